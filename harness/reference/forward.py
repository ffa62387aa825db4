"""The forward oracle in float64: `pool_loop`, the definition, and `pool`, the same result fast.

`pool_loop` is a plain loop over features, samples and ids, slow on purpose and meant to be
checked by reading it. `pool` computes the same numbers with one compiled pass per table
(`harness.reference.compiled`): each id's row is widened to float64, multiplied by its per-sample
weight and added in bag order, exactly as the loop does, so the two agree to the last bit on
everything but ``tree_sum`` (see `ReferenceResult`). ``tests/test_reference.py`` checks that on
every strategy of `harness.fuzz.strategies`.

Besides the pooled value both return, per output element, the inputs of the tolerance
(`harness.tolerance`): the sums of the positive terms and of the negative terms' magnitudes,
their total, an upper bound on the worst summation tree's sum of partial magnitudes, and the bag
length and pooling.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

from harness.model import JaggedBatch, Pooling, TableConfig, is_quantized, output_columns, total_dim
from harness.quantized import QuantizedTable, exact_values
from harness.reference import compiled
from harness.tolerance import OVERFLOW32, Tolerance, tolerance_from


@dataclass(frozen=True, eq=False)
class PooledReference:
    """The float64 pooled value of every output element, ``[batch, total_dim]``, and what the bags
    look like: `bag_length` and `is_mean` per element, worked out from the tables and the batch's
    lengths when first asked for (most users of an oracle need only the value)."""

    value: torch.Tensor
    tables: tuple[TableConfig, ...]
    keys: tuple[str, ...]
    lengths: torch.Tensor
    """The batch's keys and lengths (feature-major, as in `JaggedBatch`)."""

    @cached_property
    def _layout(self) -> dict[str, torch.Tensor]:
        return bag_layout(self.tables, JaggedBatch(self.keys, self.lengths[:0], self.lengths))

    @property
    def feature_lengths(self) -> torch.Tensor:
        """int64 ``[batch, features]``: bag lengths, features in output column order."""
        return self._layout["feature_lengths"]

    @property
    def column_feature(self) -> torch.Tensor:
        """int64 ``[total_dim]``: the feature (a column of `feature_lengths`) of each output column."""
        return self._layout["column_feature"]

    @property
    def column_mean(self) -> torch.Tensor:
        """bool ``[total_dim]``: whether each column's table pools MEAN."""
        return self._layout["column_mean"]

    @property
    def bag_length(self) -> torch.Tensor:
        """int64 ``[batch, total_dim]``: the length of each element's bag."""
        return self.feature_lengths[:, self.column_feature]

    @property
    def is_mean(self) -> torch.Tensor:
        """bool ``[batch, total_dim]``: whether each element's table pools MEAN."""
        return self.column_mean.expand(self.value.shape)

    @property
    def column_terms(self) -> torch.Tensor:
        """int64 ``[total_dim]``: the terms each id adds to a column's sum, 1, or 2 for a quantized
        table (its ``w b`` and ``w s q``: `harness.tolerance`, "Quantized tables")."""
        return self._layout["column_terms"]

    @property
    def term_count(self) -> torch.Tensor:
        """int64 ``[batch, total_dim]``: the terms each element sums, ``bag_length * column_terms``."""
        return self.bag_length * self.column_terms


def bag_layout(tables: Sequence[TableConfig], batch: JaggedBatch) -> dict[str, torch.Tensor]:
    """``feature_lengths``, ``column_feature`` and ``column_mean`` of `PooledReference` (a batch's ids
    are not read: only its keys and lengths)."""
    b = batch.batch_size
    key_index = {k: i for i, k in enumerate(batch.keys)}
    features = [key_index[f] for t in tables for f in t.feature_names]
    lengths = batch.lengths.detach().to(torch.int64).numpy().reshape(len(batch.keys), b)
    dims = [t.embedding_dim for t in tables for _ in t.feature_names]
    means = np.array([t.pooling is Pooling.MEAN for t in tables for _ in t.feature_names], dtype=np.bool_)
    terms = np.array([2 if is_quantized(t) else 1 for t in tables for _ in t.feature_names], dtype=np.int64)
    # numpy, not torch.repeat_interleave: that starts torch's OpenMP team, on which a forked child
    # of this process (the robustness matrix's) would then deadlock.
    return {
        "feature_lengths": torch.from_numpy(np.ascontiguousarray(lengths[features].T)),
        "column_feature": torch.from_numpy(np.repeat(np.arange(len(features), dtype=np.int64), dims)),
        "column_mean": torch.from_numpy(np.repeat(means, dims)),
        "column_terms": torch.from_numpy(np.repeat(terms, dims)),
    }


@dataclass(frozen=True, eq=False)
class ReferenceResult(PooledReference):
    """`PooledReference` plus the inputs of the tolerance, all float64 ``[batch, total_dim]``.

    With terms ``t_i = w_i x_i``: ``positive`` is the sum of the positive terms, ``negative`` the
    sum of the negative ones' magnitudes (a NaN term counts in neither), ``magnitude = positive +
    negative``, and
    ``tree_sum`` an upper bound on ``D``, the largest sum over the additions of the magnitudes
    below them of any summation order (`harness.tolerance`): exact in `pool_loop`, estimated from
    running statistics in `pool` for long bags (never below the exact value) and
    ``(L - 1) * magnitude`` there for short ones. For MEAN every float field is divided by the bag
    length ``L``.

    A quantized table's id adds the exact dequantized ``x = s q + b`` times ``w`` to ``value``,
    but two terms, ``w b`` and ``w s q``, to the other fields (`harness.tolerance`, "Quantized
    tables"; `term_count` counts them): a NaN one of those (an infinite weight times a zero part)
    counts as ``+inf`` in both ``positive`` and ``negative``.
    """

    magnitude: torch.Tensor
    positive: torch.Tensor
    negative: torch.Tensor
    tree_sum: torch.Tensor

    def tolerance(self) -> Tolerance:
        """The per-element tolerance of a float32 backend's result (`harness.tolerance`)."""
        return tolerance_from(
            self.value,
            self.magnitude,
            self.tree_sum,
            self.positive,
            self.negative,
            self.bag_length,
            self.is_mean,
            self.column_terms,
        )


