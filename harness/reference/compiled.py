"""The compiled pass behind `harness.reference.forward.pool` and `Oracle.of`: numba, float64.

Written apart from every backend in `impls/` on purpose (a bug shared with a backend would be
invisible): it is the loop of `pool_loop` in the same order, compiled, one call per table. Each
bag's ids are walked in order; each row is widened to float64, multiplied by its per-sample weight
(float32 x float32 is exact in float64) and added to the bag's accumulators, which are written
once per bag. So the value is `pool_loop`'s to the last bit.

Widening is exact and vectorises: float32 directly; bfloat16 by shifting its 16 bits to the top
of a float32; float16 by moving its exponent and mantissa bits into a float32 (which then holds the
value times ``2**-112``, subnormals included, inf and NaN kept by setting the exponent) and
multiplying the per-sample weight by ``2**112`` once per id (exact). The row ``AHEAD`` ids ahead is
prefetched: a random row is a cache miss, and issuing it early hides most of the latency.

Two modes: the full one writes every field of a `ReferenceResult`; the oracle's (``fused``)
writes the value, the tolerance (`harness.tolerance`: bound and classes, their per-length factors
computed once per bag) and the bag length, and no intermediate field.

The pass checks what it reads: a bag that does not fit the ids or an id outside its table stops it
with a `ValueError`, never an out-of-bounds read. It runs on the calling thread.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numba
import numpy as np
import torch
from llvmlite import ir
from numba.core import cgutils
from numba.extending import intrinsic, overload

from harness.model import JaggedBatch, Pooling, TableConfig, is_quantized, total_dim
from harness.reference import rowwise
from harness.tolerance import (
    FINITE,
    LONG_BAG,
    OVERFLOW32,
    bound_coefficients,
    classes_within_reach,
    overflow_reach,
    tree_sum_bound,
)

FLOAT32 = 0
FLOAT16 = 1
BFLOAT16 = 2
_KIND = {torch.float32: FLOAT32, torch.float16: FLOAT16, torch.bfloat16: BFLOAT16}
_FLOAT16_SCALE = 2.0**112  # float16 bits placed in a float32 read as the value times 2**-112

AHEAD = 8  # ids between the prefetched row and the one being summed

OK = 0
BAD_BAG = 1
BAD_ID = 2


@intrinsic
def _address(typingctx, array):  # noqa: ARG001 - numba's intrinsic signature
    """The address of an array's first element, as int64."""
    if not isinstance(array, numba.types.Array):
        return None

    def codegen(context, builder, sig, args):
        data = context.make_array(sig.args[0])(context, builder, args[0]).data
        return builder.ptrtoint(data, ir.IntType(64))

    return numba.types.int64(array), codegen


@intrinsic
def _prefetch(typingctx, address):  # noqa: ARG001
    """A read prefetch of the cache line at ``address`` (never faults, whatever the address)."""
    if not isinstance(address, numba.types.Integer):
        return None

    def codegen(context, builder, sig, args):
        i8p = ir.PointerType(ir.IntType(8))
        i32 = ir.IntType(32)
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]), "llvm.prefetch.p0"
        )
        builder.call(fn, [builder.inttoptr(args[0], i8p), i32(0), i32(3), i32(1)])
        return context.get_dummy_value()

    return numba.types.void(address), codegen


def _widened_row(rows, kind, i, bits):  # pragma: no cover - replaced by the overload inside numba
    raise NotImplementedError


@overload(_widened_row, inline="always")
def _widened_row_overload(rows, kind, i, bits):
    """Row ``i`` as float32 numbers: the row itself, or its 16-bit values decoded into ``bits``."""
    if rows.dtype == numba.types.float32:
        return lambda rows, kind, i, bits: rows[i]

    def decode(rows, kind, i, bits):
        row = rows[i]
        if kind == BFLOAT16:
            for d in range(row.shape[0]):
                bits[d] = np.uint32(row[d]) << 16
        else:
            for d in range(row.shape[0]):
                h = np.uint32(row[d])
                special = (
                    np.uint32(0x7F800000) if h & np.uint32(0x7C00) == np.uint32(0x7C00) else np.uint32(0)
                )
                bits[d] = ((h & np.uint32(0x8000)) << 16) | ((h & np.uint32(0x7FFF)) << 13) | special
        return bits.view(np.float32)

    return decode


@numba.njit(cache=True, nogil=True)
def _term(rows, kind, i, d, w):
    """One term ``x[i, d] * w`` in float64, widened on its own (the slow path's)."""
    if kind == FLOAT32:
        return np.float64(rows[i, d]) * w
    h = np.uint32(rows[i, d])
    bits = np.empty(1, np.uint32)
    if kind == BFLOAT16:
        bits[0] = h << 16
    else:
        special = np.uint32(0x7F800000) if h & np.uint32(0x7C00) == np.uint32(0x7C00) else np.uint32(0)
        bits[0] = ((h & np.uint32(0x8000)) << 16) | ((h & np.uint32(0x7FFF)) << 13) | special
    return np.float64(bits.view(np.float32)[0]) * w


