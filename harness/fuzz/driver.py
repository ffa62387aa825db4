"""The fuzz driver: Hypothesis generates problems, each backend is judged against the reference,
and the first failure is minimised by our own minimiser, printed and saved.

For each backend, one Hypothesis property runs on `harness.fuzz.strategies.problems`:

1. validate the problem (the strategies only make valid ones: a rejection is a harness bug);
2. compute the reference and its bound once (`Oracle`) and judge the backend
   (`check_backend_pooling`: type, shape, dtype, columns, every element under the bound, no
   input mutated, no exception); on a large problem the reference is computed on a second thread
   while the backend runs, from copies of the inputs;
3. a disagreement that a known-discrepancy case explains (`mark_known`) is counted as *known*;
4. on some examples, also one metamorphic relation (`harness.fuzz.metamorphic`), which needs no
   reference value;
5. every example's coverage buckets (`harness.fuzz.coverage`) are counted.

Hypothesis only *generates*: its shrinking is off (it shrinks seeded data poorly) and so is
``target()`` (its hill-climbing cost more than half of a profiled run). At the first failure the
property stops Hypothesis, and `harness.fuzz.minimise` minimises the concrete problem, keeping
each step only while the same failure persists (`same_failure`), within ``shrink_budget``
seconds. The minimised problem is what is printed (`harness.fuzz.format`) and saved as a case
file (`harness.cases`), by default under ``reports/runs/cases/`` (ignored by git: a command never
writes into tracked files); copying it to ``cases/regressions/`` keeps it as a regression test.

Time is accounted as the backend's (its ``supports``, ``prepare`` and lookup calls, metamorphic
reruns included) and the harness's (everything else: generation, validation, the reference,
the checks, less the reference's time that overlapped the backend's); `BackendStats` reports
both.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import torch
from hypothesis import Phase, Verbosity, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

from harness.agreement import Oracle, Outcome, Verdict, check_backend_pooling, copy_inputs, mark_known
from harness.backend import Backend, table_dtypes
from harness.cases import Case, load_cases, problem_to_json, save_case
from harness.fuzz.coverage import buckets
from harness.fuzz.metamorphic import RELATIONS, transformed_results, within
from harness.fuzz.minimise import describe_size, minimise
from harness.fuzz.problem_spec import ProblemSpec, build_problem
from harness.fuzz.profiles import register_profiles
from harness.fuzz.results import BackendStats, Failure, FuzzReport
from harness.fuzz.strategies import problem_specs
from harness.model import JaggedBatch, Problem, TableConfig
from harness.progress import Progress
from harness.validate import validate_problem
from harness.weights import make_weights

DEFAULT_SAVE_DIR = Path("reports/runs/cases")
"""Where ``jagbench fuzz`` saves minimised failures unless told otherwise: under the ignored
``reports/runs/``, relative to the working directory."""


class _Unsupported(Exception):
    """A transformed problem that the backend does not support: the relation is not checked."""


class _Stop(BaseException):
    """Ends a Hypothesis run at once: the time budget is spent or a failure was found.

    Not an ``Exception``, so Hypothesis neither shrinks nor replays it.
    """


class TimedBackend:
    """A backend whose ``supports``, ``prepare`` and lookup calls add their time to ``seconds``;
    any other attribute is the wrapped backend's (a known case's scope may test one)."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.name = getattr(backend, "name", type(backend).__name__)
        self.seconds = 0.0

    def __getattr__(self, attribute: str) -> object:
        return getattr(self.backend, attribute)

    def supports(self, tables, batch):
        start = time.perf_counter()
        try:
            return self.backend.supports(tables, batch)
        finally:
            self.seconds += time.perf_counter() - start

    def prepare(self, tables, weights):
        start = time.perf_counter()
        try:
            lookup = self.backend.prepare(tables, weights)
        finally:
            self.seconds += time.perf_counter() - start

        def timed(batch: JaggedBatch) -> torch.Tensor:
            begin = time.perf_counter()
            try:
                return lookup(batch)
            finally:
                self.seconds += time.perf_counter() - begin

        return timed


