"""The minimiser's loop: named passes, run in order and repeatedly to a fixed point, under a budget.

A pass proposes simpler candidates of the current problem through `Shrinker.attempt`, which keeps
a candidate only when it is smaller in the total order `smaller` and the failure persists (the
``reproduces`` predicate: same backend, same kind of failure; a candidate that a known case
explains, or that is not a valid problem, does not). The passes run in order; when a whole round
changes nothing, the problem is a fixed point of every pass and minimisation ends. Nothing is
random and every pass tries its candidates in a fixed order, smaller first, so the same failing
problem always minimises to the same result, unless the time budget cuts it short.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from harness.agreement import Verdict
from harness.model import Pooling, Problem
from harness.quantized import QuantizedTable
from harness.validate import ProblemError

Reproduces = Callable[[Problem], Verdict | None]
"""The failure predicate: the verdict on a candidate when it fails in the same way, else None."""

_DTYPE_RANK = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, "int8": 3, "int4": 4, "int2": 5}


class OutOfTime(Exception):
    """The minimisation budget is spent: the smallest failing problem so far is the result."""


@dataclass(frozen=True)
class Pass:
    """A named shrink pass: ``run(shrinker)`` proposes candidates through `Shrinker.attempt`."""

    name: str
    run: Callable[[Shrinker], None]


@dataclass
class Minimised:
    """What minimisation produced: the smallest failing problem found and how it got there."""

    problem: Problem
    verdict: Verdict
    steps: int
    attempts: int
    seconds: float
    complete: bool
    """True when a fixed point was reached, False when the budget ran out first."""
    steps_by_pass: Counter = field(default_factory=Counter)


def element_costs(x: torch.Tensor) -> torch.Tensor:
    """How far each value is from a simple one: 0 for 0 and 1, ``1 + |x|`` for other integers up
    to 64 in magnitude, 1000 for anything else (fractions, huge, subnormal, inf, NaN)."""
    v = x.detach().to(torch.float64)
    simple = (v == 0) | (v == 1)
    integer = torch.isfinite(v) & (v == torch.round(v)) & (v.abs() <= 64)
    return torch.where(simple, 0.0, torch.where(integer, 1.0 + v.abs(), 1000.0))


def flat_values(w: torch.Tensor | QuantizedTable) -> torch.Tensor:
    """A table's stored numbers as one float64 vector (a quantized table's codes, scales, biases)."""
    if isinstance(w, QuantizedTable):
        return torch.cat([w.codes.reshape(-1).double(), w.scale.double(), w.bias.double()])
    return w.reshape(-1).to(torch.float64)


def value_cost(x: torch.Tensor | QuantizedTable) -> float:
    """The summed `element_costs` of a tensor (of a quantized table's `flat_values`)."""
    if isinstance(x, QuantizedTable):
        x = flat_values(x)
    return float(element_costs(x).sum()) if x.numel() else 0.0


def _keys_in_table_order(p: Problem) -> bool:
    return list(p.batch.keys) == [f for t in p.tables for f in t.feature_names]


class _CostCache:
    """`value_cost` per tensor, remembered by identity: candidates share the tensors they leave
    unchanged, so only the edited one is measured again."""

    def __init__(self) -> None:
        self._costs: dict[int, tuple[torch.Tensor, float]] = {}

    def __call__(self, x: torch.Tensor) -> float:
        hit = self._costs.get(id(x))
        if hit is not None and hit[0] is x:
            return hit[1]
        if len(self._costs) > 4096:
            self._costs.clear()
        cost = value_cost(x)
        self._costs[id(x)] = (x, cost)
        return cost


def _value_cost(p: Problem, cost: Callable[[torch.Tensor], float] = value_cost) -> float:
    tables = sum(cost(w) for w in p.weights.values())
    return tables + (0.0 if p.batch.weights is None else cost(p.batch.weights))


# The total order, most significant first. Each entry is cheap to compute except the last one,
# which `smaller` only reaches when everything before it is equal.
SIZE_ORDER: tuple[tuple[str, Callable[[Problem], float]], ...] = (
    ("tables", lambda p: len(p.tables)),
    ("features", lambda p: len(p.batch.keys)),
    ("samples", lambda p: p.batch.batch_size),
    ("ids", lambda p: len(p.batch.values)),
    ("dims", lambda p: sum(t.embedding_dim for t in p.tables)),
    ("rows", lambda p: sum(t.num_embeddings for t in p.tables)),
    ("weighted", lambda p: int(p.batch.weights is not None)),
    ("dtypes", lambda p: sum(_DTYPE_RANK[t.dtype] for t in p.tables)),
    ("mean tables", lambda p: sum(t.pooling is Pooling.MEAN for t in p.tables)),
    ("int32 ids", lambda p: int(p.batch.values.dtype != torch.int64)),
    ("keys out of table order", lambda p: int(not _keys_in_table_order(p))),
    ("id sum", lambda p: int(p.batch.values.to(torch.int64).sum()) if len(p.batch.values) else 0),
    ("value cost", _value_cost),
)


def smaller(
    a: Problem,
    b: Problem,
    b_key: dict[str, float] | None = None,
    cost: Callable[[torch.Tensor], float] | None = None,
) -> bool:
    """Whether ``a`` comes strictly before ``b`` in the total order `SIZE_ORDER` (lexicographic).

    ``b_key`` caches ``b``'s components between calls (filled in as they are computed); ``cost``
    measures one tensor's `value_cost` (a caching one, say).
    """
    cache = {} if b_key is None else b_key
    for name, measure in SIZE_ORDER:
        if name == "value cost" and cost is not None:
            x, y = _value_cost(a, cost), cache.get(name)
            if y is None:
                y = cache[name] = _value_cost(b, cost)
        else:
            if name not in cache:
                cache[name] = measure(b)
            x, y = measure(a), cache[name]
        if x != y:
            return x < y
    return False


def describe_size(p: Problem) -> dict[str, int]:
    """The sizes that say how small a case is: tables, features, samples, ids, longest bag, dims."""
    lengths = p.batch.lengths
    return {
        "tables": len(p.tables),
        "features": len(p.batch.keys),
        "samples": p.batch.batch_size,
        "ids": len(p.batch.values),
        "longest_bag": int(lengths.max()) if len(lengths) else 0,
        "max_dim": max((t.embedding_dim for t in p.tables), default=0),
        "rows": sum(t.num_embeddings for t in p.tables),
    }


class Shrinker:
    """The current smallest failing problem, and the one way to replace it (`attempt`)."""

    def __init__(self, problem: Problem, verdict: Verdict, reproduces: Reproduces, deadline: float) -> None:
        self.current = problem
        self.verdict = verdict
        self.reproduces = reproduces
        self.deadline = deadline
        self.steps = 0
        self.attempts = 0
        self.steps_by_pass: Counter = Counter()
        self.pass_name = ""
        self._key: dict[str, float] = {}
        self._cost = _CostCache()

    def attempt(self, candidate: Problem | None) -> bool:
        """Keep ``candidate`` if it is smaller than the current problem and fails the same way."""
        if candidate is None or not smaller(candidate, self.current, self._key, self._cost):
            return False
        if time.monotonic() > self.deadline:
            raise OutOfTime
        self.attempts += 1
        try:
            verdict = self.reproduces(candidate)
        except ProblemError:
            return False
        if verdict is None:
            return False
        self.current, self.verdict, self._key = candidate, verdict, {}
        self.steps += 1
        self.steps_by_pass[self.pass_name] += 1
        return True


def run_passes(
    problem: Problem, verdict: Verdict, reproduces: Reproduces, passes: Sequence[Pass], *, budget: float
) -> Minimised:
    """Run ``passes`` in order, round after round, until a round changes nothing or ``budget``
    seconds are spent; the smallest problem that ``reproduces`` still fails on.

    ``problem`` must fail (``verdict`` is its verdict); it is never modified.
    """
    start = time.monotonic()
    shrinker = Shrinker(problem, verdict, reproduces, start + budget)
    complete = False
    try:
        while True:
            before = shrinker.steps
            for p in passes:
                shrinker.pass_name = p.name
                p.run(shrinker)
            if shrinker.steps == before:
                complete = True
                break
    except OutOfTime:
        pass
    return Minimised(
        shrinker.current,
        shrinker.verdict,
        shrinker.steps,
        shrinker.attempts,
        time.monotonic() - start,
        complete,
        shrinker.steps_by_pass,
    )
