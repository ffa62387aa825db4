"""Models of third-party libraries' known training discrepancies: what a library's step computes instead.

The training counterpart of `harness.known`. A training known case (`harness.training.cases`)
names a backend, a scope and a **model**: the library's behaviour written as data. A training
run of that backend counts as *known* only when it is, step by step and element by element, what
the model predicts: the backend is run again and judged by the *modelled oracle* (below) exactly
as `harness.training.check` judges it by the contract's, under the same error analysis. Whatever
the model does not change is held to the contract, so any other error in the same problem (another
table, a value off by more than the modelled rounding, another exception) still fails.

Model kinds (``"kind"``) and their parameters:

``raises``: ``{"exception": "IndexError", "message": "tuple index out of range"}``
    preparing or some step raises an exception of that class (`harness.known.Raises`).
``weight-decay-ignored``: ``{"features": "any" | "single", "dtypes": ["float32"]}``
    the tables of those dtypes (read by a single feature only, with ``"single"``) are updated as
    with ``weight_decay = 0``: the reference with no weight decay, state included (FBGEMM's CPU
    EXACT_SGD / EXACT_ADAGRAD take no weight decay; its EXACT_ROWWISE_ADAGRAD fast path for
    float32 tables of one feature passes ``weight_decay=0``).
``every-row-decayed``: ``{}``
    every row of every table is updated, as if it occurred in the batch with a zero gradient (a
    torch optimizer on dense gradients: with weight decay, untouched rows decay and their state
    grows). Modelled as the contract on a batch with one more sample, in which one more feature
    per table reads every row, its grad_output zero.
``double-rounded``: ``{"dtypes": ["float16"]}``
    the update of a table of those dtypes is ``X(fl32(w - X(delta)))`` with ``X`` the rounding to
    the table's dtype and ``delta`` the float32 step (FBGEMM's CPU ``w -= delta`` on ``c10::Half``),
    not ``X(w - delta)``.
``duplicates-applied-separately``: ``{}``
    each occurrence's share of the gradient is applied to the row on its own, the row rounded
    after each one (torch.optim.SGD adding an uncoalesced sparse gradient), instead of the
    duplicates being summed first.
``rowwise-state-per-column-shard``: ``{"world_size": 2, "unit": 4}``
    for rowwise_adagrad, a table split into column shards (`column_shard_widths`: whole
    ``unit``-column blocks spread over ``world_size`` ranks as evenly as possible, the column-wise
    plan the sharded backend makes) keeps one state per row *per shard*, the mean of ``G'^2`` over
    that shard's columns.
``trained-as-float32``: ``{"dtypes": ["float16", "bfloat16"]}``
    the tables of those dtypes are held, trained and returned in float32 (their values widened
    exactly): the contract on the problem with those tables float32.
``columns-grouped``: ``{"by": ["pooling", "dtype"]}``
    the library orders the tables by group (in order of first appearance; in order within a
    group), for the output's columns and so also for the columns grad_output is applied to: the
    contract on the problem with its tables in that order (torchrec's fused EBC).
``first-batch-key-order``: ``{"out_of_range": "zero"}``
    every batch is read as if its keys came in the first step's order: the ``i``-th feature block
    of a later batch is taken for the first batch's ``i``-th key (torchrec's sharded EBC computes
    its input permutation from the first KeyedJaggedTensor and reuses it), and an id then beyond
    its table is read as row 0 (FBGEMM's bounds check, "Setting idx to zero"): the contract on
    the batch so relabelled.

The error analysis of each model
--------------------------------
Every model but two changes the *problem* (tables' order or dtype, a batch with more ids, a
per-table optimizer) and judges the backend by the contract's own oracle and tolerance on that
problem (`harness.training.tolerance`): nothing new to derive. The two that change the rounding:

- ``double-rounded``: the float32 step ``delta^`` of a correct float32 computation lies within
  ``E32`` of the exact ``delta = w - v`` (``v`` the exact update), where ``E32`` is the contract's
  bound for the same update of a *float32* table: that bound is ``E_p + u (|v| + E_p) + ...``, at
  least ``E_p``, the bound on the computed step and decay. ``g(d) = X(fl32(w - X(d)))`` is
  nonincreasing in ``d`` (each rounding is nondecreasing), so the result lies in ``[g(fl32(delta
  + E32)), g(fl32(delta - E32))]`` (rounding the ends to float32 only widens it): that interval is
  what is allowed, one value in the usual case. Where an end is not finite the contract's
  tolerance stays.
- ``duplicates-applied-separately``: with ``n`` occurrences of terms ``t_k`` (the contract's
  computed terms), ``w_k = fl(w_(k-1) - fl(lr t_k))``. Each of the ``n`` roundings of a running
  value adds at most ``u |w_k| <= u (|w| + lr S)`` (``S = sum |t_k|``, bounded with slack
  ``2**-10`` for the terms' own errors) and the ``n`` products at most ``u lr S`` together; the
  errors add up (later additions do not scale them). So the model's bound is the contract's plus
  ``(n u (|w| + lr S) + u lr S) (1 + 2**-10)``: wider than the contract where ``lr S`` is small
  against ``|w|``, which is where sequential rounding loses the update.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from harness.known import Explanation, Model, ModelError, Observation, Raises
from harness.model import JaggedBatch, TableConfig, dtype_name, output_columns, total_dim
from harness.tolerance import FINITE, U32, Tolerance
from harness.training.check import ResultError, judge_step, keep_result
from harness.training.contract import OptimizerConfig
from harness.training.oracle import ExpectedStep, ExpectedTable, TrainingOracle
from harness.training.problem import TrainingProblem
from harness.training.tolerance import update_tolerance

TRAINING_MODEL_KINDS = (
    "raises",
    "weight-decay-ignored",
    "every-row-decayed",
    "double-rounded",
    "duplicates-applied-separately",
    "rowwise-state-per-column-shard",
    "trained-as-float32",
    "columns-grouped",
    "first-batch-key-order",
)
ALL_DTYPES = ("float32", "float16", "bfloat16")
HALF_DTYPES = ("float16", "bfloat16")
GROUP_ATTRIBUTES = ("pooling", "dtype")
EVERY_ROW_FEATURE = "__every_row__{}"
"""The name of the extra feature `every-row-decayed` adds to a table (never a real feature's)."""


def _even_split(n: int, world_size: int) -> list[int]:
    """``n`` split over ``world_size`` as evenly as possible, the first ranks one more (zeros dropped)."""
    base, extra = divmod(n, world_size)
    return [base + (1 if r < extra else 0) for r in range(world_size) if base + (1 if r < extra else 0)]


def column_shard_widths(dim: int, world_size: int, unit: int) -> list[int]:
    """The column shards of a ``dim``-wide table under the training column-wise plan: whole
    ``unit``-column blocks (FBGEMM's TBE needs each shard's dim to be a multiple of 4) spread over
    ``world_size`` ranks as evenly as possible (the first ranks wider); one shard when ``dim`` is
    not a multiple of ``unit``."""
    if dim % unit:
        return [dim]
    return [unit * k for k in _even_split(dim // unit, world_size)]


class TrainingModel(Model):
    """A library's training behaviour as data; subclasses are the kinds of the module docstring."""

    def claims(self, tables: Sequence[TableConfig], optimizer: OptimizerConfig) -> tuple[str, ...]:
        """The tables this model changes on a problem with these tables and optimizer (none: it
        does not apply, and cannot explain anything there)."""
        raise NotImplementedError


def _dtypes(tables: Sequence[TableConfig], wanted: Sequence[str]) -> tuple[str, ...]:
    return tuple(t.name for t in tables if dtype_name(t.dtype) in wanted)


@dataclass(frozen=True)
class WeightDecayIgnored(TrainingModel):
    features: str = "any"
    dtypes: tuple[str, ...] = ALL_DTYPES
    kind: str = field(default="weight-decay-ignored", init=False)

    def describe(self) -> str:
        which = "read by one feature only" if self.features == "single" else "every table"
        dtypes = "/".join(self.dtypes)
        return f"weight decay ignored ({which}, dtypes {dtypes}): the reference with weight_decay=0"

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "features": self.features, "dtypes": list(self.dtypes)}

    def claims(self, tables: Sequence[TableConfig], optimizer: OptimizerConfig) -> tuple[str, ...]:
        if not optimizer.decays:
            return ()
        single = self.features == "single"
        return tuple(
            t.name
            for t in tables
            if dtype_name(t.dtype) in self.dtypes and (not single or len(t.feature_names) == 1)
        )


@dataclass(frozen=True)
class EveryRowDecayed(TrainingModel):
    kind: str = field(default="every-row-decayed", init=False)

    def describe(self) -> str:
        return "every row updated, as if it occurred with a zero gradient (dense gradients)"

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind}

    def claims(self, tables: Sequence[TableConfig], optimizer: OptimizerConfig) -> tuple[str, ...]:
        return tuple(t.name for t in tables) if optimizer.decays else ()


@dataclass(frozen=True)
class DoubleRounded(TrainingModel):
    dtypes: tuple[str, ...] = ("float16",)
    kind: str = field(default="double-rounded", init=False)

    def describe(self) -> str:
        return f"{'/'.join(self.dtypes)} updates rounded twice: X(w - X(delta))"

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "dtypes": list(self.dtypes)}

    def claims(self, tables: Sequence[TableConfig], optimizer: OptimizerConfig) -> tuple[str, ...]:
        return _dtypes(tables, self.dtypes)