def _run_backend(backend: Backend, problem: Problem) -> torch.Tensor | None:
    """The backend's result on ``problem``, or None when it does not support it."""
    if backend.supports(problem.tables, problem.batch) is not None:
        return None
    return backend.prepare(problem.tables, problem.weights)(problem.batch)


def judge(backend: Backend, problem: Problem, known: Sequence[Case] = ()) -> tuple[Verdict, Oracle]:
    """Validate ``problem``, compute its oracle and judge ``backend`` on it, known cases applied."""
    batch = validate_problem(problem.tables, problem.batch, problem.weights)
    verdict, oracle = check_backend_pooling(backend, problem.tables, problem.weights, batch)
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
        raised = mark_known([Verdict.of_exception(backend, e, f" [after {relation}]")], running[0], known)[0]
        return None if raised.outcome is Outcome.KNOWN else (raised, running[0])
    if out is None:
        return None
    parts, result = out
    ok, detail = within(result, original, oracle.tolerance)
    if ok:
        return None
    for part in parts:
        verdict, _ = judge(backend, part, known)
        if verdict.failed:
            return replace(verdict, detail=f"{verdict.detail} [after {relation}]"), part
        if verdict.outcome is Outcome.KNOWN:
            return None
    verdict = Verdict(name, Outcome.DISAGREE, f"metamorphic relation {relation} broken: {detail}")
    verdict = mark_known([verdict], problem, known)[0]
    return None if verdict.outcome is Outcome.KNOWN else (verdict, problem)


_EXCEPTION = re.compile(r"^(?:supports\(\) raised )?([A-Za-z_][\w.]*):")


def failure_kind(verdict: Verdict) -> str:
    """What makes two failures "the same" for the minimiser: the outcome, and for an exception its
    type, for a disagreement whether the result's type, shape, dtype or values were wrong."""
    if verdict.outcome is Outcome.RAISED:
        if verdict.observed is not None and verdict.observed.error_types:
            return f"raised {verdict.observed.error_types[0]}"
        m = _EXCEPTION.match(verdict.detail)
        return f"raised {m.group(1) if m else '?'}"
    if verdict.outcome is Outcome.DISAGREE:
        c = verdict.comparison
        if c is None or c.problem is None:
            return "disagree: values" if c is not None else "disagree"
        for what in ("shape", "dtype", "not a tensor"):
            if what in c.problem or (what == "dtype" and "expected torch.float32" in c.problem):
                return f"disagree: {what}"
        return "disagree: result"
    return verdict.outcome.value


def same_failure(
    backend: Backend, verdict: Verdict, known: Sequence[Case]
) -> Callable[[Problem], Verdict | None]:
    """The minimiser's predicate: a candidate's verdict when ``backend`` fails on it as it did in
    ``verdict`` (same kind, `failure_kind`), else None. A candidate the known cases explain is
    not the same failure. Each candidate runs on its own copy (a backend may mutate its input)."""
    kind = failure_kind(verdict)

    def reproduces(candidate: Problem) -> Verdict | None:
        v, _ = judge(backend, copy_problem(candidate), known)
        return v if v.failed and failure_kind(v) == kind else None

    return reproduces


def copy_problem(problem: Problem) -> Problem:
    """A problem with copies of every tensor (the tables' weights and the batch's)."""
    weights, batch = copy_inputs(problem.weights, problem.batch)
    return Problem(problem.tables, weights, batch, dict(problem.metadata))


def _pristine(problem: Problem) -> Callable[[], Problem]:
    """How to get ``problem`` back as generated after a backend may have changed its tensors: a
    problem built from a spec is rebuilt from it (no copy of large tables per example), any
    other is copied now."""
    spec = problem.metadata.get("spec")
    if spec is not None:
        return lambda: build_problem(ProblemSpec.from_json(spec))
    copied = copy_problem(problem)
    return lambda: copied


