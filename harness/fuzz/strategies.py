"""Hypothesis strategies for pooled jagged embedding lookup problems, public and composable.

Use them in your own tests the way Hypothesis's own strategies are used::

    from hypothesis import given
    from harness.fuzz.strategies import problems

    @given(problems(max_tables=2, dtypes=[torch.float32]))
    def test_my_kernel(problem): ...

Every strategy takes keyword-only arguments and checks them up front (`InvalidArgument`). Between
them they reach: 1..many tables, tables shared by several features, batch keys in another order
than the tables declare them, dims from 1 (odd, non-power-of-two, not multiples of a vector width),
1-row tables and tables far larger than the batch touches, batch size 0, 1 and large, empty bags,
bags of one id and (rarely) bags of thousands of ids, duplicate ids, ids 0 and ``num_embeddings - 1``,
uniform and Zipf-skewed ids, SUM and MEAN, per-sample weights (zero and negative too) or none,
float32 / float16 / bfloat16 tables whose values span the dtype's range, and int32 / int64 ids.

Cheapness: small batches draw every bag as a list of ids (its per-sample weights right after it),
so that Hypothesis shrinks them bag by bag to readable minimal cases; table weights, large batches
and long bags are generated from a drawn seed (and a drawn value profile), so a 100 000-row table
or a 2000-id bag costs one draw.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument

from harness.model import ID_DTYPES, SUPPORTED_DTYPES, JaggedBatch, Pooling, Problem, TableConfig

WEIGHT_PROFILES: tuple[str, ...] = ("unit", "integers", "wide", "huge", "tiny", "subnormal", "cancel")
"""Value profiles of table weights (`make_profile_weights`):

- ``unit``: standard normal values, the usual case;
- ``integers``: small integers in [-4, 4] (exact sums: any misplaced term shows exactly);
- ``wide``: a random exponent per element across the whole dtype range, subnormals to near the
  largest finite value, random signs;
