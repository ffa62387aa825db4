"""Hypothesis strategies for pooled jagged embedding lookup problems, public and composable.

Use them in your own tests the way Hypothesis's own strategies are used::

    from hypothesis import given
    from harness.fuzz.strategies import problems

    @given(problems(max_tables=2, dtypes=[torch.float32], max_cost=100_000))
    def test_my_kernel(problem): ...

Hypothesis draws only a problem's *structure* and a seed (`problem_specs`, giving a
`ProblemSpec`); numpy builds the bulk tensors from the seed (`build_problem`), vectorised. An
example costs tens of draws whatever its size.

The structure: 1 to 64 tables with 1 to 256 features (shared tables; batch keys in the tables'
order, reversed or shuffled); up to four table *kinds* (dim, rows, pooling, dtype, value
profile) laid out over the tables in blocks, interleaved (SUM-f32, MEAN-f16, SUM-f32, ...) or
seeded; dims from 1, powers of two and ``2^k +- 1`` up to 1024; 1-row tables to 100 000 rows;
batch sizes 0 to 16 384; a length profile (uniform, skewed, ``2^k +- 1``, one huge bag, all empty);
an id distribution (uniform, Zipf, hot set, duplicates, only rows 0 and ``num_embeddings - 1``);
per-sample weights or none; int32 or int64 ids.

Sizes: small problems are common (cheap, and they shrink well), large ones a steady minority;
every example is held under ``max_cost`` (`ProblemSpec.cost`: table elements + batch x total dim
+ ids x (dim + 8), default 2^22) by capping each size by what the budget has left when drawn.
Every strategy takes keyword-only arguments and checks them up front (`InvalidArgument`).
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch
from hypothesis import event
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument

from harness.fuzz.coverage import buckets
from harness.fuzz.problem_spec import (
    ID_COST,
    ID_DISTRIBUTIONS,
    KEY_ORDERS,
    LENGTH_PROFILES,
    SAMPLE_WEIGHT_PROFILES,
    WEIGHT_PROFILES,
    ProblemSpec,
    build_batch,
    build_problem,
    make_profile_weights,
    make_sample_weights,
)
from harness.fuzz.quantized_rows import dtype_options, packable
from harness.model import (
    ID_DTYPES,
    SUPPORTED_DTYPES,
    TABLE_DTYPES,
    JaggedBatch,
    Pooling,
    Problem,
    TableConfig,
    TableDtype,
    total_dim,
)

__all__ = [
    "DEFAULT_MAX_COST",
    "ID_DISTRIBUTIONS",
    "LENGTH_PROFILES",
    "SAMPLE_WEIGHT_PROFILES",
    "WEIGHT_PROFILES",
    "ProblemSpec",
    "build_batch",
    "build_problem",
    "jagged_batches",
    "make_profile_weights",
    "per_sample_weights",
    "problem_specs",
    "problems",
    "table_configs",
    "table_weights",
    "weight_specs",
]

DEFAULT_MAX_COST = 2**22
"""The default cost budget of one example (`ProblemSpec.cost`, in elements): about 16 MiB of
float32 and a few tens of milliseconds to build and check at the most."""

_T = TypeVar("_T")
_SEEDS = st.integers(0, 2**32 - 1)

# Weighted classes of sizes, ``(weight, low, high)``; the first class is the one shrinking aims at.
_TABLE_COUNTS = ((72, 1, 4), (18, 5, 16), (9, 17, 63), (1, 64, 64))
_FEATURES_PER_TABLE = ((55, 1, 1), (30, 2, 3), (15, 4, 2**31))
_ROWS = ((25, 1, 16), (50, 17, 1000), (25, 1001, 2**31))
_DIM_CLASSES = ((25, "small"), (20, "pow2"), (20, "near-pow2"), (27, "any"), (8, "large"))


@dataclass(frozen=True)
class _Size:
    """A size class: ranges of batch sizes and bag lengths, and a cap on dims that leaves the
    budget room for them (None: no cap of its own)."""

    weight: int
    batch: tuple[int, int]
    bags: tuple[int, int]
    max_dim: int | None = None


# The first draw of an example. Hypothesis draws later choices nearer to their simplest (it
# extends prefixes with the simplest choices to find small examples early, and mutates), so what
# should keep its proportions is drawn first, and the rarest sizes are classes of their own.
_SIZES = (
    _Size(12, (1, 4), (1, 4)),  # tiny: cheap, shrinks well
    _Size(3, (0, 0), (0, 0)),  # no samples
    _Size(15, (1, 32), (1, 16)),  # small
    _Size(30, (16, 512), (8, 64)),  # medium
    _Size(12, (1, 64), (257, 4096)),  # long bags
    _Size(4, (1, 4), (4097, 2**31), max_dim=32),  # very long bags (10 000+)
    _Size(5, (1024, 4096), (1, 16)),  # large batches
    _Size(3, (8192, 2**31), (1, 8), max_dim=16),  # very large batches
    _Size(11, (64, 2048), (16, 256)),  # many ids
    _Size(5, (2048, 16384), (16, 64), max_dim=8),  # many ids in one feature (> 2^15, > 2^16)
)
_LENGTH_WEIGHTS = {"uniform": 33, "skewed": 20, "pow2": 15, "one-huge": 18, "empty": 4}
_ID_WEIGHTS = {"uniform": 30, "zipf": 25, "hot": 15, "duplicates": 15, "edges": 15}
_LAYOUTS = ("interleaved", "blocks", "seeded")


# ---------------------------------------------------------------------------------------------
# Argument checks


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(f"{name}={value!r} must be an integer")
    if value < minimum:
        raise InvalidArgument(f"{name}={value!r} must be at least {minimum}")


def _check_range(lo_name: str, lo: int, hi_name: str, hi: int, minimum: int) -> None:
    _check_int(lo_name, lo, minimum)
    _check_int(hi_name, hi, minimum)
    if lo > hi:
        raise InvalidArgument(f"{lo_name}={lo} is larger than {hi_name}={hi}")


def _check_choices(name: str, values: object, allowed: Sequence[object]) -> tuple:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise InvalidArgument(f"{name}={values!r} must be a sequence (a list or tuple)")
    if not values:
        raise InvalidArgument(f"{name} must not be empty")
    for v in values:
        if v not in allowed:
            raise InvalidArgument(f"{name} contains {v!r}; allowed: {list(allowed)}")
    return tuple(values)


def _check_weighted(weighted: object) -> None:
    if weighted is not None and not isinstance(weighted, bool):
        raise InvalidArgument(f"weighted={weighted!r} must be True, False or None (either)")


def _check_bool(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise InvalidArgument(f"{name}={value!r} must be a bool")


# ---------------------------------------------------------------------------------------------
# Drawing helpers: one draw picks a weighted class, one more a value inside it


def _pick(draw: st.DrawFn, options: Sequence[tuple[int, _T]]) -> _T:
    """One of ``options`` (``(weight, value)`` pairs) by weight; shrinks towards the first.

    Drawn with `sampled_from` over the weight units, which Hypothesis draws near uniformly (an
    ``integers(0, n)`` draw returns its lower end about 30% of the time)."""
    if len(options) == 1:
        return options[0][1]
    x = draw(_choice(range(sum(w for w, _ in options))))
    for w, value in options:
        if x < w:
            return value
        x -= w
    raise AssertionError("unreachable")


class _LazyRng:
    """A numpy generator whose seed is drawn the first time it is needed."""

    def __init__(self, draw: st.DrawFn) -> None:
        self._draw = draw
        self._rng: np.random.Generator | None = None

    def __call__(self) -> np.random.Generator:
        if self._rng is None:
            self._rng = np.random.default_rng(self._draw(_SEEDS))
        return self._rng


_POSITIONS = st.sampled_from(range(64))


@functools.lru_cache(maxsize=512)
def _choice(options: tuple | range) -> st.SearchStrategy:
    """``sampled_from(options)``, built once: a new strategy object costs more than its draw."""
    return st.sampled_from(options)


def _between(
    draw: st.DrawFn,
    low: int,
    high: int,
    floor: int,
    cap: int,
    position: int | None = None,
    rng: _LazyRng | None = None,
) -> int:
    """An integer of ``[low, high]`` clipped into ``[floor, cap]`` (``cap >= floor``).

    ``position`` (0..63, drawn here when None) places it: uniformly over a short range, and over
    a longer one in one of 64 log-spaced buckets, so that each scale is about as common; the value
    within the bucket comes from ``rng`` (one drawn seed for many values) or a draw of its own. A
    position drawn early keeps its proportions while the range it lands in is only known later."""
    low, high = min(max(low, floor), cap), min(max(high, floor), cap)
    if low == high:
        return low
    if position is None:
        position = draw(_POSITIONS)
    if high - low < 64:
        return low + position * (high - low + 1) // 64
    edges = [
        round((low + 1) * math.exp((math.log(high + 1) - math.log(low + 1)) * p / 64)) - 1
        for p in (position, position + 1)
    ]
    start = max(low, edges[0])
    end = high if position == 63 else min(high, max(start, edges[1] - 1))
    if start == end:
        return start
    return int(rng().integers(start, end + 1)) if rng is not None else draw(st.integers(start, end))


def _sized(
    draw: st.DrawFn, classes: Sequence[tuple[int, int, int]], floor: int, cap: int, rng: _LazyRng
) -> int:
    low, high = _pick(draw, [(w, (lo, hi)) for w, lo, hi in classes])
    return _between(draw, low, high, floor, cap, rng=rng)


def _weighted_choice(draw: st.DrawFn, weights: dict[str, int], allowed: tuple[str, ...]) -> str:
    return _pick(draw, [(weights[v], v) for v in weights if v in allowed])


# ---------------------------------------------------------------------------------------------
# Tables


@dataclass(frozen=True)
class _TableOptions:
    min_tables: int
    max_tables: int
    max_features: int
    max_features_per_table: int
    max_dim: int
    max_num_embeddings: int
    dtypes: tuple[TableDtype, ...]
    poolings: tuple[Pooling, ...]


_TABLE_DEFAULTS = {
    "min_tables": 1,
    "max_tables": 64,
    "max_features": 256,
    "max_features_per_table": 16,
    "max_dim": 1024,
    "max_num_embeddings": 100_000,
    "dtypes": SUPPORTED_DTYPES,
    "poolings": (Pooling.SUM, Pooling.MEAN),
}


def _table_options(**kw: object) -> _TableOptions:
    _check_range("min_tables", kw["min_tables"], "max_tables", kw["max_tables"], 1)
    _check_int("max_features", kw["max_features"], kw["min_tables"])
    _check_int("max_features_per_table", kw["max_features_per_table"], 1)
    _check_int("max_dim", kw["max_dim"], 1)
    _check_int("max_num_embeddings", kw["max_num_embeddings"], 1)
    kw["dtypes"] = _check_choices("dtypes", kw["dtypes"], TABLE_DTYPES)
    kw["poolings"] = _check_choices("poolings", kw["poolings"], tuple(Pooling))
    return _TableOptions(**kw)


def _draw_dim(draw: st.DrawFn, cap: int, rng: _LazyRng) -> int:
    kind = _pick(draw, _DIM_CLASSES)
    if kind == "small":
        return _between(draw, 1, 8, 1, cap)
    if kind == "any":
        return _between(draw, 1, 256, 1, cap, rng=rng)
    if kind == "large":
        return _between(draw, 257, cap, 1, cap, rng=rng)
    if kind == "pow2":
        return min(cap, 1 << draw(st.integers(4, 7)))
    return min(cap, (1 << draw(st.integers(2, 10))) + draw(st.integers(-1, 1)))  # 2^k - 1, 2^k, 2^k + 1


def _draw_tables(
    draw: st.DrawFn,
    o: _TableOptions,
    budget: int,
    *,
    sum_only: bool,
    profiles: tuple[str, ...] | None,
    max_dim: int | None = None,
) -> tuple[tuple[TableConfig, ...], tuple[str, ...]]:
    """Tables (and one weight profile per table, "unit" when ``profiles`` is None) whose elements
    take at most half of ``budget`` and whose total dim at most an eighth of it; dims at most
    ``max_dim`` too when given."""
    rng = _LazyRng(draw)  # seeds the variations below (not the data)
    n_tables = _sized(draw, _TABLE_COUNTS, o.min_tables, min(o.max_tables, o.max_features), rng)
    per_table = _sized(
        draw, _FEATURES_PER_TABLE, 1, max(1, min(o.max_features_per_table, o.max_features // n_tables)), rng
    )
    counts = [per_table] * n_tables
    if per_table > 1 and n_tables > 1 and draw(st.booleans()):
        counts[1:] = rng().integers(1, per_table + 1, n_tables - 1).tolist()
    dim_cap = max(1, min(o.max_dim, max_dim or o.max_dim, budget // (8 * sum(counts))))
    n_kinds = draw(st.integers(1, min(4, n_tables)))
    kinds = []
    for _ in range(n_kinds):
        dim = _draw_dim(draw, dim_cap, rng)
        rows = _sized(draw, _ROWS, 1, max(1, min(o.max_num_embeddings, budget // (2 * n_tables * dim))), rng)
        pooling = Pooling.SUM if sum_only else draw(_choice(o.poolings))
        dtype = draw(_choice(dtype_options(o.dtypes)))  # quantized ones a steady minority
        dim, dtype = packable(dim, dtype, dim_cap)  # whole bytes of packed codes
        rows = min(rows, max(1, budget // (2 * n_tables * dim)))
        profile = "unit" if profiles is None else draw(_choice(profiles))
        kinds.append((dim, rows, pooling, dtype, profile))
    layout = "blocks" if n_kinds == 1 else draw(_choice(_LAYOUTS))
    if layout == "interleaved":
        kind_of = [i % n_kinds for i in range(n_tables)]
    elif layout == "blocks":
        kind_of = [i * n_kinds // n_tables for i in range(n_tables)]
    else:
        kind_of = list(range(n_kinds)) + rng().integers(0, n_kinds, n_tables - n_kinds).tolist()
        rng().shuffle(kind_of)
    vary = n_tables > n_kinds and draw(st.booleans())  # tables of a kind get smaller dims and rows
    tables, seen, feature = [], set(), 0
    for i, (k, n) in enumerate(zip(kind_of, counts, strict=True)):
        dim, rows, pooling, dtype, profile = kinds[k]
        if vary and k in seen:
            dim, rows = int(rng().integers(1, dim + 1)), int(rng().integers(1, rows + 1))
            dim = packable(dim, dtype, dim_cap)[0]
        seen.add(k)
        names = tuple(f"f{feature + j}" for j in range(n))
        feature += n
        tables.append((TableConfig(f"t{i}", rows, dim, names, pooling, dtype), profile))
    return tuple(t for t, _ in tables), tuple(p for _, p in tables)


@st.composite
def _table_configs(draw: st.DrawFn, o: _TableOptions, budget: int) -> tuple[TableConfig, ...]:
    return _draw_tables(draw, o, budget, sum_only=False, profiles=None)[0]


def table_configs(
    *,
    min_tables: int = 1,
    max_tables: int = 64,
    max_features: int = 256,
    max_features_per_table: int = 16,
    max_dim: int = 1024,
    max_num_embeddings: int = 100_000,
    dtypes: Sequence[TableDtype] = SUPPORTED_DTYPES,
    poolings: Sequence[Pooling] = (Pooling.SUM, Pooling.MEAN),
    max_cost: int = DEFAULT_MAX_COST,
) -> st.SearchStrategy[tuple[TableConfig, ...]]:
    """Tuples of `TableConfig` named ``t0, t1, ...`` with features ``f0, f1, ...`` in order.

    Mostly 1-4 tables, often 5-16, sometimes up to ``max_tables``; each with 1, 2-3 or up to
    ``max_features_per_table`` features (at most ``max_features`` in all). Up to four kinds of
    table (dim, rows, pooling, dtype) laid out in blocks, interleaved or at random, optionally
    with smaller dims and rows within a kind. Dims: 1-8, powers of two, ``2^k - 1 / 2^k / 2^k + 1``,
    anything up to 256, now and then up to ``max_dim``; rows: 1-16, 17-1000, or up to
    ``max_num_embeddings``. Table elements stay under ``max_cost / 2``, the total dim under
    ``max_cost / 8``. ``dtypes`` defaults to the float dtypes; it may add the quantized storages
    ``"int8"``, ``"int4"``, ``"int2"`` (``dtypes=TABLE_DTYPES``: a kind is then quantized one time
    in nine, its dim fitted to whole bytes of packed codes, `harness.fuzz.quantized_rows`).
    Quantized storage is opt-in so that a user's float-only kernel is not failed by it.
    """
    o = _table_options(
        min_tables=min_tables,
        max_tables=max_tables,
        max_features=max_features,
        max_features_per_table=max_features_per_table,
        max_dim=max_dim,
        max_num_embeddings=max_num_embeddings,
        dtypes=dtypes,
        poolings=poolings,
    )
    _check_int("max_cost", max_cost, 1)
    return _table_configs(o, max_cost)


# ---------------------------------------------------------------------------------------------
# Weights


def weight_specs(*, profiles: Sequence[str] = WEIGHT_PROFILES) -> st.SearchStrategy[tuple[str, int]]:
    """``(profile, seed)`` pairs for `make_profile_weights`; shrinks towards ``(profiles[0], 0)``."""
    profiles = _check_choices("profiles", profiles, WEIGHT_PROFILES)
    return st.tuples(st.sampled_from(profiles), _SEEDS)


def table_weights(
    table: TableConfig, *, profiles: Sequence[str] = WEIGHT_PROFILES
) -> st.SearchStrategy[torch.Tensor]:
    """Weights for one table, built from a seed and one of ``profiles`` (see `WEIGHT_PROFILES`)."""
    if not isinstance(table, TableConfig):
        raise InvalidArgument(f"table={table!r} must be a TableConfig")
    return weight_specs(profiles=profiles).map(lambda spec: make_profile_weights(table, *spec))


def per_sample_weights(
    *, size: int, wide: bool = True, profiles: Sequence[str] = SAMPLE_WEIGHT_PROFILES
) -> st.SearchStrategy[torch.Tensor]:
    """A float32 tensor of ``size`` per-sample weights, built from a seed and a profile of
    ``profiles`` (`SAMPLE_WEIGHT_PROFILES`: mixed ones, zeros and negatives, ones, integers,
    positive, wide). ``wide=False`` leaves the ``wide`` profile out."""
    _check_int("size", size, 0)
    _check_bool("wide", wide)
    profiles = _check_choices("profiles", profiles, SAMPLE_WEIGHT_PROFILES)
    if not wide:
        profiles = tuple(p for p in profiles if p != "wide") or ("mixed",)
    return st.builds(make_sample_weights, st.just(size), st.sampled_from(profiles), _SEEDS)


# ---------------------------------------------------------------------------------------------
# Batches


@dataclass(frozen=True)
class _BatchOptions:
    min_batch_size: int
    max_batch_size: int
    max_bag_length: int
    max_long_bag_length: int
    length_profiles: tuple[str, ...]
    id_distributions: tuple[str, ...]
    id_dtypes: tuple[torch.dtype, ...]
    sample_weight_profiles: tuple[str, ...]
    shuffle_keys: bool


def _batch_options(**kw: object) -> _BatchOptions:
    _check_range("min_batch_size", kw["min_batch_size"], "max_batch_size", kw["max_batch_size"], 0)
    _check_int("max_bag_length", kw["max_bag_length"], 0)
    _check_int("max_long_bag_length", kw["max_long_bag_length"], 0)
    if kw["max_long_bag_length"] < kw["max_bag_length"]:
        raise InvalidArgument(
            f"max_long_bag_length={kw['max_long_bag_length']} is smaller than "
            f"max_bag_length={kw['max_bag_length']}"
        )
    kw["length_profiles"] = _check_choices("length_profiles", kw["length_profiles"], LENGTH_PROFILES)
    kw["id_distributions"] = _check_choices("id_distributions", kw["id_distributions"], ID_DISTRIBUTIONS)
    kw["id_dtypes"] = _check_choices("id_dtypes", kw["id_dtypes"], ID_DTYPES)
    kw["sample_weight_profiles"] = _check_choices(
        "sample_weight_profiles", kw["sample_weight_profiles"], SAMPLE_WEIGHT_PROFILES
    )
    _check_bool("shuffle_keys", kw["shuffle_keys"])
    return _BatchOptions(**kw)


@dataclass(frozen=True)
class _Shape:
    """The first draws of an example: its size class, length profile, and where its batch size
    and bag length lie in the ranges that the class and the budget will leave them."""

    size: _Size
    profile: str
    batch_position: int
    bag_position: int


def _draw_shape(draw: st.DrawFn, length_profiles: tuple[str, ...]) -> _Shape:
    size = _pick(draw, [(s.weight, s) for s in _SIZES])
    profile = _weighted_choice(draw, _LENGTH_WEIGHTS, length_profiles)
    return _Shape(size, profile, draw(_POSITIONS), draw(_POSITIONS))


def _draw_batch(
    draw: st.DrawFn,
    tables: tuple[TableConfig, ...],
    o: _BatchOptions,
    budget: int,
    shape: _Shape,
) -> dict:
    """The batch fields of a `ProblemSpec` of ``shape``, capped so that the spec's cost stays
    within ``budget`` (as far as ``min_batch_size`` allows)."""
    width = total_dim(tables)
    widest = max(t.embedding_dim for t in tables)
    left = max(0, budget - sum(t.num_embeddings * t.embedding_dim for t in tables))
    profile = shape.profile
    (b_low, b_high), (l_low, l_high) = shape.size.batch, shape.size.bags
    slot = width + ID_COST * sum(len(t.feature_names) for t in tables)  # a sample's id in each bag
    per_bag = {"one-huge": 3, "empty": 0}.get(profile, l_low)
    b_cap = max(o.min_batch_size, min(o.max_batch_size, left // (width + per_bag * slot)))
    rng = _LazyRng(draw)
    b = _between(draw, b_low, b_high, o.min_batch_size, b_cap, shape.batch_position, rng)
    if profile == "empty":
        length = 0
    elif profile == "one-huge":  # the huge bag ranges over 65..max_long_bag_length in any class
        cap = (left - b * (width + 3 * slot)) // (widest + ID_COST) if b else o.max_long_bag_length
        cap = max(0, min(o.max_long_bag_length, cap))
        length = _between(draw, 65, 2**31, 0, cap, shape.bag_position, rng)
    else:
        cap = (left - b * width) // (b * slot) if b else o.max_bag_length
        cap = max(0, min(o.max_bag_length, cap))
        length = _between(draw, l_low, l_high, 0, cap, shape.bag_position, rng)
    return {
        "batch_size": b,
        "length_profile": profile,
        "bag_length": length,
        "id_distribution": _weighted_choice(draw, _ID_WEIGHTS, o.id_distributions),
        "id_dtype": draw(_choice(o.id_dtypes)),
        "key_order": draw(_choice(KEY_ORDERS)) if o.shuffle_keys else "tables",
    }


@st.composite
def _jagged_batches(
    draw: st.DrawFn, tables: tuple[TableConfig, ...], o: _BatchOptions, weighted: bool | None, budget: int
) -> JaggedBatch:
    shape = _draw_shape(draw, o.length_profiles)
    if weighted is None:
        weighted = all(t.pooling is Pooling.SUM for t in tables) and draw(st.booleans())
    sample_weights = draw(_choice(o.sample_weight_profiles)) if weighted else None
    fields = _draw_batch(draw, tables, o, budget, shape)
    seed = draw(_SEEDS)
    spec = ProblemSpec(tables, ("unit",) * len(tables), sample_weights=sample_weights, seed=seed, **fields)
    return build_batch(spec)


def jagged_batches(
    tables: Sequence[TableConfig],
    *,
    min_batch_size: int = 0,
    max_batch_size: int = 16_384,
    max_bag_length: int = 16_384,
    max_long_bag_length: int = 100_000,
    weighted: bool | None = None,
    sample_weight_profiles: Sequence[str] = SAMPLE_WEIGHT_PROFILES,
    length_profiles: Sequence[str] = LENGTH_PROFILES,
    id_distributions: Sequence[str] = ID_DISTRIBUTIONS,
    id_dtypes: Sequence[torch.dtype] = ID_DTYPES,
    shuffle_keys: bool = True,
    max_cost: int = DEFAULT_MAX_COST,
) -> st.SearchStrategy[JaggedBatch]:
    """Batches over ``tables``' features, valid for them (every id below its table's size).

    A size class sets the batch size and bag length: tiny (0-4 samples, bags of 0-4), small,
    medium (8-256 samples, bags up to 64), long bags (257 to ``max_bag_length``), large batches
    (1024 to ``max_batch_size`` samples) or many ids. The lengths follow a length profile of
    ``length_profiles``; the one-huge profile's bag reaches ``max_long_bag_length``. The ids
    follow a distribution of ``id_distributions``. Sizes are capped so that the cost (tables +
    output + ids x dim, see `ProblemSpec.cost`) stays under ``max_cost``. ``weighted=None`` draws
    per-sample weights or not (never for a table that pools MEAN); with ``shuffle_keys`` the batch
    keys may come reversed or shuffled.
    """
    if isinstance(tables, TableConfig) or not isinstance(tables, Sequence) or not tables:
        raise InvalidArgument(f"tables={tables!r} must be a non-empty sequence of TableConfig")
    for i, t in enumerate(tables):
        if not isinstance(t, TableConfig):
            raise InvalidArgument(f"tables[{i}]={t!r} is not a TableConfig")
    o = _batch_options(
        min_batch_size=min_batch_size,
        max_batch_size=max_batch_size,
        max_bag_length=max_bag_length,
        max_long_bag_length=max_long_bag_length,
        length_profiles=length_profiles,
        id_distributions=id_distributions,
        id_dtypes=id_dtypes,
        sample_weight_profiles=sample_weight_profiles,
        shuffle_keys=shuffle_keys,
    )
    _check_weighted(weighted)
    if weighted and any(t.pooling is not Pooling.SUM for t in tables):
        raise InvalidArgument("weighted=True needs every table to pool SUM (per-sample weights require SUM)")
    _check_int("max_cost", max_cost, 1)
    return _jagged_batches(tuple(tables), o, weighted, max_cost)


# ---------------------------------------------------------------------------------------------
# Whole problems


@st.composite
def _problem_specs(
    draw: st.DrawFn,
    tables: st.SearchStrategy[Sequence[TableConfig]] | None,
    table_options: _TableOptions,
    batch_options: _BatchOptions,
    weighted: bool | None,
    profiles: tuple[str, ...],
    budget: int,
) -> ProblemSpec:
    shape = _draw_shape(draw, batch_options.length_profiles)
    if weighted is None:
        weighted = Pooling.SUM in table_options.poolings and _pick(draw, ((60, False), (40, True)))
    if tables is None:
        configs, weight_profiles = _draw_tables(
            draw, table_options, budget, sum_only=weighted, profiles=profiles, max_dim=shape.size.max_dim
        )
    else:
        configs = tuple(draw(tables))
        kinds = [draw(_choice(profiles)) for _ in range(draw(st.integers(1, min(4, len(configs)))))]
        weight_profiles = tuple(kinds[i % len(kinds)] for i in range(len(configs)))
        weighted = weighted and all(t.pooling is Pooling.SUM for t in configs)
    sample_weights = draw(_choice(batch_options.sample_weight_profiles)) if weighted else None
    fields = _draw_batch(draw, configs, batch_options, budget, shape)
    seed = draw(_SEEDS)
    return ProblemSpec(configs, weight_profiles, sample_weights=sample_weights, seed=seed, **fields)


def problem_specs(
    *,
    tables: st.SearchStrategy[Sequence[TableConfig]] | None = None,
    min_tables: int = 1,
    max_tables: int = 64,
    max_features: int = 256,
    max_features_per_table: int = 16,
    max_dim: int = 1024,
    max_num_embeddings: int = 100_000,
    dtypes: Sequence[TableDtype] = SUPPORTED_DTYPES,
    poolings: Sequence[Pooling] = (Pooling.SUM, Pooling.MEAN),
    profiles: Sequence[str] = WEIGHT_PROFILES,
    weighted: bool | None = None,
    sample_weight_profiles: Sequence[str] = SAMPLE_WEIGHT_PROFILES,
    min_batch_size: int = 0,
    max_batch_size: int = 16_384,
    max_bag_length: int = 16_384,
    max_long_bag_length: int = 100_000,
    length_profiles: Sequence[str] = LENGTH_PROFILES,
    id_distributions: Sequence[str] = ID_DISTRIBUTIONS,
    id_dtypes: Sequence[torch.dtype] = ID_DTYPES,
    shuffle_keys: bool = True,
    max_cost: int = DEFAULT_MAX_COST,
) -> st.SearchStrategy[ProblemSpec]:
    """`ProblemSpec`s: the structure of a problem and its seed (`build_problem` makes the tensors).

    The tables come from ``tables`` (a strategy, e.g. `table_configs`) or are drawn with the table
    options (those of `table_configs`; give them there or here, not both). Their weights follow
    ``profiles`` (`WEIGHT_PROFILES`), up to four profiles per problem. ``weighted=None`` draws
    whether there are per-sample weights (profiles ``sample_weight_profiles``): weighted problems
    get SUM tables only, and with your ``tables`` a MEAN table means unweighted. The batch options
    are those of `jagged_batches`; every spec costs at most ``max_cost`` (`ProblemSpec.cost`) as
    far as your tables and ``min_batch_size`` allow.
    """
    table_kw = {
        "min_tables": min_tables,
        "max_tables": max_tables,
        "max_features": max_features,
        "max_features_per_table": max_features_per_table,
        "max_dim": max_dim,
        "max_num_embeddings": max_num_embeddings,
        "dtypes": dtypes,
        "poolings": poolings,
    }
    if tables is not None:
        if not isinstance(tables, st.SearchStrategy):
            raise InvalidArgument(f"tables={tables!r} must be a strategy (e.g. table_configs(...)) or None")
        changed = [k for k, v in table_kw.items() if _plain(v) != _plain(_TABLE_DEFAULTS[k])]
        if changed:
            raise InvalidArgument(f"give {changed} to the tables strategy, not with tables=")
    table_options = _table_options(**table_kw)
    _check_weighted(weighted)
    if weighted and tables is None and Pooling.SUM not in table_options.poolings:
        raise InvalidArgument("weighted=True needs SUM among poolings (per-sample weights require SUM)")
    profiles = _check_choices("profiles", profiles, WEIGHT_PROFILES)
    batch_options = _batch_options(
        min_batch_size=min_batch_size,
        max_batch_size=max_batch_size,
        max_bag_length=max_bag_length,
        max_long_bag_length=max_long_bag_length,
        length_profiles=length_profiles,
        id_distributions=id_distributions,
        id_dtypes=id_dtypes,
        sample_weight_profiles=sample_weight_profiles,
        shuffle_keys=shuffle_keys,
    )
    _check_int("max_cost", max_cost, 1)
    return _problem_specs(tables, table_options, batch_options, weighted, profiles, max_cost)


def _plain(value: object) -> object:
    return tuple(value) if isinstance(value, (list, tuple)) else value


def _built(spec: ProblemSpec) -> Problem:
    problem = build_problem(spec)
    try:
        for dimension, bucket in buckets(problem).items():
            event(dimension, bucket)  # shown by --hypothesis-show-statistics
    except InvalidArgument:  # drawn outside any Hypothesis test: no statistics to record
        pass
    return problem


def problems(**options: object) -> st.SearchStrategy[Problem]:
    """Whole valid `Problem`s: `problem_specs` (same keyword options) built by `build_problem`.

    ``problem.metadata["spec"]`` is the spec, as JSON. Each example records its coverage buckets
    (`harness.fuzz.coverage.buckets`) with `hypothesis.event`, so ``pytest
    --hypothesis-show-statistics`` shows what a test of yours exercised.
    """
    return problem_specs(**options).map(_built)


problems.__signature__ = inspect.signature(problem_specs).replace(  # type: ignore[attr-defined]
    return_annotation="st.SearchStrategy[Problem]"
)
