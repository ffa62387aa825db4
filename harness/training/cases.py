"""Training cases: known training discrepancies of third-party libraries and training regressions,
saved as replayable JSON.

Known discrepancies live under ``cases/known/training/``, regressions (a minimised failure of
``jagbench fuzz --mode train``, kept once fixed) under ``cases/regressions/training/``: folders of
their own, since the forward case loader, `harness.cases.case_files`, reads only the files
directly under ``cases/known/`` and ``cases/regressions/``. The format is
the forward cases' ``jagbench-case/2`` (`harness.cases`) with ``"mode": "train"``, a training
model (`harness.training.known`) and a training problem::

    {"format": "jagbench-case/2", "mode": "train", "name": "...", "kind": "known-discrepancy",
     "backend": "fbgemm-tbe", "summary": "...", "expect": "disagree" | "raised",
     "scope": {"optimizer_kinds": ["sgd"], "decays": true, "table_dtypes": ["float16"]},
     "model": {"kind": "weight-decay-ignored", "features": "any", "dtypes": [...]},
     "reproduced": true, "variants": ["fbgemm-tbe-int32", "fbgemm-tbe-none"],
     "problem": {"tables": [...], "weights": {...}, "batch": {...first step's batch...},
                 "id_policy": "reject",
                 "training": {"optimizer": {...OptimizerConfig...},
                              "steps": [{"batch": null, "grad_output": [[...]]}, ...]}},
     "found": {...}}

``problem`` without ``training`` is the forward problem of the first step (`harness.cases`'s
layout, so its tables, weights and batch read the same way); each step's ``batch`` is ``null``
for that first batch again, or a batch in the same layout. grad_output values are stored exactly
(JSON floats round-trip float32).

``variants`` (optional) names other built-in backends that run the same library code on valid
input (the TBE fed int32 indices, or with another bounds-check mode): the case applies to them
too; replay runs ``backend``.

A regression (``"kind": "regression"``, ``"expect": "agree"``) has no model, scope or
``reproduced``: its backend must agree with the contract on it (or fail only as its known cases
explain). A regression found by a metamorphic relation alone (no reference value was wrong) names
it, ``"relation": {"name": "permute", "seed": 7}`` (`harness.training.metamorphic`): replaying
checks the relation too.

Scope keys: the forward ones (`harness.cases.scope_matches`, which must hold for some step's
forward problem), and ``optimizer_kinds`` (the optimizer's kind is one of these),
``weight_decay_modes`` (its mode is one of these) and ``decays`` (whether a weight-decay term
takes part: a mode other than "none" and a non-zero decay).

`mark_known_training` relabels a failed `harness.training.check.TrainingVerdict` as known where
the in-scope cases' models, together, explain the backend's run (`explain_training`);
`replay_training` reruns each case on its backend and checks that it still fails and that its
own model explains the failure.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from harness.agreement import Outcome
from harness.backend import BackendUnavailable, load_backend
from harness.cases import (
    CASES_DIR,
    FORMAT,
    SCOPE_KEYS,
    CaseError,
    problem_from_json,
    problem_to_json,
    scope_matches,
)
from harness.known import Explanation, Model, ModelError
from harness.model import Problem, total_dim
from harness.training.check import TrainingVerdict, check_training
from harness.training.contract import OptimizerConfig
from harness.training.known import explain_training, training_model_from_json
from harness.training.problem import StepInput, TrainingProblem
from harness.training.validate import validate_training_problem

TRAINING_CASES_DIR = CASES_DIR / "known" / "training"
TRAINING_REGRESSIONS_DIR = CASES_DIR / "regressions" / "training"
TRAINING_SCOPE_KEYS = ("optimizer_kinds", "weight_decay_modes", "decays")
EXPECTATIONS = ("disagree", "raised")
"""What a known training discrepancy may expect (a regression expects "agree")."""


def _floats(rows: torch.Tensor) -> list[list[float]]:
    return rows.to(torch.float64).tolist()


def training_problem_to_json(problem: TrainingProblem, *, id_policy: str = "reject") -> dict[str, Any]:
    """A training problem as a case's ``problem`` (module docstring)."""
    out = problem_to_json(problem.forward_problem(0), id_policy=id_policy)
    first = problem.steps[0].batch
    steps = []
    for s in problem.steps:
        batch = None
        if s.batch is not first:
            batch = problem_to_json(Problem(problem.tables, problem.weights, s.batch))["batch"]
        steps.append({"batch": batch, "grad_output": _floats(s.grad_output)})
    out["training"] = {"optimizer": problem.optimizer.to_json(), "steps": steps}
    return out