- ``huge``: magnitudes between 1/8 of the largest finite value and that value;
- ``tiny``: magnitudes between the smallest normal and 8 times it;
- ``subnormal``: the dtype's subnormal values;
- ``cancel``: rows in pairs ``r, -r (1 + small)`` of large magnitude, so sums cancel.
"""

ID_DISTRIBUTIONS: tuple[str, ...] = ("uniform", "zipf")

# Draw ids and weights one by one up to this many per feature; above it, generate them from a seed.
_DRAWN_LIMIT = 24
# Tables larger than this are a seeded block of this many rows, repeated: cheap to build.
_BLOCK_ROWS = 1021  # prime: the repetition period matches no power-of-two offset bug


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


# ---------------------------------------------------------------------------------------------
# Table configs


@st.composite
def _table_configs(
    draw: st.DrawFn,
    min_tables: int,
    max_tables: int,
    max_features_per_table: int,
    max_dim: int,
    max_num_embeddings: int,
    dtypes: tuple[torch.dtype, ...],
    poolings: tuple[Pooling, ...],
) -> tuple[TableConfig, ...]:
    n_tables = draw(st.integers(min_tables, max_tables))
    dims = st.one_of(
        st.integers(1, min(8, max_dim)),
        st.sampled_from(sorted({min(d, max_dim) for d in (16, 32, 64, 128)})),
        st.integers(1, max_dim),
    )
    rows = st.one_of(
        st.integers(1, min(16, max_num_embeddings)), st.integers(1, min(1000, max_num_embeddings))
    )
    tables = []
    feature = 0
    for i in range(n_tables):
        n_features = draw(st.one_of(st.just(1), st.integers(1, max_features_per_table)))
        names = tuple(f"f{feature + j}" for j in range(n_features))
        feature += n_features
        if max_num_embeddings > 1000 and draw(st.integers(0, 7)) == 7:  # rarely, a large table
            num_embeddings = draw(st.integers(1001, max_num_embeddings))
            dim = draw(st.integers(1, min(16, max_dim)))  # keeps it cheap to build and to check
        else:
            num_embeddings = draw(rows)
            dim = draw(dims)
        tables.append(
            TableConfig(
                name=f"t{i}",
                num_embeddings=num_embeddings,
                embedding_dim=dim,
                feature_names=names,
                pooling=draw(st.sampled_from(poolings)),
                dtype=draw(st.sampled_from(dtypes)),
            )
        )
    return tuple(tables)


def table_configs(
    *,
    min_tables: int = 1,
    max_tables: int = 4,
    max_features_per_table: int = 3,
    max_dim: int = 130,
    max_num_embeddings: int = 100_000,
    dtypes: Sequence[torch.dtype] = SUPPORTED_DTYPES,
    poolings: Sequence[Pooling] = (Pooling.SUM, Pooling.MEAN),
) -> st.SearchStrategy[tuple[TableConfig, ...]]:
    """Tuples of `TableConfig` named ``t0, t1, ...`` with features ``f0, f1, ...`` in order.

    Tables may carry several features (a shared table). Dims come from small ones (1..8), powers
    of two, and anything up to ``max_dim``; row counts from 1-row tables to 1000, and about one
    table in 8 has 1001 to ``max_num_embeddings`` rows (with a dim of at most 16, to stay cheap).
    """
    _check_range("min_tables", min_tables, "max_tables", max_tables, 1)
    _check_int("max_features_per_table", max_features_per_table, 1)
    _check_int("max_dim", max_dim, 1)
    _check_int("max_num_embeddings", max_num_embeddings, 1)
    dtypes = _check_choices("dtypes", dtypes, SUPPORTED_DTYPES)
    poolings = _check_choices("poolings", poolings, tuple(Pooling))
    return _table_configs(
        min_tables, max_tables, max_features_per_table, max_dim, max_num_embeddings, dtypes, poolings
    )


# ---------------------------------------------------------------------------------------------
# Table weights


_SUBNORMAL_EXP = {torch.float32: -149, torch.float16: -24, torch.bfloat16: -133}


def _dtype_exponents(dtype: torch.dtype) -> tuple[int, int, float, float]:
    """(smallest subnormal exponent, smallest normal exponent, smallest normal, largest finite)."""
    info = torch.finfo(dtype)
    return _SUBNORMAL_EXP[dtype], int(np.log2(info.tiny)), float(info.tiny), float(info.max)


def make_profile_weights(table: TableConfig, profile: str, seed: int) -> torch.Tensor:
    """``[num_embeddings, embedding_dim]`` weights of the table's dtype, from a value profile and seed.

    Deterministic on any machine. Values are built in float64 and rounded once to the dtype
    (clamped to its finite range). Tables of more than 1021 rows repeat a seeded 1021-row block
    (a prime period), which keeps a table far larger than the batch touches cheap to build.
    """
    if profile not in WEIGHT_PROFILES:
        raise InvalidArgument(f"profile={profile!r}; expected one of {WEIGHT_PROFILES}")
    n, dim, dtype = table.num_embeddings, table.embedding_dim, table.dtype
    rows = min(n, _BLOCK_ROWS)
    gen = torch.Generator().manual_seed(seed % (2**63))
    shape = (rows, dim)
    sub_exp, normal_exp, tiny, big = _dtype_exponents(dtype)
    if profile == "unit":
        w = torch.randn(shape, generator=gen, dtype=torch.float64)
    elif profile == "integers":
        w = torch.randint(-4, 5, shape, generator=gen).to(torch.float64)
    else:
        sign = torch.randint(0, 2, shape, generator=gen).to(torch.float64) * 2 - 1
        unit = torch.rand(shape, generator=gen, dtype=torch.float64)
    if profile in ("unit", "integers"):
        pass
    elif profile == "wide":
        exps = torch.randint(sub_exp, int(np.log2(big)) + 1, shape, generator=gen).to(torch.float64)
        w = sign * (1 + unit) * torch.exp2(exps)
    elif profile == "huge":
        w = sign * big * (0.125 + 0.875 * unit)
    elif profile == "tiny":
        w = sign * tiny * (1 + 7 * unit)
    elif profile == "subnormal":
        w = sign * tiny * unit
    else:  # cancel
        base = torch.randn(shape, generator=gen, dtype=torch.float64) * 2.0**10
        w = base.clone()
        w[1::2] = -base[0::2][: rows // 2] * (1 + 2.0**-8 * unit[1::2])
    w = w.clamp(-big, big).to(dtype)
    if rows < n:
        w = w.repeat((n + rows - 1) // rows, 1)[:n]
    return w.contiguous()


def weight_specs() -> st.SearchStrategy[tuple[str, int]]:
    """``(profile, seed)`` pairs for `make_profile_weights`; shrinks towards ``("unit", 0)``."""
    return st.tuples(st.sampled_from(WEIGHT_PROFILES), st.integers(0, 2**32 - 1))


def table_weights(
    table: TableConfig, *, profiles: Sequence[str] = WEIGHT_PROFILES
) -> st.SearchStrategy[torch.Tensor]:
    """Weights for one table, generated by seed from one of ``profiles`` (see `WEIGHT_PROFILES`)."""
    if not isinstance(table, TableConfig):
        raise InvalidArgument(f"table={table!r} must be a TableConfig")
    profiles = _check_choices("profiles", profiles, WEIGHT_PROFILES)
    return st.builds(
        make_profile_weights, st.just(table), st.sampled_from(profiles), st.integers(0, 2**32 - 1)
    )


# ---------------------------------------------------------------------------------------------
# Per-sample weights


_SPECIAL_SAMPLE_WEIGHTS = (1.0, 0.0, -1.0, 0.5, -2.0, -0.0, 3.0)


def per_sample_weights(*, size: int, wide: bool = True) -> st.SearchStrategy[torch.Tensor]:
    """A float32 tensor of ``size`` per-sample weights: ones, zeros, negatives, any values.

    With ``wide`` some weights are any finite float32 (products may overflow or underflow; the
    tolerance accounts for both). Up to 24 weights are drawn one by one; more come from a seed.
    """
    _check_int("size", size, 0)
    if not isinstance(wide, bool):
        raise InvalidArgument(f"wide={wide!r} must be a bool")
    parts = [
        st.sampled_from(_SPECIAL_SAMPLE_WEIGHTS),
        st.floats(-4, 4, width=32),
    ]
    if wide:
        parts.append(st.floats(allow_nan=False, allow_infinity=False, width=32))
    element = st.one_of(*parts)
    if size <= _DRAWN_LIMIT:
        return st.lists(element, min_size=size, max_size=size).map(
            lambda xs: torch.tensor(xs, dtype=torch.float32)
        )
    return st.integers(0, 2**32 - 1).map(lambda s: _seeded_sample_weights(size, s))


def _seeded_sample_weights(size: int, seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(size)
    special = rng.random(size)
    w[special < 0.1] = 0.0
    w[(special >= 0.1) & (special < 0.2)] = 1.0
    return torch.from_numpy(w.astype(np.float32))


# ---------------------------------------------------------------------------------------------
# Jagged batches


def _seeded_ids(n_ids: int, num_embeddings: int, distribution: str, seed: int) -> list[int]:
    rng = np.random.default_rng(seed)
    if distribution == "zipf":
        ids = (rng.zipf(1.2, n_ids) - 1) % num_embeddings
    else:
        ids = rng.integers(0, num_embeddings, n_ids)
    if n_ids >= 2:
        ids[rng.integers(0, n_ids)] = 0
        ids[rng.integers(0, n_ids)] = num_embeddings - 1
    return ids.tolist()


def _seeded_lengths(batch_size: int, max_bag_length: int, seed: int) -> list[int]:
    """Bag lengths for a large batch: a quarter empty, the rest uniform in 1..max_bag_length."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, max_bag_length + 1, batch_size) if max_bag_length else np.zeros(batch_size, int)
    lengths[rng.random(batch_size) < 0.25] = 0
    return lengths.tolist()


