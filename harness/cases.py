"""Saved cases: self-contained JSON files under ``cases/`` that the tests and ``jagbench replay`` rerun.

Two kinds:
- ``regression``: a minimised counterexample once found; the named backend is expected to agree now.
- ``known-discrepancy``: a third-party library computing something other than the contract says.
  It carries a ``scope`` (which problems it may concern) and a ``model`` (what the library
  computes instead, `harness.known`): a disagreement of that backend in scope counts as *known*
  only when the backend's result, or exception, is what the model predicts. The tests check
  that the case still reproduces and that its model explains it.

Format ``jagbench-case/2``::

    {"format": "jagbench-case/2", "name": "...", "kind": "regression" | "known-discrepancy",
     "backend": "torch", "summary": "...", "expect": "agree" | "disagree" | "raised",
     "scope": {"table_dtypes": ["float16"], "weighted": true, "pooling": ["mean"]},
     "model": {"kind": "pooled-in-dtype", "tables": ["float16"], ...},
     "reproduced": true,
     "problem": {"tables": [...], "weights": {...}, "batch": {...}, "id_policy": "reject"},
     "found": {...free-form: by, date, detail...}}

``model`` and ``reproduced`` are required of a known discrepancy and absent from a regression.
``reproduced: false`` marks a case written by analogy that nobody has seen happen (no machine to
run it on): it silences nothing until a replay on its backend confirms it and someone sets it to
``true``. Files of format ``jagbench-case/1`` (no model) still load; a known discrepancy among them
explains nothing, since nothing says what the library computes.

Scope keys (all must hold): ``table_dtypes`` / ``pooling`` (some table has one of these),
``weighted`` (the batch has per-sample weights or not), ``id_dtypes`` and ``batch_size`` (the
batch's are among these), ``noncontiguous_groups`` (grouping the tables by these attributes, e.g.
``["pooling", "dtype"]``, would reorder them), ``reads_subnormal`` (some row that the batch reads,
of a table of one of these dtypes, holds a subnormal value), ``subnormal_weights`` (format 1: some
table of one of these dtypes holds a subnormal anywhere), ``backend_attributes`` (the backend
object has these attribute values, e.g. ``{"interpret": true}``; a wrapper that exposes the
wrapped backend as ``.backend`` is looked through).

Weights are stored either as exact values (``{"values": [[...]]}``; JSON floats round-trip every
float32/float16/bfloat16 value exactly) or as a seed (``{"seed": 0, "scale": 1.0}``) for large tables.
A quantized table (dtype ``"int8"``, ``"int4"``, ``"int2"``) stores its exact data,
``{"codes": [[...]], "scale": [...], "bias": [...]}`` (unpacked integer codes, fp16 scale and bias
per row as JSON floats), or a seed: the seeded float32 values quantized (`harness.quantized`).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from harness.known import Model, ModelError, model_from_json
from harness.model import (
    JaggedBatch,
    Pooling,
    Problem,
    TableConfig,
    dtype_from_name,
    dtype_name,
    is_quantized,
)
from harness.quantized import QuantizedTable
from harness.weights import make_table_weights

FORMAT = "jagbench-case/2"
READABLE_FORMATS = ("jagbench-case/1", FORMAT)
CASES_DIR = Path(__file__).resolve().parent.parent / "cases"
KINDS = ("regression", "known-discrepancy")
EXPECTATIONS = ("agree", "disagree", "raised")
SCOPE_KEYS = (
    "table_dtypes",
    "weighted",
    "pooling",
    "id_dtypes",
    "batch_size",
    "noncontiguous_groups",
    "reads_subnormal",
    "subnormal_weights",
    "backend_attributes",
)


class CaseError(ValueError):
    """A case file that cannot be read as a jagbench case; names the file and the field."""


def _float(x: float) -> float | str:
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return x


def _unfloat(x: float | str) -> float:
    return float(x)


def table_to_json(t: TableConfig) -> dict[str, Any]:
    return {
        "name": t.name,
        "num_embeddings": t.num_embeddings,
        "embedding_dim": t.embedding_dim,
        "feature_names": list(t.feature_names),
        "pooling": t.pooling.value,
        "dtype": dtype_name(t.dtype),
    }


def table_from_json(d: Mapping[str, Any]) -> TableConfig:
    return TableConfig(
        name=d["name"],
        num_embeddings=int(d["num_embeddings"]),
        embedding_dim=int(d["embedding_dim"]),
        feature_names=tuple(d["feature_names"]),
        pooling=Pooling(d["pooling"]),
        dtype=dtype_from_name(d["dtype"]),
    )


def problem_to_json(
    problem: Problem,
    *,
    weight_seeds: Mapping[str, tuple[int, float]] | None = None,
    id_policy: str = "reject",
) -> dict[str, Any]:
    """A problem as JSON; tables named in ``weight_seeds`` store ``(seed, scale)`` instead of values."""
    weights: dict[str, Any] = {}
    for t in problem.tables:
        if weight_seeds and t.name in weight_seeds:
            seed, scale = weight_seeds[t.name]
            weights[t.name] = {"seed": seed, "scale": scale}
        elif isinstance(problem.weights[t.name], QuantizedTable):
            weights[t.name] = quantized_to_json(problem.weights[t.name])
        else:
            rows = problem.weights[t.name].to(torch.float64).tolist()
            weights[t.name] = {"values": [[_float(x) for x in r] for r in rows]}
    b = problem.batch
    return {
        "tables": [table_to_json(t) for t in problem.tables],
        "weights": weights,
        "batch": {
            "keys": list(b.keys),
            "lengths": b.lengths.tolist(),
            "values": b.values.tolist(),
            "id_dtype": dtype_name(b.values.dtype),
            "weights": None if b.weights is None else [_float(x) for x in b.weights.tolist()],
        },
        "id_policy": id_policy,
    }


def quantized_to_json(w: QuantizedTable) -> dict[str, Any]:
    """A quantized table's exact data: integer codes, and fp16 scale and bias as JSON floats."""
    return {
        "codes": w.codes.tolist(),
        "scale": [_float(x) for x in w.scale.double().tolist()],
        "bias": [_float(x) for x in w.bias.double().tolist()],
    }


