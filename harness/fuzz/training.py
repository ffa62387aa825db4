"""The training fuzz driver (``jagbench fuzz --mode train``): Hypothesis generates training
problems, each backend's steps are judged against the float64 reference, and the first failure is
minimised, printed and saved as a training case.

For each training backend, one Hypothesis property runs on
`harness.training.strategies.training_problems` (1-3 steps, every optimizer kind and weight-decay
mode, grad_output of every profile, the forward strategy's tables and batches):

1. the problem is validated and judged by `harness.training.check.check_training` (every step's
   output, every row of every table, the per-sample weight gradient; no input changed; no
   exception);
2. a failure that the backend's known training cases explain (`harness.training.cases`) is
   counted as *known*;
3. on some examples, also one training metamorphic relation (`harness.training.metamorphic`),
   which needs no reference value; a broken relation is turned into a reference counterexample
   when the transformed problem itself fails the check, and reported as the broken relation
   otherwise;
4. every example's coverage buckets (`harness.training.coverage`) are counted.

As in the forward driver (`harness.fuzz.driver`), Hypothesis only generates; the first failure
stops it and `harness.fuzz.minimise.training` minimises the concrete problem while the same
failure persists (`same_training_failure`). The minimised problem is printed and saved as a
training regression case (``"mode": "train"``, `harness.training.cases`) under
``reports/runs/cases/`` by default; ``jagbench replay`` reruns it, and copying it to
``cases/regressions/training/`` keeps it as a regression test.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hypothesis import Phase, Verbosity, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

from harness.agreement import Outcome
from harness.backend import Backend, can_train
from harness.fuzz.driver import DEFAULT_SAVE_DIR, TimedBackend, fuzz_each, regression_found, regression_name
from harness.fuzz.format import format_report
from harness.fuzz.minimise.training import (
    MinimisedTraining,
    describe_training_size,
    minimise_training,
    with_steps,
)
from harness.fuzz.profiles import register_profiles
from harness.fuzz.results import BackendStats, FuzzReport
from harness.markdown import markdown_table
from harness.model import output_columns
from harness.progress import Progress
from harness.training.cases import (
    TrainingCase,
    TrainingReplay,
    explain_with_cases,
    load_training_cases,
    save_training_case,
    scoped_training_cases,
)
from harness.training.check import TrainingVerdict, check_training
from harness.training.coverage import ALL_DIMENSIONS, training_buckets
from harness.training.metamorphic import RELATIONS, applies, check_relation, keys_reversed, permuted
from harness.training.problem import StepInput, TrainingProblem
from harness.training.strategies import training_problems
from harness.training.validate import validate_training_problem

TRAINING_REGRESSIONS_DIR_NAME = "cases/regressions/training/"


class _Stop(BaseException):
    """Ends a Hypothesis run at once (not an ``Exception``: Hypothesis neither shrinks nor replays it)."""


class TimedTrainer(TimedBackend):
    """A training backend whose calls (``supports_training``, ``prepare_training`` and every step,
    besides the forward ones) add their time to ``seconds``."""

    def supports_training(self, tables, batch, optimizer):
        start = time.perf_counter()
        try:
            return self.backend.supports_training(tables, batch, optimizer)
        finally:
            self.seconds += time.perf_counter() - start

    def prepare_training(self, tables, weights, optimizer):
        start = time.perf_counter()
        try:
            step = self.backend.prepare_training(tables, weights, optimizer)
        finally:
            self.seconds += time.perf_counter() - start

        def timed(batch, grad_output):
            begin = time.perf_counter()
            try:
                return step(batch, grad_output)
            finally:
                self.seconds += time.perf_counter() - begin

        return timed


def training_backends(backends: Sequence[Backend]) -> list[Backend]:
    """The backends that train (`harness.backend.can_train`)."""
    return [b for b in backends if can_train(b)]


# -- judging -------------------------------------------------------------------------------------


def judge_training(
    backend: object, problem: TrainingProblem, known: Sequence[TrainingCase] = ()
) -> tuple[TrainingVerdict, tuple[str, ...]]:
    """Validate ``problem`` and judge ``backend`` on it; a disagreement or exception that the
    backend's in-scope known cases explain becomes `Outcome.KNOWN`. Returns the verdict and the
    names of the explaining cases."""
    problem = validate_training_problem(problem, id_policy=problem.metadata.get("id_policy", "reject"))
    verdict = check_training(backend, problem, validated=True)
    if verdict.outcome not in (Outcome.DISAGREE, Outcome.RAISED):
        return verdict, ()
    explanation, usable = explain_with_cases(backend, problem, known)
    if not usable:
        return verdict, ()
    if explanation.explained:
        names = explanation.cases or (usable[0].name,)
        detail = f"known discrepancy {' + '.join(map(repr, names))}: {verdict.detail}"
        return dataclasses.replace(verdict, outcome=Outcome.KNOWN, detail=detail), names
    tried = ", ".join(repr(c.name) for c in usable)
    detail = f"{verdict.detail}; not explained by known case(s) {tried}: {explanation.detail}"
    return dataclasses.replace(verdict, detail=detail), ()


_CATEGORIES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("untouched row", re.compile(r"does not occur in the batch but changed")),
    ("updated row", re.compile(r"table '.*?' row \d+, column \d+")),
    ("table layout", re.compile(r"table '.*?': weights (?:have shape|are)")),
    ("output", re.compile(r"\boutput(?: sample \d+|:)")),
    ("per-sample weight gradient", re.compile(r"per_sample_weight_grad")),
    ("result", re.compile(r"TrainResult|the step returned")),
    ("relation", re.compile(r"metamorphic relation '[\w-]+' broken")),
)
_RAISED = re.compile(r"raised ([A-Za-z_][\w.]*):")


def failure_categories(detail: str) -> list[str]:
    """What a failed verdict's detail names as wrong, in the order it names them: "output",
    "updated row", "untouched row", "table layout", "per-sample weight gradient", "result",
    "relation"."""
    found = []
    for name, pattern in _CATEGORIES:
        m = pattern.search(detail)
        if m:
            found.append((m.start(), name))
    return [name for _, name in sorted(found)]


def training_failure_kind(verdict: TrainingVerdict) -> tuple[str, str]:
    """What makes two training failures "the same" for the minimiser: the outcome, and for an
    exception its type, for a disagreement the first quantity it names (`failure_categories`)."""
    if verdict.outcome is Outcome.RAISED:
        m = _RAISED.search(verdict.detail)
        return "raised", m.group(1) if m else "?"
    if verdict.outcome is Outcome.DISAGREE:
        categories = failure_categories(verdict.detail)
        return "disagree", categories[0] if categories else "?"
    return verdict.outcome.value, ""


def copy_training_problem(problem: TrainingProblem) -> TrainingProblem:
    """A problem with copies of every tensor (a backend may change its inputs); steps that share a
    batch still share one."""
    copies: dict[int, object] = {}

    def batch_copy(b):
        if id(b) not in copies:
            copies[id(b)] = dataclasses.replace(
                b,
                values=b.values.clone(),
                lengths=b.lengths.clone(),
                weights=None if b.weights is None else b.weights.clone(),
            )
        return copies[id(b)]

    steps = tuple(StepInput(batch_copy(s.batch), s.grad_output.clone()) for s in problem.steps)
    weights = {k: w.clone() for k, w in problem.weights.items()}
    return TrainingProblem(problem.tables, weights, problem.optimizer, steps, dict(problem.metadata))


def transformed_problems(problem: TrainingProblem, relation: str, seed: int) -> list[TrainingProblem]:
    """The problems a relation runs besides the first step itself (`harness.training.metamorphic`),
    each a training problem the reference can judge on its own."""
    batch, grad = problem.steps[0].batch, problem.steps[0].grad_output
    if relation == "zero-gradient":
        steps = [StepInput(batch, torch.zeros_like(grad)), StepInput(batch, grad)]
    elif relation == "double-gradient":
        steps = [StepInput(batch, grad * 2)]
    elif relation == "permute":
        steps = [StepInput(permuted(batch, seed)[0], grad)]
    elif relation == "reorder-keys":
        steps = [StepInput(keys_reversed(batch)[0], grad)]
    elif relation == "split-batch":
        k, n = batch.batch_size // 2, batch.batch_size
        steps = [
            StepInput(batch.select_samples(0, k), grad[:k].clone()),
            StepInput(batch.select_samples(k, n), grad[k:].clone()),
        ]
    else:
        raise ValueError(f"unknown relation {relation!r}; expected one of {list(RELATIONS)}")
    return [with_steps(problem, steps)]


def relation_verdict(
    backend: object, problem: TrainingProblem, relation: str, seed: int
) -> TrainingVerdict | None:
    """None when ``relation`` holds for ``backend`` on ``problem`` (validated, agreeing), else a
    failed verdict: the broken relation, or the exception the backend raised on the way."""
    name = getattr(backend, "name", type(backend).__name__)
    try:
        broken = check_relation(backend, problem, relation, seed=seed)
    except Exception as e:  # noqa: BLE001 - a backend's exception is the verdict
        return TrainingVerdict(name, Outcome.RAISED, f"raised {type(e).__name__}: {e} [after {relation}]")
    if broken is None:
        return None
    return TrainingVerdict(name, Outcome.DISAGREE, f"metamorphic relation {relation!r} broken: {broken}")


def same_training_failure(
    backend: object,
    verdict: TrainingVerdict,
    known: Sequence[TrainingCase],
    relation: tuple[str, int] | None = None,
) -> Callable[[TrainingProblem], TrainingVerdict | None]:
    """The minimiser's predicate: a candidate's verdict when ``backend`` fails on it as it did in
    ``verdict`` (`training_failure_kind`; for a disagreement, the candidate's failures must include
    the quantity the original named first), else None. A candidate the known cases explain is not
    the same failure. With ``relation`` (name, seed), the failure is that relation broken on a
    problem that otherwise agrees. Each candidate runs on its own copy."""
    kind = training_failure_kind(verdict)

    def reproduces(candidate: TrainingProblem) -> TrainingVerdict | None:
        v, _ = judge_training(backend, copy_training_problem(candidate), known)
        if relation is not None:
            if v.outcome is not Outcome.AGREE:
                return None
            v = relation_verdict(backend, copy_training_problem(candidate), *relation)
            return v if v is not None and training_failure_kind(v) == kind else None
        if not v.failed:
            return None
        if kind[0] == "disagree":
            return v if v.outcome is Outcome.DISAGREE and kind[1] in failure_categories(v.detail) else None
        return v if training_failure_kind(v) == kind else None

    return reproduces


# -- one backend ---------------------------------------------------------------------------------


@dataclass
class TrainingFailure:
    """A training failure: the (minimised) problem, the verdict on it, how it was found, where it
    was saved."""

    backend: str
    problem: TrainingProblem
    verdict: TrainingVerdict
    found_by: str
    seconds_to_find: float
    case_path: Path | None = None
    examples_to_find: int = 0
    original_size: dict[str, int] | None = None
    minimised: MinimisedTraining | None = None
    spec: dict[str, Any] | None = None
    relation: tuple[str, int] | None = None
    """(name, seed) of the metamorphic relation the failure is, when no reference value was wrong."""

    def to_json(self) -> dict[str, Any]:
        m = self.minimised
        return {
            "backend": self.backend,
            "mode": "train",
            "outcome": self.verdict.outcome.value,
            "detail": self.verdict.detail,
            "found_by": self.found_by,
            "seconds_to_find": round(self.seconds_to_find, 3),
            "examples_to_find": self.examples_to_find,
            "case_path": None if self.case_path is None else str(self.case_path),
            "original_size": self.original_size,
            "size": describe_training_size(self.problem),
            "optimizer": self.problem.optimizer.to_json(),
            "minimised": None
            if m is None
            else {
                "steps": m.steps,
                "attempts": m.attempts,
                "seconds": round(m.seconds, 3),
                "fixed_point": m.complete,
                "steps_by_pass": dict(m.steps_by_pass),
            },
        }


def training_stats(label: str) -> BackendStats:
    """Empty statistics with the training coverage dimensions."""
    return BackendStats(label, coverage={name: dict.fromkeys(labels, 0) for name, labels in ALL_DIMENSIONS})


def count_example(
    stats: BackendStats,
    verdict: TrainingVerdict,
    known_names: Sequence[str],
    metamorphic: bool,
    buckets: Mapping[str, str],
) -> None:
    """Count one example in ``stats`` (as `BackendStats.count` does a forward one)."""
    stats.examples += 1
    if verdict.outcome is Outcome.UNSUPPORTED:
        stats.unsupported += 1
        return
    for name, label in buckets.items():
        stats.coverage[name][label] = stats.coverage[name].get(label, 0) + 1
    if verdict.outcome is Outcome.AGREE:
        stats.agreed += 1
        stats.metamorphic += metamorphic
        stats.worst_ratio = max(stats.worst_ratio, verdict.worst_ratio)
    elif verdict.outcome is Outcome.KNOWN:
        stats.known += 1
        for name in known_names or ("(unnamed)",):
            stats.known_cases[name] += 1
    else:
        stats.failed += 1


def _settings(max_examples: int | None, time_budget: float | None) -> settings:
    register_profiles()
    base = settings.get_profile("campaign")
    if max_examples is None:
        max_examples = base.max_examples if time_budget else settings.get_profile("ci").max_examples
    return settings(
        base,
        max_examples=max_examples,
        derandomize=False,
        report_multiple_bugs=False,
        verbosity=Verbosity.quiet,
        phases=[Phase.generate],
    )


def _pristine(problem: TrainingProblem) -> Callable[[], TrainingProblem]:
    """How to get ``problem`` back as generated: rebuilt from its spec when it has one (no copy of
    large tables per example), else copied now."""
    spec = problem.metadata.get("training_spec")
    if spec is not None:
        from harness.training.spec import TrainingSpec, build_training_problem

        return lambda: build_training_problem(TrainingSpec.from_json(spec))
    copied = copy_training_problem(problem)
    return lambda: copied


@dataclass
class _Found:
    problem: Callable[[], TrainingProblem]
    verdict: TrainingVerdict
    found_by: str
    relation: tuple[str, int] | None = None


def _check_example(
    timed: TimedTrainer,
    problem: TrainingProblem,
    relation_name: str | None,
    relation_seed: int,
    known: Sequence[TrainingCase],
) -> tuple[TrainingVerdict, tuple[str, ...], bool, _Found | None]:
    """One example: the verdict, the explaining known cases, whether a relation was checked, and
    the failure to minimise (None when none)."""
    pristine = _pristine(problem)
    verdict, names = judge_training(timed, problem, known)
    if verdict.failed:
        return verdict, names, False, _Found(pristine, verdict, "the reference check")
    if verdict.outcome is not Outcome.AGREE or relation_name is None or not applies(relation_name, problem):
        return verdict, names, False, None
    broken = relation_verdict(timed, pristine(), relation_name, relation_seed)
    if broken is None:
        return verdict, names, True, None
    found_by = f"the metamorphic relation {relation_name!r}"
    if broken.outcome is Outcome.RAISED:
        return broken, (), True, _Found(pristine, broken, found_by)
    for transformed in transformed_problems(pristine(), relation_name, relation_seed):
        v, known_names = judge_training(timed, copy_training_problem(transformed), known)
        if v.failed:
            v = dataclasses.replace(v, detail=f"{v.detail} [after {relation_name}]")
            return v, (), True, _Found(lambda t=transformed: t, v, found_by)
        if v.outcome is Outcome.KNOWN:
            return verdict, names, True, None
    if scoped_training_cases(known, timed.name, problem):
        # A known discrepancy may break a relation that the contract keeps; not counted against it.
        return verdict, names, True, None
    return broken, (), True, _Found(pristine, broken, found_by, (relation_name, relation_seed))


def fuzz_training_backend(
    backend: Backend,
    *,
    label: str | None = None,
    max_examples: int | None = None,
    time_budget: float | None = None,
    seed: int = 0,
    save_dir: Path | None = DEFAULT_SAVE_DIR,
    known: Sequence[TrainingCase] | None = None,
    strategy: st.SearchStrategy[TrainingProblem] | None = None,
    metamorphic: bool = True,
    shrink_budget: float = 60.0,
    threads: int | None = 1,
    progress: Progress | None = None,
) -> tuple[BackendStats, TrainingFailure | None]:
    """Fuzz one training backend; its statistics and the minimised failure (saved under
    ``save_dir``), if any. Stops at the first failure, after ``max_examples`` or when
    ``time_budget`` seconds are spent (with neither, after the ``ci`` profile's 60 examples); as
    `harness.fuzz.driver.fuzz_backend` does for the forward lookup, with the same meaning of
    ``label``, ``seed``, ``shrink_budget`` and ``threads``."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _fuzz_training_backend(
            backend,
            label or getattr(backend, "name", type(backend).__name__),
            max_examples,
            time_budget,
            seed,
            save_dir,
            load_training_cases() if known is None else list(known),
            strategy if strategy is not None else training_problems(),
            metamorphic,
            shrink_budget,
            progress if progress is not None else Progress(),
        )
    finally:
        torch.set_num_threads(before)


