"""The problem model: tables, jagged batches and the pooled result, named as torchrec names them.

A batch is feature-major, like torchrec's ``KeyedJaggedTensor``::

                 sample 0     sample 1
    "product"    [1, 2, 1]    [5]          lengths [3, 1]
    "user"       [2, 3]       [4, 1]       lengths [2, 2]

    keys    = ("product", "user")
    lengths = [3, 1, 2, 2]                  # len(keys) * batch_size entries
    values  = [1, 2, 1, 5, 2, 3, 4, 1]      # every id, feature after feature
    offsets = [0, 3, 4, 6, 8]               # derived from lengths

The constructors only store what they are given; `harness.validate` checks a whole problem
before any backend sees it.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from harness.quantized import QUANTIZED_STORAGE, QuantizedTable, row_bytes

if TYPE_CHECKING:
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

SUPPORTED_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)
ID_DTYPES: tuple[torch.dtype, ...] = (torch.int64, torch.int32)
TableDtype = torch.dtype | str
"""A table's storage type: a float dtype of `SUPPORTED_DTYPES`, or a row-wise quantized storage
name of `QUANTIZED_STORAGE` (``"int8"``, ``"int4"``, ``"int2"``; see `harness.quantized`)."""
TABLE_DTYPES: tuple[TableDtype, ...] = SUPPORTED_DTYPES + QUANTIZED_STORAGE
TableWeights = torch.Tensor | QuantizedTable
"""A table's weights: a ``[rows, dim]`` tensor of its float dtype, or a `QuantizedTable`."""


class Pooling(str, enum.Enum):
    """How a bag's rows are reduced: SUM adds them, MEAN divides that sum by the bag's length."""

    SUM = "sum"
    MEAN = "mean"


@dataclass(frozen=True)
class TableConfig:
    """One embedding table, like torchrec's ``EmbeddingBagConfig``.

    ``feature_names`` lists the batch keys looked up in this table; several features may share it.
    ``dtype`` is the storage type of the table's weights: a float dtype, whose weights are a tensor
    of it, or a quantized storage name (``"int8"``, ``"int4"``, ``"int2"``), whose weights are a
    `harness.quantized.QuantizedTable`.
    """

    name: str
    num_embeddings: int
    embedding_dim: int
    feature_names: tuple[str, ...]
    pooling: Pooling = Pooling.SUM
    dtype: TableDtype = torch.float32

    def __post_init__(self) -> None:
        object.__setattr__(self, "feature_names", tuple(self.feature_names))
        if isinstance(self.pooling, str) and not isinstance(self.pooling, Pooling):
            object.__setattr__(self, "pooling", Pooling(self.pooling))


