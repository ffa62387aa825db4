"""Where a fuzz run's time goes: the floor that generation alone sets, and a run's breakdown.

Not a test and not the benchmark suite: a measurement for issue-style questions ("how many
examples per second can ``jagbench fuzz`` reach, and what is the harness's share?").

1. **Generation floor.** The fuzz driver's ``@given`` (the problem strategy, the metamorphic
   relation and its seed) under the driver's own settings (`driver._settings`) around a test
   body that does nothing: Hypothesis's engine and the draws alone; then with `build_problem`, the
   seeded bulk data; and, for scale, the same decorator over one integer draw.
2. **Breakdown of a run.** `fuzz_backend` on a backend for a time budget, with a timer around each
   of the driver's steps (no profiler: cProfile doubles the cost of pure Python code).

    .venv/bin/python scripts/probe_fuzz_speed.py --seconds 15
    .venv/bin/python scripts/probe_fuzz_speed.py --backend docs/examples/mykernel.py:K --skip-floor

Times overlap: `check_backend_pooling` holds the backend's lookup and the oracle, which on a large
problem runs on a second thread beside it; `check_relation` holds the backend's reruns.
"""

from __future__ import annotations

import argparse
import functools
import time
from collections import Counter
from collections.abc import Callable

from hypothesis import given
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

from harness import agreement
from harness.backend import load_backend
from harness.fuzz import driver
from harness.fuzz.metamorphic import RELATIONS
from harness.fuzz.problem_spec import build_problem
from harness.fuzz.strategies import problem_specs


class _Stop(BaseException):
    """Ends the Hypothesis run when the time is up (not an Exception: Hypothesis does not catch it)."""


def generation_ms(strategy: st.SearchStrategy, seconds: float) -> tuple[int, float]:
    """Examples drawn in ``seconds`` by the driver's decorator around a no-op body, and ms each."""
    count, start = [0], time.perf_counter()
    relation = st.sampled_from((None, None, *RELATIONS))

    @hypothesis_seed(0)
    @driver._settings(None, seconds)
    @given(strategy, relation, st.integers(0, 2**31 - 1))
    def body(problem: object, relation_name: str | None, relation_seed: int) -> None:
        count[0] += 1
        if time.perf_counter() - start > seconds:
            raise _Stop

    try:
        body()
    except _Stop:
        pass
    elapsed = time.perf_counter() - start
    return count[0], 1e3 * elapsed / count[0]


def _timed(module: object, name: str, totals: Counter, calls: Counter) -> None:
    """Replace ``module.name`` by a wrapper that adds its wall time to ``totals[name]``."""
    inner: Callable = getattr(module, name)

    @functools.wraps(inner)
    def wrapper(*args: object, **kwargs: object) -> object:
        begin = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            totals[name] += time.perf_counter() - begin
            calls[name] += 1

    setattr(module, name, wrapper)


def breakdown(backend_spec: str, seconds: float) -> None:
    totals: Counter = Counter()
    calls: Counter = Counter()
    for name in ("build_problem", "validate_problem", "check_backend_pooling", "check_relation", "buckets"):
        _timed(driver, name, totals, calls)
    for name in ("copy_inputs", "_mutated", "judge_result"):
        _timed(agreement, name, totals, calls)
    oracle_of = agreement.Oracle.of.__func__

    def timed_oracle(cls: type, *args: object, **kwargs: object) -> object:
        begin = time.perf_counter()
        try:
            return oracle_of(cls, *args, **kwargs)
        finally:
            totals["Oracle.of"] += time.perf_counter() - begin
            calls["Oracle.of"] += 1

    agreement.Oracle.of = classmethod(timed_oracle)
    stats, _ = driver.fuzz_backend(load_backend(backend_spec), time_budget=seconds, seed=0, save_dir=None)
    n = stats.examples
    steps = ("validate_problem", "check_backend_pooling", "check_relation", "buckets")
    inside = sum(totals[k] for k in steps)
    print(
        f"\n{backend_spec}: {n} examples in {stats.seconds:.1f} s, {n / stats.seconds:.1f} examples/s, "
        f"harness share {stats.harness_share:.0%}; per example, ms:"
    )
    print(f"  {'backend (its supports, prepare, lookups)':44s} {1e3 * stats.backend_seconds / n:7.2f}")
    outside = 1e3 * (stats.seconds - inside) / n - 1e3 * totals["build_problem"] / n
    print(f"  {'Hypothesis (engine and draws)':44s} {outside:7.2f}")
    for name, total in totals.most_common():
        print(f"  {name:44s} {1e3 * total / n:7.2f}   ({calls[name]} calls)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--backend", default="docs/examples/mykernel.py:K")
    parser.add_argument("--skip-floor", action="store_true")
    args = parser.parse_args()
    if not args.skip_floor:
        print("generation floor (a no-op test body), ms per example:")
        for label, strategy in (
            ("one integer", st.integers()),
            ("problem_specs()", problem_specs()),
            ("problem_specs().map(build_problem)", problem_specs().map(build_problem)),
        ):
            n, ms = generation_ms(strategy, args.seconds)
            print(f"  {label:44s} {ms:7.2f}   ({n} examples, {1e3 / ms:.0f}/s at most)")
    breakdown(args.backend, args.seconds)


if __name__ == "__main__":
    main()