def _fuzz_training_backend(
    backend: Backend,
    label: str,
    max_examples: int | None,
    time_budget: float | None,
    seed: int,
    save_dir: Path | None,
    known: list[TrainingCase],
    strategy: st.SearchStrategy[TrainingProblem],
    metamorphic: bool,
    shrink_budget: float,
    progress: Progress,
) -> tuple[BackendStats, TrainingFailure | None]:
    timed = TimedTrainer(backend)
    stats = training_stats(label)
    start = time.monotonic()
    deadline = start + time_budget if time_budget else None
    found: list[_Found] = []
    relation = st.sampled_from((None, None, *RELATIONS)) if metamorphic else st.just(None)
    description = f"fuzz --mode train {label}"
    if time_budget:
        progress.start(description, total=time_budget, unit="s")
    else:
        progress.start(description, total=max_examples or settings.get_profile("ci").max_examples, unit="ex")

    @hypothesis_seed(seed)
    @_settings(max_examples, time_budget)
    @given(strategy, relation, st.integers(0, 2**31 - 1))
    def prop(problem: TrainingProblem, relation_name: str | None, relation_seed: int) -> None:
        if deadline is not None and time.monotonic() > deadline:
            raise _Stop
        verdict, names, checked, failure = _check_example(timed, problem, relation_name, relation_seed, known)
        count_example(stats, verdict, names, checked, training_buckets(problem))
        progress.update(
            time.monotonic() - start if time_budget else stats.examples,
            examples=stats.examples,
            agreed=stats.agreed,
            known=stats.known,
            unsupported=stats.unsupported,
        )
        if failure is not None:
            found.append(failure)
            raise _Stop

    try:
        prop()
    except _Stop:
        pass
    stats.seconds = time.monotonic() - start
    stats.backend_seconds = timed.seconds
    progress.finish()
    if not found:
        return stats, None
    return stats, _minimised_failure(
        backend, label, found[0], stats, known, seed, save_dir, shrink_budget, progress
    )


