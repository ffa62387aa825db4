"""The Triton kernel of the ``triton`` backend: every table and feature of a batch in one launch.

The kernel body, `pool_kernel_body`, is a plain function. `kernel(interpret)` wraps it
explicitly, and only when first asked:

- ``interpret=False``: ``triton.jit`` (compiled for the GPU on its first launch);
- ``interpret=True``: Triton's interpreter (``triton.runtime.interpreter.InterpretedFunction``),
  which runs the same body with numpy on CPU tensors.

So the mode is chosen by the caller, per kernel object, and never by a process-wide
``TRITON_INTERPRET`` that ``triton.jit`` reads when a module is imported. (If a user does set
``TRITON_INTERPRET=1``, ``triton.jit`` itself returns an interpreted function and the "compiled"
kernel is interpreted too: slower, still correct.) One consequence: Triton's own library
functions (``tl.max``, ``tl.cdiv``, ``tl.zeros``) were decorated by ``triton.jit`` when
``triton.language`` was imported, so without ``TRITON_INTERPRET`` they are compiled-only and the
interpreter refuses to call them. The body therefore uses only Triton builtins (which the
interpreter patches on every call) plus `_larger`, a combine function that both modes can call
(the interpreter calls its ``.fn``).

``EXACT_BF16`` (the training step sets it) widens bfloat16 rows by their bits instead of
``.to(tl.float32)``, whose interpreter version turns subnormals wrong
(cases/known/triton-interpreter-bfloat16-subnormal.json); compiled, both give the same bits.

Work decomposition (see docs/triton.md for the why): program ``(p, q)`` pools ``BLOCK_B``
consecutive samples of one feature (``p`` = feature * sample blocks + block) over columns
``q * BLOCK_D .. q * BLOCK_D + BLOCK_D`` of that feature's table. Each step of its loop gathers
the j-th row of all ``BLOCK_B`` bags at once, a ``[BLOCK_B, BLOCK_D]`` tile whose rows are
contiguous, so a warp reads whole rows (coalesced, vectorised along the dim); ``UNROLL`` steps are
unrolled, so ``UNROLL * BLOCK_B`` rows are in flight per program. Tables live in one buffer per
dtype; each feature knows its table's first element there (int64: the buffers pass 2**31
elements). All address arithmetic is int64.
"""

from __future__ import annotations

import functools
from typing import Any

import triton
import triton.language as tl

# Kinds of weight storage; the kernel reads a feature's rows from the buffer of its kind.
# (constexpr: a Triton kernel may only read globals that are constexpr.)
KIND_F32 = tl.constexpr(0)
KIND_F16 = tl.constexpr(1)
KIND_BF16 = tl.constexpr(2)
# Row-wise quantized tables: 8-, 4- or 2-bit codes (``8 >> (kind - KIND_I8)`` bits) packed
# LSB-first in the codes buffer, each row's fp16 scale and bias in the qparams buffer.
KIND_I8 = tl.constexpr(3)
KIND_I4 = tl.constexpr(4)
KIND_I2 = tl.constexpr(5)
# The ``ONLY_KIND`` of a launch whose tables have more than one storage dtype.
MIXED = tl.constexpr(-1)


@triton.jit
def _larger(a, b):
    """The combine function of a max-reduction, defined here (see the module's docstring)."""
    return tl.maximum(a, b)


