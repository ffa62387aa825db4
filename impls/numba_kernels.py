"""The fused numba kernel behind the ``numba`` backend: every table and feature in one call.

Layout (built once by `impls.numba_fused`): each table stays where the caller's tensor holds it;
the kernel gets its address, rows, dim, row size and storage kind (float32, float16 or bfloat16,
widened to float32 in registers; or int8 / int4 / int2 quantized rows, packed once by the adapter
into FBGEMM's row layout and dequantized in registers). So tables of mixed dims and dtypes need
neither padding, nor a stacking copy, nor grouping, and one call computes the whole batch.

The work: `pool` takes the KeyedJaggedTensor as it comes (feature-major ``values`` and
``lengths``) and splits the samples into chunks, one ``prange`` iteration each. A serial first
pass sums each (feature, chunk) slice of ``lengths`` (checking every length) and prefix-sums those
sums into start offsets; then the one parallel pass walks, within its chunk, features outside and
samples inside, so ``values`` is read contiguously. Each (feature, chunk) run of bags is pooled by
a loop generated in LLVM IR (`impls.numba_codegen.pool_block`) per column block of the table's
dim: the bag's sum stays in vector registers (one FMA per id) and is written to the output once,
and the row of the id ``ahead_by`` positions ahead is prefetched (a random row is a cache miss;
issuing it early hides most of the memory latency, see /work/shared/PERF-NOTES.md).

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
from numba.extending import intrinsic

from impls.numba_codegen import (
    KIND_BF16,
    KIND_F16,
    KIND_F32,
    KIND_I2,
    KIND_I4,
    KIND_I8,
    MAX_WIDTH,
    QPARAM_BYTES,
    UNKNOWN_BLOCK,
    pool_block,
)

GENERATED_FROM = {"numba_codegen.py": "ba6c203d0ca2b9a33827177c256cd42305eae26a0d98642f586126b6a81654ec"}
"""The SHA-256 of each module (in ``impls/``) whose generated code these kernels inline. numba's disk
cache keys a kernel on the text of the file that defines it, not on the modules whose IR it inlines:
without this an edit of `impls.numba_codegen` alone would load the previous build from the cache (in
a clone, or in an installed package after an upgrade). ``tests/test_numba.py`` keeps it equal to the
files, so such an edit changes this file too."""

# Error codes written to ``err[0]`` (``err[1:4]`` = position, value, limit), read by the adapter.
OK = 0
BAD_LENGTH = 1
LENGTHS_MISMATCH = 2
BAD_ID = 3
NO_LOOP = 4  # no generated loop for a table's (storage kind, block width): a bug, not bad input

__all__ = ["KIND_BF16", "KIND_F16", "KIND_F32", "KIND_I2", "KIND_I4", "KIND_I8", "pool"]


@intrinsic
def _address(typingctx, array):  # noqa: ARG001 - numba's intrinsic signature
    """The address of an array's first element, as int64."""
    if not isinstance(array, types.Array):
        return None

    def codegen(context, builder, sig, args):
        data = context.make_array(sig.args[0])(context, builder, args[0]).data
        return builder.ptrtoint(data, ir.IntType(64))

    return types.int64(array), codegen