def _minimised_failure(
    backend: Backend,
    label: str,
    found: _Found,
    stats: BackendStats,
    known: list[TrainingCase],
    seed: int,
    save_dir: Path | None,
    shrink_budget: float,
    progress: Progress,
) -> TrainingFailure:
    original = found.problem()
    spec = original.metadata.get("training_spec")
    original = dataclasses.replace(
        original, metadata={k: v for k, v in original.metadata.items() if k != "training_spec"}
    )
    progress.note(
        f"fuzz --mode train {label}: {found.verdict.outcome.value} after {stats.examples} examples "
        f"({stats.seconds:.1f} s); minimising it (at most {shrink_budget:g} s)"
    )
    result = minimise_training(
        original,
        found.verdict,
        same_training_failure(backend, found.verdict, known, found.relation),
        budget=shrink_budget,
    )
    failure = TrainingFailure(
        backend=label,
        problem=result.problem,
        verdict=result.verdict,
        found_by=found.found_by,
        seconds_to_find=stats.seconds,
        examples_to_find=stats.examples,
        original_size=describe_training_size(original),
        minimised=result,
        spec=spec,
        relation=found.relation,
    )
    progress.note(
        f"fuzz --mode train {label}: minimised in {result.steps} steps, {result.seconds:.1f} s"
        + ("" if result.complete else " (budget spent before a fixed point)")
    )
    if save_dir is not None:
        failure.case_path = save_training_case(regression_case(failure, seed), Path(save_dir))
    return failure


