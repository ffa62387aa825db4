"""The compiled float64 pass over a row-wise quantized table (`harness.quantized`).

`harness.reference.compiled` calls it for each quantized table, in place of its float pass; it
writes the same outputs in the same two modes. It is `pool_loop`'s quantized branch, compiled:
each id's row is dequantized exactly (``s q + b`` in float64), times its per-sample weight, and
added to the bag's value in bag order (so the value is the loop's to the last bit); the bound's
fields sum two terms per id, ``w b`` then ``w s q`` (`harness.tolerance`, "Quantized tables"),
both exact in float64. A NaN one of those counts as ``+inf`` in both signed parts; so does
``w s q`` with a code of 0 where ``|w s|`` overflows float32 (a library computing ``fl(w s)`` first
gets ``inf * 0``).

Like the float pass it checks what it reads: a bag that does not fit the ids or an id outside its
table stops it with an error code, never an out-of-bounds read.
"""

from __future__ import annotations

import numba
import numpy as np

from harness.quantized import QuantizedTable
from harness.tolerance import (
    FINITE,
    LONG_BAG,
    OVERFLOW32,
    bound_coefficients,
    classes_within_reach,
    overflow_reach,
    tree_sum_bound,
)

TERMS_PER_ID = 2
OK = 0  # the error codes of harness.reference.compiled
BAD_BAG = 1
BAD_ID = 2


@numba.njit(cache=True, nogil=True)
def _signed(t: float, pos: float, neg: float) -> tuple[float, float]:
    if t > 0.0:
        return pos + t, neg
    if t < 0.0:
        return pos, neg - t
    if t != t:  # NaN: the split sum is NaN whatever the order
        return pos + np.inf, neg + np.inf
    return pos, neg


@numba.njit(cache=True, nogil=True)
def _pool_quantized_table(
    codes,
    scale,
    bias,
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
    err,
):
    n_rows, dim = codes.shape
    n_ids = ids.shape[0]
    acc = np.empty(dim)
    pos = np.empty(dim)
    neg = np.empty(dim)
    square = np.empty(dim)
    for j in range(features.shape[0]):
        f = features[j]
        col = first_cols[j]
        for s in range(batch_size):
            bag = f * batch_size + s
            start = offsets[bag]
            end = offsets[bag + 1]
            if start < 0 or end < start or end > n_ids:
                err[0] = BAD_BAG
                err[1] = bag
                return
            n = end - start
            terms = TERMS_PER_ID * n
            long = terms >= LONG_BAG
            acc[:] = 0.0
            pos[:] = 0.0
            neg[:] = 0.0
            square[:] = 0.0
            for p in range(start, end):
                i = ids[p]
                if i < 0 or i >= n_rows:
                    err[0] = BAD_ID
                    err[1] = p
                    err[2] = i
                    err[3] = n_rows
                    return
                w = np.float64(per_sample[p]) if weighted else 1.0
                si = scale[i]
                bi = bias[i]
                ws = w * si
                wb = w * bi
                ws_overflows = not abs(ws) < OVERFLOW32  # fl(w s) is inf: inf * (q = 0) is NaN
                for d in range(dim):
                    q = np.float64(codes[i, d])
                    acc[d] += (si * q + bi) * w
                    tc = np.nan if ws_overflows and q == 0.0 else ws * q
                    pos[d], neg[d] = _signed(wb, pos[d], neg[d])
                    pos[d], neg[d] = _signed(tc, pos[d], neg[d])
                    if long:
                        square[d] += wb * wb + tc * tc
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
                tree_factor, plain, eta = bound_coefficients(n, is_mean, TERMS_PER_ID)
                if is_mean:
                    tree_factor, plain = tree_factor / n, plain / n
                reach = overflow_reach(n, False, TERMS_PER_ID)
            for d in range(dim):
                m = pos[d] + neg[d]
                t = tree_sum_bound(m, square[d], terms) if long else (terms - 1) * m
                v = acc[d]
                c = col + d
                if fused:
                    value[s, c] = v / n if is_mean else v
                    bound[s, c] = tree_factor * (t + m) + plain * m + eta
                    if abs(v) < np.inf and m * reach < OVERFLOW32:
                        classes[s, c] = FINITE
                    else:
                        classes[s, c] = classes_within_reach(v, pos[d], neg[d], reach)
                    continue
                q, g = pos[d], neg[d]
                if is_mean:
                    v, m, q, g, t = v / n, m / n, q / n, g / n, t / n
                value[s, c] = v
                magnitude[s, c] = m
                positive[s, c] = q
                negative[s, c] = g
                tree_sum[s, c] = t


def pool_table(table: QuantizedTable, *args) -> None:
    """`harness.reference.compiled`'s per-table pass for a quantized table: ``args`` are the float
    pass's after its rows and kind (ids, offsets, ..., err)."""
    codes = table.codes.detach().contiguous().numpy()
    scale = table.scale.detach().double().contiguous().numpy()
    bias = table.bias.detach().double().contiguous().numpy()
    _pool_quantized_table(codes, scale, bias, *args)