def exact_tree_sum(terms: torch.Tensor) -> torch.Tensor:
    """``D = sum_{k=2..L} P_k`` per column of ``[L, dim]`` terms, ``P_k`` the sum of the k largest |t|.

    The largest sum of partial magnitudes over all summation trees (`harness.tolerance`). NaN
    terms count as 0, as in ``magnitude``.
    """
    a = torch.where(torch.isnan(terms), torch.zeros_like(terms), terms.abs())
    largest_first = torch.sort(a, dim=0, descending=True).values
    return torch.cumsum(largest_first, dim=0)[1:].sum(dim=0)


def _bags(tables: Sequence[TableConfig], batch: JaggedBatch) -> dict[str, object]:
    """What `PooledReference` needs of the problem: a copy of the lengths, which a backend might change."""
    return {"tables": tuple(tables), "keys": batch.keys, "lengths": batch.lengths.clone()}


def pool_loop(
    tables: Sequence[TableConfig], weights: Mapping[str, torch.Tensor], batch: JaggedBatch
) -> ReferenceResult:
    """Pool every bag in float64, feature by feature, sample by sample, id by id."""
    b = batch.batch_size
    width = total_dim(tables)
    fields = {
        name: torch.zeros(b, width, dtype=torch.float64)
        for name in ("value", "magnitude", "positive", "negative", "tree_sum")
    }
    table_by_name = {t.name: t for t in tables}
    offsets = batch.offsets.tolist()
    ids = batch.values.tolist()
    per_sample = batch.weights.double().tolist() if batch.weights is not None else None

    for table_name, feature, first_col, dim in output_columns(tables):
        table = table_by_name[table_name]
        rows = exact_values(weights[table_name])
        cols = slice(first_col, first_col + dim)
        f = batch.keys.index(feature)
        for sample in range(b):
            start, end = offsets[f * b + sample], offsets[f * b + sample + 1]
            terms = [
                rows[ids[pos]] * (per_sample[pos] if per_sample is not None else 1.0)
                for pos in range(start, end)
            ]
            acc = torch.zeros(dim, dtype=torch.float64)
            for term in terms:  # in bag order
                acc += term
            if is_quantized(table):
                w = [per_sample[pos] if per_sample is not None else 1.0 for pos in range(start, end)]
                terms = _split_terms(weights[table_name], ids[start:end], w)
            pos_sum = torch.zeros(dim, dtype=torch.float64)
            neg_sum = torch.zeros(dim, dtype=torch.float64)
            for term in terms:
                nan = torch.isnan(term) if is_quantized(table) else torch.zeros(dim, dtype=torch.bool)
                pos_sum += torch.where(term > 0, term, torch.where(nan, torch.inf, 0.0))
                neg_sum += torch.where(term < 0, -term, torch.where(nan, torch.inf, 0.0))
            mag = pos_sum + neg_sum
            tree = exact_tree_sum(torch.stack(terms)) if terms else torch.zeros(dim, dtype=torch.float64)
            n = end - start
            out = {"value": acc, "magnitude": mag, "positive": pos_sum, "negative": neg_sum, "tree_sum": tree}
            for name, x in out.items():
                fields[name][sample, cols] = x / n if table.pooling is Pooling.MEAN and n > 0 else x
    return ReferenceResult(**fields, **_bags(tables, batch))


def _split_terms(table: QuantizedTable, ids: Sequence[int], w: Sequence[float]) -> list[torch.Tensor]:
    """A quantized bag's terms for the bound: per id, in bag order, ``w b`` then ``w s q`` (both
    exact in float64: ``w s`` has at most 35 significant bits, times a code at most 43); ``w s q``
    is NaN where the code is 0 and ``|w s|`` overflows float32 (``fl(w s) * 0``, `harness.tolerance`)."""
    scale, bias, codes = table.scale.double(), table.bias.double(), table.codes.double()
    out = []
    for i, weight in zip(ids, w, strict=True):
        out.append((weight * bias[i]).expand(codes.shape[1]))
        ws = weight * scale[i]
        code_terms = ws * codes[i]
        if not abs(float(ws)) < OVERFLOW32:
            code_terms = torch.where(codes[i] == 0, torch.nan, code_terms)
        out.append(code_terms)
    return out


def pool(
    tables: Sequence[TableConfig], weights: Mapping[str, torch.Tensor], batch: JaggedBatch
) -> ReferenceResult:
    """`pool_loop`'s result (``tree_sum`` aside), by one compiled pass per table.

    Safe on unchecked input: an id outside its table or lengths that do not fit the ids raise
    `ValueError` instead of reading out of bounds (validate first for a message naming the place).
    """
    return ReferenceResult(**compiled.pool(tables, weights, batch), **_bags(tables, batch))


def pool_with_tolerance(
    tables: Sequence[TableConfig], weights: Mapping[str, torch.Tensor], batch: JaggedBatch
) -> tuple[PooledReference, Tolerance]:
    """`pool`'s value and its `Tolerance` in one pass, without the intermediate fields: the same
    value and tolerance as ``pool(...)`` and ``.tolerance()``, at a fraction of the memory traffic."""
    f = compiled.pool(tables, weights, batch, fused=True)
    return PooledReference(f["value"], **_bags(tables, batch)), Tolerance(f["bound"], f["classes"])