@dataclass(frozen=True)
class DuplicatesAppliedSeparately(TrainingModel):
    kind: str = field(default="duplicates-applied-separately", init=False)

    def describe(self) -> str:
        return "each occurrence's gradient applied to its row on its own (one rounding per occurrence)"

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind}

    def claims(self, tables: Sequence[TableConfig], optimizer: OptimizerConfig) -> tuple[str, ...]:
        return tuple(t.name for t in tables) if optimizer.kind == "sgd" else ()


@dataclass(frozen=True)
class RowwiseStatePerColumnShard(TrainingModel):
    world_size: int = 2
    unit: int = 4
    kind: str = field(default="rowwise-state-per-column-shard", init=False)

    def describe(self) -> str:
        blocks = f"{self.unit}-column blocks over {self.world_size} ranks"
        return f"rowwise state per column shard (shards of {blocks})"

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "world_size": self.world_size, "unit": self.unit}

    def widths(self, table: TableConfig) -> list[int]:
        return column_shard_widths(table.embedding_dim, self.world_size, self.unit)

    def claims(self, tables: Sequence[TableConfig], optimizer: OptimizerConfig) -> tuple[str, ...]:
        if optimizer.kind != "rowwise_adagrad":
            return ()
        return tuple(t.name for t in tables if len(self.widths(t)) > 1)