def _id_element(num_embeddings: int) -> st.SearchStrategy[int]:
    top = num_embeddings - 1
    return st.one_of(
        st.integers(0, top),
        st.sampled_from(sorted({0, top})),
        st.integers(0, min(top, 3)),  # a hot set: duplicates and skew
    )


@st.composite
def _seeded_bags(draw: st.DrawFn, lengths: list[int], num_embeddings: int) -> list[list[int]]:
    distribution = draw(st.sampled_from(ID_DISTRIBUTIONS))
    ids = _seeded_ids(sum(lengths), num_embeddings, distribution, draw(st.integers(0, 2**32 - 1)))
    return _split(ids, lengths)


def _split(values: list, lengths: list[int]) -> list:
    out, start = [], 0
    for n in lengths:
        out.append(values[start : start + n])
        start += n
    return out


@st.composite
def _jagged_batches(
    draw: st.DrawFn,
    tables: tuple[TableConfig, ...],
    min_batch_size: int,
    max_batch_size: int,
    max_bag_length: int,
    max_long_bag_length: int,
    weighted: bool | None,
    id_dtypes: tuple[torch.dtype, ...],
    shuffle_keys: bool,
) -> JaggedBatch:
    """Up to 16 samples are drawn bag by bag (each bag's weights right after it), which Hypothesis
    shrinks bag by bag. The rare extras (more samples, one long bag) come from seeds and are drawn
    last, so that shrinking can drop them without disturbing the rest."""
    size_of = {f: t.num_embeddings for t in tables for f in t.feature_names}
    keys = [f for t in tables for f in t.feature_names]
    if shuffle_keys:
        keys = list(draw(st.permutations(keys)))
    if weighted is None:
        weighted = all(t.pooling is Pooling.SUM for t in tables) and draw(st.booleans())
    small = min(max_batch_size, max(min_batch_size, 16))
    b = draw(
        st.one_of(
            st.integers(min_batch_size, max(min_batch_size, min(small, 4))),
            st.integers(min_batch_size, small),
        )
    )
    bags: dict[str, list[list[int]]] = {}
    weights: dict[str, list[torch.Tensor]] = {}
    for key in keys:
        element = _id_element(size_of[key])
        bag = st.one_of(
            st.lists(element, max_size=min(3, max_bag_length)), st.lists(element, max_size=max_bag_length)
        )
        bags[key], weights[key] = [], []
        for _ in range(b):
            bags[key].append(draw(bag))
            if weighted:
                weights[key].append(draw(per_sample_weights(size=len(bags[key][-1]))))
    id_dtype = draw(st.sampled_from(id_dtypes))
    if max_batch_size > b and draw(st.integers(0, 15)) == 15:  # rarely, a large batch
        extra = draw(st.integers(1, max_batch_size - b))
        for key in keys:
            lengths = _seeded_lengths(extra, max_bag_length, draw(st.integers(0, 2**32 - 1)))
            bags[key] += draw(_seeded_bags(lengths, size_of[key]))
            if weighted:
                weights[key] += _split(draw(per_sample_weights(size=sum(lengths))), lengths)
    total = len(bags[keys[0]])
    if max_long_bag_length > max_bag_length and total > 0 and draw(st.integers(0, 15)) == 15:
        key = draw(st.sampled_from(keys))  # rarely, one long bag
        where = draw(st.integers(0, total - 1))
        length = draw(st.integers(max_bag_length + 1, max_long_bag_length))
        bags[key][where] = draw(_seeded_bags([length], size_of[key]))[0]
        if weighted:
            weights[key][where] = draw(per_sample_weights(size=length))
    per_sample = None
    if weighted:
        flat = [w for key in keys for w in weights[key]]
        per_sample = torch.cat(flat) if flat else torch.zeros(0, dtype=torch.float32)
    return JaggedBatch(
        keys=tuple(keys),
        values=torch.tensor([i for key in keys for x in bags[key] for i in x], dtype=id_dtype),
        lengths=torch.tensor([len(x) for key in keys for x in bags[key]], dtype=torch.int64),
        weights=per_sample,
    )


