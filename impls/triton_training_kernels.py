"""The Triton kernel of the ``triton`` backend's training step: backward and optimizer in one launch.

The occurrences of the batch's ids have been grouped by (table, row) before the launch
(`impls.triton_training`: a stable sort of a global row key, then ``unique_consecutive``), so
every *unique row* is a segment of positions in batch order. `update_kernel_body`'s program
``p`` owns ``BLOCK_R`` consecutive unique rows, each a whole row of ``BLOCK_D`` columns (masked
to its table's dim):

1. it loads the rows (before the update) and their optimizer state;
2. it walks their segments together: step ``j`` takes the ``j``-th occurrence of every row at
   once, gathers its ``grad_output`` slice (``[BLOCK_R, BLOCK_D]``, each row contiguous: a warp
   reads whole rows), writes the occurrence's per-sample weight gradient (the dot product of the
   row *before* the update with that slice; every position belongs to exactly one segment, so one
   program writes it), scales the slice by the per-sample weight or by ``fl(1 / bag length)``
   (MEAN: computed on the host, IEEE) and adds it to the row's gradient, in batch order;
3. it applies the optimizer to its rows and writes rows and state back.

No two programs touch the same row, and no atomics are used: the result does not depend on the
schedule (the same bits on every run). Each row is read and written once per step, whatever its
number of duplicates.

Arithmetic is float32 with one IEEE rounding per operation: ``tl.div_rn`` and ``tl.sqrt_rn``,
because compiled ``/`` is ``div.full.f32`` (about 2 ulp) and ``tl.sqrt`` is
``sqrt.approx.ftz.f32`` (flushes subnormals): neither is within the tolerance's assumptions. The
compiler may fuse a product and a sum into an FMA (one rounding instead of two: within them too).
bfloat16 values are widened and rounded (to nearest even) with integer operations, not Triton's
conversions: under the interpreter, ``.to(tl.float32)`` of a bfloat16 subnormal is wrong
(cases/known/triton-interpreter-bfloat16-subnormal.json) and ``.to(tl.bfloat16)`` truncates;
compiled, the integer code gives the same bits as the hardware conversions.

As in `impls.triton_kernels`, the body is a plain function wrapped per mode (`kernel`), and uses
only Triton builtins: the interpreter cannot call Triton's own ``tl.sum`` or ``tl.max`` (they
were decorated compiled-only). Its reductions are ``tl.reduce`` with the combine functions those
use, ``tl.standard._sum_combine`` and ``_elementwise_max``: the interpreter recognises them and
reduces with numpy (any other combine function it calls element by element in Python, thousands
of times slower). All address arithmetic is int64.
"""

from __future__ import annotations

import functools
from typing import Any

import triton
import triton.language as tl

# Optimizer kinds and weight-decay modes (constexpr: a kernel may only read constexpr globals).
SGD = tl.constexpr(0)
ADAGRAD = tl.constexpr(1)
ROWWISE_ADAGRAD = tl.constexpr(2)
DECAY_NONE = tl.constexpr(0)
DECAY_L2 = tl.constexpr(1)
DECAY_DECOUPLED = tl.constexpr(2)
# The storage dtype of the rows a launch updates (one launch per dtype present).
STORE_F32 = tl.constexpr(0)
STORE_F16 = tl.constexpr(1)
STORE_BF16 = tl.constexpr(2)

OPTIMIZER_KIND = {"sgd": SGD.value, "adagrad": ADAGRAD.value, "rowwise_adagrad": ROWWISE_ADAGRAD.value}
DECAY_MODE = {"none": DECAY_NONE.value, "l2": DECAY_L2.value, "decoupled": DECAY_DECOUPLED.value}


