"""Validation: every malformed problem is rejected here, before any backend runs.

Each error names what is wrong and where (table, feature, sample, position, value, limit).
Nothing is changed silently: the only transformation is the explicit id policy ``"modulo"``,
which returns a *new* batch and leaves the caller's tensors untouched.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
import torch

from harness.model import (
    ID_DTYPES,
    TABLE_DTYPES,
    JaggedBatch,
    Pooling,
    TableConfig,
    dtype_name,
    is_quantized,
)
from harness.quantized import QuantizedTable, bits_of, levels_of

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
        if t.dtype not in TABLE_DTYPES:
            raise ProblemError(
                f"table {t.name!r}: unsupported dtype {t.dtype}; "
                f"supported: {', '.join(dtype_name(d) for d in TABLE_DTYPES)}"
            )
        if is_quantized(t):
            _check_packable_dim(t)
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


def validate_weights(tables: Sequence[TableConfig], weights: Mapping[str, object]) -> None:
    """Each table has a CPU ``[num_embeddings, embedding_dim]`` tensor of its dtype (a quantized
    table: a `QuantizedTable`, `_check_quantized_weights`); no extras."""
    names = {t.name for t in tables}
    for extra in sorted(set(weights) - names):
        raise ProblemError(f"weights given for {extra!r}, which is not a table")
    for t in tables:
        if t.name not in weights:
            raise ProblemError(f"no weights for table {t.name!r}")
        w = weights[t.name]
        if is_quantized(t) or isinstance(w, QuantizedTable):
            _check_quantized_weights(t, w)
            continue
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


def _check_packable_dim(t: TableConfig) -> None:
    """A quantized table's dim must fill whole bytes of packed codes.

    FBGEMM's IntNBit TBE (and so torchrec's QuantEmbeddingBagCollection) and torch's
    ``embedding_bag_{byte,4bit,2bit}_rowwise_offsets`` all read int8 rows of any dim, int4 rows of
    an even dim and int2 rows of a dim divisible by 4; jagbench accepts exactly those. (FBGEMM's own
    quantizer op is stricter, a row's packed bytes even; torchrec pads rows to 16 bytes, which
    limits no dim.)
    """
    per_byte = 8 // bits_of(t.dtype)
    if t.embedding_dim % per_byte:
        raise ProblemError(
            f"table {t.name!r}: {t.dtype} packs {per_byte} codes a byte, so embedding_dim must be a "
            f"multiple of {per_byte} (as the int-n lookups of FBGEMM, torchrec and torch require); "
            f"got {t.embedding_dim}"
        )


def _check_quantized_weights(t: TableConfig, w: object) -> None:
    """A quantized table's weights: a `QuantizedTable` of its storage with uint8 codes ``[rows,
    dim]`` within ``0..2**bits - 1`` and finite float16 scale and bias ``[rows]``, all on the CPU."""
    if not is_quantized(t):
        raise ProblemError(
            f"weights of table {t.name!r} are a QuantizedTable ({w.storage}), "
            f"but the table's dtype is {dtype_name(t.dtype)}"
        )
    if not isinstance(w, QuantizedTable):
        raise ProblemError(
            f"weights of table {t.name!r} are a {type(w).__name__}; a {t.dtype} table needs a "
            "harness.quantized.QuantizedTable (codes, scale, bias)"
        )
    if w.storage != t.dtype:
        raise ProblemError(
            f"weights of table {t.name!r} are stored {w.storage!r}, but the table's dtype is {t.dtype!r}"
        )
    rows, dim = t.num_embeddings, t.embedding_dim
    for what, x, dtype, shape in (
        ("codes", w.codes, torch.uint8, (rows, dim)),
        ("scale", w.scale, torch.float16, (rows,)),
        ("bias", w.bias, torch.float16, (rows,)),
    ):
        if (
            not isinstance(x, torch.Tensor)
            or x.dtype != dtype
            or tuple(x.shape) != shape
            or x.device.type != "cpu"
        ):
            raise ProblemError(
                f"{what} of quantized table {t.name!r} must be a CPU {dtype_name(dtype)} tensor of shape "
                f"{shape}, got {_described(x)}"
            )
    limit = levels_of(t.dtype)
    if limit < 255 and rows and int(w.codes.max()) > limit:
        r, c = (int(i) for i in (w.codes > limit).nonzero()[0])
        raise ProblemError(
            f"code out of range: table {t.name!r}, row {r}, column {c} has code {int(w.codes[r, c])}; "
            f"{t.dtype} codes are 0..{limit}"
        )
    for what, x in (("scale", w.scale), ("bias", w.bias)):
        bad = ~torch.isfinite(x)
        if bool(bad.any()):
            r = int(bad.nonzero()[0])
            raise ProblemError(
                f"non-finite {what}: table {t.name!r}, row {r} has {what} {float(x[r])}; "
                "a quantized row's scale and bias must be finite"
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
    """One pass over the lengths of a structurally valid batch: none negative, none longer than the
    ids, and they sum to the ids (no length above the ids also means the int64 sum cannot wrap)."""
    lengths = batch.lengths.cpu()
    n = len(batch.values)
    b = batch.batch_size
    if len(lengths):
        low, high = (int(x) for x in torch.aminmax(lengths))
        if low < 0:
            i = int((lengths < 0).nonzero()[0])
            raise ProblemError(
                f"negative length {int(lengths[i])} for feature {batch.keys[i // b]!r}, "
                f"sample {i % b} (lengths[{i}])"
            )
        if high > n:
            i = int((lengths > n).nonzero()[0])
            raise ProblemError(
                f"length {int(lengths[i])} for feature {batch.keys[i // b]!r}, sample {i % b} "
                f"(lengths[{i}]) is larger than the {n} ids of the batch"
            )
    if len(lengths) * n < 2**63:
        total = int(lengths.to(torch.int64).sum())
    else:  # so many lengths that even lengths of at most n could wrap an int64 sum
        total = sum(lengths.tolist())
    if total != n:
        raise ProblemError(f"sum(lengths) = {total} but values has {n} ids")


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
    if len(set(batch.keys)) != len(batch.keys):
        dup = sorted({k for k in batch.keys if batch.keys.count(k) > 1})
        raise ProblemError(f"batch key {dup[0]!r} appears more than once")
    check_batch_lengths(batch)


def _on(t: torch.Tensor, device: str | None) -> bool:
    return device is None or t.device.type == device


def _features(tables: Sequence[TableConfig]) -> list[str]:
    return sorted(f for t in tables for f in t.feature_names)


def _per_id(per_feature: list[int], counts: torch.Tensor) -> torch.Tensor:
    """``per_feature[f]`` repeated for each of feature ``f``'s ``counts[f]`` ids (numpy's repeat:
    torch's starts its OpenMP team, on which a forked child of this process would deadlock)."""
    return torch.from_numpy(np.repeat(np.array(per_feature, dtype=np.int64), counts.numpy()))