def pool_kernel_body(
    values,  # int32 or int64 [n_ids]: every id, feature after feature (the KJT layout)
    offsets,  # int64 [n_keys * batch + 1]: bag i is values[offsets[i]:offsets[i + 1]]
    per_sample,  # float32 [n_ids] per-sample weights (ignored unless HAS_WEIGHTS)
    w_a,  # the weights buffer (ONLY_KIND >= 0), or the float32 buffer (mixed)
    w_b,  # the float16 buffer (mixed only; a 1-element dummy otherwise)
    w_c,  # the bfloat16 buffer (mixed only; a 1-element dummy otherwise)
    w_q,  # uint8: quantized tables' packed codes, row after row (a 1-element dummy without them)
    w_s,  # float16: quantized tables' rows' scale and bias, interleaved (a 1-element dummy without them)
    feat_base,  # int64 [n_keys]: element offset of the key's table in its buffer (quantized: byte offset)
    feat_dim,  # int64 [n_keys]: embedding_dim of the key's table
    feat_col,  # int64 [n_keys]: first output column of the key
    feat_mean,  # int64 [n_keys]: 1 when the key's table pools by MEAN
    feat_kind,  # int64 [n_keys]: KIND_* of the key's table (read when mixed)
    feat_rows,  # int64 [n_keys]: num_embeddings of the key's table
    feat_qrow,  # int64 [n_keys]: the key's quantized table's first row in w_s (0 for float tables)
    error,  # int64 [1]: set to 1 when an id is outside its table (that id is skipped, not read)
    out,  # float32 [batch, out_stride]
    batch,
    out_stride,
    BLOCK_B: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_WEIGHTS: tl.constexpr,
    HAS_MEAN: tl.constexpr,
    ONLY_KIND: tl.constexpr,
    VEC: tl.constexpr,
    UNROLL: tl.constexpr,
    EXACT_BF16: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_d = tl.program_id(1)
    blocks_per_feature = (batch + BLOCK_B - 1) // BLOCK_B
    f = pid // blocks_per_feature
    blk = pid % blocks_per_feature

    dim = tl.load(feat_dim + f)
    base = tl.load(feat_base + f)
    col0 = tl.load(feat_col + f)
    num_rows = tl.load(feat_rows + f)
    if VEC > 1:
        # Every dim, table base and column is a multiple of VEC: tell the compiler, so that a
        # row's columns are read and written as 16-byte vectors.
        dim = tl.multiple_of(dim, VEC)
        base = tl.multiple_of(base, VEC)
        col0 = tl.multiple_of(col0, VEC)
        out_stride = tl.multiple_of(out_stride, VEC)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    col_live = cols < dim

    samples = blk * BLOCK_B + tl.arange(0, BLOCK_B)
    sample_live = samples < batch
    bag = f.to(tl.int64) * batch + samples
    start = tl.load(offsets + bag, mask=sample_live, other=0)
    length = tl.load(offsets + bag + 1, mask=sample_live, other=0) - start
    steps = tl.reduce(length, 0, _larger)
    # A program whose column block lies past this feature's dim has nothing to do.
    steps = tl.where(pid_d * BLOCK_D < dim, steps, 0)

    acc = tl.full([BLOCK_B, BLOCK_D], 0.0, tl.float32)
    if ONLY_KIND == MIXED:
        kind = tl.load(feat_kind + f)
    else:
        kind = ONLY_KIND
    # Quantized tables: a row's codes start at base + id * row_bytes; column c's code is in byte
    # c // per_byte at bit (c % per_byte) * bits. (Float kinds give some other bits, never used.)
    bits = 8 >> ((kind - KIND_I8) & 3)
    per_byte = 8 // bits
    row_bytes = (dim * bits + 7) // 8
    qrow = tl.load(feat_qrow + f)
    code_byte = (cols // per_byte)[None, :]
    code_shift = ((cols % per_byte) * bits)[None, :]
    # Bags that met an id outside their table; flagged once after the loop (a store inside it would
    # keep the compiler from issuing the next step's loads early).
    outside = samples < 0
    for j0 in range(0, steps, UNROLL):
        # UNROLL steps per iteration, unrolled: their row loads are all in flight before any add.
        for u in tl.static_range(UNROLL):
            j = j0 + u
            live = j < length
            pos = start + j
            ids = tl.load(values + pos, mask=live, other=0).to(tl.int64)
            inside = (ids >= 0) & (ids < num_rows)
            outside |= live & ~inside
            live = live & inside
            element = base + ids * dim
            where = element[:, None] + cols[None, :]
            mask = live[:, None] & col_live[None, :]
            if ONLY_KIND == MIXED:
                if kind == KIND_F32:
                    rows = tl.load(w_a + where, mask=mask, other=0.0).to(tl.float32)
                elif kind == KIND_F16:
                    rows = tl.load(w_b + where, mask=mask, other=0.0).to(tl.float32)
                elif kind == KIND_BF16:
                    rows = tl.load(w_c + where, mask=mask, other=0.0)
                    if EXACT_BF16:
                        widened = rows.to(tl.int16, bitcast=True).to(tl.int32) << 16
                        rows = widened.to(tl.float32, bitcast=True)
                    else:
                        rows = rows.to(tl.float32)
                else:
                    codes = tl.load(w_q + ((base + ids * row_bytes)[:, None] + code_byte), mask=mask, other=0)
                    codes = (codes.to(tl.int32) >> code_shift) & ((1 << bits) - 1)
                    qparam = (qrow + ids) * 2
                    scale = tl.load(w_s + qparam, mask=live, other=0.0).to(tl.float32)
                    shift = tl.load(w_s + qparam + 1, mask=live, other=0.0).to(tl.float32)
                    # The product is exact (fp16 scale x code < 256): an FMA here rounds the same.
                    rows = codes.to(tl.float32) * scale[:, None] + shift[:, None]
            elif ONLY_KIND >= KIND_I8:
                codes = tl.load(w_q + ((base + ids * row_bytes)[:, None] + code_byte), mask=mask, other=0)
                codes = (codes.to(tl.int32) >> code_shift) & ((1 << bits) - 1)
                qparam = (qrow + ids) * 2
                scale = tl.load(w_s + qparam, mask=live, other=0.0).to(tl.float32)
                shift = tl.load(w_s + qparam + 1, mask=live, other=0.0).to(tl.float32)
                rows = codes.to(tl.float32) * scale[:, None] + shift[:, None]
            else:
                rows = tl.load(w_a + where, mask=mask, other=0.0)
                if ONLY_KIND == KIND_BF16 and EXACT_BF16:
                    # The bits widened by hand: exact in both modes (the module docstring).
                    rows = (rows.to(tl.int16, bitcast=True).to(tl.int32) << 16).to(tl.float32, bitcast=True)
                else:
                    rows = rows.to(tl.float32)
            if HAS_WEIGHTS:
                weight = tl.load(per_sample + pos, mask=live, other=0.0)
                rows = rows * weight[:, None]
            acc += rows

    tl.store(error + samples * 0, outside.to(tl.int64), mask=outside)

    if HAS_MEAN:
        if tl.load(feat_mean + f) != 0:
            # div_rn: compiled, `/` is div.full.f32 (about 2 ulp), not one IEEE rounding.
            acc = tl.div_rn(acc, tl.maximum(length, 1).to(tl.float32)[:, None])

    target = samples.to(tl.int64)[:, None] * out_stride + (col0 + cols)[None, :]
    tl.store(out + target, acc, mask=sample_live[:, None] & col_live[None, :])


@functools.cache
def kernel(interpret: bool) -> Any:
    """The kernel, compiled by ``triton.jit`` or run by Triton's interpreter (CPU tensors)."""
    if interpret:
        from triton.runtime.interpreter import InterpretedFunction

        return InterpretedFunction(pool_kernel_body)
    # Batch size and output width change from call to call: compiling a variant for each value
    # Triton would specialise on (1, multiples of 16) buys nothing here (VEC says what matters).
    return triton.jit(pool_kernel_body, do_not_specialize=["batch", "out_stride"])
