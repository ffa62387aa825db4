"""The fuzz driver: Hypothesis generates problems, every backend is judged against the reference.

For each backend, one Hypothesis property runs on `harness.fuzz.strategies.problems`:

1. validate the problem (the strategies only make valid ones: a rejection is a harness bug);
2. compute the reference and its bound once (`Oracle`) and judge the backend (`check_backend`:
   type, shape, dtype, columns, every element under the bound, no input mutated, no exception);
3. a disagreement that a known-discrepancy case explains (`mark_known`) is counted as *known*;
4. on some examples, also one metamorphic relation (`harness.fuzz.metamorphic`), which needs no
   reference value;
5. a failure is shrunk by Hypothesis, printed readably (`format_failure`) and saved as a
   self-contained regression case under ``cases/regressions/`` (``save_dir``).

Shrunk cases are stored as data (``harness.cases`` JSON), never as ``@reproduce_failure`` blobs or
in ``.hypothesis/``: the profiles (`harness.fuzz.profiles`) turn the example database off.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from hypothesis import Verbosity, given, settings, target
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

from harness.agreement import Oracle, Outcome, Verdict, check_backend, mark_known
from harness.backend import Backend
from harness.cases import CASES_DIR, Case, load_cases, problem_to_json, save_case
from harness.fuzz.metamorphic import RELATIONS, transformed_results, within
from harness.fuzz.profiles import register_profiles
from harness.fuzz.results import BackendStats, Failure, FuzzReport
from harness.fuzz.strategies import problems
from harness.model import Problem
from harness.validate import validate_problem

REGRESSIONS_DIR = CASES_DIR / "regressions"
Progress = Callable[[str], None]


class BackendFailure(AssertionError):
    """Raised inside the property when a backend fails; carries the verdict."""

    def __init__(self, verdict: Verdict) -> None:
        super().__init__(f"{verdict.backend}: {verdict.outcome.value}: {verdict.detail}")
        self.verdict = verdict


class _Unsupported(Exception):
    """A transformed problem that the backend does not support: the relation is not checked."""


class _Stop(BaseException):
    """Ends a Hypothesis run cleanly when the time budget is spent (not an Exception: not shrunk)."""


def _run_backend(backend: Backend, problem: Problem) -> torch.Tensor | None:
    """The backend's result on ``problem``, or None when it does not support it."""
    if backend.supports(problem.tables, problem.batch) is not None:
        return None
    return backend.prepare(problem.tables, problem.weights)(problem.batch)


def judge(backend: Backend, problem: Problem, known: Sequence[Case] = ()) -> tuple[Verdict, Oracle]:
    """Validate ``problem``, compute its oracle and judge ``backend`` on it, known cases applied."""
    batch = validate_problem(problem.tables, problem.batch, problem.weights)
    oracle = Oracle.of(problem.tables, problem.weights, batch)
    verdict = check_backend(backend, problem.tables, problem.weights, batch, oracle)
    return mark_known([verdict], problem, known)[0], oracle


def check_relation(
    backend: Backend, problem: Problem, oracle: Oracle, relation: str, seed: int, known: Sequence[Case] = ()
) -> tuple[Verdict, Problem] | None:
    """Check one metamorphic relation; None when it holds or does not apply, else the failure.

    A broken relation means some transformed problem disagrees with the reference (both results
    are within ``bound`` of the exact value when correct), so that problem is judged and returned:
    it is the counterexample worth saving.
    """
    name = getattr(backend, "name", type(backend).__name__)
    running = [problem]

    def run(p: Problem) -> torch.Tensor:
        running[0] = p
        result = _run_backend(backend, p)
        if result is None:
            raise _Unsupported
        return result

    try:
        original = run(problem)
        out = transformed_results(relation, problem, run, seed)
    except _Unsupported:
        return None
    except Exception as e:  # noqa: BLE001 - a backend's exception is the verdict
        raised = Verdict(name, Outcome.RAISED, f"{type(e).__name__}: {e} [after {relation}]")
        raised = mark_known([raised], running[0], known)[0]
        return None if raised.outcome is Outcome.KNOWN else (raised, running[0])
    if out is None:
        return None
    parts, result = out
    ok, detail = within(result, original, oracle.bound)
    if ok:
        return None
    for part in parts:
        verdict, _ = judge(backend, part, known)
        if verdict.failed:
            return (
                Verdict(
                    verdict.backend,
                    verdict.outcome,
                    f"{verdict.detail} [after {relation}]",
                    verdict.comparison,
                ),
                part,
            )
        if verdict.outcome is Outcome.KNOWN:
            return None
    verdict = Verdict(name, Outcome.DISAGREE, f"metamorphic relation {relation} broken: {detail}")
    verdict = mark_known([verdict], problem, known)[0]
    return None if verdict.outcome is Outcome.KNOWN else (verdict, problem)