def _check_ids(batch: JaggedBatch, table_of: Mapping[str, TableConfig]) -> None:
    """Every id within its feature's table, in one vectorised pass; the first bad one is named."""
    n = len(batch.values)
    if n == 0:
        return
    sizes = [table_of[k].num_embeddings for k in batch.keys]
    values = batch.values
    low, high = (int(x) for x in torch.aminmax(values))
    if low >= 0 and high < min(sizes):  # the usual case: one pass over the ids
        return
    b = batch.batch_size
    counts = batch.lengths.reshape(len(batch.keys), b).to(torch.int64).sum(1)
    limit = _per_id(sizes, counts)
    bad = (values < 0) | (values >= limit)
    if not bool(bad.any()):
        return
    pos = int(torch.argmax(bad.to(torch.uint8)))
    ends = torch.cumsum(counts, 0)
    f = int(torch.searchsorted(ends, pos, right=True))
    first = int(ends[f - 1]) if f > 0 else 0
    key = batch.keys[f]
    table = table_of[key]
    pos -= first  # within the feature's ids
    value = int(values[first + pos])
    bag_ends = torch.cumsum(batch.lengths[f * b : (f + 1) * b].to(torch.int64), 0)
    sample = int(torch.searchsorted(bag_ends, pos, right=True))
    start = int(bag_ends[sample - 1]) if sample > 0 else 0
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
    if len(batch.keys) != len(table_of):  # keys are distinct and all features: the counts differ
        keys = set(batch.keys)
        f, t = next((f, t) for f, t in table_of.items() if f not in keys)
        raise ProblemError(f"feature {f!r} of table {t.name!r} is missing from the batch")
    check_weights_pooling(tables, batch)
    if id_policy == "modulo":
        b = batch.batch_size
        counts = batch.lengths.reshape(len(batch.keys), b).to(torch.int64).sum(1)
        limit = _per_id([table_of[k].num_embeddings for k in batch.keys], counts)
        values = torch.remainder(batch.values, limit).to(batch.values.dtype)
        return JaggedBatch(batch.keys, values, batch.lengths, batch.weights)
    _check_ids(batch, table_of)
    return batch