def quantized_from_json(w: Mapping[str, Any], t: TableConfig) -> QuantizedTable:
    """`quantized_to_json`'s inverse. Codes that do not fit a byte are kept as int64 (validation
    names them); fp16 values round-trip exactly through JSON floats."""
    codes = torch.tensor(w["codes"], dtype=torch.int64).reshape(t.num_embeddings, t.embedding_dim)
    if len(codes) == 0 or (int(codes.min()) >= 0 and int(codes.max()) <= 255):
        codes = codes.to(torch.uint8)

    def fp16(xs: Sequence[float | str]) -> torch.Tensor:
        return torch.tensor([_unfloat(x) for x in xs], dtype=torch.float64).to(torch.float16)

    return QuantizedTable(
        codes, fp16(w["scale"]), fp16(w["bias"]), t.dtype if is_quantized(t) else str(t.dtype)
    )


def problem_from_json(d: Mapping[str, Any]) -> Problem:
    tables = tuple(table_from_json(t) for t in d["tables"])
    weights = {}
    for t in tables:
        w = d["weights"][t.name]
        if "codes" in w:
            weights[t.name] = quantized_from_json(w, t)
        elif "values" in w:
            rows = [[_unfloat(x) for x in r] for r in w["values"]]
            tensor = torch.tensor(rows, dtype=torch.float64).reshape(t.num_embeddings, t.embedding_dim)
            weights[t.name] = tensor.to(t.dtype)
        else:
            weights[t.name] = make_table_weights(t, int(w["seed"]), float(w.get("scale", 1.0)))
    b = d["batch"]
    batch = JaggedBatch(
        keys=tuple(b["keys"]),
        values=torch.tensor(b["values"], dtype=dtype_from_name(b.get("id_dtype", "int64"))),
        lengths=torch.tensor(b["lengths"], dtype=torch.int64),
        weights=None
        if b.get("weights") is None
        else torch.tensor([_unfloat(x) for x in b["weights"]], dtype=torch.float32),
    )
    return Problem(tables, weights, batch, {"id_policy": d.get("id_policy", "reject")})


