"""The catalogue of malformed inputs (``cases/robustness/inputs.json``) and the readings of each.

The catalogue is data: a few small valid *base* problems and, per input, the *edits* that break
one of them. This module interprets it: `build_input` applies the edits and returns the malformed
problem exactly as a backend will be handed it (nothing here validates it).

A backend that returns a result instead of raising has read the input *some* way. `READINGS`
names the sensible ways (ids taken modulo the table size, clamped, skipped, ...): each turns the
malformed problem into a well-formed one whose reference result is what a backend reading the
input that way returns. `matching_readings` says which of an input's candidate readings a result
equals, under the tolerance of `harness.tolerance`; none means the result is garbage.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path
from typing import Any

import torch

from harness.cases import CASES_DIR, table_from_json
from harness.model import JaggedBatch, TableConfig, TableWeights, dtype_name, is_quantized
from harness.quantized import QuantizedTable, concat_rows, levels_of
from harness.reference.forward import pool_loop
from harness.tolerance import Tolerance, compare
from harness.validate import ProblemError, validate_batch_layout
from harness.weights import make_weights

FORMAT = "jagbench-robustness-inputs/1"
CATALOGUE = CASES_DIR / "robustness" / "inputs.json"
CLEAN_EXPECTATIONS = ("raise", "as-given")
_DTYPES = {
    name: getattr(torch, name)
    for name in ("float64", "float32", "float16", "bfloat16", "int64", "int32", "int16")
}


class CatalogueError(ValueError):
    """A catalogue file that cannot be interpreted; names the input and the edit."""


@dataclass(frozen=True)
class MalformedInput:
    """One catalogue entry: how to break a base problem, and how a result may be read."""

    name: str
    description: str
    base: str
    edits: tuple[Mapping[str, Any], ...]
    readings: tuple[str, ...]
    clean: str


@dataclass(frozen=True, eq=False)
class RawProblem:
    """A problem as handed to a backend, possibly malformed: nothing about it is guaranteed."""

    tables: tuple[TableConfig, ...]
    weights: dict[str, TableWeights]
    batch: JaggedBatch


@dataclass(frozen=True)
class Catalogue:
    path: Path
    bases: Mapping[str, Mapping[str, Any]]
    inputs: tuple[MalformedInput, ...]

    def input(self, name: str) -> MalformedInput:
        for i in self.inputs:
            if i.name == name:
                return i
        raise CatalogueError(f"no input {name!r} in {self.path}; inputs: {[i.name for i in self.inputs]}")

    def select(self, names: Sequence[str] | None) -> list[MalformedInput]:
        """The named inputs in the order given, or every input when ``names`` is empty."""
        return [self.input(n) for n in names] if names else list(self.inputs)


@cache
def load_catalogue(path: Path = CATALOGUE) -> Catalogue:
    """Read and check a catalogue: known format, bases, edits' ops, readings and expectations."""
    doc = json.loads(Path(path).read_text())
    if doc.get("format") != FORMAT:
        raise CatalogueError(f"{path}: format {doc.get('format')!r}, expected {FORMAT!r}")
    inputs = []
    for d in doc["inputs"]:
        where = f"{path}: input {d.get('name')!r}"
        if d["base"] not in doc["bases"]:
            raise CatalogueError(f"{where}: unknown base {d['base']!r}")
        for e in d["edits"]:
            if e.get("op") not in _EDITS:
                raise CatalogueError(f"{where}: unknown edit op {e.get('op')!r}; known: {sorted(_EDITS)}")
        for r in d["readings"]:
            if r not in READINGS:
                raise CatalogueError(f"{where}: unknown reading {r!r}; known: {sorted(READINGS)}")
        if d["clean"] not in CLEAN_EXPECTATIONS:
            raise CatalogueError(f"{where}: clean must be one of {CLEAN_EXPECTATIONS}, got {d['clean']!r}")
        inputs.append(
            MalformedInput(
                d["name"], d["description"], d["base"], tuple(d["edits"]), tuple(d["readings"]), d["clean"]
            )
        )
    names = [i.name for i in inputs]
    if len(set(names)) != len(names):
        raise CatalogueError(f"{path}: duplicate input names")
    return Catalogue(Path(path), doc["bases"], tuple(inputs))