def regression_case(failure: TrainingFailure, seed: int) -> TrainingCase:
    """The saved form of a failure: a training regression case (its backend is expected to agree
    once fixed), named by the backend and a digest of the problem."""
    from harness.training.cases import training_problem_to_json

    problem_json = training_problem_to_json(failure.problem)
    found = regression_found(
        failure,
        by=f"jagbench fuzz --mode train --seed {seed}",
        minimised_by="harness.fuzz.minimise.training",
        size=describe_training_size(failure.problem),
    )
    return TrainingCase(
        name=regression_name(failure.backend, problem_json, "train-"),
        backend=failure.backend,
        summary=f"{failure.verdict.outcome.value}: {failure.verdict.detail}",
        expect="agree",
        problem=failure.problem,
        model=None,
        found=found,
        kind="regression",
        relation=None
        if failure.relation is None
        else {"name": failure.relation[0], "seed": failure.relation[1]},
    )


def fuzz_training(
    backends: Sequence[Backend],
    *,
    labels: Sequence[str] | None = None,
    max_examples: int | None = None,
    time_budget: float | None = None,
    seed: int = 0,
    save_dir: Path | None = DEFAULT_SAVE_DIR,
    known: Sequence[TrainingCase] | None = None,
    strategy: st.SearchStrategy[TrainingProblem] | None = None,
    metamorphic: bool = True,
    shrink_budget: float = 60.0,
    threads: int | None = 1,
    progress: Progress | None = None,
) -> FuzzReport:
    """Fuzz each training backend in turn (what ``jagbench fuzz --mode train`` runs);
    ``time_budget`` is split evenly. The report's failures are `TrainingFailure`s."""
    known = load_training_cases() if known is None else list(known)
    stats, failures = fuzz_each(
        backends,
        labels,
        time_budget,
        lambda backend, label, each: fuzz_training_backend(
            backend,
            label=label,
            max_examples=max_examples,
            time_budget=each,
            seed=seed,
            save_dir=save_dir,
            known=known,
            strategy=strategy,
            metamorphic=metamorphic,
            shrink_budget=shrink_budget,
            threads=threads,
            progress=progress,
        ),
    )
    settings_json = {
        "mode": "train",
        "max_examples": max_examples,
        "time_budget": time_budget,
        "seed": seed,
        "shrink_budget": shrink_budget,
    }
    return FuzzReport(stats, failures, settings=settings_json)