def jagged_batches(
    tables: Sequence[TableConfig],
    *,
    min_batch_size: int = 0,
    max_batch_size: int = 200,
    max_bag_length: int = 16,
    max_long_bag_length: int = 2000,
    weighted: bool | None = None,
    id_dtypes: Sequence[torch.dtype] = ID_DTYPES,
    shuffle_keys: bool = True,
) -> st.SearchStrategy[JaggedBatch]:
    """Batches over ``tables``' features, valid for them (every id below its table's size).

    Batch sizes favour 0..4 and 0..16; about one batch in 16 has more samples, up to
    ``max_batch_size`` (their lengths and ids generated from a seed). Bag lengths favour 0..3 but
    reach ``max_bag_length``, and about one batch in 16 gets one long bag of up to
    ``max_long_bag_length`` ids (set it to ``max_bag_length`` to turn those off). ``weighted=None``
    draws per-sample weights or not (never for a table that pools MEAN). With ``shuffle_keys`` the
    batch keys come in any order, not the tables' order.
    """
    if isinstance(tables, TableConfig) or not isinstance(tables, Sequence) or not tables:
        raise InvalidArgument(f"tables={tables!r} must be a non-empty sequence of TableConfig")
    for i, t in enumerate(tables):
        if not isinstance(t, TableConfig):
            raise InvalidArgument(f"tables[{i}]={t!r} is not a TableConfig")
    _check_range("min_batch_size", min_batch_size, "max_batch_size", max_batch_size, 0)
    _check_int("max_bag_length", max_bag_length, 0)
    _check_int("max_long_bag_length", max_long_bag_length, 0)
    if max_long_bag_length < max_bag_length:
        raise InvalidArgument(
            f"max_long_bag_length={max_long_bag_length} is smaller than max_bag_length={max_bag_length}"
        )
    _check_weighted(weighted)
    if weighted and any(t.pooling is not Pooling.SUM for t in tables):
        raise InvalidArgument("weighted=True needs every table to pool SUM (per-sample weights require SUM)")
    id_dtypes = _check_choices("id_dtypes", id_dtypes, ID_DTYPES)
    if not isinstance(shuffle_keys, bool):
        raise InvalidArgument(f"shuffle_keys={shuffle_keys!r} must be a bool")
    return _jagged_batches(
        tuple(tables),
        min_batch_size,
        max_batch_size,
        max_bag_length,
        max_long_bag_length,
        weighted,
        id_dtypes,
        shuffle_keys,
    )