@dataclass(frozen=True)
class TrainedAsFloat32(TrainingModel):
    dtypes: tuple[str, ...] = HALF_DTYPES
    kind: str = field(default="trained-as-float32", init=False)

    def describe(self) -> str:
        return f"{'/'.join(self.dtypes)} tables held, trained and returned as float32"

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "dtypes": list(self.dtypes)}

    def claims(self, tables: Sequence[TableConfig], optimizer: OptimizerConfig) -> tuple[str, ...]:
        return _dtypes(tables, self.dtypes)


def grouped_order(tables: Sequence[TableConfig], by: Sequence[str]) -> list[TableConfig]:
    """The tables grouped by these attributes: groups in order of first appearance, tables in order."""
    groups: dict[tuple[str, ...], list[TableConfig]] = {}
    for t in tables:
        groups.setdefault(tuple(str(getattr(t, a)) for a in by), []).append(t)
    return [t for group in groups.values() for t in group]


@dataclass(frozen=True)
class ColumnsGrouped(TrainingModel):
    by: tuple[str, ...] = GROUP_ATTRIBUTES
    kind: str = field(default="columns-grouped", init=False)

    def describe(self) -> str:
        return f"tables (output columns and grad_output's) in groups by ({', '.join(self.by)})"

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "by": list(self.by)}

    def claims(self, tables: Sequence[TableConfig], optimizer: OptimizerConfig) -> tuple[str, ...]:
        order = grouped_order(tables, self.by)
        if [t.name for t in order] == [t.name for t in tables]:
            return ()
        return tuple(t.name for t in tables)