@numba.njit(cache=True, nogil=True)
def _signed_parts(rows, kind, ids, start, end, d, per_sample, weighted, scale):
    """The sums of the positive terms and of the negative ones' magnitudes of column ``d``, exactly
    as the loop adds them. The fast pass's ``(|t| +- t) / 2`` is the same for finite terms only, so
    a column whose sum is not finite is added again here."""
    pos = 0.0
    neg = 0.0
    for p in range(start, end):
        t = _term(rows, kind, ids[p], d, (np.float64(per_sample[p]) if weighted else 1.0) * scale)
        if t > 0.0:
            pos += t
        elif t < 0.0:
            neg -= t
    return pos, neg


@numba.njit(cache=True, nogil=True, inline="always")
def _accumulate(
    rows,
    kind,
    ids,
    start,
    end,
    ahead_end,
    per_sample,
    weighted,
    scale,
    long,
    acc,
    pos,
    neg,
    square,
    bits,
    err,
):
    """Add the terms of bag ``ids[start:end]`` to ``acc`` (the value), ``pos`` and ``neg`` (the signed
    parts) and, for a ``long`` bag, ``square`` (the squared magnitudes), column by column in bag
    order, from zero (the four arrays are a row long). Rows are prefetched `AHEAD` ids ahead while
    that stays below ``ahead_end`` (ids read next: the rest of the feature, say). False, with
    ``err`` filled, at an id outside the table (nothing is read there)."""
    n_rows, dim = rows.shape
    row_bytes = rows.strides[0]
    base = _address(rows)
    for d in range(dim):
        acc[d] = 0.0
        pos[d] = 0.0
        neg[d] = 0.0
    if long:
        for d in range(dim):
            square[d] = 0.0
    for p in range(start, end):
        i = ids[p]
        if i < 0 or i >= n_rows:
            err[0] = BAD_ID
            err[1] = p
            err[2] = i
            err[3] = n_rows
            return False
        if p + AHEAD < ahead_end:
            ahead = base + ids[p + AHEAD] * row_bytes
            _prefetch(ahead)
            if row_bytes > 64:
                _prefetch(ahead + 64)
        w = (np.float64(per_sample[p]) if weighted else 1.0) * scale
        r = _widened_row(rows, kind, i, bits)
        if long:
            for d in range(dim):
                t = np.float64(r[d]) * w
                a = abs(t)
                acc[d] += t
                pos[d] += (a + t) * 0.5
                neg[d] += (a - t) * 0.5
                square[d] += a * a
        else:
            for d in range(dim):
                t = np.float64(r[d]) * w
                a = abs(t)
                acc[d] += t
                pos[d] += (a + t) * 0.5
                neg[d] += (a - t) * 0.5
    return True


@numba.njit(cache=True, nogil=True, inline="always")
def _bag_factors(n, is_mean):
    """The tolerance's per-bag factors of a bag of ``n > 0`` ids, for `_element`: `bound_coefficients`
    (MEAN's divided by ``n``, so that an element needs no division but its value's) and
    `overflow_reach` of the undivided signed parts."""
    tree_factor, plain, eta = bound_coefficients(n, is_mean)
    if is_mean:
        tree_factor, plain = tree_factor / n, plain / n
    return tree_factor, plain, eta, overflow_reach(n, False)


@numba.njit(cache=True, nogil=True)
def _factor_table(n_max):
    """`_bag_factors` of every bag length below ``n_max``, ``[mean, n, 4]`` (row 0 unused): the
    same numbers, looked up per bag instead of computed (two ``exp`` per bag were most of the cost
    of a pass over short bags)."""
    out = np.zeros((2, n_max, 4))
    for m in range(2):
        for n in range(1, n_max):
            f = _bag_factors(n, m == 1)
            for k in range(4):
                out[m, n, k] = f[k]
    return out


