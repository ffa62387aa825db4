"""What a problem exercises, as one named bucket per dimension: the coverage a fuzz run reports.

`buckets` reads a concrete `Problem`, not the spec it was drawn from, so it describes a minimised,
transformed or replayed case as well as a generated one. `DIMENSIONS` lists the dimensions and
their buckets in display order; `count_buckets` tallies many problems' buckets in that order.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from itertools import combinations

import torch

from harness.model import SUPPORTED_DTYPES, Problem, dtype_name, is_quantized
from harness.quantized import QUANTIZED_STORAGE


def _ranges(*uppers: int, lowest: int = 0) -> tuple[str, ...]:
    """Labels of the ranges ``[lowest, u0], (u0, u1], ..., > u_last``: ``"2-16"``, ``"1"``, ``">4096"``."""
    labels, low = [], lowest
    for up in uppers:
        labels.append(str(up) if low == up else f"{low}-{up}")
        low = up + 1
    return (*labels, f">{uppers[-1]}")


def _bucket(value: int, labels: tuple[str, ...], *uppers: int) -> str:
    for label, up in zip(labels, uppers, strict=False):
        if value <= up:
            return label
    return labels[-1]


_TABLES = (1, 4, 16, 64)
_FEATURES = (1, 8, 32, 256)
_BATCH = (0, 1, 16, 256, 4096)
_BAG = (0, 1, 16, 256, 4096)
_IDS = (0, 512, 16_384, 100_000)
_FEATURE_IDS = (2**15, 2**16)
_DIMS = (8, 64, 256, 512, 1024)
_DTYPE_SETS = tuple(
    "+".join(dtype_name(d) for d in combo)
    for k in range(1, len(SUPPORTED_DTYPES) + 1)
    for combo in combinations(SUPPORTED_DTYPES, k)
) + ("none",)

DIMENSIONS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("tables", _ranges(*_TABLES, lowest=1)),
    ("features", _ranges(*_FEATURES, lowest=1)),
    ("batch size", _ranges(*_BATCH)),
    ("bag length", _ranges(*_BAG)),
    ("empty bags", ("none", "some", "all", "no bags")),
    ("ids", _ranges(*_IDS)),
    ("ids per feature", _ranges(*_FEATURE_IDS)),
    ("dims", _ranges(*_DIMS, lowest=1)),
    ("dim % 4", ("all 0", "some not 0")),
    ("dtypes", _DTYPE_SETS),
    ("quantized", ("none", *QUANTIZED_STORAGE, "several")),
    ("pooling", ("sum", "mean", "sum+mean")),
    ("groups", ("one", "contiguous", "interleaved")),
    ("weighted", ("no", "yes")),
    ("id dtype", ("int64", "int32")),
)
"""Each dimension and its buckets, in display order:

- ``bag length``: the longest bag; ``ids``: all ids of the batch; ``ids per feature``: the
  feature with the most ids (past 2^15 and 2^16, where 16-bit offsets and indices overflow);
- ``dims``: the largest table dim; ``dim % 4``: whether every dim is a multiple of 4 (a vector
  width);
- ``dtypes``: the set of float table dtypes ("none": every table quantized); ``quantized``: the
  quantized storage of the tables that have one (int8, int4, int2, or several); ``pooling``: the
  poolings present;
- ``groups``: the tables' (pooling, dtype) pairs in column order: all one pair, each pair in one
  contiguous run, or interleaved (a pair recurs after another, e.g. SUM-f32, MEAN-f16, SUM-f32).
"""
_LABELS = dict(DIMENSIONS)


def buckets(problem: Problem) -> dict[str, str]:
    """One bucket per dimension of `DIMENSIONS` (in that order) for this concrete problem."""
    tables, batch = problem.tables, problem.batch
    n_features = sum(len(t.feature_names) for t in tables)
    lengths = batch.lengths.to(torch.int64)
    b = batch.batch_size
    longest = int(lengths.max()) if len(lengths) else 0
    per_feature = int(lengths.reshape(len(batch.keys), b).sum(dim=1).max()) if b and batch.keys else 0
    dims = [t.embedding_dim for t in tables]
    dtypes = {t.dtype for t in tables}
    poolings = {t.pooling.value for t in tables}
    return {
        "tables": _bucket(len(tables), _LABELS["tables"], *_TABLES),
        "features": _bucket(n_features, _LABELS["features"], *_FEATURES),
        "batch size": _bucket(b, _LABELS["batch size"], *_BATCH),
        "bag length": _bucket(longest, _LABELS["bag length"], *_BAG),
        "empty bags": _empty(len(lengths), int((lengths == 0).sum())),
        "ids": _bucket(len(batch.values), _LABELS["ids"], *_IDS),
        "ids per feature": _bucket(per_feature, _LABELS["ids per feature"], *_FEATURE_IDS),
        "dims": _bucket(max(dims), _LABELS["dims"], *_DIMS),
        "dim % 4": "all 0" if all(d % 4 == 0 for d in dims) else "some not 0",
        "dtypes": "+".join(dtype_name(d) for d in SUPPORTED_DTYPES if d in dtypes) or "none",
        "quantized": _quantized({d for d in dtypes if is_quantized(d)}),
        "pooling": "+".join(p for p in ("sum", "mean") if p in poolings),
        "groups": _groups([(t.pooling, t.dtype) for t in tables]),
        "weighted": "no" if batch.weights is None else "yes",
        "id dtype": dtype_name(batch.values.dtype),
    }


def _quantized(storages: set[str]) -> str:
    if not storages:
        return "none"
    return next(iter(storages)) if len(storages) == 1 else "several"


def _empty(bags: int, empty: int) -> str:
    if not bags:
        return "no bags"
    return "none" if not empty else "all" if empty == bags else "some"


def _groups(pairs: list[tuple[object, object]]) -> str:
    runs = [p for i, p in enumerate(pairs) if i == 0 or pairs[i - 1] != p]
    if len(runs) == 1:
        return "one"
    return "contiguous" if len(set(runs)) == len(runs) else "interleaved"


def count_buckets(bucket_dicts: Iterable[Mapping[str, str]]) -> dict[str, dict[str, int]]:
    """How many problems fell in each bucket, every dimension and bucket in display order (zeros
    included), from `buckets` results."""
    counts = {name: dict.fromkeys(labels, 0) for name, labels in DIMENSIONS}
    for found in bucket_dicts:
        for name, label in found.items():
            counts[name][label] += 1
    return counts