@dataclass
class _Found:
    problem: Callable[[], Problem]
    verdict: Verdict
    found_by: str


def default_strategy(backend: object) -> st.SearchStrategy[Problem]:
    """What a backend is fuzzed on unless told otherwise: `problems()` over the table dtypes the
    backend declares in an optional ``table_dtypes`` attribute, by default the float dtypes only
    (`harness.backend.table_dtypes`). A backend that reads quantized tables says so, e.g. ``table_dtypes =
    TABLE_DTYPES`` (a quantized-only one ``("int8", "int4", "int2")``): a backend written before
    quantized storage existed is not failed for not knowing it.

    The same examples as `problems()`, built without its `hypothesis.event` calls: the driver
    counts each example's coverage buckets itself, once."""
    return problem_specs(dtypes=table_dtypes(backend)).map(build_problem)


def warm_up(backend: Backend) -> float:
    """Run ``backend`` once on a tiny problem of the first table dtype it declares, before any
    budget starts: the seconds it took. A cold numba cache compiles its kernels here (about 10 s
    on a fresh machine, which would otherwise eat a short time budget whole), the sharded
    backends start their ranks. Whatever it raises or returns is not judged here: the fuzz run
    will meet the same behaviour on its own examples."""
    start = time.perf_counter()
    dtype = table_dtypes(backend)[0]
    tables = (TableConfig("warm_up", 4, 4, ("f",), dtype=dtype),)
    batch = JaggedBatch.from_bags({"f": [[0, 3], []]})
    weights = make_weights(tables, seed=0)
    try:
        if backend.supports(tables, batch) is None:
            backend.prepare(tables, weights)(batch)
    except Exception:  # noqa: BLE001 - judged by the fuzz run itself, on its own examples
        pass
    return time.perf_counter() - start


def fuzz_backend(
    backend: Backend,
    *,
    label: str | None = None,
    max_examples: int | None = None,
    time_budget: float | None = None,
    seed: int = 0,
    save_dir: Path | None = DEFAULT_SAVE_DIR,
    known: Sequence[Case] | None = None,
    strategy: st.SearchStrategy[Problem] | None = None,
    metamorphic: bool = True,
    shrink_budget: float = 60.0,
    threads: int | None = 1,
    progress: Progress | None = None,
) -> tuple[BackendStats, Failure | None]:
    """Fuzz one backend; its statistics and the minimised failure (saved under ``save_dir``), if any.

    Stops at the first failure, after ``max_examples`` or when ``time_budget`` seconds are spent,
    whichever comes first (with neither, after the ``ci`` profile's 60 examples). Minimising a
    failure gets at most ``shrink_budget`` further seconds (the smallest failing problem so far
    is kept). ``label`` names the backend in the saved case (a built-in name or a ``module:ATTR``
    spec that ``jagbench replay`` can load); it defaults to ``backend.name``. The same ``seed``
    and arguments give the same examples (with a time budget, possibly fewer or more of them)
    and the same minimised case (unless the budget cuts minimisation short).

    ``threads`` sets torch's intra-op threads for the run (restored after): fuzz problems are
    small, and on a shared machine the thread hand-off costs more than the work (10x measured).
    ``None`` leaves torch's setting alone, for backends whose threading is under test.
    """
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        progress = progress if progress is not None else Progress()
        warm_up_s = warm_up(backend)
        if warm_up_s >= 1.0:
            progress.note(
                f"{label or getattr(backend, 'name', type(backend).__name__)}: warm-up {warm_up_s:.1f} s "
                "(kernels compiled or loaded, workers started), not counted in the budget"
            )
        return _fuzz_backend(
            backend,
            label or getattr(backend, "name", type(backend).__name__),
            max_examples,
            time_budget,
            seed,
            save_dir,
            load_cases() if known is None else list(known),
            strategy if strategy is not None else default_strategy(backend),
            metamorphic,
            shrink_budget,
            progress,
        )
    finally:
        torch.set_num_threads(before)


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