@numba.njit(cache=True, nogil=True, inline="always")
def _element(v, q, g, square, n, is_mean, factors):
    """One element's ``(value, bound, classes)`` (`harness.tolerance`) from its bag's sums: ``v`` the
    value, ``q`` and ``g`` the signed parts, ``square`` the squared magnitudes (a long bag's), over
    ``n > 0`` ids; ``factors`` are the bag's `_bag_factors`. ``classes`` is -1 where ``v`` is not
    finite: then the signed parts must be summed exactly (`_signed_parts`) for `classes_within_reach`.

    element_bound(m / n, t / n, n, True) = (A / n)(t + m) + (B / n) m + C: no division but the
    value's."""
    tree_factor, plain, eta, reach = factors
    m = q + g
    t = tree_sum_bound(m, square, n) if n >= LONG_BAG else (n - 1) * m
    value = v / n if is_mean else v
    bound = tree_factor * (t + m) + plain * m + eta
    if abs(v) < np.inf and m * reach < OVERFLOW32:
        return value, bound, FINITE  # no order overflows: finite values only
    if not abs(v) < np.inf:  # an infinite or NaN term: the caller sums the signed parts exactly
        return value, bound, -1
    return value, bound, classes_within_reach(v, q, g, reach)


@numba.njit(cache=True, nogil=True)
def _pool_table(
    rows,
    kind,
    ids,
    offsets,
    per_sample,
    weighted,
    features,
    first_cols,
    batch_size,
    is_mean,
    fused,
    value,
    magnitude,
    positive,
    negative,
    tree_sum,
    bound,
    classes,
    factor_table,
    err,
):
    n_ids = ids.shape[0]
    dim = rows.shape[1]
    scale = _FLOAT16_SCALE if kind == FLOAT16 else 1.0
    acc = np.empty(dim)
    pos = np.empty(dim)
    neg = np.empty(dim)
    square = np.empty(dim)
    bits = np.empty(dim, np.uint32)
    for j in range(features.shape[0]):
        f = features[j]
        col = first_cols[j]
        feature_end = min(offsets[(f + 1) * batch_size], n_ids)
        for s in range(batch_size):
            bag = f * batch_size + s
            start = offsets[bag]
            end = offsets[bag + 1]
            if start < 0 or end < start or end > n_ids:
                err[0] = BAD_BAG
                err[1] = bag
                return
            n = end - start
            long = n >= LONG_BAG
            if not _accumulate(
                rows,
                kind,
                ids,
                start,
                end,
                feature_end,
                per_sample,
                weighted,
                scale,
                long,
                acc,
                pos,
                neg,
                square,
                bits,
                err,
            ):
                return
            if n == 0:  # an empty bag pools to exactly zero, with bound zero
                for d in range(dim):
                    value[s, col + d] = 0.0
                    if fused:
                        bound[s, col + d] = 0.0
                        classes[s, col + d] = FINITE
                    else:
                        magnitude[s, col + d] = 0.0
                        positive[s, col + d] = 0.0
                        negative[s, col + d] = 0.0
                        tree_sum[s, col + d] = 0.0
                continue
            if fused:
                if n < factor_table.shape[1]:
                    row = factor_table[1 if is_mean else 0, n]
                    factors = (row[0], row[1], row[2], row[3])
                else:
                    factors = _bag_factors(n, is_mean)
                for d in range(dim):
                    v, b, c = _element(acc[d], pos[d], neg[d], square[d], n, is_mean, factors)
                    if c < 0:
                        q, g = _signed_parts(rows, kind, ids, start, end, d, per_sample, weighted, scale)
                        c = classes_within_reach(acc[d], q, g, factors[3])
                    value[s, col + d] = v
                    bound[s, col + d] = b
                    classes[s, col + d] = c
                continue
            for d in range(dim):
                if not np.isfinite(acc[d]):  # an infinite or NaN term: the signed parts exactly
                    pos[d], neg[d] = _signed_parts(
                        rows, kind, ids, start, end, d, per_sample, weighted, scale
                    )
                m = pos[d] + neg[d]
                t = tree_sum_bound(m, square[d], n) if long else (n - 1) * m
                v, q, g = acc[d], pos[d], neg[d]
                if is_mean:
                    v, m, q, g, t = v / n, m / n, q / n, g / n, t / n
                c = col + d
                value[s, c] = v
                magnitude[s, c] = m
                positive[s, c] = q
                negative[s, c] = g
                tree_sum[s, c] = t


def _storage(w: torch.Tensor) -> np.ndarray:
    """A table's rows as numba reads them: float32, or the raw 16 bits of float16 / bfloat16."""
    w = w.detach()
    if not w.is_contiguous():
        w = w.contiguous()
    if w.dtype == torch.float32:
        return w.numpy()
    if w.dtype in (torch.float16, torch.bfloat16):
        return w.view(torch.int16).numpy().view(np.uint16)
    raise ValueError(f"no float64 widening for table dtype {w.dtype}")


def _int64_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach()
    if t.dtype != torch.int64:
        t = t.to(torch.int64)
    return t.numpy() if t.is_contiguous() else t.contiguous().numpy()