# --- building an input ---------------------------------------------------------------------------


class _Draft:
    """A problem being edited: bags until the first batch edit, then tensors."""

    def __init__(self, base: Mapping[str, Any]) -> None:
        self.tables = [table_from_json(t) for t in base["tables"]]
        self.weights = make_weights(self.tables, int(base.get("weights_seed", 0)))
        self.bags: dict[str, list[list[int]]] | None = copy.deepcopy(dict(base["bags"]))
        psw = base.get("per_sample_weights")
        self.per_sample: dict[str, list[list[float]]] | None = copy.deepcopy(dict(psw)) if psw else None
        self._batch: JaggedBatch | None = None

    def editable_bags(self, op: str) -> dict[str, list[list[int]]]:
        if self.bags is None:
            raise CatalogueError(f"edit {op!r} changes bags, but a batch edit came before it")
        return self.bags

    @property
    def batch(self) -> JaggedBatch:
        if self._batch is None:
            assert self.bags is not None
            self._batch = JaggedBatch.from_bags(self.bags, self.per_sample)
            self.bags = self.per_sample = None
        return self._batch

    @batch.setter
    def batch(self, batch: JaggedBatch) -> None:
        self._batch = batch

    def table(self, name: str) -> tuple[int, TableConfig]:
        for i, t in enumerate(self.tables):
            if t.name == name:
                return i, t
        raise CatalogueError(f"no table {name!r}")


def _number(x: float | str) -> float:
    return float(x)


def _set_id(d: _Draft, e: Mapping[str, Any]) -> None:
    d.editable_bags("set_id")[e["feature"]][e["sample"]][e["position"]] = int(e["value"])


def _set_bags(d: _Draft, e: Mapping[str, Any]) -> None:
    bags = d.editable_bags("set_bags")
    bags[e["feature"]] = [list(b) for b in e["bags"]]
    if d.per_sample is not None:
        d.per_sample[e["feature"]] = [[1.0] * len(b) for b in e["bags"]]


def _add_key(d: _Draft, e: Mapping[str, Any]) -> None:
    _set_bags(d, {"feature": e["key"], "bags": e["bags"]})


def _remove_key(d: _Draft, e: Mapping[str, Any]) -> None:
    del d.editable_bags("remove_key")[e["key"]]
    if d.per_sample is not None:
        del d.per_sample[e["key"]]


def _set_weight(d: _Draft, e: Mapping[str, Any]) -> None:
    d.editable_bags("set_weight")
    if d.per_sample is None:
        raise CatalogueError("set_weight on a base without per-sample weights")
    d.per_sample[e["feature"]][e["sample"]][e["position"]] = _number(e["value"])


def _length_index(batch: JaggedBatch, feature: str, sample: int) -> int:
    return batch.keys.index(feature) * batch.batch_size + sample


def _add_to_length(d: _Draft, e: Mapping[str, Any]) -> None:
    b = d.batch
    lengths = b.lengths.clone()
    lengths[_length_index(b, e["feature"], e["sample"])] += int(e["delta"])
    d.batch = replace(b, lengths=lengths)


def _set_lengths(d: _Draft, e: Mapping[str, Any]) -> None:
    b = d.batch
    lengths = b.lengths.clone()
    start = _length_index(b, e["feature"], 0)
    lengths[start : start + len(e["lengths"])] = torch.tensor(e["lengths"], dtype=lengths.dtype)
    d.batch = replace(b, lengths=lengths)


def _truncate_weights(d: _Draft, e: Mapping[str, Any]) -> None:
    b = d.batch
    assert b.weights is not None
    d.batch = replace(b, weights=b.weights[: len(b.weights) - int(e["count"])].clone())


def _append_weights(d: _Draft, e: Mapping[str, Any]) -> None:
    b = d.batch
    assert b.weights is not None
    extra = torch.tensor([_number(x) for x in e["values"]], dtype=b.weights.dtype)
    d.batch = replace(b, weights=torch.cat([b.weights, extra]))