# -- printing ------------------------------------------------------------------------------------


def _grad_text(grad: torch.Tensor, tables, limit: int = 12) -> str:
    nonzero = torch.nonzero(grad)
    if not len(nonzero):
        return "all zero"
    owner = {}
    for _, feature, first, dim in output_columns(tables):
        for c in range(first, first + dim):
            owner[c] = (feature, c - first)
    parts = []
    for sample, col in nonzero[:limit].tolist():
        feature, j = owner[col]
        parts.append(f"[{sample}, {feature}:{j}] = {float(grad[sample, col]):.6g}")
    more = f", ... {len(nonzero) - limit} more non-zero" if len(nonzero) > limit else ""
    return ", ".join(parts) + more + " (others 0)"


def format_training_problem(problem: TrainingProblem) -> str:
    """The optimizer, the tables, each step's batch (once per distinct batch) and grad_output."""
    from harness.fuzz.format import format_problem

    lines = [f"optimizer: {problem.optimizer.describe()}"]
    seen: dict[int, int] = {}
    for i, s in enumerate(problem.steps):
        lines.append(f"step {i}:")
        if id(s.batch) in seen:
            lines.append(f"  the batch of step {seen[id(s.batch)]}")
        else:
            seen[id(s.batch)] = i
            text = format_problem(problem.forward_problem(i))
            if i:  # the tables were shown with the first step
                text = text[text.index("batch:") :]
                text = text[: text.index("table rows used:")].rstrip()
            lines += ["  " + line for line in text.splitlines()]
        lines.append(f"  grad_output: {_grad_text(s.grad_output, problem.tables)}")
    return "\n".join(lines)