def training_problem_from_json(d: Mapping[str, Any]) -> TrainingProblem:
    """The `TrainingProblem` of a case's ``problem``; ``metadata["id_policy"]`` as stored."""
    first = problem_from_json(d)
    training = d["training"]
    steps = []
    for s in training["steps"]:
        batch = first.batch
        if s.get("batch") is not None:
            batch = problem_from_json({**d, "batch": s["batch"]}).batch
        grad = torch.tensor(s["grad_output"], dtype=torch.float64).to(torch.float32)
        steps.append(StepInput(batch, grad.reshape(batch.batch_size, total_dim(first.tables))))
    optimizer = OptimizerConfig.from_json(training["optimizer"])
    return TrainingProblem(first.tables, first.weights, optimizer, tuple(steps), dict(first.metadata))


def training_scope_matches(scope: Mapping[str, Any], problem: TrainingProblem) -> bool:
    """All conditions of ``scope`` hold for ``problem`` (an empty scope matches nothing)."""
    if not scope:
        return False
    optimizer = problem.optimizer
    for key, want in scope.items():
        if key == "optimizer_kinds" and optimizer.kind not in want:
            return False
        if key == "weight_decay_modes" and optimizer.weight_decay_mode not in want:
            return False
        if key == "decays" and optimizer.decays != bool(want):
            return False
    forward = {k: v for k, v in scope.items() if k not in TRAINING_SCOPE_KEYS}
    if not forward:
        return True
    return any(
        scope_matches(forward, Problem(problem.tables, problem.weights, s.batch)) for s in problem.steps
    )


@dataclass
class TrainingCase:
    """A named, replayable training problem, the backend it concerns and the model of what that
    backend's library computes instead of the contract."""

    name: str
    backend: str
    summary: str
    expect: str
    problem: TrainingProblem
    model: Model | None
    scope: dict[str, Any] = field(default_factory=dict)
    reproduced: bool = True
    found: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    kind: str = "known-discrepancy"
    """``known-discrepancy`` (with a model) or ``regression`` (no model; expects "agree")."""
    relation: dict[str, Any] | None = None
    """A regression found by a metamorphic relation: ``{"name": ..., "seed": ...}``."""
    variants: tuple[str, ...] = ()
    """Other built-in backends that run the same library code on valid input (``fbgemm-tbe-int32``
    and ``fbgemm-tbe-none`` for ``fbgemm-tbe``: the same kernel fed int32 indices or with another
    bounds-check mode): the case applies to them too. Replay runs ``backend``."""

    def in_scope(self, backend: str, problem: TrainingProblem) -> bool:
        """Whether ``backend`` on ``problem`` is within this known case's scope (necessary, not
        sufficient: its model must explain the run); never for a regression."""
        return (
            self.kind == "known-discrepancy"
            and (backend == self.backend or backend in self.variants)
            and training_scope_matches(self.scope, problem)
        )

    @property
    def id_policy(self) -> str:
        return self.problem.metadata.get("id_policy", "reject")

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "format": FORMAT,
            "mode": "train",
            "name": self.name,
            "kind": self.kind,
            "backend": self.backend,
            "summary": self.summary,
            "expect": self.expect,
        }
        if self.kind == "known-discrepancy":
            out.update(scope=self.scope, model=self.model.to_json(), reproduced=self.reproduced)
            if self.variants:
                out["variants"] = list(self.variants)
        if self.relation is not None:
            out["relation"] = dict(self.relation)
        out["problem"] = training_problem_to_json(self.problem, id_policy=self.id_policy)
        out["found"] = self.found
        return out