@dataclass
class Case:
    """A named, replayable problem with the backend it concerns and what is expected of it."""

    name: str
    kind: str
    backend: str
    summary: str
    expect: str
    problem: Problem
    scope: dict[str, Any] = field(default_factory=dict)
    found: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    problem_json: dict[str, Any] | None = None
    model: Model | None = None
    reproduced: bool = False

    def to_json(self) -> dict[str, Any]:
        # A format-1 known case (no model) stays format 1: format 2 requires a model.
        old = self.kind == "known-discrepancy" and self.model is None
        out = {
            "format": READABLE_FORMATS[0] if old else FORMAT,
            "name": self.name,
            "kind": self.kind,
            "backend": self.backend,
            "summary": self.summary,
            "expect": self.expect,
            "scope": self.scope,
        }
        if self.kind == "known-discrepancy" and not old:
            out["model"] = self.model.to_json()
            out["reproduced"] = self.reproduced
        out["problem"] = self.problem_json or problem_to_json(self.problem)
        out["found"] = self.found
        return out

    @property
    def can_silence(self) -> bool:
        """A known discrepancy that may explain disagreements: it has a model and was reproduced."""
        return self.kind == "known-discrepancy" and self.model is not None and self.reproduced

    def in_scope(self, backend: str, problem: Problem, backend_object: object | None = None) -> bool:
        """Whether ``backend`` on ``problem`` is within this known discrepancy's scope.

        Being in scope is necessary, not sufficient: the case explains a disagreement only when its
        `model` does (`harness.agreement.mark_known`). ``backend_object`` is needed by the
        ``backend_attributes`` scope key (without it that key does not hold).
        """
        if self.kind != "known-discrepancy" or backend != self.backend:
            return False
        return scope_matches(self.scope, problem, backend_object)


def _groups_interleaved(tables: Sequence[TableConfig], attributes: Sequence[str]) -> bool:
    """Grouping the tables by these attributes (e.g. ``["pooling", "dtype"]``) breaks their order:
    some group's tables are not adjacent, so concatenating the groups would reorder the tables."""
    seen: set[tuple[str, ...]] = set()
    previous = None
    for t in tables:
        group = tuple(str(getattr(t, a)) for a in attributes)
        if group != previous and group in seen:
            return True
        seen.add(group)
        previous = group
    return False


def _subnormal(w: torch.Tensor) -> torch.Tensor:
    """Which values of ``w`` are subnormal in its own dtype (nonzero, smaller than the smallest normal)."""
    mag = w.detach().abs().to(torch.float32)
    return (mag > 0) & (mag < torch.finfo(w.dtype).tiny)


def _has_subnormal(w: torch.Tensor) -> bool:
    return bool(_subnormal(w).any())


def _reads_subnormal(problem: Problem, dtypes: Sequence[str]) -> bool:
    """Some row that the batch reads, of a table of one of ``dtypes``, holds a subnormal value."""
    batch = problem.batch
    for t in problem.tables:
        if dtype_name(t.dtype) not in dtypes:
            continue
        rows = _subnormal(problem.weights[t.name]).any(dim=1)
        if not bool(rows.any()):
            continue
        for key in t.feature_names:
            if key in batch.keys:
                ids = batch.values[batch.feature_slice(key)].to(torch.int64)
                ids = ids[(ids >= 0) & (ids < len(rows))]  # a problem not yet validated may hold others
                if bool(rows[ids].any()):
                    return True
    return False


def _attribute(backend: object, name: str) -> Any:
    """``backend.name``, looking through wrappers that expose the wrapped backend as ``.backend``."""
    seen = 0
    while backend is not None and seen < 8:
        if hasattr(backend, name):
            return getattr(backend, name)
        backend = getattr(backend, "backend", None)
        seen += 1
    return _MISSING


_MISSING = object()


def scope_matches(scope: Mapping[str, Any], problem: Problem, backend: object | None = None) -> bool:
    """All conditions of ``scope`` hold for ``problem`` (an empty scope matches nothing)."""
    if not scope:
        return False
    tables = problem.tables
    for key, want in scope.items():
        if key == "table_dtypes":
            ok = any(dtype_name(t.dtype) in want for t in tables)
        elif key == "weighted":
            ok = (problem.batch.weights is not None) == bool(want)
        elif key == "pooling":
            ok = any(t.pooling.value in want for t in tables)
        elif key == "id_dtypes":
            ok = dtype_name(problem.batch.values.dtype) in want
        elif key == "batch_size":
            ok = problem.batch.batch_size in want
        elif key == "noncontiguous_groups":
            ok = _groups_interleaved(tables, want)
        elif key == "subnormal_weights":
            ok = any(dtype_name(t.dtype) in want and _has_subnormal(problem.weights[t.name]) for t in tables)
        elif key == "reads_subnormal":
            ok = _reads_subnormal(problem, want)
        elif key == "backend_attributes":
            ok = backend is not None and all(_attribute(backend, a) == v for a, v in want.items())
        else:
            raise CaseError(f"unknown scope key {key!r}; known: {SCOPE_KEYS}")
        if not ok:
            return False
    return True