def _size_text(size: Mapping[str, int]) -> str:
    return (
        f"{size['steps']} step(s) over {size['batches']} batch(es), {size['tables']} table(s), "
        f"{size['features']} feature(s), {size['samples']} sample(s), {size['ids']} id(s) "
        f"(longest bag {size['longest_bag']}), dim <= {size['max_dim']}"
    )


def format_training_failure(failure: TrainingFailure) -> str:
    v = failure.verdict
    lines = [
        f"## {failure.backend} (training): {v.outcome.value}, found by {failure.found_by} "
        f"after {failure.seconds_to_find:.1f} s",
        v.detail,
    ]
    m = failure.minimised
    if m is not None and failure.original_size is not None:
        now = describe_training_size(failure.problem)
        lines.append(
            f"minimised in {m.steps} steps ({m.attempts} tries, {m.seconds:.1f} s"
            + ("" if m.complete else ", budget spent before a fixed point")
            + f") from {_size_text(failure.original_size)} to {_size_text(now)}"
        )
    lines.append(format_training_problem(failure.problem))
    if failure.case_path is not None:
        lines.append(f"saved as {failure.case_path}; rerun with: jagbench replay {failure.case_path}")
        if TRAINING_REGRESSIONS_DIR_NAME not in str(failure.case_path):
            lines.append(
                f"to keep it as a regression test, copy it to {TRAINING_REGRESSIONS_DIR_NAME} and commit "
                "it with the fix (the test suite replays every case there)"
            )
    return "\n".join(lines)