def training_case_from_json(d: Mapping[str, Any], path: Path | None = None) -> TrainingCase:
    where = str(path) if path else "case"
    if d.get("format") != FORMAT or d.get("mode") != "train":
        raise CaseError(f"{where}: not a training case (format {FORMAT!r} with mode 'train')")
    kind = d.get("kind", "known-discrepancy")
    if kind not in ("known-discrepancy", "regression"):
        raise CaseError(f"{where}: kind {kind!r} is not 'known-discrepancy' or 'regression'")
    required = ("name", "backend", "expect", "problem")
    if kind == "known-discrepancy":
        required += ("model", "reproduced")
    for key in required:
        if key not in d:
            raise CaseError(f"{where}: missing field {key!r}")
    if kind == "regression" and d["expect"] != "agree":
        raise CaseError(f"{where}: a training regression expects 'agree', got {d['expect']!r}")
    if kind == "known-discrepancy" and d["expect"] not in EXPECTATIONS:
        raise CaseError(f"{where}: expect {d['expect']!r} is not one of {EXPECTATIONS}")
    for key in d.get("scope", {}):
        if key not in SCOPE_KEYS + TRAINING_SCOPE_KEYS:
            raise CaseError(f"{where}: unknown scope key {key!r}; known: {SCOPE_KEYS + TRAINING_SCOPE_KEYS}")
    try:
        model = training_model_from_json(d["model"]) if kind == "known-discrepancy" else None
    except ModelError as e:
        raise CaseError(f"{where}: bad model: {e}") from e
    try:
        problem = training_problem_from_json(d["problem"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CaseError(f"{where}: bad problem: {type(e).__name__}: {e}") from e
    return TrainingCase(
        name=d["name"],
        backend=d["backend"],
        summary=d.get("summary", ""),
        expect=d["expect"],
        problem=problem,
        model=model,
        scope=dict(d.get("scope", {})),
        reproduced=bool(d.get("reproduced", True)),
        found=dict(d.get("found", {})),
        path=path,
        kind=kind,
        relation=dict(d["relation"]) if d.get("relation") else None,
        variants=tuple(d.get("variants", ())),
    )


def load_training_case(path: str | os.PathLike[str]) -> TrainingCase:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise CaseError(f"cannot read case {str(path)!r}: {e.strerror}") from e
    except json.JSONDecodeError as e:
        raise CaseError(f"{path}: not JSON: {e}") from e
    return training_case_from_json(data, path)


def training_case_files(directory: Path = TRAINING_CASES_DIR) -> list[Path]:
    return sorted(directory.glob("*.json"))


def every_training_case_file(root: Path = CASES_DIR) -> list[Path]:
    """Every training case under ``root``: known discrepancies, then regressions."""
    return [p for sub in ("known", "regressions") for p in training_case_files(root / sub / "training")]


def is_training_case(data: Mapping[str, Any]) -> bool:
    """Whether a case file's JSON is a training case (``"mode": "train"``)."""
    return data.get("mode") == "train"


def load_training_cases(directory: Path = TRAINING_CASES_DIR) -> list[TrainingCase]:
    return [load_training_case(p) for p in training_case_files(directory)]


def save_training_case(case: TrainingCase, directory: Path) -> Path:
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


def scoped_training_cases(
    cases: Iterable[TrainingCase], backend: str, problem: TrainingProblem
) -> list[TrainingCase]:
    """Every case of ``backend`` whose scope holds ``problem``, in order."""
    return [c for c in cases if c.in_scope(backend, problem)]


def explain_with_cases(
    backend: object, problem: TrainingProblem, cases: Sequence[TrainingCase]
) -> tuple[Explanation, list[TrainingCase]]:
    """The in-scope, reproduced cases of ``backend`` tried together on ``problem`` (validated)."""
    name = getattr(backend, "name", type(backend).__name__)
    usable = [c for c in scoped_training_cases(cases, name, problem) if c.reproduced]
    if not usable:
        return Explanation(False, "no known training case of this backend is in scope"), usable
    return explain_training(backend, problem, [(c.name, c.model) for c in usable]), usable


def mark_known_training(
    verdict: TrainingVerdict, backend: object, problem: TrainingProblem, cases: Sequence[TrainingCase]
) -> TrainingVerdict:
    """``verdict`` as `Outcome.KNOWN` when it failed (disagree or raised) and the in-scope cases'
    models explain the backend's run; else unchanged, with why not added to its detail. The
    backend is run again (`explain_training`)."""
    if verdict.outcome not in (Outcome.DISAGREE, Outcome.RAISED):
        return verdict
    explanation, usable = explain_with_cases(backend, problem, cases)
    if not usable:
        return verdict
    if explanation.explained:
        known = " + ".join(map(repr, explanation.cases))
        return dataclasses.replace(
            verdict, outcome=Outcome.KNOWN, detail=f"known discrepancy {known}: {verdict.detail}"
        )
    tried = ", ".join(repr(c.name) for c in usable)
    return dataclasses.replace(
        verdict, detail=f"{verdict.detail}; not explained by known case(s) {tried}: {explanation.detail}"
    )


def with_relation(
    backend: object, problem: TrainingProblem, case: TrainingCase, verdict: TrainingVerdict
) -> TrainingVerdict:
    """``verdict``, or, when it agrees and the case names a relation, that relation's failure on
    the problem (a disagreement, or the exception the backend raised)."""
    if case.relation is None or verdict.outcome is not Outcome.AGREE:
        return verdict
    from harness.training.metamorphic import check_relation

    name, seed = case.relation["name"], int(case.relation.get("seed", 0))
    try:
        broken = check_relation(backend, problem, name, seed=seed)
    except Exception as e:  # noqa: BLE001 - a backend's exception is the verdict
        return dataclasses.replace(
            verdict, outcome=Outcome.RAISED, detail=f"raised {type(e).__name__}: {e} [after {name}]"
        )
    if broken is None:
        return dataclasses.replace(verdict, detail=f"{verdict.detail}; the relation {name!r} holds")
    return dataclasses.replace(
        verdict, outcome=Outcome.DISAGREE, detail=f"metamorphic relation {name!r} broken: {broken}"
    )


@dataclass(frozen=True)
class TrainingReplay:
    """One backend on one case: the check's verdict (known cases applied when the backend is held
    to agreement) and, for a known case on its own backend, the case's own model on the run."""

    case: TrainingCase
    verdict: TrainingVerdict
    explanation: Explanation | None
    skipped: bool = False
    expected: str = ""
    """What is expected of this backend: the case's ``expect`` on its own backend (the default),
    "agree" on any other."""

    @property
    def expectation(self) -> str:
        return self.expected or self.case.expect

    @property
    def as_expected(self) -> bool:
        """A known case still fails as it says and its own model explains it; a backend held to
        agreement agrees (or its own known cases explain it; another backend may also decline the
        case). A case that could not run here counts as expected."""
        if self.skipped:
            return True
        outcome = self.verdict.outcome
        if self.expectation == "agree":
            own = self.verdict.backend == self.case.backend
            return outcome in (Outcome.AGREE, Outcome.KNOWN) or (outcome is Outcome.UNSUPPORTED and not own)
        return (
            outcome.value == self.expectation and self.explanation is not None and self.explanation.explained
        )


def replay_training(
    cases: Sequence[TrainingCase],
    backends: Mapping[str, object] | None = None,
    *,
    others: Sequence[object] | None = None,
    known: Sequence[TrainingCase] | None = None,
) -> list[TrainingReplay]:
    """Each case on its own backend (``backends[name]``, else loaded by name), or on each of
    ``others`` instead. A known case's own backend gets the contract's verdict, then the case's
    own model alone on the same run; a backend held to agreement (a regression's own, or any of
    ``others``) gets its verdict with ``known`` (default: the cases under ``cases/known/training/``)
    applied."""
    out = []
    for case in cases:
        problem = validate_training_problem(case.problem, id_policy=case.id_policy)
        if others:
            for backend in others:
                verdict = with_relation(
                    backend, problem, case, check_training(backend, problem, validated=True)
                )
                if known is None:
                    known = load_training_cases()
                verdict = mark_known_training(verdict, backend, problem, known)
                out.append(TrainingReplay(case, verdict, None, expected="agree"))
            continue
        try:
            backend = (backends or {}).get(case.backend) or load_backend(case.backend)
        except BackendUnavailable as e:
            verdict = TrainingVerdict(case.backend, Outcome.UNSUPPORTED, f"not run here: {e}")
            out.append(TrainingReplay(case, verdict, None, skipped=True))
            continue
        verdict = check_training(backend, problem, validated=True)
        explanation = None
        if case.kind == "regression":
            verdict = with_relation(backend, problem, case, verdict)
            if known is None:
                known = load_training_cases()
            verdict = mark_known_training(verdict, backend, problem, known)
        elif verdict.outcome in (Outcome.DISAGREE, Outcome.RAISED):
            explanation = explain_training(backend, problem, [(case.name, case.model)])
        out.append(TrainingReplay(case, verdict, explanation))
    return out