@dataclass
class _RunState:
    stats: BackendStats
    start: float
    deadline: float | None
    shrink_budget: float
    progress: Progress | None
    last_progress: float = 0.0
    found_at: float | None = None
    best: tuple[Problem, Verdict, str] | None = None


def fuzz_backend(
    backend: Backend,
    *,
    label: str | None = None,
    max_examples: int | None = None,
    time_budget: float | None = None,
    seed: int = 0,
    save_dir: Path | None = REGRESSIONS_DIR,
    known: Sequence[Case] | None = None,
    strategy: st.SearchStrategy[Problem] | None = None,
    metamorphic: bool = True,
    shrink_budget: float = 60.0,
    threads: int | None = 1,
    progress: Progress | None = None,
) -> tuple[BackendStats, Failure | None]:
    """Fuzz one backend; its statistics and the shrunk failure (saved under ``save_dir``), if any.

    Stops after ``max_examples`` or when ``time_budget`` seconds are spent, whichever comes first
    (with neither, after the ``ci`` profile's 60 examples). Shrinking a failure gets at most
    ``shrink_budget`` further seconds (the smallest failing example seen so far is kept).
    ``label`` names the backend in the saved case (a built-in name or a ``module:ATTR`` spec that
    ``jagbench replay`` can load); it defaults to ``backend.name``. The same ``seed`` and arguments
    give the same examples (with a time budget, possibly fewer or more of them).

    ``threads`` sets torch's intra-op threads for the run (restored after): fuzz problems are
    small, and on a shared machine the thread hand-off costs more than the work (10x measured).
    ``None`` leaves torch's setting alone, for backends whose threading is under test.
    """
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _fuzz_backend(
            backend,
            label,
            max_examples,
            time_budget,
            seed,
            save_dir,
            known,
            strategy,
            metamorphic,
            shrink_budget,
            progress,
        )
    finally:
        torch.set_num_threads(before)


def _fuzz_backend(
    backend: Backend,
    label: str | None,
    max_examples: int | None,
    time_budget: float | None,
    seed: int,
    save_dir: Path | None,
    known: Sequence[Case] | None,
    strategy: st.SearchStrategy[Problem] | None,
    metamorphic: bool,
    shrink_budget: float,
    progress: Progress | None,
) -> tuple[BackendStats, Failure | None]:
    register_profiles()
    label = label or getattr(backend, "name", type(backend).__name__)
    known = load_cases() if known is None else list(known)
    stats = BackendStats(label)
    start = time.monotonic()
    state = _RunState(stats, start, start + time_budget if time_budget else None, shrink_budget, progress)
    relation = st.sampled_from((None, None, *RELATIONS)) if metamorphic else st.just(None)
    base = settings.get_profile("campaign")
    run_settings = settings(
        base,
        max_examples=max_examples
        if max_examples is not None
        else (base.max_examples if time_budget else settings.get_profile("ci").max_examples),
        derandomize=False,
        report_multiple_bugs=False,
        verbosity=Verbosity.quiet,
        phases=[p for p in base.phases if p.name != "explain"],
    )

    @hypothesis_seed(seed)
    @run_settings
    @given(strategy if strategy is not None else problems(), relation, st.integers(0, 2**31 - 1))
    def prop(problem: Problem, relation_name: str | None, relation_seed: int) -> None:
        now = time.monotonic()
        if state.found_at is None and state.deadline is not None and now > state.deadline:
            raise _Stop
        if state.found_at is not None and now > state.found_at + state.shrink_budget:
            raise _Stop
        pristine = _copy(problem)  # what is saved, even if the backend mutates its input
        verdict, oracle = judge(backend, problem, known)
        failing, found_by = pristine, "the reference check"
        if verdict.outcome is Outcome.AGREE and relation_name is not None:
            broken = check_relation(backend, problem, oracle, relation_name, relation_seed, known)
            if broken is not None:
                verdict, failing = broken
                found_by = f"the metamorphic relation {relation_name!r}"
        if state.found_at is None:
            _count(state, verdict, relation_name)
        if verdict.outcome is Outcome.AGREE and verdict.comparison is not None:
            # Steer towards near-disagreements; not towards known ones, which would crowd the run.
            target(verdict.comparison.worst_ratio, label="error / bound")
        if verdict.failed:
            if state.found_at is None:
                state.found_at = time.monotonic()
                stats.seconds = state.found_at - start
                if progress is not None:
                    progress(f"fuzz {label}: failure after {stats.examples} examples; shrinking it")
            state.best = (failing, verdict, found_by)
            raise BackendFailure(verdict)

    try:
        prop()
    except (_Stop, BackendFailure):
        pass
    except Exception as e:  # noqa: BLE001 - e.g. a flaky failure: the best example is still kept
        if state.best is None:
            raise
        if progress is not None:
            progress(f"fuzz {label}: Hypothesis ended with {type(e).__name__}; keeping the smallest failure")
    if state.found_at is None:
        stats.seconds = time.monotonic() - start
    if state.best is None:
        return stats, None
    failing, verdict, found_by = state.best
    failure = Failure(label, failing, verdict, found_by, stats.seconds)
    if save_dir is not None:
        failure.case_path = save_case(_regression_case(failure, seed), Path(save_dir))
    return stats, failure


