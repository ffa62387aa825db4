"""A problem's structure and seed (`ProblemSpec`), and the tensors numpy builds from them.

Hypothesis draws only the structure (`harness.fuzz.strategies.problem_specs`): the tables, the
batch size and which *profile* the lengths, ids and values follow. `build_problem` then makes the
bulk tensors from the spec's seed, vectorised, so an example costs tens of draws whatever its
size. A spec is also usable without Hypothesis::

    spec = ProblemSpec(tables=(TableConfig("t0", 1000, 64, ("f0", "f1")),), weight_profiles=("unit",),
                       batch_size=512, length_profile="pow2", bag_length=300, seed=7)
    problem = build_problem(spec)     # the same tensors on every call (and machine, same numpy)

Determinism: each part (lengths, ids, per-sample weights, key order, each table's weights) is
made from the raw words of its own SplitMix64 stream, whose state is a SplitMix64 hash of the
seed and the part, with integer and exact floating-point arithmetic (Zipf ranks take one
``pow``). The generator is fully specified, so the tensors are the same on every machine and
numpy version; a test pins a small spec's tensors.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from harness.fuzz.quantized_rows import ROW_WORDS, quantized_profile_weights
from harness.fuzz.words import PROFILE_CODES, normal, profile_values, scaled, sign, stream_words, unit
from harness.model import (
    ID_DTYPES,
    JaggedBatch,
    Pooling,
    Problem,
    TableConfig,
    TableWeights,
    dtype_from_name,
    dtype_name,
    is_quantized,
    total_dim,
)
from harness.validate import validate_tables
from harness.weights import table_seed

WEIGHT_PROFILES: tuple[str, ...] = tuple(PROFILE_CODES)
"""Value profiles of table weights (`make_profile_weights`), in the order of their codes in
`harness.fuzz.words.profile_values`, which computes them:

- ``unit``: standard normal values, the usual case;
- ``integers``: small integers in [-4, 4] (exact sums: any misplaced term shows exactly);
- ``positive``: one sign, magnitudes in [1/4, 4): no cancellation, so a sum is as large as the sum
  of its terms' magnitudes and the error bound is tight relative to it;
- ``wide``: a random exponent per element across the whole dtype range, subnormals to near the
  largest finite value, random signs;
- ``huge``: magnitudes between 1/8 of the largest finite value and that value;
- ``tiny``: magnitudes between the smallest normal and 8 times it;
- ``subnormal``: the dtype's subnormal values;
- ``cancel``: rows in pairs ``r, -r (1 + small)`` of large magnitude, so sums cancel.
"""

SAMPLE_WEIGHT_PROFILES: tuple[str, ...] = ("mixed", "ones", "integers", "positive", "wide")
"""Profiles of per-sample weights (float32, one per id):

- ``mixed``: standard normal, with about 10% zeros, 10% ones and 5% minus ones;
- ``ones``: all 1 (the result must equal the unweighted one);
- ``integers``: integers in [-3, 3];
- ``positive``: one sign, magnitudes in [1/8, 16): with ``positive`` tables, no cancellation;
- ``wide``: random signs and exponents over the whole float32 range, subnormals included
  (products may overflow or underflow; the tolerance accounts for both).
"""

LENGTH_PROFILES: tuple[str, ...] = ("uniform", "skewed", "pow2", "one-huge", "empty")
"""How bag lengths follow from ``bag_length`` (L):

- ``uniform``: every bag's length uniform in [0, L];
- ``skewed``: an octave ``k`` uniform in [0, bits(L)], then a length uniform in [0, 2^k - 1]
  (at most L): mostly short bags and empty ones, a tail up to L;
- ``pow2``: lengths ``2^k - 1``, ``2^k`` and ``2^k + 1`` (at most L), ``k`` uniform: the edges of
  warps, blocks and staging buffers;
- ``one-huge``: every bag of 0..3 ids but one bag (a seeded feature and sample) of exactly L;
- ``empty``: every bag empty.
"""

ID_DISTRIBUTIONS: tuple[str, ...] = ("uniform", "zipf", "hot", "duplicates", "edges")
"""How ids are spread over a table's rows:

- ``uniform``; ``zipf``: Zipf-skewed (exponent 1.2), row 0 the hottest;
- ``hot``: 90% of a feature's ids from a hot set of 1..8 rows;
- ``duplicates``: each bag holds copies of at most two rows;
- ``edges``: only rows 0 and ``num_embeddings - 1``.