def _cast_ids(d: _Draft, e: Mapping[str, Any]) -> None:
    b = d.batch
    d.batch = replace(b, values=b.values.to(_DTYPES[e["dtype"]]))


def _set_table_value(d: _Draft, e: Mapping[str, Any]) -> None:
    _, t = d.table(e["table"])
    w = d.weights[t.name].clone()
    w[e["row"], e["column"]] = _number(e["value"])
    d.weights[t.name] = w


def _empty_table(d: _Draft, e: Mapping[str, Any]) -> None:
    i, t = d.table(e["table"])
    d.tables[i] = replace(t, num_embeddings=0)
    d.weights[t.name] = torch.empty(0, t.embedding_dim, dtype=t.dtype)


def _cast_table(d: _Draft, e: Mapping[str, Any]) -> None:
    _, t = d.table(e["table"])
    d.weights[t.name] = d.weights[t.name].to(_DTYPES[e["dtype"]])


def _quantized(d: _Draft, name: str) -> tuple[int, TableConfig, QuantizedTable]:
    i, t = d.table(name)
    w = d.weights[t.name]
    if not isinstance(w, QuantizedTable):
        raise CatalogueError(f"table {name!r} is not quantized")
    return i, t, w.clone()


def _set_code(d: _Draft, e: Mapping[str, Any]) -> None:
    _, t, w = _quantized(d, e["table"])
    w.codes[e["row"], e["column"]] = int(e["value"])
    d.weights[t.name] = w


def _set_qparam(d: _Draft, e: Mapping[str, Any]) -> None:
    """A row's ``"scale"`` or ``"bias"`` set (to a float16 value)."""
    _, t, w = _quantized(d, e["table"])
    getattr(w, e["part"])[e["row"]] = _number(e["value"])
    d.weights[t.name] = w


def _cast_quantized(d: _Draft, e: Mapping[str, Any]) -> None:
    """A quantized table's ``"codes"``, ``"scale"`` or ``"bias"`` stored as another dtype."""
    _, t, w = _quantized(d, e["table"])
    parts = {"codes": w.codes, "scale": w.scale, "bias": w.bias}
    parts[e["part"]] = parts[e["part"]].to(_DTYPES[e["dtype"]])
    d.weights[t.name] = QuantizedTable(parts["codes"], parts["scale"], parts["bias"], w.storage)


def _set_dim(d: _Draft, e: Mapping[str, Any]) -> None:
    """A table cut to its first ``dim`` columns (a quantized one: a dim its packing may not hold)."""
    i, t = d.table(e["table"])
    d.tables[i] = replace(t, embedding_dim=int(e["dim"]))
    d.weights[t.name] = d.weights[t.name][:, : int(e["dim"])].clone()


_EDITS: dict[str, Callable[[_Draft, Mapping[str, Any]], None]] = {
    "set_id": _set_id,
    "set_bags": _set_bags,
    "add_key": _add_key,
    "remove_key": _remove_key,
    "set_weight": _set_weight,
    "add_to_length": _add_to_length,
    "set_lengths": _set_lengths,
    "truncate_weights": _truncate_weights,
    "append_weights": _append_weights,
    "cast_ids": _cast_ids,
    "set_table_value": _set_table_value,
    "empty_table": _empty_table,
    "cast_table": _cast_table,
    "set_code": _set_code,
    "set_qparam": _set_qparam,
    "cast_quantized": _cast_quantized,
    "set_dim": _set_dim,
}


def build_base(catalogue: Catalogue, base: str) -> RawProblem:
    """A base problem, unedited (well-formed)."""
    d = _Draft(catalogue.bases[base])
    return RawProblem(tuple(d.tables), dict(d.weights), d.batch)


def build_input(catalogue: Catalogue, item: MalformedInput) -> RawProblem:
    """The base problem with the input's edits applied in order."""
    d = _Draft(catalogue.bases[item.base])
    for e in item.edits:
        try:
            _EDITS[e["op"]](d, e)
        except (KeyError, IndexError, ValueError) as exc:
            raise CatalogueError(f"input {item.name!r}: edit {dict(e)} failed: {exc!r}") from exc
    return RawProblem(tuple(d.tables), dict(d.weights), d.batch)