def _copy(problem: Problem) -> Problem:
    b = problem.batch
    batch = type(b)(
        b.keys, b.values.clone(), b.lengths.clone(), None if b.weights is None else b.weights.clone()
    )
    weights = {k: w.clone() for k, w in problem.weights.items()}
    return Problem(problem.tables, weights, batch, dict(problem.metadata))


def _count(state: _RunState, verdict: Verdict, relation: str | None) -> None:
    s = state.stats
    s.examples += 1
    if verdict.outcome is Outcome.AGREE:
        s.agreed += 1
        s.metamorphic += relation is not None
        if verdict.comparison is not None:
            s.worst_ratio = max(s.worst_ratio, verdict.comparison.worst_ratio)
    elif verdict.outcome is Outcome.KNOWN:
        s.known += 1
        s.known_cases[verdict.detail.split("'")[1] if "'" in verdict.detail else verdict.detail] += 1
    elif verdict.outcome is Outcome.UNSUPPORTED:
        s.unsupported += 1
    else:
        s.failed += 1
    now = time.monotonic()
    if state.progress is not None and now - state.last_progress >= 1.0:
        state.last_progress = now
        state.progress(
            f"fuzz {s.backend}: {s.examples} examples, {s.agreed} agreed, {s.known} known, "
            f"{s.unsupported} unsupported, worst error/bound {s.worst_ratio:.2g}, {now - state.start:.0f} s"
        )


def _regression_case(failure: Failure, seed: int) -> Case:
    problem_json = problem_to_json(failure.problem)
    digest = hashlib.sha1(json.dumps(problem_json, sort_keys=True).encode()).hexdigest()[:10]
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", failure.backend).strip("-") or "backend"
    return Case(
        name=f"{safe}-{digest}",
        kind="regression",
        backend=failure.backend,
        summary=f"{failure.verdict.outcome.value}: {failure.verdict.detail}",
        expect="agree",
        problem=failure.problem,
        problem_json=problem_json,
        found={
            "by": f"jagbench fuzz --seed {seed} ({failure.found_by}), shrunk by Hypothesis",
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
            "torch": torch.__version__,
            "seconds_to_find": round(failure.seconds_to_find, 2),
        },
    )


def fuzz(
    backends: Sequence[Backend],
    *,
    labels: Sequence[str] | None = None,
    max_examples: int | None = None,
    time_budget: float | None = None,
    seed: int = 0,
    save_dir: Path | None = REGRESSIONS_DIR,
    known: Sequence[Case] | None = None,
    shrink_budget: float = 60.0,
    threads: int | None = 1,
    progress: Progress | None = None,
) -> FuzzReport:
    """Fuzz each backend in turn (what ``jagbench fuzz`` runs); ``time_budget`` is split evenly.

    ``threads`` sets torch's intra-op threads for the run (restored after): fuzz problems are
    small, and on a shared machine the thread hand-off costs more than the work (10x measured).
    ``None`` leaves torch's setting alone, for backends whose threading is under test.
    """
    if labels is not None and len(labels) != len(backends):
        raise ValueError(f"{len(labels)} labels for {len(backends)} backends")
    known = load_cases() if known is None else list(known)
    each = time_budget / len(backends) if time_budget and backends else None
    stats, failures = [], []
    for i, backend in enumerate(backends):
        s, failure = fuzz_backend(
            backend,
            label=labels[i] if labels is not None else None,
            max_examples=max_examples,
            time_budget=each,
            seed=seed,
            save_dir=save_dir,
            known=known,
            shrink_budget=shrink_budget,
            threads=threads,
            progress=progress,
        )
        stats.append(s)
        if failure is not None:
            failures.append(failure)
    return FuzzReport(stats, failures)