def update_kernel_body(
    order,  # int64 [n_ids]: the batch's positions sorted by (table, row), stably (batch order within a row)
    occ_grad,  # int64 [n_ids]: per sorted occurrence, its grad_output slice's first element
    occ_scale,  # float32 [n_ids]: per sorted occurrence, its per-sample weight or 1 / its MEAN bag's length
    seg_start,  # int64 [n_unique]: where each unique row's occurrences start in the sorted order
    seg_count,  # int64 [n_unique]: how many there are
    seg_key,  # int64 [n_unique]: the row's global key (its table's first key + id)
    seg_table,  # int64 [n_unique]: the row's table (an index into the tab_* arrays)
    grad,  # float32 [batch, width]: grad_output
    weights,  # the launch's storage dtype: the tables of that dtype, back to back (read and written)
    moments,  # float32: adagrad one per element (tab_state + id * dim + column), rowwise one per key
    psw_grad,  # float32 [n_ids]: written with each position's per-sample weight gradient (HAS_WEIGHTS)
    hyper,  # float32 [3]: learning rate, eps, weight decay
    tab_base,  # int64 [n_tables]: the table's first element in ``weights``
    tab_dim,  # int64 [n_tables]
    tab_key0,  # int64 [n_tables]: the table's first global key
    tab_state,  # int64 [n_tables]: the table's first element in ``moments`` (adagrad)
    first,  # the launch's first unique row
    end,  # one past its last
    KIND: tl.constexpr,
    DECAY: tl.constexpr,
    STORE: tl.constexpr,
    HAS_WEIGHTS: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
    VEC: tl.constexpr,
    UNROLL: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = first + pid * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    row_live = rows < end
    start = tl.load(seg_start + rows, mask=row_live, other=0)
    count = tl.load(seg_count + rows, mask=row_live, other=0)
    key = tl.load(seg_key + rows, mask=row_live, other=0)
    tab = tl.load(seg_table + rows, mask=row_live, other=0)
    dim = tl.load(tab_dim + tab, mask=row_live, other=0)
    row_id = key - tl.load(tab_key0 + tab, mask=row_live, other=0)
    element = tl.load(tab_base + tab, mask=row_live, other=0) + row_id * dim
    if VEC > 1:
        # Every dim, table base and column is a multiple of VEC: rows move as 16-byte vectors.
        dim = tl.multiple_of(dim, VEC)
        element = tl.multiple_of(element, VEC)
    cols = tl.arange(0, BLOCK_D)
    live = row_live[:, None] & (cols[None, :] < dim[:, None])
    where = element[:, None] + cols[None, :]

    if STORE == STORE_BF16:
        bits = tl.load(weights + where, mask=live, other=0.0).to(tl.int16, bitcast=True)
        w = (bits.to(tl.int32) << 16).to(tl.float32, bitcast=True)
    else:
        w = tl.load(weights + where, mask=live, other=0.0).to(tl.float32)

    steps = tl.reduce(count, 0, tl.standard._elementwise_max)
    acc = tl.full([BLOCK_R, BLOCK_D], 0.0, tl.float32)
    for j0 in range(0, steps, UNROLL):
        # UNROLL occurrences of every row per iteration, unrolled: their loads are all in flight.
        for u in tl.static_range(UNROLL):
            j = j0 + u
            occurs = j < count
            at = start + j
            column = tl.load(occ_grad + at, mask=occurs, other=0)
            if VEC > 1:
                column = tl.multiple_of(column, VEC)
            g = tl.load(grad + (column[:, None] + cols[None, :]), mask=occurs[:, None] & live, other=0.0)
            if HAS_WEIGHTS:
                pos = tl.load(order + at, mask=occurs, other=0)
                tl.store(psw_grad + pos, tl.reduce(w * g, 1, tl.standard._sum_combine), mask=occurs)
            if HAS_SCALE:
                g = g * tl.load(occ_scale + at, mask=occurs, other=0.0)[:, None]
            acc += g

    lr = tl.load(hyper)
    eps = tl.load(hyper + 1)
    wd = tl.load(hyper + 2)
    if DECAY == DECAY_L2:
        h = acc + wd * w
    else:
        h = acc
    if DECAY == DECAY_DECOUPLED:
        kept = (1.0 - lr * wd) * w
        step = acc
    else:
        kept = w
        step = h
    if KIND == SGD:
        new = kept - lr * step
    elif KIND == ADAGRAD:
        state = (tl.load(tab_state + tab, mask=row_live, other=0) + row_id * dim)[:, None] + cols[None, :]
        m = tl.load(moments + state, mask=live, other=0.0) + h * h
        tl.store(moments + state, m, mask=live)
        new = kept - tl.div_rn(lr * step, tl.sqrt_rn(m) + eps)
    else:
        mean = tl.div_rn(tl.reduce(h * h, 1, tl.standard._sum_combine), tl.maximum(dim, 1).to(tl.float32))
        m = tl.load(moments + key, mask=row_live, other=0.0) + mean
        tl.store(moments + key, m, mask=row_live)
        mu = tl.div_rn(lr, tl.sqrt_rn(m) + eps)
        new = kept - mu[:, None] * step

    if STORE == STORE_BF16:
        # Round to nearest even on the bits; a NaN stays a (quiet) NaN.
        b32 = new.to(tl.int32, bitcast=True)
        rounded = (b32 + 0x7FFF + ((b32 >> 16) & 1)) >> 16
        rounded = tl.where(new != new, 0x7FC0, rounded)
        tl.store(weights + where, rounded.to(tl.int16).to(tl.bfloat16, bitcast=True), mask=live)
    elif STORE == STORE_F16:
        tl.store(weights + where, new.to(tl.float16), mask=live)
    else:
        tl.store(weights + where, new, mask=live)


@functools.cache
def kernel(interpret: bool) -> Any:
    """The kernel, compiled by ``triton.jit`` or run by Triton's interpreter (CPU tensors)."""
    if interpret:
        from triton.runtime.interpreter import InterpretedFunction

        return InterpretedFunction(update_kernel_body)
    return triton.jit(update_kernel_body, do_not_specialize=["first", "end"])
