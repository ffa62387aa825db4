"""Our own minimiser of concrete failing problems (Hypothesis shrinks seeded data poorly).

Once the fuzz driver finds a failure it stops Hypothesis and minimises the problem itself:
`minimise` runs the named passes of `passes.PASSES` (drop tables, features, samples, ids; halve
dims; compact rows; simplify ids and values; simpler dtypes, pooling, id dtype and key order) in
order and repeatedly, to a fixed point, under a time budget. A candidate is kept only while the
same failure persists (`engine.Shrinker.attempt`) and only when it is smaller in a total order
(`engine.SIZE_ORDER`), so the result is deterministic. `edits` holds the vectorised problem edits
the passes are made of.
"""

from __future__ import annotations

from collections.abc import Sequence

from harness.agreement import Verdict
from harness.fuzz.minimise.engine import Minimised, Pass, Reproduces, describe_size, run_passes, smaller
from harness.fuzz.minimise.passes import PASSES
from harness.model import Problem

__all__ = ["PASSES", "Minimised", "Pass", "Reproduces", "describe_size", "minimise", "smaller"]


def minimise(
    problem: Problem,
    verdict: Verdict,
    reproduces: Reproduces,
    *,
    budget: float,
    passes: Sequence[Pass] = PASSES,
) -> Minimised:
    """The smallest problem on which ``reproduces`` still reports the same failure, found within
    ``budget`` seconds; ``problem`` (failing with ``verdict``) is never modified."""
    return run_passes(problem, verdict, reproduces, passes, budget=budget)
