"""Edits of a concrete problem, vectorised so that a 100 000-id problem is edited in milliseconds.

Every function returns a new `Problem` (new tensors where anything changed) and never touches its
argument. None of them checks that the result is valid: the minimiser validates each candidate and
drops the invalid ones (a weighted MEAN table, say).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from harness.model import JaggedBatch, Pooling, Problem, TableConfig
from harness.quantized import QuantizedTable, concat_rows


def bag_of_ids(batch: JaggedBatch) -> torch.Tensor:
    """For each id of ``batch.values``, the index of its bag (``feature * batch_size + sample``)."""
    return torch.repeat_interleave(torch.arange(len(batch.lengths)), batch.lengths.to(torch.int64))


def position_in_bag(batch: JaggedBatch) -> torch.Tensor:
    """For each id, its position within its bag (0 for a bag's first id)."""
    starts = batch.offsets[:-1]
    return torch.arange(len(batch.values)) - starts[bag_of_ids(batch)]


def table_of_ids(problem: Problem) -> torch.Tensor:
    """For each id, the index (in ``problem.tables``) of the table its feature reads."""
    index = {f: i for i, t in enumerate(problem.tables) for f in t.feature_names}
    per_key = torch.tensor([index[k] for k in problem.batch.keys], dtype=torch.int64)
    b = problem.batch.batch_size
    if b == 0 or not len(per_key):
        return torch.zeros(len(problem.batch.values), dtype=torch.int64)
    return per_key[bag_of_ids(problem.batch) // b]


def replace(
    problem: Problem,
    *,
    tables: Sequence[TableConfig] | None = None,
    weights: Mapping[str, torch.Tensor] | None = None,
    batch: JaggedBatch | None = None,
) -> Problem:
    """``problem`` with some of its parts replaced (the others shared, they are never edited)."""
    return Problem(
        tuple(problem.tables if tables is None else tables),
        dict(problem.weights if weights is None else weights),
        problem.batch if batch is None else batch,
        dict(problem.metadata),
    )


def restrict(
    problem: Problem,
    *,
    keys: Sequence[str] | None = None,
    samples: torch.Tensor | None = None,
    ids: torch.Tensor | None = None,
) -> Problem:
    """Keep only the batch keys ``keys`` (in the batch's order), the samples where the boolean mask
    ``samples`` holds, and the ids where the boolean mask ``ids`` holds (bags shrink to match).

    A table left without features is dropped with its weights; a shared table keeps its
    remaining features in order.
    """
    batch = problem.batch
    b = batch.batch_size
    kept_keys = tuple(k for k in batch.keys if keys is None or k in set(keys))
    feature_mask = torch.tensor([k in kept_keys for k in batch.keys], dtype=torch.bool)
    sample_mask = torch.ones(b, dtype=torch.bool) if samples is None else samples.to(torch.bool)
    bag_mask = (feature_mask[:, None] & sample_mask[None, :]).reshape(-1)
    bag = bag_of_ids(batch)
    id_mask = bag_mask[bag] if len(bag) else torch.zeros(0, dtype=torch.bool)
    if ids is not None:
        id_mask = id_mask & ids.to(torch.bool)
    lengths = torch.bincount(bag[id_mask], minlength=len(batch.lengths))[bag_mask]
    new_batch = JaggedBatch(
        kept_keys,
        batch.values[id_mask],
        lengths.to(batch.lengths.dtype),
        None if batch.weights is None else batch.weights[id_mask],
    )
    tables = []
    for t in problem.tables:
        features = tuple(f for f in t.feature_names if f in kept_keys)
        if features:
            tables.append(_table(t, feature_names=features))
    weights = {t.name: problem.weights[t.name] for t in tables}
    return replace(problem, tables=tables, weights=weights, batch=new_batch)


def join_samples(problem: Problem, start: int, stop: int) -> Problem:
    """Samples ``[start, stop)`` joined into one: in every feature their bags become one bag (the
    ids in the same order), so the batch has ``stop - start - 1`` fewer samples and the same ids."""
    batch = problem.batch
    b = batch.batch_size
    lengths = batch.lengths.reshape(len(batch.keys), b)
    joined = torch.cat(
        [lengths[:, :start], lengths[:, start:stop].sum(dim=1, keepdim=True), lengths[:, stop:]], dim=1
    )
    new_batch = JaggedBatch(
        batch.keys, batch.values, joined.reshape(-1).to(batch.lengths.dtype), batch.weights
    )
    return replace(problem, batch=new_batch)


def _table(t: TableConfig, **changes: object) -> TableConfig:
    fields = {
        "name": t.name,
        "num_embeddings": t.num_embeddings,
        "embedding_dim": t.embedding_dim,
        "feature_names": t.feature_names,
        "pooling": t.pooling,
        "dtype": t.dtype,
    }
    fields.update(changes)
    return TableConfig(**fields)  # type: ignore[arg-type]


def with_dim(problem: Problem, table: int, dim: int) -> Problem:
    """Table ``table`` cut to its first ``dim`` columns (its weights sliced to match)."""
    return with_columns(problem, table, torch.arange(dim))


def with_columns(problem: Problem, table: int, columns: torch.Tensor) -> Problem:
    """Table ``table`` keeping only the weight columns ``columns`` (indices, in order)."""
    t = problem.tables[table]
    tables = list(problem.tables)
    tables[table] = _table(t, embedding_dim=len(columns))
    weights = dict(problem.weights)
    weights[t.name] = problem.weights[t.name][:, columns].clone()
    return replace(problem, tables=tables, weights=weights)


def with_attribute(problem: Problem, table: int, *, pooling: Pooling | None = None, dtype=None) -> Problem:
    """Table ``table`` with another pooling or storage dtype (its values converted)."""
    t = problem.tables[table]
    tables = list(problem.tables)
    weights = dict(problem.weights)
    if pooling is not None:
        tables[table] = _table(t, pooling=pooling)
    if dtype is not None:
        tables[table] = _table(tables[table], dtype=dtype)
        weights[t.name] = problem.weights[t.name].to(dtype)
    return replace(problem, tables=tables, weights=weights)


def with_ids(problem: Problem, values: torch.Tensor) -> Problem:
    """The same bags holding other ids (``values`` in the batch's id dtype)."""
    b = problem.batch
    return replace(problem, batch=JaggedBatch(b.keys, values.to(b.values.dtype), b.lengths, b.weights))


def with_id_dtype(problem: Problem, dtype: torch.dtype) -> Problem:
    b = problem.batch
    return replace(problem, batch=JaggedBatch(b.keys, b.values.to(dtype), b.lengths, b.weights))


def with_sample_weights(problem: Problem, weights: torch.Tensor | None) -> Problem:
    b = problem.batch
    return replace(problem, batch=JaggedBatch(b.keys, b.values, b.lengths, weights))


def with_table_weights(problem: Problem, table: int, values: torch.Tensor) -> Problem:
    weights = dict(problem.weights)
    weights[problem.tables[table].name] = values
    return replace(problem, weights=weights)


def with_rows(
    problem: Problem, table: int, rows: torch.Tensor, remap: Callable[[torch.Tensor], torch.Tensor]
) -> Problem:
    """Table ``table`` holding ``rows`` (its new weights) and its ids mapped by ``remap``."""
    t = problem.tables[table]
    tables = list(problem.tables)
    tables[table] = _table(t, num_embeddings=len(rows))
    weights = dict(problem.weights)
    weights[t.name] = rows
    mine = table_of_ids(problem) == table
    values = problem.batch.values.clone()
    values[mine] = remap(values[mine].to(torch.int64)).to(values.dtype)
    b = problem.batch
    return replace(
        problem, tables=tables, weights=weights, batch=JaggedBatch(b.keys, values, b.lengths, b.weights)
    )


def merge_tables(problem: Problem, first: int) -> Problem:
    """Tables ``first`` and ``first + 1`` as one shared table: the second's rows appended to the
    first's, its features moved to the first and their ids shifted past the first's rows."""
    a, c = problem.tables[first], problem.tables[first + 1]
    merged = _table(
        a,
        num_embeddings=a.num_embeddings + c.num_embeddings,
        feature_names=a.feature_names + c.feature_names,
    )
    tables = list(problem.tables)
    tables[first : first + 2] = [merged]
    weights = {k: v for k, v in problem.weights.items() if k != c.name}
    upper, lower = problem.weights[a.name], problem.weights[c.name]
    if isinstance(upper, QuantizedTable):
        weights[a.name] = concat_rows([upper, lower])
    else:
        weights[a.name] = torch.cat([upper, lower])
    values = problem.batch.values.clone()
    moved = table_of_ids(problem) == first + 1
    values[moved] += a.num_embeddings
    b = problem.batch
    return replace(
        problem, tables=tables, weights=weights, batch=JaggedBatch(b.keys, values, b.lengths, b.weights)
    )


def with_keys_in_table_order(problem: Problem) -> Problem:
    """The batch's features reordered to follow the tables' feature order (bags kept whole)."""
    batch = problem.batch
    order = [f for t in problem.tables for f in t.feature_names]
    b = batch.batch_size
    lengths = batch.lengths.reshape(len(batch.keys), b) if batch.keys else batch.lengths.reshape(0, 0)
    offsets = batch.offsets
    pieces, new_lengths = [], []
    for key in order:
        f = batch.keys.index(key)
        pieces.append(torch.arange(int(offsets[f * b]), int(offsets[(f + 1) * b])))
        new_lengths.append(lengths[f])
    take = torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.int64)
    new_batch = JaggedBatch(
        tuple(order),
        batch.values[take],
        torch.cat(new_lengths) if new_lengths else batch.lengths.clone(),
        None if batch.weights is None else batch.weights[take],
    )
    return replace(problem, batch=new_batch)