# ---------------------------------------------------------------------------------------------
# Whole problems


@st.composite
def _problems(
    draw: st.DrawFn,
    tables: st.SearchStrategy[tuple[TableConfig, ...]] | None,
    weighted: bool | None,
    profiles: tuple[str, ...],
    batch_kwargs: dict,
) -> Problem:
    if weighted is None:
        weighted = draw(st.booleans())
    if tables is None:
        poolings = (Pooling.SUM,) if weighted else (Pooling.SUM, Pooling.MEAN)
        configs = draw(table_configs(poolings=poolings))
    else:
        configs = tuple(draw(tables))
        if weighted and any(t.pooling is not Pooling.SUM for t in configs):
            weighted = False
    specs = {t.name: draw(st.tuples(st.sampled_from(profiles), st.integers(0, 2**32 - 1))) for t in configs}
    weights = {t.name: make_profile_weights(t, *specs[t.name]) for t in configs}
    batch = draw(jagged_batches(configs, weighted=weighted, **batch_kwargs))
    return Problem(configs, weights, batch, {"weight_profiles": specs})


def problems(
    *,
    tables: st.SearchStrategy[Sequence[TableConfig]] | None = None,
    weighted: bool | None = None,
    profiles: Sequence[str] = WEIGHT_PROFILES,
    min_batch_size: int = 0,
    max_batch_size: int = 200,
    max_bag_length: int = 16,
    max_long_bag_length: int = 2000,
    id_dtypes: Sequence[torch.dtype] = ID_DTYPES,
    shuffle_keys: bool = True,
) -> st.SearchStrategy[Problem]:
    """Whole valid `Problem`s: tables (default `table_configs()`), their weights, and a batch.

    ``weighted=None`` draws whether the batch has per-sample weights (with the default tables,
    weighted problems get SUM tables only; with your ``tables`` strategy, a MEAN table means
    unweighted). Table weights follow ``profiles`` (see `WEIGHT_PROFILES`); the drawn
    ``(profile, seed)`` of each table is in ``problem.metadata["weight_profiles"]``.
    The batch options are those of `jagged_batches`.
    """
    if tables is not None and not isinstance(tables, st.SearchStrategy):
        raise InvalidArgument(f"tables={tables!r} must be a strategy (e.g. table_configs(...)) or None")
    _check_weighted(weighted)
    profiles = _check_choices("profiles", profiles, WEIGHT_PROFILES)
    _check_range("min_batch_size", min_batch_size, "max_batch_size", max_batch_size, 0)
    _check_int("max_bag_length", max_bag_length, 0)
    _check_int("max_long_bag_length", max_long_bag_length, max_bag_length)
    id_dtypes = _check_choices("id_dtypes", id_dtypes, ID_DTYPES)
    if not isinstance(shuffle_keys, bool):
        raise InvalidArgument(f"shuffle_keys={shuffle_keys!r} must be a bool")
    batch_kwargs = {
        "min_batch_size": min_batch_size,
        "max_batch_size": max_batch_size,
        "max_bag_length": max_bag_length,
        "max_long_bag_length": max_long_bag_length,
        "id_dtypes": id_dtypes,
        "shuffle_keys": shuffle_keys,
    }
    return _problems(tables, weighted, profiles, batch_kwargs)
