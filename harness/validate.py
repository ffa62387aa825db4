"""Validation: every malformed problem is rejected here, before any backend runs.

Each error names what is wrong and where (table, feature, sample, position, value, limit).
Nothing is changed silently: the only transformation is the explicit id policy ``"modulo"``,
which returns a *new* batch and leaves the caller's tensors untouched.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch

from harness.model import (
    ID_DTYPES,
    SUPPORTED_DTYPES,
    JaggedBatch,
    Pooling,
    TableConfig,
    dtype_name,
)

IdPolicy = Literal["reject", "modulo"]
ID_POLICIES: tuple[str, ...] = ("reject", "modulo")


class ProblemError(ValueError):
    """A problem (tables, weights or batch) that no backend may be given."""


def validate_tables(tables: Sequence[TableConfig]) -> None:
    """Check table configs on their own: names, sizes, dtypes, pooling, feature ownership."""
    if isinstance(tables, TableConfig) or not isinstance(tables, Sequence):
        raise ProblemError(f"tables must be a sequence of TableConfig, got {type(tables).__name__}")
    if len(tables) == 0:
        raise ProblemError("no tables: a problem needs at least one TableConfig")
    seen_tables: set[str] = set()
    owner: dict[str, str] = {}
    for i, t in enumerate(tables):
        if not isinstance(t, TableConfig):
            raise ProblemError(f"tables[{i}] is a {type(t).__name__}, not a TableConfig")
        if not isinstance(t.name, str) or not t.name:
            raise ProblemError(f"tables[{i}] has an empty or non-string name {t.name!r}")
        if t.name in seen_tables:
            raise ProblemError(f"duplicate table name {t.name!r} (tables[{i}])")
        seen_tables.add(t.name)
        for attr in ("num_embeddings", "embedding_dim"):
            v = getattr(t, attr)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ProblemError(f"table {t.name!r}: {attr} must be a positive integer, got {v!r}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise ProblemError(
                f"table {t.name!r}: unsupported dtype {t.dtype}; "
                f"supported: {', '.join(dtype_name(d) for d in SUPPORTED_DTYPES)}"
            )
        if not isinstance(t.pooling, Pooling):
            raise ProblemError(
                f"table {t.name!r}: pooling must be Pooling.SUM or Pooling.MEAN, got {t.pooling!r}"
            )
        if len(t.feature_names) == 0:
            raise ProblemError(f"table {t.name!r} declares no feature_names")
        for f in t.feature_names:
            if f in owner:
                where = (
                    "twice in that table" if owner[f] == t.name else f"by tables {owner[f]!r} and {t.name!r}"
                )
                raise ProblemError(f"feature {f!r} is declared {where}")
            owner[f] = t.name


def validate_weights(tables: Sequence[TableConfig], weights: Mapping[str, torch.Tensor]) -> None:
    """Each table has a CPU ``[num_embeddings, embedding_dim]`` tensor of its dtype; no extras."""
    names = {t.name for t in tables}
    for extra in sorted(set(weights) - names):
        raise ProblemError(f"weights given for {extra!r}, which is not a table")
    for t in tables:
        if t.name not in weights:
            raise ProblemError(f"no weights for table {t.name!r}")
        w = weights[t.name]
        if not isinstance(w, torch.Tensor):
            raise ProblemError(f"weights of table {t.name!r} are a {type(w).__name__}, not a tensor")
        expected = (t.num_embeddings, t.embedding_dim)
        if tuple(w.shape) != expected:
            raise ProblemError(
                f"weights of table {t.name!r} have shape {tuple(w.shape)}, expected {expected}"
            )
        if w.dtype != t.dtype:
            raise ProblemError(
                f"weights of table {t.name!r} are {dtype_name(w.dtype)}, "
                f"but the table's dtype is {dtype_name(t.dtype)}"
            )
        if w.device.type != "cpu":
            raise ProblemError(
                f"weights of table {t.name!r} are on {w.device}; "
                "pass them on the CPU (backends move them in prepare)"
            )


def _described(t: object) -> str:
    """What a wrong batch field is, for an error: its type, or its dtype, shape and device."""
    if not isinstance(t, torch.Tensor):
        return f"a {type(t).__name__}"
    return f"{dtype_name(t.dtype)} of shape {tuple(t.shape)} on {t.device}"


def check_batch_structure(
    batch: JaggedBatch, *, device: str | None = "cpu", tables: Sequence[TableConfig] | None = None
) -> None:
    """The checks that read no lengths or ids: type, keys, tensors' rank, dtype and device, sizes.

    ``device`` is the device type every tensor must be on, or ``None`` for any (a lookup that moves
    the batch to its own device); ``tables``, when given, are named if the batch has no keys.
    Repeated keys are not looked for here: that is O(keys), and a lookup finds them once per key
    tuple when it maps keys to tables.
    """
    if not isinstance(batch, JaggedBatch):
        raise ProblemError(f"batch is a {type(batch).__name__}, not a JaggedBatch")
    if len(batch.keys) == 0:
        features = "" if tables is None else f"; the tables' features are {_features(tables)}"
        raise ProblemError(f"batch has no keys{features}")
    on = "" if device is None else f" {device.upper()}"
    for what, t in (("ids (values)", batch.values), ("lengths", batch.lengths)):
        if not isinstance(t, torch.Tensor) or t.dim() != 1 or not _on(t, device):
            raise ProblemError(f"{what} must be a 1-D{on} tensor, got {_described(t)}")
        if t.dtype not in ID_DTYPES:
            hint = " (ids are not integers)" if t is batch.values and t.dtype.is_floating_point else ""
            raise ProblemError(f"{what} must be int64 or int32, got {dtype_name(t.dtype)}{hint}")
    n_keys = len(batch.keys)
    if len(batch.lengths) % n_keys != 0:
        raise ProblemError(
            f"lengths has {len(batch.lengths)} entries, not a multiple of the {n_keys} keys "
            f"{list(batch.keys)}"
        )
    w = batch.weights
    if w is not None:
        if not isinstance(w, torch.Tensor) or w.dtype != torch.float32 or not _on(w, device):
            raise ProblemError(f"per-sample weights must be a float32{on} tensor, got {_described(w)}")
        if w.dim() != 1 or len(w) != len(batch.values):
            raise ProblemError(
                f"per-sample weights have shape {tuple(w.shape)}, expected ({len(batch.values)},) like values"
            )


def check_batch_lengths(batch: JaggedBatch) -> None:
    """One pass over the lengths of a structurally valid batch: none negative, and they sum to the ids."""
    lengths = batch.lengths.cpu()
    if len(lengths) and int(lengths.min()) < 0:
        i = int((lengths < 0).nonzero()[0])
        b = batch.batch_size
        raise ProblemError(
            f"negative length {int(lengths[i])} for feature {batch.keys[i // b]!r}, "
            f"sample {i % b} (lengths[{i}])"
        )
    total = int(lengths.to(torch.int64).sum())
    if total != len(batch.values):
        raise ProblemError(f"sum(lengths) = {total} but values has {len(batch.values)} ids")


def check_weights_pooling(tables: Sequence[TableConfig], batch: JaggedBatch) -> None:
    """Per-sample weights require SUM pooling in every table."""
    if batch.weights is None:
        return
    for t in tables:
        if t.pooling is not Pooling.SUM:
            raise ProblemError(
                f"per-sample weights require SUM pooling, but table {t.name!r} "
                f"(features {list(t.feature_names)}) pools {t.pooling.value.upper()}"
            )


def check_lookup_batch(
    batch: JaggedBatch, tables: Sequence[TableConfig], *, device: str | None, has_mean: bool | None = None
) -> None:
    """What a backend's lookup checks of a batch when called directly, without `validate_problem`.

    Here, not in impls/: one home and one wording for every rule about a batch (impls/ imports harness/).
    It reads no lengths or ids: a lookup checks those itself (in its kernel, or with
    `check_batch_lengths`), and keys against its tables when it maps them. ``device`` as in
    `check_batch_structure`. ``has_mean`` (whether any table pools MEAN), when the lookup has it
    from ``prepare``, keeps the check O(1) per call: the tables are then scanned only for the error.
    Raises `ProblemError` (a `ValueError`).
    """
    check_batch_structure(batch, device=device, tables=tables)
    if batch.weights is not None and has_mean is not False:
        check_weights_pooling(tables, batch)


def validate_batch_layout(batch: JaggedBatch) -> None:
    """The jagged layout alone: keys, id and length dtypes, lengths against values, weights."""
    check_batch_structure(batch)
    dup = sorted({k for k in batch.keys if batch.keys.count(k) > 1})
    if dup:
        raise ProblemError(f"batch key {dup[0]!r} appears more than once")
    check_batch_lengths(batch)


def _on(t: torch.Tensor, device: str | None) -> bool:
    return device is None or t.device.type == device


def _features(tables: Sequence[TableConfig]) -> list[str]:
    return sorted(f for t in tables for f in t.feature_names)


def _check_ids(table: TableConfig, key: str, ids: torch.Tensor, lengths: torch.Tensor) -> None:
    bad = ((ids < 0) | (ids >= table.num_embeddings)).nonzero()
    if len(bad) == 0:
        return
    pos = int(bad[0])
    value = int(ids[pos])
    ends = torch.cumsum(lengths.to(torch.int64), 0)
    sample = int(torch.searchsorted(ends, pos, right=True))
    start = int(ends[sample - 1]) if sample > 0 else 0
    what = "negative id" if value < 0 else "id out of range"
    raise ProblemError(
        f"{what}: feature {key!r}, sample {sample}, position {pos - start} in its bag "
        f"(position {pos} of the feature's ids) has id {value}; table {table.name!r} has "
        f"num_embeddings {table.num_embeddings} (valid ids 0..{table.num_embeddings - 1}); "
        "pass id_policy='modulo' to hash ids into the table"
    )


def validate_problem(
    tables: Sequence[TableConfig],
    batch: JaggedBatch,
    weights: Mapping[str, torch.Tensor] | None = None,
    *,
    id_policy: IdPolicy = "reject",
) -> JaggedBatch:
    """Check a whole problem; return the batch the backends get.

    With ``id_policy="reject"`` (the default) that is ``batch`` itself. With ``"modulo"`` it is a
    new batch whose ids are ``id mod num_embeddings`` of the feature's table; the caller's batch is
    not touched. Raises `ProblemError` naming the first thing that is wrong.
    """
    if id_policy not in ID_POLICIES:
        raise ProblemError(f"unknown id policy {id_policy!r}; expected one of {ID_POLICIES}")
    validate_tables(tables)
    if weights is not None:
        validate_weights(tables, weights)
    validate_batch_layout(batch)
    table_of = {f: t for t in tables for f in t.feature_names}
    for k in batch.keys:
        if k not in table_of:
            raise ProblemError(
                f"batch key {k!r} is not a feature of any table (features: {sorted(table_of)})"
            )
    for f, t in table_of.items():
        if f not in batch.keys:
            raise ProblemError(f"feature {f!r} of table {t.name!r} is missing from the batch")
    check_weights_pooling(tables, batch)
    b = batch.batch_size
    offsets = batch.offsets
    new_values = []
    for f, key in enumerate(batch.keys):
        t = table_of[key]
        lo, hi = int(offsets[f * b]), int(offsets[(f + 1) * b])
        ids = batch.values[lo:hi]
        if id_policy == "modulo":
            new_values.append(torch.remainder(ids, t.num_embeddings))
        else:
            _check_ids(t, key, ids, batch.lengths[f * b : (f + 1) * b])
    if id_policy == "modulo":
        values = torch.cat(new_values) if new_values else batch.values.clone()
        return JaggedBatch(batch.keys, values.to(batch.values.dtype), batch.lengths, batch.weights)
    return batch
