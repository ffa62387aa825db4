"""The fused training kernel behind the ``numba`` backend: forward, backward and optimizer, one call.

`train_step` runs one training step over every table of a batch in two parallel passes (numba
``prange``), with no atomics: each table belongs to exactly one thread, so every row, every
optimizer state and every output column has one writer.

1. *Group* (serial, O(features x samples)): the lengths are checked and summed per feature; each
   table's occurrences (every id of every feature that reads it) get a contiguous slice of the
   sort buffers; the tables are dealt to ``n_groups`` groups (one per thread) largest first, each
   to the least loaded group (cost: ids x dim).
2. *Sort* (parallel over groups): each table's occurrences are linearised into 64-bit keys
   ``row << 32 | position`` (checking every id: a bad one is recorded, never read), and sorted by
   row with a least-significant-digit radix sort (one histogram read for every digit, then one
   scatter per digit of at most 2^11 buckets; a table of few ids uses a comparison sort of the
   same keys). Every key is distinct and the order of equal rows is their position, so both give
   the same order: the batch's. A bad id stops the step here, before anything is written.
3. *Walk* (parallel over groups): each table's sorted keys are walked run by run, one run per
   distinct row. The row is read once (widened to float32) and the rows ``ahead`` occurrences on
   are prefetched, with their optimizer state. For each occurrence of the row: its per-sample
   weight gradient is the dot product of the row *before* the update with grad_output's columns
   of its feature; its gradient term ``scale * grad_output`` is added into the row's gradient
   ``G``; and (``fuse_forward``) its forward term ``scale * row`` is added into its bag's output,
   so the forward lookup reads each distinct row once, the same read as the update. When the run
   ends, the optimizer updates the row from ``G`` (float32), while the row is hot, and the result
   is rounded once to the table's dtype and stored.

``scale`` is the per-sample weight (weighted SUM), ``fl(1 / L)`` (MEAN) or 1. grad_output's
columns of a table's features are first copied into a contiguous per-thread buffer
(``stage``: ``[features x samples, dim]``), and the forward terms go to a second one, copied
out to ``out`` at the end: the occurrences visit bags in row order, and in ``grad_output`` (and
``out``) a feature's columns of successive samples lie a whole output row apart, a stride that
maps them onto a few cache sets.

Arithmetic is float32 throughout (state included) with no fast-math flags, so nothing is
reassociated behind our back; the sums whose order we choose (the dot products and the rowwise
mean of ``G'^2``) run in eight lanes added pairwise, an order the tolerance allows (any tree).
The terms of ``G`` are added in the batch's order, and the forward terms of a bag in the order of
its distinct rows. The result depends on neither the thread count nor the grouping.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from impls.numba_codegen import KIND_F32
from impls.numba_kernels import BAD_ID, BAD_LENGTH, LENGTHS_MISMATCH, NO_LOOP
from impls.numba_training_ir import (
    ADAGRAD,
    DECOUPLED,
    FIRST_BLOCK,
    FORWARD,
    L2,
    MAX_TRAIN_WIDTH,
    ROWWISE,
    SCALED,
    UNKNOWN_RUN,
    WEIGHTED,
    train_run,
    train_update,
)

GENERATED_FROM = {
    "numba_codegen.py": "ba6c203d0ca2b9a33827177c256cd42305eae26a0d98642f586126b6a81654ec",
    "numba_kernels.py": "ebbc37c602d77617be074bd9a3bf0fd14081040a0073dbf68dad77414f644f72",
    "numba_training_ir.py": "2a668803134eeaf89bed3e039c38d307259bea002776a1a9022e08e028435e01",
}
"""The SHA-256 of each module (in ``impls/``) whose code or constants these kernels inline: numba's
disk cache sees only this file's text (see `impls.numba_kernels.GENERATED_FROM`)."""

SGD = 0
ADAGRAD_CODE = 1
ROWWISE_ADAGRAD = 2
OPTIMIZER_CODES = {"sgd": SGD, "adagrad": ADAGRAD_CODE, "rowwise_adagrad": ROWWISE_ADAGRAD}

DECAY_NONE = 0
DECAY_L2 = 1
DECAY_DECOUPLED = 2
DECAY_CODES = {"none": DECAY_NONE, "l2": DECAY_L2, "decoupled": DECAY_DECOUPLED}

# Widest radix digit: 2^11 int64 counters (16 KiB) stay in L1. A table of rows needing b bits
# sorts in ceil(b / 11) passes of equal digits (1M rows: 2 passes of 10 bits).
MAX_DIGIT_BITS = 11
# A table with fewer ids than this many times its buckets is sorted by comparison instead.
RADIX_MIN_PER_BUCKET = 2

