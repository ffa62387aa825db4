"""The fused numba kernel behind the ``numba`` backend: every table and feature in one call.

Layout (built once by `impls.numba_fused`): each table stays where the caller's tensor holds it;
the kernel gets its address, rows, dim and storage kind (float32, float16 or bfloat16, widened
to float32 here by typed LLVM loads). So tables of mixed dims and dtypes need neither padding,
nor a stacking copy, nor grouping, and one call computes the whole batch.

The work: `pool` takes the KeyedJaggedTensor as it comes (feature-major ``values`` and
``lengths``) and splits the samples into chunks, one ``prange`` iteration each. A serial first
pass sums each (feature, chunk) slice of ``lengths`` (checking every length) and prefix-sums those
sums into start offsets; then the one parallel pass walks, within its chunk,
features outside and samples inside, so ``values`` is read contiguously. Each bag is summed into
a per-thread float32 accumulator and written to the output once. The row of the id
``ahead_by`` positions ahead is prefetched: a random row is a cache miss, and issuing it
early hides most of the memory latency (see /work/shared/PERF-NOTES.md).

Ids are checked against their table inside the main pass: an unsigned compare catches negative
and too-large ids in one test, the first bad position per chunk is recorded, and the caller raises
after the kernel. No out-of-range row is ever read. Structural errors (negative or impossibly
large lengths, lengths that do not add up to the number of ids) are found in the first pass,
before any id is read.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

# Error codes written to ``err[0]`` (``err[1:4]`` = position, value, limit), read by the adapter.
OK = 0
BAD_LENGTH = 1
LENGTHS_MISMATCH = 2
BAD_ID = 3

# Storage kinds of a table (``table_kind``).
KIND_F32 = 0
KIND_F16 = 1
KIND_BF16 = 2


def _pointer(builder, address, pointee):
    return builder.inttoptr(address, ir.PointerType(pointee))


@intrinsic
def _prefetch(typingctx, address):  # noqa: ARG001 - numba's intrinsic signature
    """Hint the CPU to fetch the cache line at ``address`` (``llvm.prefetch``; never faults)."""
    if address != types.uint64:
        return None

    def codegen(context, builder, sig, args):
        i32 = ir.IntType(32)
        fn = cgutils.get_or_insert_function(
            builder.module,
            ir.FunctionType(ir.VoidType(), [cgutils.voidptr_t, i32, i32, i32]),
            "llvm.prefetch.p0",
        )
        builder.call(fn, [_pointer(builder, args[0], ir.IntType(8)), i32(0), i32(3), i32(1)])
        return context.get_dummy_value()

    return types.void(address), codegen


@intrinsic
def _load_f32(typingctx, address, index):  # noqa: ARG001
    """The float32 at ``address`` (a row's first byte) plus ``index`` elements."""
    if address != types.uint64 or not isinstance(index, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        ptr = builder.gep(_pointer(builder, args[0], ir.FloatType()), [args[1]], inbounds=True)
        return builder.load(ptr)

    return types.float32(address, index), codegen


@intrinsic
def _load_f16(typingctx, address, index):  # noqa: ARG001
    """The float16 at ``address`` plus ``index`` elements, widened exactly to float32 (``fpext``)."""
    if address != types.uint64 or not isinstance(index, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        ptr = builder.gep(_pointer(builder, args[0], ir.HalfType()), [args[1]], inbounds=True)
        return builder.fpext(builder.load(ptr), ir.FloatType())

    return types.float32(address, index), codegen


@intrinsic
def _load_bf16(typingctx, address, index):  # noqa: ARG001
    """The bfloat16 at ``address`` plus ``index`` elements, widened exactly: its bits are a
    float32's upper 16 bits."""
    if address != types.uint64 or not isinstance(index, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        i32 = ir.IntType(32)
        ptr = builder.gep(_pointer(builder, args[0], ir.IntType(16)), [args[1]], inbounds=True)
        wide = builder.shl(builder.zext(builder.load(ptr), i32), i32(16))
        return builder.bitcast(wide, ir.FloatType())

    return types.float32(address, index), codegen


@intrinsic
def _load_i64(typingctx, address, index):  # noqa: ARG001
    """The int64 at ``address`` plus ``index`` elements."""
    if address != types.uint64 or not isinstance(index, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        ptr = builder.gep(_pointer(builder, args[0], ir.IntType(64)), [args[1]], inbounds=True)
        return builder.load(ptr)

    return types.int64(address, index), codegen


def _make_pool_feature(load):
    """The loop over one feature's bags for one storage kind; ``load`` reads an element as float32.

    A factory rather than a function argument: a dispatcher passed as an argument would make the
    calling kernel uncacheable (numba treats it as a dynamic global).
    """

    @njit
    def pool_feature(
        address, rows, dim, row_bytes, ids, lengths, per_sample, has_weights, is_mean, ahead_by,
        prefetch_bytes, first_bag, s0, s1, start, stop, out, col, acc,
    ):  # fmt: skip
        """Pool samples ``s0..s1`` of one feature: bags ``first_bag + s``, ids ``values[start:stop]``.

        Writes ``out[s, col:col + dim]``; returns the position of the first id outside the table, or -1.
        """
        last = stop - 1
        first_bad = -1
        pos = start
        for s in range(s0, s1):
            n = np.int64(lengths[first_bag + s])
            for d in range(dim):
                acc[d] = 0.0
            for p in range(pos, pos + n):
                ahead = np.uint64(_load_i64(ids, min(p + ahead_by, last)))
                if ahead < rows:
                    ahead_address = address + ahead * row_bytes
                    for offset in range(0, prefetch_bytes, 64):
                        _prefetch(ahead_address + np.uint64(offset))
                row = np.uint64(_load_i64(ids, p))
                if row >= rows:
                    if first_bad < 0:
                        first_bad = p
                    continue
                row_address = address + row * row_bytes
                if has_weights:
                    w = per_sample[p]
                    for d in range(dim):
                        acc[d] += w * load(row_address, d)
                else:
                    for d in range(dim):
                        acc[d] += load(row_address, d)
            pos += n
            if is_mean and n > 0:
                divisor = np.float32(n)
                for d in range(dim):
                    out[s, col + d] = acc[d] / divisor
            else:
                for d in range(dim):
                    out[s, col + d] = acc[d]
        return first_bad

    return pool_feature


_pool_f32 = _make_pool_feature(_load_f32)
_pool_f16 = _make_pool_feature(_load_f16)
_pool_bf16 = _make_pool_feature(_load_bf16)


@njit(inline="always")
def _first_error(per_chunk):
    """The smallest recorded position (-1 marks a chunk without error), or -1."""
    first = -1
    for c in range(per_chunk.shape[0]):
        if per_chunk[c] >= 0 and (first < 0 or per_chunk[c] < first):
            first = per_chunk[c]
    return first


@njit(parallel=True, cache=True, nogil=True)
def pool(
    ids,
    n_ids,
    lengths,
    per_sample,
    has_weights,
    feature_table,
    feature_col,
    table_address,
    table_rows,
    table_dim,
    table_kind,
    table_mean,
    chunk,
    ahead_by,
    prefetch_lines,
    out,
    err,
):
    """Pool a whole batch into ``out`` ``[batch, total_dim]`` (float32); errors go to ``err``.

    The ``n_ids`` int64 ids are read from address ``ids``.

    ``feature_table[f]`` is the table of batch key ``f`` and ``feature_col[f]`` its first output
    column. Table ``t`` is a C-contiguous ``[table_rows[t], table_dim[t]]`` array at address
    ``table_address[t]``, stored as ``table_kind[t]`` (a ``KIND_*`` code); the caller keeps it alive.
    Bags are pooled ``chunk`` samples per parallel work item, prefetching the row of the id
    ``ahead_by`` positions ahead. ``err`` (int64[4]) receives the code, position, value and limit
    of the first error.
    """
    n_features = feature_table.shape[0]
    batch = out.shape[0]
    n_chunks = (batch + chunk - 1) // chunk
    # starts[f, c]: position in values of the first id of feature f, chunk c; starts[f, n_chunks]
    # is the end of feature f. Filled with per-slice sums first, then prefix-summed.
    starts = np.zeros((n_features, n_chunks + 1), np.int64)
    # A length outside 0..n_ids is an error; the upper limit also keeps the sums from overflowing.
    bad_length = -1
    for f in range(n_features):
        for c in range(n_chunks):
            total = 0
            for i in range(f * batch + c * chunk, f * batch + min(batch, (c + 1) * chunk)):
                n = np.int64(lengths[i])
                if (n < 0 or n > n_ids) and bad_length < 0:
                    bad_length = i
                total += n
            starts[f, c] = total
    if bad_length >= 0:
        err[0] = BAD_LENGTH
        err[1] = bad_length
        err[2] = lengths[bad_length]
        err[3] = n_ids
        return
    position = 0
    for f in range(n_features):
        for c in range(n_chunks):
            size = starts[f, c]
            starts[f, c] = position
            position += size
        starts[f, n_chunks] = position
    if position != n_ids:
        err[0] = LENGTHS_MISMATCH
        err[2] = position
        err[3] = n_ids
        return
    max_dim = 1
    for t in range(table_dim.shape[0]):
        max_dim = max(max_dim, table_dim[t])
    bad = np.full(n_chunks, -1, np.int64)
    for c in prange(n_chunks):
        acc = np.empty(max_dim, np.float32)
        s0 = c * chunk
        s1 = min(batch, s0 + chunk)
        for f in range(n_features):
            t = feature_table[f]
            kind = table_kind[t]
            address = np.uint64(table_address[t])
            rows = np.uint64(table_rows[t])
            dim = table_dim[t]
            row_bytes = np.uint64(dim * (4 if kind == KIND_F32 else 2))
            prefetch_bytes = min(dim * (4 if kind == KIND_F32 else 2), 64 * prefetch_lines)
            table = (address, rows, dim, row_bytes)
            batch_data = (
                ids,
                lengths,
                per_sample,
                has_weights,
                table_mean[t],
                ahead_by,
                prefetch_bytes,
            )
            where = (f * batch, s0, s1, starts[f, c], starts[f, c + 1], out, feature_col[f], acc)
            if kind == KIND_F32:
                first_bad = _pool_f32(*table, *batch_data, *where)
            elif kind == KIND_F16:
                first_bad = _pool_f16(*table, *batch_data, *where)
            else:
                first_bad = _pool_bf16(*table, *batch_data, *where)
            if first_bad >= 0 and bad[c] < 0:
                bad[c] = first_bad
    first = _first_error(bad)
    if first >= 0:
        err[0] = BAD_ID
        err[1] = first
        err[2] = _load_i64(ids, first)