@dataclass(frozen=True)
class FirstBatchKeyOrder(TrainingModel):
    out_of_range: str = "zero"
    kind: str = field(default="first-batch-key-order", init=False)

    def describe(self) -> str:
        return "later batches read in the first batch's key order (ids beyond a table read as row 0)"

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "out_of_range": self.out_of_range}

    def claims(self, tables: Sequence[TableConfig], optimizer: OptimizerConfig) -> tuple[str, ...]:
        return tuple(t.name for t in tables)

    def relabel(self, tables: Sequence[TableConfig], batch: JaggedBatch, keys: Sequence[str]) -> JaggedBatch:
        """``batch`` with its feature blocks taken for ``keys`` in order, out-of-range ids as 0."""
        if tuple(batch.keys) == tuple(keys):
            return batch
        rows = {f: t.num_embeddings for t in tables for f in t.feature_names}
        values = batch.values.clone()
        for i, key in enumerate(keys):
            part = batch.feature_slice(batch.keys[i])
            ids = values[part]
            values[part] = torch.where(ids < rows[key], ids, torch.zeros_like(ids))
        return JaggedBatch(tuple(keys), values, batch.lengths, batch.weights)


def _dtype_list(d: Mapping[str, Any], default: Sequence[str], allowed: Sequence[str]) -> tuple[str, ...]:
    values = d.get("dtypes", list(default))
    if not isinstance(values, list) or not values or any(v not in allowed for v in values):
        raise ModelError(f"model 'dtypes' is {values!r}, expected a list drawn from {list(allowed)}")
    return tuple(values)


def _positive_int(d: Mapping[str, Any], key: str, default: int) -> int:
    v = d.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ModelError(f"model {key!r} must be a positive integer, got {v!r}")
    return v


def training_model_from_json(d: Mapping[str, Any]) -> Model:
    """A training model (or `harness.known.Raises`) from a case's ``"model"``; `ModelError` names
    a bad field."""
    if not isinstance(d, Mapping):
        raise ModelError(f"model must be an object, got {type(d).__name__}")
    kind = d.get("kind")
    if kind not in TRAINING_MODEL_KINDS:
        raise ModelError(f"model 'kind' is {kind!r}, expected one of {list(TRAINING_MODEL_KINDS)}")
    if kind == "raises":
        if not isinstance(d.get("exception"), str) or not d["exception"]:
            raise ModelError("model 'raises' needs 'exception', an exception class name")
        return Raises(d["exception"], d.get("message", ""))
    if kind == "weight-decay-ignored":
        features = d.get("features", "any")
        if features not in ("any", "single"):
            raise ModelError(f"model 'features' is {features!r}, expected 'any' or 'single'")
        return WeightDecayIgnored(features, _dtype_list(d, ALL_DTYPES, ALL_DTYPES))
    if kind == "every-row-decayed":
        return EveryRowDecayed()
    if kind == "double-rounded":
        return DoubleRounded(_dtype_list(d, ("float16",), HALF_DTYPES))
    if kind == "duplicates-applied-separately":
        return DuplicatesAppliedSeparately()
    if kind == "rowwise-state-per-column-shard":
        return RowwiseStatePerColumnShard(_positive_int(d, "world_size", 2), _positive_int(d, "unit", 4))
    if kind == "trained-as-float32":
        return TrainedAsFloat32(_dtype_list(d, HALF_DTYPES, HALF_DTYPES))
    if kind == "first-batch-key-order":
        if d.get("out_of_range", "zero") != "zero":
            raise ModelError(f"model 'out_of_range' is {d.get('out_of_range')!r}, expected 'zero'")
        return FirstBatchKeyOrder()
    by = d.get("by", list(GROUP_ATTRIBUTES))
    if not isinstance(by, list) or not by or any(a not in GROUP_ATTRIBUTES for a in by):
        raise ModelError(f"model 'by' is {by!r}, expected attributes drawn from {list(GROUP_ATTRIBUTES)}")
    return ColumnsGrouped(tuple(by))


# ---------------------------------------------------------------------------------------------
# The modelled oracle.


def _first(models: Sequence[tuple[str, TrainingModel]], cls: type) -> tuple[str, Any] | None:
    return next(((n, m) for n, m in models if isinstance(m, cls)), None)


def _no_decay(optimizer: OptimizerConfig) -> OptimizerConfig:
    return dataclasses.replace(optimizer, weight_decay=0.0, weight_decay_mode="none")