_LOW32 = (1 << 32) - 1


@intrinsic
def _prefetch(typingctx, address):  # noqa: ARG001
    """Prefetch the cache line at ``address`` for writing (it never faults)."""
    sig = types.void(types.int64)

    def codegen(context, builder, sig, args):
        i8p = ir.PointerType(ir.IntType(8))
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
        builder.call(fn, [builder.inttoptr(args[0], i8p), i32(1), i32(3), i32(1)])
        return context.get_dummy_value()

    return sig, codegen


@njit(cache=True, nogil=True)
def _sort_table(keys, spare, base, n, rows, hist):
    """Sort ``keys[base : base + n]`` (``row << 32 | position``); returns whether the result is in
    ``spare`` (an odd number of radix passes) rather than ``keys``."""
    if n <= 1 or rows <= 1:
        return False
    bits = 0
    while (np.int64(1) << bits) < rows:
        bits += 1
    passes = (bits + MAX_DIGIT_BITS - 1) // MAX_DIGIT_BITS
    digit = (bits + passes - 1) // passes
    buckets = np.int64(1) << digit
    if n < RADIX_MIN_PER_BUCKET * buckets:
        keys[base : base + n].sort()
        return False
    mask = buckets - 1
    h = hist[: passes * buckets].reshape((passes, buckets))
    h[:, :] = 0
    for i in range(base, base + n):
        row = keys[i] >> 32
        for k in range(passes):
            h[k, (row >> (k * digit)) & mask] += 1
    src = keys
    dst = spare
    for k in range(passes):
        total = np.int64(0)
        for b in range(buckets):
            c = h[k, b]
            h[k, b] = total + base
            total += c
        shift = 32 + k * digit
        for i in range(base, base + n):
            v = src[i]
            b = (v >> shift) & mask
            dst[h[k, b]] = v
            h[k, b] += 1
        src, dst = dst, src
    return passes % 2 == 1


@njit(cache=True, nogil=True)
def _linearise(
    t, ids, lengths, per_sample, has_weights, feature_table, feature_start, batch, rows, mean,
    need_scale, keys, base, slot_of, scale_of,
):  # fmt: skip
    """Write table ``t``'s occurrences as keys at ``keys[base:]`` in the batch's order, each
    position's stage slot (``local feature x batch + sample``) and scale; returns the first bad
    position (an id outside the table: its key uses row 0), or -1."""
    bad = -1
    i = base
    local = 0
    urows = np.uint64(rows)
    for f in range(feature_table.shape[0]):
        if feature_table[f] != t:
            continue
        p = feature_start[f]
        for s in range(batch):
            length = lengths[f * batch + s]
            inverse = np.float32(1.0)
            if mean and length > 0:
                inverse = np.float32(1.0) / np.float32(length)
            slot = np.int32(local * batch + s)
            for q in range(p, p + length):
                row = ids[q]
                if np.uint64(row) >= urows:
                    if bad < 0:
                        bad = q
                    row = 0
                keys[i] = (row << 32) | q
                slot_of[q] = slot
                if need_scale:
                    scale_of[q] = per_sample[q] if has_weights else inverse
                i += 1
            p += length
        local += 1
    return bad