@intrinsic
def _load_i64(typingctx, address, index):  # noqa: ARG001
    """The int64 at ``address`` plus ``index`` elements."""
    if not isinstance(address, types.Integer) or not isinstance(index, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        ptr = builder.inttoptr(args[0], ir.PointerType(ir.IntType(64)))
        return builder.load(builder.gep(ptr, [args[1]], inbounds=True))

    return types.int64(address, index), codegen


@njit(inline="always")
def _block_offset(kind, done):
    """The byte offset of column ``done`` in a row of ``kind`` (`numba_codegen.block_offset`)."""
    if kind == KIND_F32:
        return done * 4
    if kind == KIND_F16 or kind == KIND_BF16:
        return done * 2
    bits = 8 if kind == KIND_I8 else (4 if kind == KIND_I4 else 2)
    return QPARAM_BYTES + done * bits // 8


@njit(inline="always")
def _first_error(per_chunk):
    """The smallest recorded position (-1 marks a chunk without error), or -1."""
    first = -1
    for c in range(per_chunk.shape[0]):
        if per_chunk[c] >= 0 and (first < 0 or per_chunk[c] < first):
            first = per_chunk[c]
    return first


@njit(inline="always")
def _pool_run(
    kind, dim, max_width, ids, lengths_at, n_samples, start, ids_end, table, rows, row_bytes, weights,
    weight_step, ahead_by, mean, out_at, out_stride, err, bad, c,
):  # fmt: skip
    """Pool ``n_samples`` consecutive bags of one feature, column block after column block of at
    most ``max_width`` columns (`numba_codegen.pool_block`); errors as `pool` records them."""
    done = 0
    while done < dim:
        width = max_width
        while width > dim - done:
            width //= 2
        offset = _block_offset(kind, done)
        first_bad = pool_block(
            kind, width, ids, lengths_at, n_samples, start, ids_end, table + offset, rows, row_bytes,
            -offset, weights, weight_step, ahead_by, mean, out_at + done * 4, out_stride,
        )  # fmt: skip
        done += width
        if first_bad == UNKNOWN_BLOCK:
            err[0] = NO_LOOP  # every thread that gets here writes the same value
            err[2] = kind
            err[3] = width
        elif first_bad >= 0 and (bad[c] < 0 or first_bad < bad[c]):
            bad[c] = first_bad


@njit(cache=True, nogil=True)
def _pool_chunk(
    c, chunk, batch, ids, ids_end, lengths, lengths_address, feature_table, feature_col, table_address,
    table_rows, table_dim, table_row_bytes, table_kind, table_mean, weights_address, weight_step,
    ahead_by, bag_major_dim, bag_major_width, out_address, out_columns, starts, err, bad,
):  # fmt: skip
    """Pool chunk ``c`` (samples ``c * chunk`` on) of every feature; `pool`'s work item.

    A function of its own, not the body of `pool`'s loop, so that the parallel and the serial
    loop run the same compiled code: inlined into numba's parallel region, the same loop measured
    1.2-1.6x slower on one thread (cache-resident workloads)."""
    s0 = c * chunk
    s1 = min(batch, s0 + chunk)
    out_stride = out_columns * 4
    for f in range(feature_table.shape[0]):
        t = feature_table[f]
        kind = table_kind[t]
        dim = table_dim[t]
        row_bytes = table_row_bytes[t]
        mean = np.int64(1 if table_mean[t] else 0)
        if dim < bag_major_dim:
            first_out = out_address + (s0 * out_columns + feature_col[f]) * 4
            _pool_run(
                kind, dim, MAX_WIDTH, ids, lengths_address + (f * batch + s0) * 8, s1 - s0, starts[f, c],
                ids_end, table_address[t], table_rows[t], row_bytes, weights_address, weight_step,
                ahead_by, mean, first_out, out_stride, err, bad, c,
            )  # fmt: skip
            continue
        position = starts[f, c]
        for s in range(s0, s1):
            bag_out = out_address + (s * out_columns + feature_col[f]) * 4
            _pool_run(
                kind, dim, bag_major_width, ids, lengths_address + (f * batch + s) * 8, 1, position,
                ids_end, table_address[t], table_rows[t], row_bytes, weights_address, weight_step,
                ahead_by, mean, bag_out, out_stride, err, bad, c,
            )  # fmt: skip
            position += np.int64(lengths[f * batch + s])


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
    table_row_bytes,
    table_kind,
    table_mean,
    chunk,
    ahead_by,
    bag_major_dim,
    bag_major_width,
    parallel,
    out,
    err,
):
    """Pool a whole batch into ``out`` ``[batch, total_dim]`` (float32); errors go to ``err``.

    The ``n_ids`` int64 ids are read from address ``ids``. ``per_sample`` holds the float32
    per-sample weights when ``has_weights``, else a single 1.0 (each row is multiplied by it).

    ``feature_table[f]`` is the table of batch key ``f`` and ``feature_col[f]`` its first output
    column. Table ``t`` is ``table_rows[t]`` rows of ``table_row_bytes[t]`` bytes at address
    ``table_address[t]``, each row ``table_dim[t]`` elements stored as ``table_kind[t]`` (a
    ``KIND_*`` code: a float type, or a quantized row as `numba_codegen.QUANTIZED_ROW_LAYOUT`
    says); the caller keeps it alive.
    Bags are pooled ``chunk`` samples per work item, prefetching the row of the id ``ahead_by``
    positions ahead; the items run on numba's threads when ``parallel``, else one after another
    on the calling thread (no parallel region is entered: for small batches, entering it costs
    more than the second thread saves). ``err`` (int64[4]) receives the code, position, value and
    limit of the first error.

    A table of dim ``bag_major_dim`` or more is pooled bag by bag: every column block (at most
    ``bag_major_width`` wide, a power of two) of one bag before the next, so a bag's rows are read
    from memory once and stay in cache for its other blocks, and a block's loop is short enough that
    the core keeps the loads of many rows in flight (each a page-table walk as well as a cache
    miss in a large table, which the prefetch does not hide). Narrower rows are pooled a run of
    ``chunk`` bags at a time, block after block, each block as wide as the row allows (up to
    `numba_codegen.MAX_WIDTH`).
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
    lengths_address = _address(lengths)
    weights_address = _address(per_sample)
    weight_step = 4 if has_weights else 0
    out_address = _address(out)
    bad = np.full(n_chunks, -1, np.int64)
    # What every chunk is pooled with (one tuple, so that both loops below call the same thing).
    work = (
        chunk, batch, ids, n_ids - 1, lengths, lengths_address, feature_table, feature_col, table_address,
        table_rows, table_dim, table_row_bytes, table_kind, table_mean, weights_address, weight_step,
        ahead_by, bag_major_dim, bag_major_width, out_address, out.shape[1], starts, err, bad,
    )  # fmt: skip
    if parallel:
        for c in prange(n_chunks):
            _pool_chunk(c, *work)
    else:
        for c in range(n_chunks):
            _pool_chunk(c, *work)
    if err[0] == NO_LOOP:
        return
    first = _first_error(bad)
    if first >= 0:
        err[0] = BAD_ID
        err[1] = first
        err[2] = _load_i64(ids, first)