def case_from_json(d: Mapping[str, Any], path: Path | None = None) -> Case:
    where = str(path) if path else "case"
    if d.get("format") not in READABLE_FORMATS:
        raise CaseError(f"{where}: format is {d.get('format')!r}, expected one of {READABLE_FORMATS}")
    if d.get("mode", "forward") != "forward":
        raise CaseError(
            f"{where}: a training case (mode {d['mode']!r}): read it with "
            "harness.training.cases.load_training_case (`jagbench replay` reads both)"
        )
    for key in ("name", "kind", "backend", "expect", "problem"):
        if key not in d:
            raise CaseError(f"{where}: missing field {key!r}")
    if d["kind"] not in KINDS:
        raise CaseError(f"{where}: kind {d['kind']!r} is not one of {KINDS}")
    if d["expect"] not in EXPECTATIONS:
        raise CaseError(f"{where}: expect {d['expect']!r} is not one of {EXPECTATIONS}")
    for key in d.get("scope", {}):
        if key not in SCOPE_KEYS:
            raise CaseError(f"{where}: unknown scope key {key!r}; known: {SCOPE_KEYS}")
    if not isinstance(d.get("scope", {}).get("backend_attributes", {}), Mapping):
        raise CaseError(f"{where}: scope 'backend_attributes' must be an object of attribute values")
    model, reproduced = None, False
    if d["kind"] == "known-discrepancy" and d["format"] == FORMAT:
        for key in ("model", "reproduced"):
            if key not in d:
                raise CaseError(f"{where}: a known discrepancy needs {key!r} (format {FORMAT})")
        if not isinstance(d["reproduced"], bool):
            raise CaseError(f"{where}: 'reproduced' must be true or false, got {d['reproduced']!r}")
        try:
            model = model_from_json(d["model"])
        except ModelError as e:
            raise CaseError(f"{where}: bad model: {e}") from e
        reproduced = d["reproduced"]
    try:
        problem = problem_from_json(d["problem"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CaseError(f"{where}: bad problem: {type(e).__name__}: {e}") from e
    return Case(
        name=d["name"],
        kind=d["kind"],
        backend=d["backend"],
        summary=d.get("summary", ""),
        expect=d["expect"],
        problem=problem,
        scope=dict(d.get("scope", {})),
        found=dict(d.get("found", {})),
        path=path,
        problem_json=dict(d["problem"]),
        model=model,
        reproduced=reproduced,
    )


def load_case(path: str | os.PathLike[str]) -> Case:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise CaseError(f"cannot read case {str(path)!r}: {e.strerror}") from e
    except json.JSONDecodeError as e:
        raise CaseError(f"{path}: not JSON: {e}") from e
    return case_from_json(data, path)


def case_files(directory: Path = CASES_DIR) -> list[Path]:
    """Every case file below ``directory`` (``*.json`` under ``known/`` and ``regressions/``)."""
    return sorted(p for sub in ("known", "regressions") for p in (directory / sub).glob("*.json"))


def load_cases(directory: Path = CASES_DIR) -> list[Case]:
    return [load_case(p) for p in case_files(directory)]


def known_discrepancy(
    cases: Iterable[Case], backend: str, problem: Problem, backend_object: object | None = None
) -> Case | None:
    """The first known-discrepancy case of ``backend`` whose scope holds ``problem``.

    In scope only: whether the case explains a given disagreement is for its model to say
    (`harness.agreement.mark_known`, which records the explaining cases on the verdict).
    """
    for case in cases:
        if case.in_scope(backend, problem, backend_object):
            return case
    return None


def scoped_cases(
    cases: Iterable[Case], backend: str, problem: Problem, backend_object: object | None = None
) -> list[Case]:
    """Every known-discrepancy case of ``backend`` whose scope holds ``problem``, in order."""
    return [c for c in cases if c.in_scope(backend, problem, backend_object)]


def save_case(case: Case, directory: Path) -> Path:
    """Write ``case`` as ``directory/<name>.json`` atomically (temp file, then rename)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{case.name}.json"
    text = json.dumps(case.to_json(), indent=1) + "\n"
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{case.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)
    case.path = path
    return path