# --- readings ------------------------------------------------------------------------------------


def _bags(batch: JaggedBatch) -> list[list[int]]:
    """Positions of each bag's ids, offsets clipped to ``[0, len(values)]``, reversed bags empty."""
    n = len(batch.values)
    ends = [0] + torch.cumsum(batch.lengths.to(torch.int64), 0).tolist()
    clipped = [min(max(o, 0), n) for o in ends]
    return [list(range(lo, max(lo, hi))) for lo, hi in zip(clipped[:-1], clipped[1:], strict=True)]


def _rebuild(batch: JaggedBatch, bags: Sequence[Sequence[int]]) -> JaggedBatch:
    """A batch with the same keys whose bag ``i`` holds the ids at positions ``bags[i]``."""
    index = torch.tensor([p for bag in bags for p in bag], dtype=torch.int64)
    weights = batch.weights[index] if batch.weights is not None else None
    lengths = torch.tensor([len(bag) for bag in bags], dtype=torch.int64)
    return JaggedBatch(batch.keys, batch.values[index], lengths, weights)


def _table_rows(p: RawProblem) -> list[int]:
    """For each id position, the number of rows of its feature's table (structure must be valid)."""
    rows = {f: t.num_embeddings for t in p.tables for f in t.feature_names}
    b = p.batch.batch_size
    out: list[int] = []
    for i, bag in enumerate(_bags(p.batch)):
        out += [rows[p.batch.keys[i // b]]] * len(bag)
    return out


def _map_ids(p: RawProblem, fn: Callable[[int, int], int | None]) -> RawProblem:
    """Each id replaced by ``fn(id, rows)``; ``None`` drops the id (and its weight)."""
    ids = p.batch.values.tolist()
    rows = _table_rows(p)
    new_ids = list(ids)
    bags = []
    for bag in _bags(p.batch):
        kept = []
        for pos in bag:
            v = fn(int(ids[pos]), rows[pos])
            if v is not None:
                new_ids[pos] = v
                kept.append(pos)
        bags.append(kept)
    batch = replace(p.batch, values=torch.tensor(new_ids, dtype=torch.int64))
    return replace(p, batch=_rebuild(batch, bags))


def _bad(v: int, rows: int) -> bool:
    return v < 0 or v >= rows


def _as_given(p: RawProblem) -> RawProblem:
    return p


def _ids_modulo(p: RawProblem) -> RawProblem:
    return _map_ids(p, lambda v, n: v % n if n > 0 else v)


def _ids_clamped(p: RawProblem) -> RawProblem:
    return _map_ids(p, lambda v, n: min(max(v, 0), n - 1) if n > 0 else v)


def _bad_ids_skipped(p: RawProblem) -> RawProblem:
    return _map_ids(p, lambda v, n: None if _bad(v, n) else v)


def _bad_ids_as_row_0(p: RawProblem) -> RawProblem:
    return _map_ids(p, lambda v, n: 0 if _bad(v, n) else v)


def _ids_int32_wrapped(p: RawProblem) -> RawProblem:
    values = p.batch.values.to(torch.int32).to(torch.int64)
    return replace(p, batch=replace(p.batch, values=values))


def _offsets_clipped(p: RawProblem) -> RawProblem:
    return replace(p, batch=_rebuild(p.batch, _bags(p.batch)))


def _negative_lengths_as_0(p: RawProblem) -> RawProblem:
    batch = replace(p.batch, lengths=p.batch.lengths.clamp(min=0))
    return replace(p, batch=_rebuild(batch, _bags(batch)))


def _pad_weights(p: RawProblem, fill: float) -> RawProblem:
    w = p.batch.weights
    assert w is not None
    missing = len(p.batch.values) - len(w)
    if missing <= 0:
        return p
    padded = torch.cat([w, torch.full((missing,), fill, dtype=w.dtype)])
    return replace(p, batch=replace(p.batch, weights=padded))


def _weights_ignored(p: RawProblem) -> RawProblem:
    return replace(p, batch=replace(p.batch, weights=None))


def _extra_weights_ignored(p: RawProblem) -> RawProblem:
    w = p.batch.weights
    assert w is not None
    return replace(p, batch=replace(p.batch, weights=w[: len(p.batch.values)]))


def _bad_ids_as_zero_rows(p: RawProblem) -> RawProblem:
    """Each bad id reads a row of zeros, and still counts in a MEAN bag's length (FBGEMM's
    inference TBE reads an id of -1 as a pruned row so): a zero row appended to its table."""
    table_of = {f: t.name for t in p.tables for f in t.feature_names}
    b = p.batch.batch_size
    ids = p.batch.values.tolist()
    rows = _table_rows(p)
    bad_tables = {
        table_of[p.batch.keys[i // b]]
        for i, bag in enumerate(_bags(p.batch))
        for pos in bag
        if _bad(int(ids[pos]), rows[pos])
    }
    tables, weights = [], dict(p.weights)
    for t in p.tables:
        if t.name in bad_tables:
            w = p.weights[t.name]
            if isinstance(w, QuantizedTable):
                zero = QuantizedTable(
                    torch.zeros(1, t.embedding_dim, dtype=w.codes.dtype),
                    torch.zeros(1, dtype=w.scale.dtype),
                    torch.zeros(1, dtype=w.bias.dtype),
                    w.storage,
                )
                weights[t.name] = concat_rows([w, zero])
            else:
                weights[t.name] = torch.cat([w, torch.zeros(1, t.embedding_dim, dtype=w.dtype)])
            t = replace(t, num_embeddings=t.num_embeddings + 1)
        tables.append(t)
    mapped = _map_ids(p, lambda v, n: n if _bad(v, n) else v)
    return replace(mapped, tables=tuple(tables), weights=weights)


def _codes(p: RawProblem, fix: Callable[[torch.Tensor, int], torch.Tensor]) -> RawProblem:
    weights = dict(p.weights)
    for t in p.tables:
        w = p.weights[t.name]
        if isinstance(w, QuantizedTable) and is_quantized(t):
            weights[t.name] = QuantizedTable(fix(w.codes, levels_of(t.dtype)), w.scale, w.bias, w.storage)
    return replace(p, weights=weights)


def _table_cast_to_config_dtype(p: RawProblem) -> RawProblem:
    return replace(
        p,
        weights={
            t.name: p.weights[t.name] if is_quantized(t) else p.weights[t.name].to(t.dtype) for t in p.tables
        },
    )


def _ids_cast_to_int64(p: RawProblem) -> RawProblem:
    return replace(p, batch=replace(p.batch, values=p.batch.values.to(torch.int64)))


def _stray_keys_ignored(p: RawProblem) -> RawProblem:
    declared = {f for t in p.tables for f in t.feature_names}
    b = p.batch.batch_size
    bags = _bags(p.batch)
    keep = [i for i, k in enumerate(p.batch.keys) if k in declared]
    keys = tuple(p.batch.keys[i] for i in keep)
    kept_bags = [bags[i * b + s] for i in keep for s in range(b)]
    return replace(p, batch=_rebuild(replace(p.batch, keys=keys), kept_bags))


def _missing_features_as_zeros(p: RawProblem) -> RawProblem:
    b = p.batch.batch_size
    missing = [f for t in p.tables for f in t.feature_names if f not in p.batch.keys]
    keys = p.batch.keys + tuple(missing)
    lengths = torch.cat([p.batch.lengths, torch.zeros(len(missing) * b, dtype=p.batch.lengths.dtype)])
    return replace(p, batch=replace(p.batch, keys=keys, lengths=lengths))


READINGS: dict[str, Callable[[RawProblem], RawProblem]] = {
    "as-given": _as_given,
    "ids-modulo": _ids_modulo,
    "ids-clamped": _ids_clamped,
    "bad-ids-skipped": _bad_ids_skipped,
    "bad-ids-as-row-0": _bad_ids_as_row_0,
    "ids-int32-wrapped": _ids_int32_wrapped,
    "offsets-clipped": _offsets_clipped,
    "negative-lengths-as-0": _negative_lengths_as_0,
    "missing-weights-as-0": lambda p: _pad_weights(p, 0.0),
    "missing-weights-as-1": lambda p: _pad_weights(p, 1.0),
    "weights-ignored": _weights_ignored,
    "extra-weights-ignored": _extra_weights_ignored,
    "table-cast-to-config-dtype": _table_cast_to_config_dtype,
    "ids-cast-to-int64": _ids_cast_to_int64,
    "stray-keys-ignored": _stray_keys_ignored,
    "missing-features-as-zeros": _missing_features_as_zeros,
    "bad-ids-as-zero-rows": _bad_ids_as_zero_rows,
    "codes-masked": lambda p: _codes(p, lambda c, top: c & top),
    "codes-clamped": lambda p: _codes(p, lambda c, top: c.clamp(max=top)),
}


def _computable(p: RawProblem) -> str | None:
    """Why the reference cannot pool ``p`` (``None`` when it can): a weaker `validate_problem`.

    Tables of 0 rows and weights of another float dtype than the config are allowed: a reading
    may give them a meaning.
    """
    try:
        validate_batch_layout(p.batch)
    except ProblemError as e:
        return str(e)
    features = [f for t in p.tables for f in t.feature_names]
    if sorted(features) != sorted(p.batch.keys):
        return f"batch keys {list(p.batch.keys)} are not the tables' features {features}"
    for t in p.tables:
        w = p.weights[t.name]
        if isinstance(w, QuantizedTable):
            shapes = (tuple(w.codes.shape), tuple(w.scale.shape), tuple(w.bias.shape))
            rows = (t.num_embeddings,)
            if shapes != ((t.num_embeddings, t.embedding_dim), rows, rows) or w.codes.is_floating_point():
                return f"quantized table {t.name!r}: codes, scale, bias of shapes {shapes}"
            continue
        if tuple(w.shape) != (t.num_embeddings, t.embedding_dim) or not w.is_floating_point():
            return f"weights of table {t.name!r}: {dtype_name(w.dtype)} {tuple(w.shape)}"
    ids = p.batch.values.tolist()
    for pos, rows in enumerate(_table_rows(p)):
        if _bad(int(ids[pos]), rows):
            return f"id {ids[pos]} at position {pos} is outside a {rows}-row table"
    return None


@dataclass(frozen=True)
class ReadingResult:
    """The reference result of a reading, or why the reading does not apply to this input."""

    name: str
    value: torch.Tensor | None
    bound: Tolerance | None
    not_applicable: str | None


def reading_results(problem: RawProblem, names: Sequence[str]) -> list[ReadingResult]:
    """The float64 reference result and bound of each named reading of ``problem``."""
    out = []
    for name in names:
        p = READINGS[name](problem)
        why = _computable(p)
        if why is not None:
            out.append(ReadingResult(name, None, None, why))
            continue
        # The readable loop: it widens any stored dtype (a malformed input may have float64 tables).
        ref = pool_loop(p.tables, p.weights, p.batch)
        out.append(ReadingResult(name, ref.value, ref.tolerance(), None))
    return out


def matching_readings(
    result: torch.Tensor, readings: Sequence[ReadingResult]
) -> tuple[list[str], str | None]:
    """The readings whose reference ``result`` equals within the tolerance, and when none does,
    the nearest one described (``"as-given, error 420x the bound"``) to tell garbage from a
    reading computed less accurately than the contract asks."""
    got = result.to(torch.float32)
    matched = []
    nearest: tuple[float, str] | None = None
    for r in readings:
        if r.value is None or r.bound is None:
            continue
        c = compare(got, r.value, r.bound)
        if c.agree:
            matched.append(r.name)
        elif c.problem is None and (nearest is None or c.worst_ratio < nearest[0]):
            nearest = (c.worst_ratio, r.name)
    if matched or nearest is None or nearest[0] == float("inf"):
        return matched, None
    return matched, f"nearest reading {nearest[1]}, error {nearest[0]:.3g}x the bound"