def format_training_report(report: FuzzReport) -> str:
    """The forward report's table and coverage (`harness.fuzz.format.format_report`), then every
    training failure in full."""
    text = format_report(dataclasses.replace(report, failures=[]))
    for f in report.failures:
        text += "\n\n" + format_training_failure(f)
    return text


def format_training_replay(results: Sequence[TrainingReplay]) -> str:
    """A Markdown table of training cases replayed (case, backend, expected, got, model, as
    expected), then each surprise with its detail and the case's problem."""
    rows = []
    for r in results:
        if r.skipped:
            model = "not run"
        elif r.explanation is None:
            model = "-"
        else:
            model = "explains it" if r.explanation.explained else "does NOT explain it"
        rows.append(
            [
                r.case.name,
                r.verdict.backend,
                r.expectation,
                "unavailable" if r.skipped else r.verdict.outcome.value,
                model,
                "skipped" if r.skipped else "yes" if r.as_expected else "NO",
            ]
        )
    text = markdown_table(["training case", "backend", "expected", "got", "model", "as expected"], rows)
    for r in results:
        if r.as_expected:
            continue
        got = r.verdict.outcome.value
        lines = [f"## {r.case.name} on {r.verdict.backend}: expected {r.expectation}, got {got}"]
        lines.append(r.verdict.detail)
        if r.explanation is not None and not r.explanation.explained:
            model = r.case.model.describe() if r.case.model is not None else "no model"
            lines.append(f"not as the case's model says ({model}): {r.explanation.detail}")
        lines.append(format_training_problem(r.case.problem))
        text += "\n\n" + "\n".join(lines)
    return text


__all__ = [
    "TimedTrainer",
    "TrainingFailure",
    "failure_categories",
    "format_training_failure",
    "format_training_replay",
    "format_training_report",
    "fuzz_training",
    "fuzz_training_backend",
    "judge_training",
    "regression_case",
    "same_training_failure",
    "training_backends",
    "training_failure_kind",
]