def _fuzz_backend(
    backend: Backend,
    label: str,
    max_examples: int | None,
    time_budget: float | None,
    seed: int,
    save_dir: Path | None,
    known: list[Case],
    strategy: st.SearchStrategy[Problem],
    metamorphic: bool,
    shrink_budget: float,
    progress: Progress,
) -> tuple[BackendStats, Failure | None]:
    timed = TimedBackend(backend)
    stats = BackendStats(label)
    start = time.monotonic()
    deadline = start + time_budget if time_budget else None
    found: list[_Found] = []
    relation = st.sampled_from((None, None, *RELATIONS)) if metamorphic else st.just(None)
    if time_budget:
        progress.start(f"fuzz {label}", total=time_budget, unit="s")
    else:
        progress.start(
            f"fuzz {label}", total=max_examples or settings.get_profile("ci").max_examples, unit="ex"
        )

    @hypothesis_seed(seed)
    @_settings(max_examples, time_budget)
    @given(strategy, relation, st.integers(0, 2**31 - 1))
    def prop(problem: Problem, relation_name: str | None, relation_seed: int) -> None:
        if deadline is not None and time.monotonic() > deadline:
            raise _Stop
        pristine = _pristine(problem)
        verdict, oracle = judge(timed, problem, known)
        failing, found_by = pristine, "the reference check"
        if verdict.outcome is Outcome.AGREE and relation_name is not None:
            broken = check_relation(timed, problem, oracle, relation_name, relation_seed, known)
            if broken is not None:
                verdict, transformed = broken
                failing, found_by = (lambda: transformed), f"the metamorphic relation {relation_name!r}"
        stats.count(verdict, relation_name is not None, buckets(problem))
        elapsed = time.monotonic() - start
        progress.update(
            elapsed if time_budget else stats.examples,
            examples=stats.examples,
            agreed=stats.agreed,
            known=stats.known,
            unsupported=stats.unsupported,
        )
        if verdict.failed:
            found.append(_Found(failing, verdict, found_by))
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
    known: list[Case],
    seed: int,
    save_dir: Path | None,
    shrink_budget: float,
    progress: Progress,
) -> Failure:
    original = found.problem()
    progress.note(
        f"fuzz {label}: {found.verdict.outcome.value} after {stats.examples} examples "
        f"({stats.seconds:.1f} s); minimising it (at most {shrink_budget:g} s)"
    )
    result = minimise(
        _without_spec(original),
        found.verdict,
        same_failure(backend, found.verdict, known),
        budget=shrink_budget,
    )
    failure = Failure(
        backend=label,
        problem=result.problem,
        verdict=result.verdict,
        found_by=found.found_by,
        seconds_to_find=stats.seconds,
        examples_to_find=stats.examples,
        original_size=describe_size(original),
        minimised=result,
        spec=original.metadata.get("spec"),
    )
    progress.note(
        f"fuzz {label}: minimised in {result.steps} steps, {result.seconds:.1f} s"
        + ("" if result.complete else " (budget spent before a fixed point)")
    )
    if save_dir is not None:
        failure.case_path = save_case(_regression_case(failure, seed), Path(save_dir))
    return failure


def _without_spec(problem: Problem) -> Problem:
    """The problem without its generating spec: once minimised, the spec no longer describes it."""
    metadata = {k: v for k, v in problem.metadata.items() if k != "spec"}
    return Problem(problem.tables, problem.weights, problem.batch, metadata)


def regression_name(backend: str, problem_json: object, infix: str = "") -> str:
    """A saved failure's name: the backend, made file-safe, and a digest of its problem."""
    digest = hashlib.sha1(json.dumps(problem_json, sort_keys=True).encode()).hexdigest()[:10]
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", backend).strip("-") or "backend"
    return f"{safe}-{infix}{digest}"