Except under ``edges``, every feature with two or more ids reads row 0 and row
``num_embeddings - 1`` at least once (at seeded positions).
"""

KEY_ORDERS: tuple[str, ...] = ("tables", "reversed", "shuffled")
"""The batch's key order: as the tables declare their features, reversed, or a seeded shuffle.
Each feature's bags are the same whatever the order."""

_BLOCK_ROWS = 1021
_BLOCK_ELEMENTS = 2**16
_PRIMES = [p for p in range(2, _BLOCK_ROWS + 1) if all(p % q for q in range(2, int(p**0.5) + 1))]


@functools.cache
def block_rows(embedding_dim: int) -> int:
    """The period of a table's rows: 1021 up to dim 64, then the largest prime with at most
    2^16 elements in a block (509 at dim 128, 61 at dim 1024).

    A larger table repeats a seeded block of this many rows, which keeps a table far larger
    than the batch touches cheap to build. A prime, so that no power-of-two offset bug lines up
    with the period; a bug reading row ``i + k * period`` instead of ``i`` goes unseen.
    """
    limit = max(2, min(_BLOCK_ROWS, _BLOCK_ELEMENTS // max(1, embedding_dim)))
    return max(p for p in _PRIMES if p <= limit)


ID_COST = 8
"""What an id costs beyond its row's elements, in elements, in `ProblemSpec.cost`."""

# Independent random streams of one spec, so that changing one part leaves the others unchanged.
_LENGTHS, _IDS, _SAMPLE_WEIGHTS, _KEYS, _TABLE = 1, 2, 3, 4, 5
_SUBNORMAL_EXP = {torch.float32: -149, torch.float16: -24, torch.bfloat16: -133}


_MASK64 = 2**64 - 1


def _splitmix64(x: int) -> tuple[int, int]:
    """One step of SplitMix64 (Steele, Lea and Flood): the next state and a well-mixed output."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    z = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x, z ^ (z >> 31)


class _Bits:
    """One random stream: the raw 64-bit words of a SplitMix64 generator (`stream_words`) whose
    state is a SplitMix64 hash of the key (its integers, 64 bits at a time).

    SplitMix64 is fully specified integer arithmetic, so the words, and every value made from
    them below with integer and exact floating-point arithmetic, are the same on every machine
    and numpy version. Starting a stream costs a few microseconds and a word about a nanosecond
    (numpy's seeding costs tens of microseconds, its distributions several times more per value)."""

    def __init__(self, *key: int) -> None:
        x = 0
        for k in key:
            while True:
                x, _ = _splitmix64(x ^ (k & _MASK64))
                k >>= 64
                if not k:
                    break
        self._state = _splitmix64(x)[1]

    def words(self, shape: int | tuple[int, ...]) -> np.ndarray:
        """uint64 words of ``shape``, the next ones of this stream."""
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        out, state = stream_words(np.uint64(self._state), math.prod(shape))
        self._state = int(state)
        return out.reshape(shape)

    def below(self, high: object, shape: int | tuple[int, ...] | None = None) -> np.ndarray:
        """int64 integers uniform in ``[0, high)`` (``high`` below 2^32, an array broadcast to
        ``shape``), by multiplying the top 32 bits of a word and keeping the top half."""
        high = np.asarray(high, dtype=np.uint64)
        words = self.words(high.shape if shape is None else shape)
        return (((words >> np.uint64(32)) * high) >> np.uint64(32)).astype(np.int64)


@dataclass(frozen=True)
class ProblemSpec:
    """The structure of one problem and the seed of its data; `build_problem` makes the tensors.

    ``tables`` in output column order, each with the value profile of its weights in
    ``weight_profiles`` (`WEIGHT_PROFILES`). The batch has ``batch_size`` samples; its lengths
    follow ``length_profile`` with scale ``bag_length`` (`LENGTH_PROFILES`), its ids
    ``id_distribution`` (`ID_DISTRIBUTIONS`) as ``id_dtype``; ``sample_weights`` is a per-sample
    weight profile (`SAMPLE_WEIGHT_PROFILES`) or None for none; ``key_order`` is one of
    `KEY_ORDERS`. Checked on construction (`ValueError`).
    """

    tables: tuple[TableConfig, ...]
    weight_profiles: tuple[str, ...]
    batch_size: int
    length_profile: str = "uniform"
    bag_length: int = 1
    id_distribution: str = "uniform"
    id_dtype: torch.dtype = torch.int64
    sample_weights: str | None = None
    key_order: str = "tables"
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "tables", tuple(self.tables))
        object.__setattr__(self, "weight_profiles", tuple(self.weight_profiles))
        validate_tables(self.tables)
        if len(self.weight_profiles) != len(self.tables):
            raise ValueError(f"{len(self.weight_profiles)} weight profiles for {len(self.tables)} tables")
        for p in self.weight_profiles:
            _check_member("weight profile", p, WEIGHT_PROFILES)
        for name in ("batch_size", "bag_length", "seed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name}={v!r} must be a non-negative integer")
        _check_member("length_profile", self.length_profile, LENGTH_PROFILES)
        _check_member("id_distribution", self.id_distribution, ID_DISTRIBUTIONS)
        _check_member("id_dtype", self.id_dtype, ID_DTYPES)
        _check_member("key_order", self.key_order, KEY_ORDERS)
        if self.sample_weights is not None:
            _check_member("sample_weights", self.sample_weights, SAMPLE_WEIGHT_PROFILES)
            mean = [t.name for t in self.tables if t.pooling is not Pooling.SUM]
            if mean:
                raise ValueError(f"per-sample weights need SUM pooling; tables {mean} pool MEAN")

    @property
    def features(self) -> tuple[str, ...]:
        """Every feature, in the tables' order."""
        return tuple(f for t in self.tables for f in t.feature_names)

    def max_bag(self) -> int:
        """The longest bag this spec can make."""
        return 0 if self.length_profile == "empty" or self.batch_size == 0 else self.bag_length

    def max_ids(self) -> int:
        """The most ids this spec can make (every bag at its longest)."""
        n_features, b, length = len(self.features), self.batch_size, self.max_bag()
        if self.length_profile == "one-huge" and b:
            return n_features * b * min(3, length) + length - min(3, length)
        return n_features * b * length

    def cost(self) -> int:
        """An upper bound on the elements this problem holds or touches: table elements, plus the
        output (batch x total dim), plus every id times its table's dim plus `ID_COST` (the id, its
        offset and weight bookkeeping). What ``max_cost`` of the strategies bounds: memory and time
        of building, checking and running a problem scale with it."""
        tables = sum(t.num_embeddings * t.embedding_dim for t in self.tables)
        width = total_dim(self.tables)
        slot = width + ID_COST * len(self.features)  # one id in every feature's bag of a sample
        b, length = self.batch_size, self.max_bag()
        if self.length_profile == "one-huge":
            base = min(3, length)
            widest = max(t.embedding_dim for t in self.tables)
            return tables + b * width + b * base * slot + (widest + ID_COST) * (length - base)
        return tables + b * width + b * length * slot

    def to_json(self) -> dict[str, Any]:
        """A JSON-able description (what ``problem.metadata["spec"]`` holds); `from_json` reads it."""
        return {
            "tables": [
                {
                    "name": t.name,
                    "num_embeddings": t.num_embeddings,
                    "embedding_dim": t.embedding_dim,
                    "feature_names": list(t.feature_names),
                    "pooling": t.pooling.value,
                    "dtype": dtype_name(t.dtype),
                    "weight_profile": p,
                }
                for t, p in zip(self.tables, self.weight_profiles, strict=True)
            ],
            "batch_size": self.batch_size,
            "length_profile": self.length_profile,
            "bag_length": self.bag_length,
            "id_distribution": self.id_distribution,
            "id_dtype": dtype_name(self.id_dtype),
            "sample_weights": self.sample_weights,
            "key_order": self.key_order,
            "seed": self.seed,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ProblemSpec:
        """The spec that `to_json` described."""
        tables = tuple(
            TableConfig(
                t["name"],
                t["num_embeddings"],
                t["embedding_dim"],
                tuple(t["feature_names"]),
                Pooling(t["pooling"]),
                dtype_from_name(t["dtype"]),
            )
            for t in data["tables"]
        )
        return cls(
            tables=tables,
            weight_profiles=tuple(t["weight_profile"] for t in data["tables"]),
            batch_size=data["batch_size"],
            length_profile=data["length_profile"],
            bag_length=data["bag_length"],
            id_distribution=data["id_distribution"],
            id_dtype=dtype_from_name(data["id_dtype"]),
            sample_weights=data["sample_weights"],
            key_order=data["key_order"],
            seed=data["seed"],
        )


def _check_member(name: str, value: object, allowed: Sequence[object]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r}; expected one of {list(allowed)}")


def build_problem(spec: ProblemSpec) -> Problem:
    """The `Problem` a spec describes: table weights and batch built from its seed.

    Deterministic. ``problem.metadata["spec"]`` is ``spec.to_json()``.
    """
    weights = {
        t.name: make_profile_weights(t, p, table_seed(spec.seed, t.name))
        for t, p in zip(spec.tables, spec.weight_profiles, strict=True)
    }
    return Problem(spec.tables, weights, build_batch(spec), {"spec": spec.to_json()})


# ---------------------------------------------------------------------------------------------
# Table weights


def make_profile_weights(table: TableConfig, profile: str, seed: int) -> TableWeights:
    """``[num_embeddings, embedding_dim]`` weights of the table's dtype, from a value profile and seed
    (a quantized table's: `harness.fuzz.quantized_rows`).

    Deterministic. Values are built in float64 within the dtype's finite range
    (`harness.fuzz.words.profile_values`; ``unit`` is approximately normal) and rounded once to
    the dtype. Tables of more than 1021 rows repeat a seeded 1021-row block (a prime period),
    which keeps a table far larger than the batch touches cheap to build; wider tables a shorter
    prime block (`block_rows`), so at most 2^16 values are drawn per table.
    """
    _check_member("profile", profile, WEIGHT_PROFILES)
    n, dim, dtype = table.num_embeddings, table.embedding_dim, table.dtype
    rows = min(n, block_rows(dim))
    if is_quantized(table):  # a QuantizedTable: the profile's meaning for quantized rows
        return quantized_profile_weights(table, profile, _Bits(seed, _TABLE).words((rows, dim + ROW_WORDS)))
    words = _Bits(seed, _TABLE).words((rows, dim))
    info = torch.finfo(dtype)
    w = profile_values(
        words,
        PROFILE_CODES[profile],
        float(info.tiny),
        float(info.max),
        _SUBNORMAL_EXP[dtype],
        int(np.log2(info.max)),
    )
    t = torch.from_numpy(w).to(dtype)  # every profile is within the finite range here
    if rows < n:
        t = t.repeat((n + rows - 1) // rows, 1)[:n]
    return t.contiguous()


# ---------------------------------------------------------------------------------------------
# The batch


def build_batch(spec: ProblemSpec) -> JaggedBatch:
    """The spec's batch alone (its ``weight_profiles`` are not used), vectorised over all bags."""
    features = [(f, t.num_embeddings) for t in spec.tables for f in t.feature_names]
    n_features, b = len(features), spec.batch_size
    rows = np.array([r for _, r in features], dtype=np.int64)
    lengths = _lengths(spec.length_profile, spec.bag_length, n_features, b, _Bits(spec.seed, _LENGTHS))
    ids = _ids(spec.id_distribution, lengths, rows, _Bits(spec.seed, _IDS))
    per_sample = None
    if spec.sample_weights is not None:
        per_sample = _sample_weights(spec.sample_weights, len(ids), _Bits(spec.seed, _SAMPLE_WEIGHTS))
    order = _key_order(spec.key_order, n_features, _Bits(spec.seed, _KEYS))
    if not np.array_equal(order, np.arange(n_features)):
        counts = lengths.sum(axis=1)
        starts = np.cumsum(counts) - counts
        pieces = [slice(int(starts[i]), int(starts[i] + counts[i])) for i in order]
        ids = np.concatenate([ids[:0]] + [ids[p] for p in pieces])
        if per_sample is not None:
            per_sample = np.concatenate([per_sample[:0]] + [per_sample[p] for p in pieces])
        lengths = lengths[order]
    return JaggedBatch(
        keys=tuple(features[i][0] for i in order),
        values=torch.from_numpy(ids).to(spec.id_dtype),
        lengths=torch.from_numpy(np.ascontiguousarray(lengths).reshape(-1)),
        weights=None if per_sample is None else torch.from_numpy(per_sample),
    )


def _lengths(profile: str, length: int, n_features: int, b: int, bits: _Bits) -> np.ndarray:
    """``[features, batch]`` int64 bag lengths, each at most ``length``."""
    shape = (n_features, b)
    if profile == "empty" or length == 0 or b == 0 or n_features == 0:
        return np.zeros(shape, dtype=np.int64)
    if profile == "uniform":
        return bits.below(length + 1, shape)
    if profile == "skewed":
        octave = bits.below(length.bit_length() + 1, shape)
        return bits.below(np.minimum(length, (np.int64(1) << octave) - 1) + 1)
    if profile == "pow2":
        if length < 2:
            return bits.below(length + 1, shape)
        top = (length - 1).bit_length() - 1  # the largest k with 2^k + 1 <= length
        return (np.int64(1) << bits.below(top + 1, shape)) + bits.below(3, shape) - 1
    out = bits.below(min(3, length) + 1, shape)  # one-huge
    out[int(bits.below(n_features, ())), int(bits.below(b, ()))] = length
    return out


def _ids(distribution: str, lengths: np.ndarray, rows: np.ndarray, bits: _Bits) -> np.ndarray:
    """int64 ids of every bag, feature after feature (``lengths`` is ``[features, batch]``)."""
    counts = lengths.sum(axis=1)
    n = int(counts.sum())
    high = np.repeat(rows, counts)
    if distribution == "uniform":
        ids = bits.below(high)
    elif distribution == "zipf":
        # P(k or more) = (k + 1)^-0.2, the tail of Zipf's law with exponent 1.2, by inversion.
        ranks = np.floor((1 - unit(bits.words(n))) ** -5.0) - 1
        ids = np.minimum(ranks, 2.0**62).astype(np.int64) % high
    elif distribution == "hot":
        n_features = len(rows)
        hot_sets = bits.below(rows[:, None], (n_features, 8))
        sizes = np.minimum(1 + bits.below(8, n_features), rows)
        feature = np.repeat(np.arange(n_features), counts)
        hot = hot_sets[feature, bits.below(np.repeat(sizes, counts))]
        ids = np.where(bits.below(10, n) < 9, hot, bits.below(high))
    elif distribution == "duplicates":
        bag_rows = np.repeat(rows, lengths.shape[1])
        pairs = bits.below(bag_rows[:, None], (len(bag_rows), 2))
        bag = np.repeat(np.arange(len(bag_rows)), lengths.reshape(-1))
        ids = pairs[bag, bits.below(2, n)]
    else:  # edges
        return np.where(bits.below(2, n) == 0, 0, high - 1).astype(np.int64)
    starts = np.cumsum(counts) - counts
    several = counts >= 2
    first = starts + bits.below(np.maximum(counts, 1))
    last = starts + bits.below(np.maximum(counts, 1))
    ids[first[several]] = 0
    ids[last[several]] = rows[several] - 1
    return ids.astype(np.int64)


def make_sample_weights(size: int, profile: str, seed: int) -> torch.Tensor:
    """``size`` float32 per-sample weights from a profile (`SAMPLE_WEIGHT_PROFILES`) and a seed."""
    _check_member("profile", profile, SAMPLE_WEIGHT_PROFILES)
    return torch.from_numpy(_sample_weights(profile, size, _Bits(seed, _SAMPLE_WEIGHTS)))


def _sample_weights(profile: str, n: int, bits: _Bits) -> np.ndarray:
    if profile == "ones":
        return np.ones(n, dtype=np.float32)
    if profile == "integers":
        return (bits.below(7, n) - 3).astype(np.float32)
    words = bits.words(n)
    if profile == "positive":
        return scaled(words, -3, 3).astype(np.float32)
    if profile == "wide":
        w = sign(words) * scaled(words, -149, 127)
        big = float(np.finfo(np.float32).max)
        return np.clip(w, -big, big).astype(np.float32)
    w = normal(words)  # mixed
    special = bits.below(20, n)
    w[special < 2] = 0.0
    w[(special == 2) | (special == 3)] = 1.0
    w[special == 4] = -1.0
    return w.astype(np.float32)


def _key_order(order: str, n_features: int, bits: _Bits) -> np.ndarray:
    if order == "reversed":
        return np.arange(n_features)[::-1]
    if order == "shuffled":
        return np.argsort(bits.words(n_features), kind="stable")
    return np.arange(n_features)