FIELDS = ("value", "magnitude", "positive", "negative", "tree_sum")
_UNUSED_F64 = np.zeros((1, 1), np.float64)
_UNUSED_U8 = np.zeros((1, 1), np.uint8)
_UNUSED_F32 = np.zeros((1, 1), np.float32)
_UNUSED_PRE = np.zeros((2, 1, 1), np.float64)
_NO_WEIGHTS = np.zeros(1, np.float32)


def pool(
    tables: Sequence[TableConfig],
    weights: Mapping[str, torch.Tensor],
    batch: JaggedBatch,
    *,
    fused: bool = False,
) -> dict[str, torch.Tensor]:
    """``[batch, total_dim]`` tensors: ``value`` and either the other `FIELDS` or, ``fused``, the
    tolerance's ``bound`` and ``classes``."""
    b = batch.batch_size
    width = total_dim(tables)
    value = np.empty((b, width), np.float64)
    if fused:
        stats = {name: _UNUSED_F64 for name in FIELDS[1:]}
        bound, classes = np.empty((b, width), np.float64), np.empty((b, width), np.uint8)
    else:
        stats = {name: np.empty((b, width), np.float64) for name in FIELDS[1:]}
        bound, classes = _UNUSED_F64, _UNUSED_U8
    ids = _int64_numpy(batch.values)
    lengths = _int64_numpy(batch.lengths)
    offsets = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])  # may wrap on unchecked lengths: every bag is checked
    weighted = batch.weights is not None
    per_sample = batch.weights.detach().contiguous().numpy() if weighted else _NO_WEIGHTS
    key_index = {k: i for i, k in enumerate(batch.keys)}
    err = np.zeros(4, np.int64)
    col = 0
    for t in tables:
        missing = [f for f in t.feature_names if f not in key_index]
        if missing:
            raise ValueError(f"feature {missing[0]!r} of table {t.name!r} is not in the batch")
        dim = t.embedding_dim
        features = np.array([key_index[f] for f in t.feature_names], np.int64)
        if b > 0 and is_quantized(t):  # its own pass (harness.reference.rowwise), same outputs
            rowwise.pool_table(
                weights[t.name],
                ids,
                offsets,
                per_sample,
                weighted,
                features,
                col + dim * np.arange(len(features), dtype=np.int64),
                b,
                t.pooling is Pooling.MEAN,
                fused,
                value,
                stats["magnitude"],
                stats["positive"],
                stats["negative"],
                stats["tree_sum"],
                bound,
                classes,
                err,
            )
        elif b > 0:
            _pool_table(
                _storage(weights[t.name]),
                _KIND[t.dtype],
                ids,
                offsets,
                per_sample,
                weighted,
                features,
                col + dim * np.arange(len(features), dtype=np.int64),
                b,
                t.pooling is Pooling.MEAN,
                fused,
                value,
                stats["magnitude"],
                stats["positive"],
                stats["negative"],
                stats["tree_sum"],
                bound,
                classes,
                _FACTORS,
                err,
            )
        if err[0] != OK:
            _raise(batch, t, err)
        col += dim * len(features)
    out = {"value": value}
    out.update({"bound": bound, "classes": classes} if fused else stats)
    return {name: torch.from_numpy(a) for name, a in out.items()}


def _raise(batch: JaggedBatch, table: TableConfig, err: np.ndarray) -> None:
    code, where, value, limit = (int(x) for x in err)
    b = batch.batch_size
    if code == BAD_BAG:
        raise ValueError(
            f"the bag of feature {batch.keys[where // b]!r}, sample {where % b} (lengths[{where}]) "
            f"does not fit the {len(batch.values)} ids: validate the problem first"
        )
    raise ValueError(
        f"id {value} at values[{where}] is outside table {table.name!r} ({limit} rows): "
        "validate the problem first"
    )


def _warm() -> None:
    """Load both specialisations of the kernel (float32 rows, 16-bit rows) now, from numba's disk
    cache or by compiling them. Done at import: a process forked after it (the robustness matrix's
    forkserver children) inherits them instead of paying the first load, about 0.3-0.5 s of CPU."""
    ids = np.zeros(1, np.int64)
    offsets = np.array([0, 1], np.int64)
    one = np.zeros((1, 1), np.float64)
    for rows in (np.zeros((1, 1), np.float32), np.zeros((1, 1), np.uint16)):
        err = np.zeros(4, np.int64)
        features, cols = np.zeros(1, np.int64), np.zeros(1, np.int64)
        args = (rows, FLOAT32, ids, offsets, _NO_WEIGHTS, False, features, cols, 1, False, True)
        _pool_table(*args, one, one, one, one, one, one, np.zeros((1, 1), np.uint8), _FACTORS, err)


_FACTORS = _factor_table(4096)
_warm()