@dataclass(frozen=True, eq=False)
class _EveryRow:
    """The batch augmentation of `every-row-decayed`: tables with one more feature each."""

    tables: tuple[TableConfig, ...]
    kept_columns: torch.Tensor

    @classmethod
    def of(cls, tables: Sequence[TableConfig]) -> _EveryRow:
        extended = tuple(
            dataclasses.replace(t, feature_names=(*t.feature_names, EVERY_ROW_FEATURE.format(t.name)))
            for t in tables
        )
        extra = {t.feature_names[-1] for t in extended}
        kept = [
            c
            for _, f, first, dim in output_columns(extended)
            if f not in extra
            for c in range(first, first + dim)
        ]
        return cls(extended, torch.tensor(kept, dtype=torch.int64))

    def batch(self, batch: JaggedBatch, grad_output: torch.Tensor) -> tuple[JaggedBatch, torch.Tensor]:
        b = batch.batch_size
        lengths = batch.lengths.to(torch.int64).reshape(len(batch.keys), b)
        parts = [torch.cat([lengths, torch.zeros(len(batch.keys), 1, dtype=torch.int64)], 1).reshape(-1)]
        values, weights = [batch.values], [batch.weights] if batch.weights is not None else None
        keys = list(batch.keys)
        for t in self.tables:
            keys.append(t.feature_names[-1])
            parts.append(torch.tensor([0] * b + [t.num_embeddings], dtype=torch.int64))
            values.append(torch.arange(t.num_embeddings, dtype=batch.values.dtype))
            if weights is not None:
                weights.append(torch.ones(t.num_embeddings, dtype=torch.float32))
        augmented = JaggedBatch(
            tuple(keys), torch.cat(values), torch.cat(parts), None if weights is None else torch.cat(weights)
        )
        grad = torch.zeros(b + 1, total_dim(self.tables), dtype=torch.float32)
        grad[:b, self.kept_columns] = grad_output
        return augmented, grad