@njit(cache=True, nogil=True)
def _walk_table(
    src, base, n, dim, kind, address, row_bytes, run_flags, update_flags, slot_of, scale_of, gs, os,
    psw_grad, state, state_offset, hyper, ahead, wbuf, grad, scalars,
):  # fmt: skip
    """Walk one table's sorted keys ``src[base : base + n]`` (module docstring, step 3); returns 0,
    or `UNKNOWN_RUN` when a column block has no generated loop (a bug)."""
    element = 4 if kind == KIND_F32 else 2
    keys_address = src.ctypes.data
    slot_address = slot_of.ctypes.data
    scale_address = scale_of.ctypes.data
    gs_address = gs.ctypes.data
    os_address = os.ctypes.data
    psw_address = psw_grad.ctypes.data
    wbuf_address = wbuf.ctypes.data
    grad_address = grad.ctypes.data
    state_address = state.ctypes.data
    hyper_address = hyper.ctypes.data
    ss_address = scalars.ctypes.data
    mu_address = ss_address + 4
    rowwise = (update_flags & ROWWISE) != 0
    adagrad = (update_flags & ADAGRAD) != 0
    stride = dim * 4
    dim_f = np.float32(dim)
    lr = hyper[0]
    eps = hyper[1]
    lines = (row_bytes + 63) // 64
    state_lines = (dim * 4 + 63) // 64
    end = base + n
    j = base
    while j < end:
        row = src[j] >> 32
        e = j + 1
        while e < end and (src[e] >> 32) == row:
            e += 1
        if ahead > 0:
            later = src[min(j + ahead, end - 1)] >> 32
            at = address + later * row_bytes
            for line in range(lines):
                _prefetch(at + 64 * line)
            if rowwise:
                _prefetch(state_address + (state_offset + later) * 4)
            elif adagrad:
                at = state_address + (state_offset + later * dim) * 4
                for line in range(state_lines):
                    _prefetch(at + 64 * line)
        # the row's gradient G (H with l2), forward terms and per-sample weight gradients
        row_address = address + row * row_bytes
        done = 0
        while done < dim:
            width = MAX_TRAIN_WIDTH
            while width > dim - done:
                width //= 2
            code = train_run(
                kind, width, keys_address, j, e, slot_address, scale_address, gs_address + done * 4,
                os_address + done * 4, stride, row_address + done * element, wbuf_address + done * 4,
                grad_address + done * 4, psw_address, run_flags | (FIRST_BLOCK if done == 0 else 0),
                hyper_address, ss_address,
            )  # fmt: skip
            if code == UNKNOWN_RUN:
                return UNKNOWN_RUN
            done += width
        if rowwise:
            m = state[state_offset + row] + scalars[0] / dim_f
            state[state_offset + row] = m
            scalars[1] = lr / (np.sqrt(m) + eps)
        # the update, rounded once to the table's dtype
        done = 0
        while done < dim:
            width = MAX_TRAIN_WIDTH
            while width > dim - done:
                width //= 2
            state_block = state_address + (state_offset + row * dim + done) * 4
            train_update(
                kind, width, row_address + done * element, wbuf_address + done * 4,
                grad_address + done * 4, state_block, update_flags, hyper_address, mu_address,
            )  # fmt: skip
            done += width
        j = e
    return 0


