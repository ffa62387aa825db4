"""Saved cases: self-contained JSON files under ``cases/`` that the tests and ``jagbench replay`` rerun.

Two kinds:
- ``regression``: a shrunk counterexample once found; the named backend is expected to agree now.
- ``known-discrepancy``: a third-party library computing something other than the contract says.
  It carries a ``scope`` (which problems it explains) so that fuzzing reports matching
  disagreements as *known* instead of new, and the tests check it still reproduces.

Format ``jagbench-case/1``::

    {"format": "jagbench-case/1", "name": "...", "kind": "regression" | "known-discrepancy",
     "backend": "torch", "summary": "...", "expect": "agree" | "disagree" | "raised",
     "scope": {"table_dtypes": ["float16"], "weighted": true, "pooling": ["mean"]},
     "problem": {"tables": [...], "weights": {...}, "batch": {...}, "id_policy": "reject"},
     "found": {...free-form: by, date, detail...}}

Scope keys (all must hold): ``table_dtypes`` / ``pooling`` (some table has one of these),
``weighted`` (the batch has per-sample weights or not), ``id_dtypes`` and ``batch_size`` (the
batch's are among these), ``noncontiguous_groups`` (grouping the tables by these attributes, e.g.
``["pooling", "dtype"]``, would reorder them), ``subnormal_weights`` (some table of one of these
dtypes holds a subnormal value).

Weights are stored either as exact values (``{"values": [[...]]}``; JSON floats round-trip every
float32/float16/bfloat16 value exactly) or as a seed (``{"seed": 0, "scale": 1.0}``) for large tables.
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

from harness.model import JaggedBatch, Pooling, Problem, TableConfig, dtype_from_name, dtype_name
from harness.weights import make_table_weights

FORMAT = "jagbench-case/1"
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
    "subnormal_weights",
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


def problem_from_json(d: Mapping[str, Any]) -> Problem:
    tables = tuple(table_from_json(t) for t in d["tables"])
    weights = {}
    for t in tables:
        w = d["weights"][t.name]
        if "values" in w:
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

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "name": self.name,
            "kind": self.kind,
            "backend": self.backend,
            "summary": self.summary,
            "expect": self.expect,
            "scope": self.scope,
            "problem": self.problem_json or problem_to_json(self.problem),
            "found": self.found,
        }

    def in_scope(self, backend: str, problem: Problem) -> bool:
        """Whether this known discrepancy explains a disagreement of ``backend`` on ``problem``."""
        if self.kind != "known-discrepancy" or backend != self.backend:
            return False
        return scope_matches(self.scope, problem)


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


def _has_subnormal(w: torch.Tensor) -> bool:
    """Some value of ``w`` is subnormal in its own dtype (nonzero, smaller than the smallest normal)."""
    mag = w.detach().abs().to(torch.float32)
    return bool(((mag > 0) & (mag < torch.finfo(w.dtype).tiny)).any())


def scope_matches(scope: Mapping[str, Any], problem: Problem) -> bool:
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
        else:
            raise CaseError(f"unknown scope key {key!r}; known: {SCOPE_KEYS}")
        if not ok:
            return False
    return True


def case_from_json(d: Mapping[str, Any], path: Path | None = None) -> Case:
    where = str(path) if path else "case"
    if d.get("format") != FORMAT:
        raise CaseError(f"{where}: format is {d.get('format')!r}, expected {FORMAT!r}")
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


def known_discrepancy(cases: Iterable[Case], backend: str, problem: Problem) -> Case | None:
    """The first known-discrepancy case that explains ``backend`` disagreeing on ``problem``."""
    for case in cases:
        if case.in_scope(backend, problem):
            return case
    return None


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