def regression_found(failure: object, *, by: str, minimised_by: str, size: str) -> dict[str, object]:
    """A saved failure's ``found`` record: how and when it was found and minimised (a forward
    `Failure` or a training one: the same fields)."""
    m = failure.minimised
    found: dict[str, object] = {
        "by": f"{by} ({failure.found_by})",
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "seconds_to_find": round(failure.seconds_to_find, 2),
        "examples_to_find": failure.examples_to_find,
    }
    if m is not None:
        found["minimised"] = {
            "by": minimised_by,
            "steps": m.steps,
            "attempts": m.attempts,
            "seconds": round(m.seconds, 2),
            "fixed_point": m.complete,
            "from": failure.original_size,
            "to": size,
        }
    if failure.spec is not None:
        found["generated_from"] = failure.spec
    return found


def _regression_case(failure: Failure, seed: int) -> Case:
    found = regression_found(
        failure,
        by=f"jagbench fuzz --seed {seed}",
        minimised_by="harness.fuzz.minimise",
        size=describe_size(failure.problem),
    )
    problem_json = problem_to_json(failure.problem)
    return Case(
        name=regression_name(failure.backend, problem_json),
        kind="regression",
        backend=failure.backend,
        summary=f"{failure.verdict.outcome.value}: {failure.verdict.detail}",
        expect="agree",
        problem=failure.problem,
        problem_json=problem_json,
        found=found,
    )


def fuzz_each(
    backends: Sequence[Backend],
    labels: Sequence[str] | None,
    time_budget: float | None,
    run: Callable[[Backend, str | None, float | None], tuple[BackendStats, object | None]],
) -> tuple[list[BackendStats], list]:
    """Fuzz each backend in turn with ``run(backend, label, its share of time_budget)``: every
    one's statistics, and the failures found (forward and training runs alike)."""
    if labels is not None and len(labels) != len(backends):
        raise ValueError(f"{len(labels)} labels for {len(backends)} backends")
    each = time_budget / len(backends) if time_budget and backends else None
    stats, failures = [], []
    for i, backend in enumerate(backends):
        s, failure = run(backend, labels[i] if labels is not None else None, each)
        stats.append(s)
        if failure is not None:
            failures.append(failure)
    return stats, failures


def fuzz(
    backends: Sequence[Backend],
    *,
    labels: Sequence[str] | None = None,
    max_examples: int | None = None,
    time_budget: float | None = None,
    seed: int = 0,
    save_dir: Path | None = DEFAULT_SAVE_DIR,
    known: Sequence[Case] | None = None,
    strategy: st.SearchStrategy[Problem] | None = None,
    shrink_budget: float = 60.0,
    threads: int | None = 1,
    progress: Progress | None = None,
) -> FuzzReport:
    """Fuzz each backend in turn (what ``jagbench fuzz`` runs); ``time_budget`` is split evenly.

    ``threads`` sets torch's intra-op threads for the run (restored after): fuzz problems are
    small, and on a shared machine the thread hand-off costs more than the work (10x measured).
    ``None`` leaves torch's setting alone, for backends whose threading is under test.
    """
    known = load_cases() if known is None else list(known)
    stats, failures = fuzz_each(
        backends,
        labels,
        time_budget,
        lambda backend, label, each: fuzz_backend(
            backend,
            label=label,
            max_examples=max_examples,
            time_budget=each,
            seed=seed,
            save_dir=save_dir,
            known=known,
            strategy=strategy,
            shrink_budget=shrink_budget,
            threads=threads,
            progress=progress,
        ),
    )
    return FuzzReport(stats, failures, settings=_run_settings(max_examples, time_budget, seed, shrink_budget))


def _run_settings(
    max_examples: int | None, time_budget: float | None, seed: int, shrink_budget: float
) -> Mapping[str, object]:
    return {
        "max_examples": max_examples,
        "time_budget": time_budget,
        "seed": seed,
        "shrink_budget": shrink_budget,
    }