@njit(parallel=True, cache=True, nogil=True)
def train_step(
    ids, lengths, per_sample, has_weights, feature_table, feature_col, table_address, table_rows,
    table_dim, table_row_bytes, table_kind, table_mean, state, state_offset, optimizer, decay_mode,
    lr, eps, wd, grad_output, out, psw_grad, keys, spare, slot_of, scale_of, stage, hist, n_groups,
    ahead, fuse_forward, err,
):  # fmt: skip
    """One training step over the whole batch (module docstring); errors go to ``err``.

    ``ids`` (int64), ``lengths`` (int64, feature-major) and ``per_sample`` (float32; a single 1.0
    without weights) are the batch; ``feature_table[f]`` / ``feature_col[f]`` the table and first
    output column of batch key ``f``. Table ``t`` is ``table_rows[t]`` x ``table_dim[t]`` elements
    of kind ``table_kind[t]`` at ``table_address[t]`` (rows ``table_row_bytes[t]`` apart), its
    optimizer state in ``state`` from ``state_offset[t]`` (per row or per element). ``optimizer``
    and ``decay_mode`` are the codes above, ``lr``, ``eps`` and ``wd`` float32 scalars.
    ``grad_output`` and ``out`` are float32 ``[batch, total_dim]``; ``psw_grad`` receives one
    per-sample weight gradient per id (when ``has_weights``). ``keys`` / ``spare`` (int64),
    ``slot_of`` (int32) and ``scale_of`` (float32, or one element when not needed) have one entry
    per id; ``stage`` (float32 ``[n_groups, 2 * size]``) and ``hist`` (int64 ``[n_groups, size]``)
    are per-thread scratch. Without ``fuse_forward``, ``out`` is left alone (the caller pooled it).
    """
    n_features = feature_table.shape[0]
    n_tables = table_rows.shape[0]
    batch = grad_output.shape[0]
    n_ids = ids.shape[0]
    # 1. lengths checked and summed per feature
    feature_start = np.zeros(n_features + 1, np.int64)
    for f in range(n_features):
        lo = lengths[f * batch : (f + 1) * batch]
        if batch > 0 and (lo.min() < 0 or lo.max() > n_ids):
            for i in range(batch):
                if lo[i] < 0 or lo[i] > n_ids:
                    err[0] = BAD_LENGTH
                    err[1] = f * batch + i
                    err[2] = lo[i]
                    err[3] = n_ids
                    return
        feature_start[f + 1] = feature_start[f] + lo.sum()
    if feature_start[n_features] != n_ids:
        err[0] = LENGTHS_MISMATCH
        err[2] = feature_start[n_features]
        err[3] = n_ids
        return
    table_n = np.zeros(n_tables, np.int64)
    table_features = np.zeros(n_tables, np.int64)
    for f in range(n_features):
        t = feature_table[f]
        table_n[t] += feature_start[f + 1] - feature_start[f]
        table_features[t] += 1
    table_base = np.zeros(n_tables, np.int64)
    for t in range(1, n_tables):
        table_base[t] = table_base[t - 1] + table_n[t - 1]
    # tables dealt to groups: largest first, each to the least loaded group
    cost = np.empty(n_tables, np.float64)
    for t in range(n_tables):
        cost[t] = table_n[t] * (table_dim[t] + 4.0) + table_features[t] * batch * table_dim[t]
    order = np.argsort(-cost)
    load = np.zeros(n_groups, np.float64)
    group_of = np.empty(n_tables, np.int64)
    for i in range(n_tables):
        g = np.argmin(load)
        group_of[order[i]] = g
        load[g] += cost[order[i]]
    need_scale = np.zeros(n_tables, np.bool_)
    for t in range(n_tables):
        need_scale[t] = has_weights or table_mean[t]
    in_spare = np.zeros(n_tables, np.bool_)
    bad = np.full(n_groups, -1, np.int64)
    # 2. linearise and sort, each table on one thread
    for g in prange(n_groups):
        for t in range(n_tables):
            if group_of[t] != g or table_n[t] == 0:
                continue
            first_bad = _linearise(
                t, ids, lengths, per_sample, has_weights, feature_table, feature_start, batch,
                table_rows[t], table_mean[t], need_scale[t], keys, table_base[t], slot_of, scale_of,
            )  # fmt: skip
            if first_bad >= 0 and (bad[g] < 0 or first_bad < bad[g]):
                bad[g] = first_bad
            in_spare[t] = _sort_table(keys, spare, table_base[t], table_n[t], table_rows[t], hist[g])
    first = -1
    for g in range(n_groups):
        if bad[g] >= 0 and (first < 0 or bad[g] < first):
            first = bad[g]
    if first >= 0:
        err[0] = BAD_ID
        err[1] = first
        err[2] = ids[first]
        return
    hyper = np.empty(4, np.float32)
    hyper[0] = lr
    hyper[1] = eps
    hyper[2] = wd
    hyper[3] = np.float32(1.0) - lr * wd
    update_flags = DECOUPLED if decay_mode == DECAY_DECOUPLED else 0
    if optimizer == ADAGRAD_CODE:
        update_flags |= ADAGRAD
    elif optimizer == ROWWISE_ADAGRAD:
        update_flags |= ROWWISE
    size = stage.shape[1] // 2
    # 3. walk each table's distinct rows: forward, gradients and update
    for g in prange(n_groups):
        wbuf = np.empty(max(1, table_dim.max()), np.float32)
        grad = np.empty(max(1, table_dim.max()), np.float32)
        scalars = np.zeros(2, np.float32)
        for t in range(n_tables):
            if group_of[t] != g:
                continue
            dim = table_dim[t]
            k = table_features[t]
            m = k * batch
            gs = stage[g, : m * dim].reshape((m, dim))
            os = stage[g, size : size + m * dim].reshape((m, dim))
            local = 0
            for f in range(n_features):
                if feature_table[f] != t:
                    continue
                col = feature_col[f]
                for s in range(batch):
                    src_row = grad_output[s, col : col + dim]
                    dst = gs[local * batch + s]
                    for d in range(dim):
                        dst[d] = src_row[d]
                local += 1
            if fuse_forward:
                os[:, :] = 0
            if table_n[t] > 0:
                run_flags = (SCALED if need_scale[t] else 0) | (WEIGHTED if has_weights else 0)
                run_flags |= (FORWARD if fuse_forward else 0) | (L2 if decay_mode == DECAY_L2 else 0)
                code = _walk_table(
                    spare if in_spare[t] else keys, table_base[t], table_n[t], dim, table_kind[t],
                    table_address[t], table_row_bytes[t], run_flags, update_flags, slot_of, scale_of, gs,
                    os, psw_grad, state, state_offset[t], hyper, ahead, wbuf, grad, scalars,
                )  # fmt: skip
                if code == UNKNOWN_RUN:
                    err[0] = NO_LOOP
            if fuse_forward:
                local = 0
                for f in range(n_features):
                    if feature_table[f] != t:
                        continue
                    col = feature_col[f]
                    for s in range(batch):
                        src_row = os[local * batch + s]
                        dst = out[s, col : col + dim]
                        for d in range(dim):
                            dst[d] = src_row[d]
                    local += 1