@dataclass(frozen=True, eq=False)
class JaggedBatch:
    """Variable-length id lists per (feature, sample), in the KeyedJaggedTensor layout."""

    keys: tuple[str, ...]
    values: torch.Tensor
    lengths: torch.Tensor
    weights: torch.Tensor | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "keys", tuple(self.keys))

    @property
    def batch_size(self) -> int:
        """Samples per feature: ``len(lengths) // len(keys)`` (0 when there are no keys)."""
        return len(self.lengths) // len(self.keys) if self.keys else 0

    @property
    def offsets(self) -> torch.Tensor:
        """``len(lengths) + 1`` int64 offsets into ``values``: bag ``i`` is ``values[o[i]:o[i+1]]``."""
        out = torch.zeros(len(self.lengths) + 1, dtype=torch.int64)
        torch.cumsum(self.lengths.to(torch.int64), dim=0, out=out[1:])
        return out

    def feature_slice(self, key: str) -> slice:
        """The slice of ``values`` (and ``weights``) that holds feature ``key``'s ids."""
        f = self.keys.index(key)
        offsets = self.offsets
        b = self.batch_size
        return slice(int(offsets[f * b]), int(offsets[(f + 1) * b]))

    def bag(self, key: str, sample: int) -> torch.Tensor:
        """The ids of one (feature, sample) bag."""
        i = self.keys.index(key) * self.batch_size + sample
        offsets = self.offsets
        return self.values[int(offsets[i]) : int(offsets[i + 1])]

    def select_samples(self, start: int, stop: int) -> JaggedBatch:
        """Samples ``[start, stop)`` of every feature, as a batch of ``stop - start`` samples.

        Its tensors are new (never views of this batch's); the keys are kept, and per-sample
        weights follow their ids. Needs ``0 <= start <= stop <= batch_size``.
        """
        b = self.batch_size
        if not 0 <= start <= stop <= b:
            raise ValueError(f"samples [{start}, {stop}) are not within a batch of {b} samples")
        offsets = self.offsets
        features = range(len(self.keys))
        spans = [(int(offsets[f * b + start]), int(offsets[f * b + stop])) for f in features]

        def take(t: torch.Tensor, pieces: Sequence[slice]) -> torch.Tensor:
            return torch.cat([t[:0]] + [t[p] for p in pieces])  # a new tensor, even of no pieces

        ids = [slice(lo, hi) for lo, hi in spans]
        bags = [slice(f * b + start, f * b + stop) for f in features]
        return JaggedBatch(
            keys=self.keys,
            values=take(self.values, ids),
            lengths=take(self.lengths, bags),
            weights=None if self.weights is None else take(self.weights, ids),
        )

    @classmethod
    def from_bags(
        cls,
        bags: Mapping[str, Sequence[Sequence[int]]],
        weights: Mapping[str, Sequence[Sequence[float]]] | None = None,
        id_dtype: torch.dtype = torch.int64,
    ) -> JaggedBatch:
        """Build a batch from ``{feature: [[ids of sample 0], [ids of sample 1], ...]}``."""
        keys = tuple(bags)
        lengths = [len(b) for k in keys for b in bags[k]]
        values = [int(i) for k in keys for b in bags[k] for i in b]
        w = None
        if weights is not None:
            w = torch.tensor([float(x) for k in keys for b in weights[k] for x in b], dtype=torch.float32)
        return cls(
            keys=keys,
            values=torch.tensor(values, dtype=id_dtype),
            lengths=torch.tensor(lengths, dtype=torch.int64),
            weights=w,
        )

    def to_kjt(self) -> KeyedJaggedTensor:
        """This batch as a torchrec ``KeyedJaggedTensor`` (needs torchrec; shares storage)."""
        from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

        return KeyedJaggedTensor(
            keys=list(self.keys), values=self.values, lengths=self.lengths, weights=self.weights
        )

    @classmethod
    def from_kjt(cls, kjt: KeyedJaggedTensor) -> JaggedBatch:
        """A batch holding a torchrec ``KeyedJaggedTensor``'s keys, ids, lengths and weights.

        A batch has one batch size for every key. A KJT with a variable stride per key
        (``stride_per_key_per_rank``) is accepted when every key has the same strides (its layout
        is then a batch's); otherwise `ValueError` names each key's batch size.
        """
        if kjt.variable_stride_per_key():
            per_rank = [list(s) for s in kjt.stride_per_key_per_rank()]
            if any(s != per_rank[0] for s in per_rank):
                sizes = ", ".join(
                    f"{k!r}: {n}" for k, n in zip(kjt.keys(), kjt.stride_per_key(), strict=True)
                )
                raise ValueError(
                    "the KeyedJaggedTensor has a variable stride per key (batch sizes "
                    f"{sizes}; per rank {per_rank}); a JaggedBatch needs the same batch size for every key"
                )
        return cls(
            keys=tuple(kjt.keys()),
            values=kjt.values(),
            lengths=kjt.lengths(),
            weights=kjt.weights_or_none(),
        )


def is_quantized(table: TableConfig | TableDtype) -> bool:
    """Whether a table (or a storage type) is row-wise quantized (``"int8"``, ``"int4"``, ``"int2"``)."""
    dtype = table.dtype if isinstance(table, TableConfig) else table
    return isinstance(dtype, str) and dtype in QUANTIZED_STORAGE


def stored_row_bytes(table: TableConfig) -> int:
    """Bytes one row of the table takes as stored: ``dim * itemsize`` for a float dtype; the packed
    codes plus the fp16 scale and bias for a quantized one (no library's alignment padding)."""
    if is_quantized(table):
        return row_bytes(table.embedding_dim, table.dtype)
    return table.embedding_dim * table.dtype.itemsize


@dataclass(frozen=True, eq=False)
class Problem:
    """Everything one lookup needs: the tables, their weights and a batch."""

    tables: tuple[TableConfig, ...]
    weights: Mapping[str, TableWeights]
    batch: JaggedBatch
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "tables", tuple(self.tables))


def output_columns(tables: Sequence[TableConfig]) -> list[tuple[str, str, int, int]]:
    """``(table, feature, first column, dim)`` for each feature, in torchrec's EBC key order."""
    cols = []
    start = 0
    for t in tables:
        for f in t.feature_names:
            cols.append((t.name, f, start, t.embedding_dim))
            start += t.embedding_dim
    return cols


def total_dim(tables: Sequence[TableConfig]) -> int:
    """Width of the pooled result: each feature contributes its table's ``embedding_dim``."""
    return sum(t.embedding_dim * len(t.feature_names) for t in tables)


def dtype_name(dtype: TableDtype) -> str:
    """``torch.float16`` -> ``"float16"``; a quantized storage name is its own name (``"int4"``)."""
    if isinstance(dtype, str):
        return dtype
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> TableDtype:
    """``"float16"`` -> ``torch.float16``, for the dtypes tables may have and ids may have; a
    quantized storage name (``"int8"``, ``"int4"``, ``"int2"``) is returned as it is."""
    if name in QUANTIZED_STORAGE:
        return name
    for d in SUPPORTED_DTYPES + ID_DTYPES:
        if dtype_name(d) == name:
            return d
    known = [dtype_name(d) for d in TABLE_DTYPES + ID_DTYPES]
    raise ValueError(f"unknown dtype {name!r}; expected one of {known}")