@dataclass(frozen=True, eq=False)
class _ColumnSplit:
    """The tables of `rowwise-state-per-column-shard`: each claimed table as its column shards."""

    tables: tuple[TableConfig, ...]
    shards: Mapping[str, list[tuple[str, int, int]]]
    copies: Mapping[str, list[str]]
    grad_columns: torch.Tensor

    @classmethod
    def of(
        cls, tables: Sequence[TableConfig], model: RowwiseStatePerColumnShard, claimed: Sequence[str]
    ) -> _ColumnSplit:
        first = {f: c for _, f, c, _ in output_columns(tables)}
        out, shards, copies, columns = [], {}, {}, []
        for t in tables:
            widths = model.widths(t) if t.name in claimed else [t.embedding_dim]
            start = 0
            for i, w in enumerate(widths):
                name = t.name if len(widths) == 1 else f"{t.name}@{i}"
                feats = t.feature_names if len(widths) == 1 else tuple(f"{f}@{i}" for f in t.feature_names)
                out.append(dataclasses.replace(t, name=name, embedding_dim=w, feature_names=feats))
                shards.setdefault(t.name, []).append((name, start, w))
                for f, copy in zip(t.feature_names, feats, strict=True):
                    copies.setdefault(f, []).append(copy)
                    columns.extend(range(first[f] + start, first[f] + start + w))
                start += w
        return cls(tuple(out), shards, copies, torch.tensor(columns, dtype=torch.int64))

    def batch(self, batch: JaggedBatch, grad_output: torch.Tensor) -> tuple[JaggedBatch, torch.Tensor]:
        keys, values, lengths, weights = [], [], [], []
        b = batch.batch_size
        for key in batch.keys:
            part = batch.feature_slice(key)
            f = batch.keys.index(key)
            for copy in self.copies[key]:
                keys.append(copy)
                values.append(batch.values[part])
                lengths.append(batch.lengths[f * b : (f + 1) * b])
                if batch.weights is not None:
                    weights.append(batch.weights[part])
        split = JaggedBatch(
            tuple(keys), torch.cat(values), torch.cat(lengths), torch.cat(weights) if weights else None
        )
        return split, grad_output[:, self.grad_columns]

    def weights(self, weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {
            name: weights[table][:, start : start + w].contiguous()
            for table, pieces in self.shards.items()
            for name, start, w in pieces
        }

    def join(self, table: str, expected: Mapping[str, ExpectedTable]) -> ExpectedTable:
        pieces = [expected[name] for name, _, _ in self.shards[table]]
        return ExpectedTable(
            rows=pieces[0].rows,
            after=torch.cat([p.after for p in pieces], 1),
            tolerance=Tolerance(
                torch.cat([p.tolerance.bound for p in pieces], 1),
                torch.cat([p.tolerance.classes for p in pieces], 1),
            ),
            unconstrained=torch.cat([p.unconstrained for p in pieces], 1),
            occurrences=pieces[0].occurrences,
        )


def _round_to(x: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """float32 values rounded to ``dtype`` (nearest even), back as float32."""
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(dtype).to(torch.float32).numpy()


def _double_rounded(
    expected: ExpectedTable, fp32_bound: torch.Tensor, before: torch.Tensor, dtype: torch.dtype
) -> ExpectedTable:
    """`double-rounded`'s interval (module docstring) where both ends are finite."""
    w = before.to(torch.float64).numpy()
    delta = w - expected.after.numpy()
    e = fp32_bound.numpy()
    with np.errstate(over="ignore", invalid="ignore"):

        def g(d: np.ndarray) -> np.ndarray:
            step = _round_to(d.astype(np.float32), dtype)
            return _round_to((w.astype(np.float32) - step).astype(np.float32), dtype).astype(np.float64)

        hi, lo = g(delta - e), g(delta + e)
        ok = np.isfinite(lo) & np.isfinite(hi) & ~expected.unconstrained.numpy()
        middle, half_width = np.where(ok, (lo + hi) / 2, 0.0), np.where(ok, (hi - lo) / 2, 0.0)
    after = expected.after.clone()
    bound = expected.tolerance.bound.clone()
    classes = expected.tolerance.classes.clone()
    mask = torch.from_numpy(ok)
    after[mask] = torch.from_numpy(middle)[mask]
    bound[mask] = torch.from_numpy(half_width)[mask]
    classes[mask] = FINITE
    return dataclasses.replace(expected, after=after, tolerance=Tolerance(bound, classes))


def _applied_separately(
    expected: ExpectedTable, magnitude: torch.Tensor, before: torch.Tensor, lr: float
) -> ExpectedTable:
    """`duplicates-applied-separately`'s wider bound (module docstring)."""
    n = expected.occurrences.to(torch.float64).unsqueeze(1)
    s = lr * magnitude
    extra = (n * U32 * (before.to(torch.float64).abs() + s) + U32 * s) * (1 + 2.0**-10)
    bound = torch.where(
        torch.isfinite(expected.tolerance.bound), expected.tolerance.bound + extra, expected.tolerance.bound
    )
    return dataclasses.replace(expected, tolerance=Tolerance(bound, expected.tolerance.classes))


class ModelledTrainingOracle:
    """The expected result of each step of one training run, where the models say what the library
    computes (module docstring) and the contract says the rest.

    ``tables`` are the tables as the library holds them (`columns-grouped`'s order,
    `trained-as-float32`'s dtype): the backend's result is judged against them.
    """

    def __init__(
        self,
        tables: Sequence[TableConfig],
        optimizer: OptimizerConfig,
        models: Sequence[tuple[str, TrainingModel]],
    ) -> None:
        self.optimizer = optimizer
        # The layout models first (order and dtype as the library holds the tables), then the rest
        # on the tables so held: e.g. FBGEMM's float32 fast path runs for a float16 table that
        # torchrec's fused EBC stores as float32.
        layout = [(n, m) for n, m in models if isinstance(m, (ColumnsGrouped, TrainedAsFloat32))]
        self.claims = {name: m.claims(tables, optimizer) for name, m in layout}
        judged = list(tables)
        grouped = _first([(n, m) for n, m in layout if self.claims[n]], ColumnsGrouped)
        if grouped is not None:
            judged = grouped_order(judged, grouped[1].by)
        widened = _first([(n, m) for n, m in layout if self.claims[n]], TrainedAsFloat32)
        if widened is not None:
            claimed = set(self.claims[widened[0]])
            judged = [dataclasses.replace(t, dtype=torch.float32) if t.name in claimed else t for t in judged]
        layout_kinds = (ColumnsGrouped, TrainedAsFloat32)
        self.claims.update(
            {n: m.claims(judged, optimizer) for n, m in models if not isinstance(m, layout_kinds)}
        )
        self.models = [(n, m) for n, m in models if self.claims[n]]
        self.tables: tuple[TableConfig, ...] = tuple(judged)
        every_row = _first(self.models, EveryRowDecayed)
        self.every_row = _EveryRow.of(self.tables) if every_row is not None else None
        update_tables = self.every_row.tables if self.every_row is not None else self.tables
        self.no_decay = self._claimed(WeightDecayIgnored)
        optimizers = {"contract": optimizer}
        if self.no_decay:
            optimizers["no-decay"] = _no_decay(optimizer)
        self.oracles = {k: TrainingOracle(update_tables, o) for k, o in optimizers.items()}
        sharded = _first(self.models, RowwiseStatePerColumnShard)
        self.split: _ColumnSplit | None = None
        self.split_oracles: dict[str, TrainingOracle] = {}
        if sharded is not None:
            if self.every_row is not None:
                raise ModelError("rowwise-state-per-column-shard and every-row-decayed cannot be combined")
            self.split = _ColumnSplit.of(self.tables, sharded[1], self.claims[sharded[0]])
            self.split_oracles = {k: TrainingOracle(self.split.tables, o) for k, o in optimizers.items()}
        key_order = _first(self.models, FirstBatchKeyOrder)
        self.key_order: FirstBatchKeyOrder | None = None if key_order is None else key_order[1]
        self.first_keys: tuple[str, ...] | None = None
        self.relabelled = False
        self.double_rounded = self._claimed(DoubleRounded)
        self.separately = self._claimed(DuplicatesAppliedSeparately)

    def _claimed(self, kind: type) -> set[str]:
        """The tables the models of this kind claim, together."""
        return {t for n, m in self.models if isinstance(m, kind) for t in self.claims[n]}

    @property
    def used(self) -> tuple[str, ...]:
        """The models that change something on this problem (`first-batch-key-order` only once a
        later batch's keys came in another order)."""
        return tuple(n for n, m in self.models if not isinstance(m, FirstBatchKeyOrder) or self.relabelled)

    def initial_weights(self, weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The problem's starting weights as the library holds them (widened where modelled)."""
        return {t.name: weights[t.name].to(t.dtype, copy=True) for t in self.tables}

    def _kind(self, table: str) -> str:
        return "no-decay" if table in self.no_decay else "contract"

    def step(
        self, weights: Mapping[str, torch.Tensor], batch: JaggedBatch, grad_output: torch.Tensor
    ) -> ExpectedStep:
        """The modelled expectation of one step from ``weights`` (the library's, by table name)."""
        if self.key_order is not None:
            self.first_keys = self.first_keys or tuple(batch.keys)
            relabelled = self.key_order.relabel(self.tables, batch, self.first_keys)
            self.relabelled = self.relabelled or relabelled is not batch
            batch = relabelled
        b = batch.batch_size
        step_batch, step_grad = (
            (batch, grad_output) if self.every_row is None else self.every_row.batch(batch, grad_output)
        )
        errors = {k: dict(o.state_error) for k, o in self.oracles.items()}
        expected = {k: o.step(weights, step_batch, step_grad) for k, o in self.oracles.items()}
        split_expected = {}
        if self.split is not None:
            split_batch, split_grad = self.split.batch(batch, grad_output)
            split_weights = self.split.weights(weights)
            split_expected = {
                k: o.step(split_weights, split_batch, split_grad) for k, o in self.split_oracles.items()
            }
        main = expected["contract"]
        reference, output_tolerance, psw_tolerance = main.reference, main.output_tolerance, main.psw_tolerance
        if self.every_row is not None:
            keep = self.every_row.kept_columns
            value = reference.forward.value[:b][:, keep]
            output_tolerance = Tolerance(
                main.output_tolerance.bound[:b][:, keep], main.output_tolerance.classes[:b][:, keep]
            )
            psw = reference.per_sample_weight_grad
            if psw is not None:
                n = len(batch.values)
                psw = psw[:n]
                psw_tolerance = Tolerance(psw_tolerance.bound[:n], psw_tolerance.classes[:n])
            reference = dataclasses.replace(
                reference,
                forward=dataclasses.replace(reference.forward, value=value),
                per_sample_weight_grad=psw,
            )
        tables = {}
        for t in self.tables:
            kind = self._kind(t.name)
            if self.split is not None and len(self.split.shards[t.name]) > 1:
                e = self.split.join(t.name, split_expected[kind].tables)
            else:
                e = expected[kind].tables[t.name]
            s = expected[kind].reference.tables[t.name]
            if t.name in self.double_rounded:
                err = errors[kind].get(t.name)
                fp32 = update_tolerance(
                    self.oracles[kind].optimizer, torch.float32, s.before, s.gradient, s.gradient_magnitude,
                    s.occurrences, s.after, s.moment_after, None if err is None else err[s.rows],
                )  # fmt: skip
                e = _double_rounded(e, fp32.tolerance.bound, weights[t.name][s.rows], t.dtype)
            elif t.name in self.separately:
                lr = self.optimizer.learning_rate
                e = _applied_separately(e, s.gradient_magnitude, weights[t.name][s.rows], lr)
            tables[t.name] = e
        return ExpectedStep(reference, output_tolerance, tables, psw_tolerance)


# ---------------------------------------------------------------------------------------------
# Explaining a backend's training run.


def _run_failure(error: BaseException, models: Sequence[tuple[str, Model]], at: str) -> Explanation:
    observation = Observation.of_exception(error)
    reasons = []
    for name, model in models:
        if isinstance(model, Raises):
            why = model.explains_exception(observation)
            if why is None:
                return Explanation(
                    True, f"{at} raised the exception {name!r} models ({model.describe()})", (name,)
                )
            reasons.append(f"{name!r}: {why}")
    got = f"{type(error).__name__}: {error}"
    return Explanation(
        False, f"{at} raised {got}; " + ("; ".join(reasons) or "no model of an exception is in scope")
    )


def explain_training(
    backend: object, problem: TrainingProblem, models: Sequence[tuple[str, Model]]
) -> Explanation:
    """Whether the named models, together, explain what ``backend`` does on ``problem`` (validated).

    The backend is prepared and run again, every step judged by the `ModelledTrainingOracle` of the
    value models (`harness.training.check.judge_step`: output, every row of every table, the
    per-sample weight gradient); an exception is explained by a ``raises`` model that matches it.
    """
    if not models:
        return Explanation(False, "no known case to try")
    values = [(n, m) for n, m in models if isinstance(m, TrainingModel)]
    try:
        oracle = ModelledTrainingOracle(problem.tables, problem.optimizer, values)
    except ModelError as e:
        return Explanation(False, str(e))
    try:
        step_fn = backend.prepare_training(problem.tables, problem.weights, problem.optimizer)
    except Exception as e:  # noqa: BLE001 - a backend's exception is what is explained
        return _run_failure(e, models, "prepare_training()")
    current = oracle.initial_weights(problem.weights)
    n = len(problem.steps)
    for i, s in enumerate(problem.steps):
        at = f"step {i} of {n}" if n > 1 else "the step"
        try:
            result = keep_result(step_fn(s.batch, s.grad_output), oracle.tables)
        except ResultError as e:
            return Explanation(False, f"{at}: {e}")
        except Exception as e:  # noqa: BLE001
            return _run_failure(e, models, at)
        expected = oracle.step(current, s.batch, s.grad_output)
        failures, _ = judge_step(oracle.tables, s.batch, current, result, expected)
        if failures:
            used = " + ".join(map(repr, oracle.used)) or "no model"
            return Explanation(False, f"{at} is not what {used} model(s): " + "; ".join(failures))
        current = result.weights
        if not all(bool(torch.isfinite(w).all()) for w in current.values()):
            break
    if not oracle.used:
        return Explanation(
            False, "no model applies to this problem, and the backend agrees with the contract"
        )
    names = " + ".join(map(repr, oracle.used))
    return Explanation(True, f"every step is what {names} model(s)", oracle.used)


__all__ = [
    "TRAINING_MODEL_KINDS",
    "ColumnsGrouped",
    "DoubleRounded",
    "DuplicatesAppliedSeparately",
    "EveryRowDecayed",
    "FirstBatchKeyOrder",
    "ModelledTrainingOracle",
    "RowwiseStatePerColumnShard",
    "TrainedAsFloat32",
    "TrainingModel",
    "WeightDecayIgnored",
    "column_shard_widths",
    "explain_training",
    "grouped_order",
    "training_model_from_json",
]
