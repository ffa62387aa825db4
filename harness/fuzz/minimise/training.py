"""Minimising a failing training problem: fewer steps, simpler gradients and optimizer, and the
forward passes applied to every step's batch consistently.

A training problem is tables, starting weights, an optimizer and steps, each a batch and its
grad_output. `minimise_training` runs `TRAINING_PASSES` in order and repeatedly, to a fixed point,
under a time budget, keeping a candidate only when it is smaller in the total order
(`training_smaller`) and the same failure persists (the ``reproduces`` predicate), as the forward
minimiser does (`harness.fuzz.minimise.engine`). The passes:

- training passes: drop steps; let a later step reuse the first step's batch; the optimizer
  towards sgd, no weight decay, a learning rate of 1; grad_output towards zeros and small
  integers (all of it, each step's, then runs of elements); fewer samples of a batch (the rows of
  grad_output of every step over that batch go with them); fewer columns of a table (the columns
  of grad_output of its features go with them);
- the forward passes (`harness.fuzz.minimise.passes`) *lifted*: they run on one forward problem
  whose batch is every distinct batch of the steps side by side (`ForwardView`), so an edit of a
  table (drop it, compact its rows, float32 it, merge it with its neighbour), of the features or
  of the ids is made to every step's batch at once, and a step that reuses a batch keeps reusing
  it. The edited view is split back into the steps (`ForwardView.split`); grad_output keeps the
  columns of the features that remain. The forward passes that change a batch's size or a
  table's dim are not lifted (the training passes above do that, with grad_output).

Like the forward minimiser, nothing is random: the same failing problem and predicate always give
the same result unless the time budget cuts it short.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch

from harness.fuzz.minimise import edits, passes
from harness.fuzz.minimise.engine import OutOfTime, element_costs, value_cost
from harness.model import JaggedBatch, Pooling, Problem, TableConfig, output_columns
from harness.training.contract import OptimizerConfig
from harness.training.problem import StepInput, TrainingProblem
from harness.validate import ProblemError

TrainingReproduces = Callable[[TrainingProblem], object | None]
"""The failure predicate: the verdict on a candidate when it fails in the same way, else None."""

CHUNK_LIMIT = 64
"""Most candidates one granularity of a run-removing search may take."""

_KIND_RANK = {"sgd": 0, "adagrad": 1, "rowwise_adagrad": 2}
_MODE_RANK = {"none": 0, "l2": 1, "decoupled": 2}
_DTYPE_RANK = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


@dataclass
class MinimisedTraining:
    """What minimisation produced: the smallest failing training problem found and how."""

    problem: TrainingProblem
    verdict: object
    steps: int
    attempts: int
    seconds: float
    complete: bool
    """True when a fixed point was reached, False when the budget ran out first."""
    steps_by_pass: Counter = field(default_factory=Counter)


# -- the batches of a training problem ---------------------------------------------------------


def same_batch(a: JaggedBatch, b: JaggedBatch) -> bool:
    """The same keys, ids (and id dtype), lengths and per-sample weights."""
    if a is b:
        return True
    if a.keys != b.keys or a.values.dtype != b.values.dtype:
        return False
    if not (torch.equal(a.values, b.values) and torch.equal(a.lengths, b.lengths)):
        return False
    if (a.weights is None) != (b.weights is None):
        return False
    return a.weights is None or torch.equal(a.weights, b.weights)


def distinct_batches(problem: TrainingProblem) -> tuple[list[JaggedBatch], list[int]]:
    """The steps' batches without repeats (equal ones are one), and each step's index into them."""
    batches: list[JaggedBatch] = []
    index = []
    for s in problem.steps:
        for j, b in enumerate(batches):
            if same_batch(s.batch, b):
                index.append(j)
                break
        else:
            index.append(len(batches))
            batches.append(s.batch)
    return batches, index


def with_steps(problem: TrainingProblem, steps: Sequence[StepInput], **changes: object) -> TrainingProblem:
    """``problem`` with other steps (equal batches made one object, so a case stores them once)
    and optionally other ``tables``, ``weights`` or ``optimizer``."""
    shared: list[JaggedBatch] = []
    out = []
    for s in steps:
        batch = next((b for b in shared if same_batch(s.batch, b)), None)
        if batch is None:
            shared.append(s.batch)
            batch = s.batch
        out.append(s if batch is s.batch else StepInput(batch, s.grad_output))
    return TrainingProblem(
        tuple(changes.get("tables", problem.tables)),
        dict(changes.get("weights", problem.weights)),
        changes.get("optimizer", problem.optimizer),
        tuple(out),
        dict(problem.metadata),
    )


def grad_columns(
    old: Sequence[TableConfig],
    new: Sequence[TableConfig],
    source: Callable[[str, int], Sequence[int]] | None = None,
) -> torch.Tensor | None:
    """For each column of the new tables' output, the old column it comes from (by feature):
    ``source(table, dim)`` gives the old table columns a table keeps (default: the same ones,
    which needs the same dim). None when a new feature has no old columns to come from."""
    before = {feature: (first, dim) for _, feature, first, dim in output_columns(old)}
    index: list[int] = []
    for table, feature, _, dim in output_columns(new):
        if feature not in before:
            return None
        first, old_dim = before[feature]
        columns = source(table, dim) if source is not None else None
        if columns is None:
            if dim != old_dim:
                return None
            columns = range(dim)
        index.extend(first + c for c in columns)
    return torch.tensor(index, dtype=torch.int64)


# -- the total order -----------------------------------------------------------------------------


def _batches(p: TrainingProblem) -> list[JaggedBatch]:
    return distinct_batches(p)[0]


def _keys_in_table_order(p: TrainingProblem, b: JaggedBatch) -> bool:
    return list(b.keys) == [f for t in p.tables for f in t.feature_names]


def _grad_cost(p: TrainingProblem) -> float:
    return sum(float(element_costs(s.grad_output).sum()) for s in p.steps if s.grad_output.numel())


def _optimizer_values(o: OptimizerConfig) -> float:
    values = [o.learning_rate] + ([o.weight_decay] if o.weight_decay_mode != "none" else [])
    return float(element_costs(torch.tensor(values, dtype=torch.float64)).sum())


def _value_cost(p: TrainingProblem) -> float:
    tables = sum(value_cost(w) for w in p.weights.values())
    return tables + sum(value_cost(b.weights) for b in _batches(p) if b.weights is not None)


TRAINING_SIZE_ORDER: tuple[tuple[str, Callable[[TrainingProblem], float]], ...] = (
    ("steps", lambda p: len(p.steps)),
    ("batches", lambda p: len(_batches(p))),
    ("tables", lambda p: len(p.tables)),
    ("features", lambda p: sum(len(b.keys) for b in _batches(p))),
    ("samples", lambda p: sum(b.batch_size for b in _batches(p))),
    ("ids", lambda p: sum(len(b.values) for b in _batches(p))),
    ("dims", lambda p: sum(t.embedding_dim for t in p.tables)),
    ("rows", lambda p: sum(t.num_embeddings for t in p.tables)),
    ("weighted", lambda p: sum(b.weights is not None for b in _batches(p))),
    ("dtypes", lambda p: sum(_DTYPE_RANK.get(t.dtype, 3) for t in p.tables)),
    ("mean tables", lambda p: sum(t.pooling is Pooling.MEAN for t in p.tables)),
    ("int32 ids", lambda p: sum(b.values.dtype != torch.int64 for b in _batches(p))),
    ("keys out of table order", lambda p: sum(not _keys_in_table_order(p, b) for b in _batches(p))),
    ("optimizer kind", lambda p: _KIND_RANK[p.optimizer.kind]),
    ("weight decay mode", lambda p: _MODE_RANK[p.optimizer.weight_decay_mode]),
    ("id sum", lambda p: sum(int(b.values.to(torch.int64).sum()) for b in _batches(p) if len(b.values))),
    ("grad_output cost", _grad_cost),
    ("optimizer values", lambda p: _optimizer_values(p.optimizer)),
    ("value cost", _value_cost),
)
"""The total order of training problems, most significant first (lexicographic): fewer steps
and distinct batches before anything else, then the forward sizes over the distinct batches,
then a simpler optimizer, then simpler values."""


def training_smaller(a: TrainingProblem, b: TrainingProblem, b_key: dict[str, float] | None = None) -> bool:
    """Whether ``a`` comes strictly before ``b`` in `TRAINING_SIZE_ORDER`; ``b_key`` caches ``b``'s
    components between calls."""
    cache = {} if b_key is None else b_key
    for name, measure in TRAINING_SIZE_ORDER:
        if name not in cache:
            cache[name] = measure(b)
        x, y = measure(a), cache[name]
        if x != y:
            return x < y
    return False


def describe_training_size(p: TrainingProblem) -> dict[str, int]:
    """The sizes that say how small a case is: steps, distinct batches, then the forward sizes
    (`harness.fuzz.minimise.describe_size`) over the distinct batches (samples and ids summed,
    the longest bag of any)."""
    batches = _batches(p)
    lengths = [int(b.lengths.max()) for b in batches if len(b.lengths)]
    return {
        "steps": len(p.steps),
        "batches": len(batches),
        "tables": len(p.tables),
        "features": max((len(b.keys) for b in batches), default=0),
        "samples": sum(b.batch_size for b in batches),
        "ids": sum(len(b.values) for b in batches),
        "longest_bag": max(lengths, default=0),
        "max_dim": max((t.embedding_dim for t in p.tables), default=0),
        "rows": sum(t.num_embeddings for t in p.tables),
    }


# -- the shrinker --------------------------------------------------------------------------------


class TrainingShrinker:
    """The current smallest failing training problem, and the one way to replace it (`attempt`)."""

    def __init__(
        self, problem: TrainingProblem, verdict: object, reproduces: TrainingReproduces, deadline: float
    ) -> None:
        self.current = problem
        self.verdict = verdict
        self.reproduces = reproduces
        self.deadline = deadline
        self.steps = 0
        self.attempts = 0
        self.steps_by_pass: Counter = Counter()
        self.pass_name = ""
        self._key: dict[str, float] = {}

    def attempt(self, candidate: TrainingProblem | None) -> bool:
        """Keep ``candidate`` if it is smaller than the current problem and fails the same way."""
        if candidate is None or not training_smaller(candidate, self.current, self._key):
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


@dataclass(frozen=True)
class TrainingPass:
    """A named shrink pass: ``run(shrinker)`` proposes candidates through `TrainingShrinker.attempt`."""

    name: str
    run: Callable[[TrainingShrinker], None]


def _drop_runs(
    s: TrainingShrinker,
    count: Callable[[TrainingProblem], int],
    without: Callable[[TrainingProblem, range], TrainingProblem | None],
    *,
    min_keep: int = 0,
) -> None:
    """Remove runs ``[i, j)`` of units while the failure persists, largest runs first (at most
    `CHUNK_LIMIT` candidates per run length)."""
    size = count(s.current)
    while size >= 1:
        n = count(s.current)
        if n <= min_keep:
            return
        size = min(size, n)
        if -(-n // size) > CHUNK_LIMIT:
            return
        start = 0
        while start < count(s.current):
            n = count(s.current)
            stop = min(start + size, n)
            if n - (stop - start) >= min_keep and s.attempt(without(s.current, range(start, stop))):
                continue
            start += size
        if size == 1:
            return
        size = (size + 1) // 2


# -- the forward view: the forward passes on every step's batch at once --------------------------


def _concat_samples(batches: Sequence[JaggedBatch]) -> JaggedBatch:
    """The batches' samples side by side (feature-major, like every batch): same keys."""
    keys = batches[0].keys
    values, lengths, weights = [], [], []
    for f in range(len(keys)):
        for b in batches:
            n = b.batch_size
            offsets = b.offsets
            lo, hi = int(offsets[f * n]), int(offsets[(f + 1) * n])
            values.append(b.values[lo:hi])
            lengths.append(b.lengths[f * n : (f + 1) * n])
            if b.weights is not None:
                weights.append(b.weights[lo:hi])
    first = batches[0]
    return JaggedBatch(
        keys,
        torch.cat([first.values[:0], *values]),
        torch.cat([first.lengths[:0], *lengths]),
        None if first.weights is None else torch.cat([first.weights[:0], *weights]),
    )


class ForwardView:
    """A training problem's distinct batches side by side as one forward `Problem` (`problem`),
    and the way back (`split`). None of it when the batches cannot stand side by side (other
    keys, id dtypes or weightedness)."""

    def __init__(self, training: TrainingProblem) -> None:
        self.training = training
        self.batches, self.index = distinct_batches(training)
        first = self.batches[0]
        self.problem: Problem | None = None
        if all(
            b.keys == first.keys
            and b.values.dtype == first.values.dtype
            and (b.weights is None) == (first.weights is None)
            for b in self.batches
        ):
            merged = _concat_samples(self.batches)
            self.problem = Problem(training.tables, training.weights, merged, dict(training.metadata))

    def split(self, candidate: Problem) -> TrainingProblem | None:
        """The training problem of an edited view: its batch cut back into the distinct batches
        (the same sizes: an edit that changed them is not one this view can split), grad_output
        keeping the columns of the features that remain. None when it cannot be split."""
        sizes = [b.batch_size for b in self.batches]
        if candidate.batch.batch_size != sum(sizes):
            return None
        columns = grad_columns(self.training.tables, candidate.tables)
        if columns is None:
            return None
        pieces = []
        start = 0
        for n in sizes:
            pieces.append(candidate.batch.select_samples(start, start + n))
            start += n
        steps = [
            StepInput(pieces[j], s.grad_output[:, columns].clone())
            for s, j in zip(self.training.steps, self.index, strict=True)
        ]
        return with_steps(self.training, steps, tables=candidate.tables, weights=candidate.weights)


class _Lifted:
    """What a forward pass sees of a `TrainingShrinker`: ``current`` (the forward view's problem)
    and ``attempt`` (a forward candidate, split back and tried as a training problem)."""

    def __init__(self, shrinker: TrainingShrinker) -> None:
        self.shrinker = shrinker
        self._view: ForwardView | None = None

    @property
    def view(self) -> ForwardView:
        if self._view is None or self._view.training is not self.shrinker.current:
            self._view = ForwardView(self.shrinker.current)
        return self._view

    @property
    def current(self) -> Problem:
        return self.view.problem

    def attempt(self, candidate: Problem | None) -> bool:
        if candidate is None:
            return False
        return self.shrinker.attempt(self.view.split(candidate))


def lifted(forward: passes.Pass) -> TrainingPass:
    """A forward pass run on every step's batch at once (`ForwardView`)."""

    def run(s: TrainingShrinker) -> None:
        proxy = _Lifted(s)
        if proxy.view.problem is not None:
            forward.run(proxy)  # type: ignore[arg-type]  # it reads only .current and .attempt

    return TrainingPass(forward.name, run)


# -- the training passes -------------------------------------------------------------------------


def drop_steps(s: TrainingShrinker) -> None:
    def without(p: TrainingProblem, r: range) -> TrainingProblem:
        return with_steps(p, [st for i, st in enumerate(p.steps) if i not in r])

    _drop_runs(s, lambda p: len(p.steps), without, min_keep=1)


def reuse_first_batch(s: TrainingShrinker) -> None:
    """Every later step over the first step's batch (when of the same size), then each one."""

    def reused(p: TrainingProblem, which: Sequence[int]) -> TrainingProblem | None:
        first = p.steps[0].batch
        steps = list(p.steps)
        changed = False
        for i in which:
            b = steps[i].batch
            if not same_batch(b, first) and b.batch_size == first.batch_size:
                steps[i] = StepInput(first, steps[i].grad_output)
                changed = True
        return with_steps(p, steps) if changed else None

    later = range(1, len(s.current.steps))
    if len(later) > 1:
        s.attempt(reused(s.current, later))
    for i in range(1, len(s.current.steps)):
        s.attempt(reused(s.current, [i]))


def simpler_optimizer(s: TrainingShrinker) -> None:
    """sgd (or adagrad from rowwise_adagrad), no weight decay, weight decay 1, learning rate 1:
    each change tried on the optimizer as it is by then."""
    changes: tuple[dict[str, object], ...] = (
        {"kind": "sgd"},
        {"kind": "adagrad"},
        {"weight_decay_mode": "none", "weight_decay": 0.0},
        {"weight_decay": 1.0},
        {"learning_rate": 1.0},
    )
    for change in changes:
        o = s.current.optimizer
        if change.get("kind") == "adagrad" and o.kind != "rowwise_adagrad":
            continue
        if "weight_decay_mode" not in change and "weight_decay" in change and o.weight_decay_mode == "none":
            continue
        candidate = replace(o, **change)
        if candidate != o:
            s.attempt(with_steps(s.current, s.current.steps, optimizer=candidate))


def _samples_of(p: TrainingProblem, batch: int, keep: torch.Tensor) -> TrainingProblem:
    """Batch ``batch`` (of `distinct_batches`) keeping the samples where ``keep`` holds, with the
    same rows of grad_output of every step over it."""
    batches, index = distinct_batches(p)
    b = batches[batch]
    kept = edits.restrict(Problem(p.tables, p.weights, b), samples=keep).batch
    steps = [
        StepInput(kept, s.grad_output[keep].clone()) if j == batch else s
        for s, j in zip(p.steps, index, strict=True)
    ]
    return with_steps(p, steps)


def drop_samples(s: TrainingShrinker) -> None:
    """For each distinct batch: its first ``k`` samples for the smallest ``k``, then runs of
    samples dropped anywhere (grad_output's rows go with them)."""
    j = 0
    while j < len(distinct_batches(s.current)[0]):
        size = distinct_batches(s.current)[0][j].batch_size

        def first(p: TrainingProblem, k: int, j: int = j) -> TrainingProblem | None:
            batches, _ = distinct_batches(p)
            if j >= len(batches):
                return None
            return _samples_of(p, j, torch.arange(batches[j].batch_size) < k)

        passes.smallest(s, 0, size, first)  # type: ignore[arg-type]  # reads .current, .attempt

        def without(p: TrainingProblem, r: range, j: int = j) -> TrainingProblem | None:
            batches, _ = distinct_batches(p)
            if j >= len(batches):
                return None
            keep = torch.ones(batches[j].batch_size, dtype=torch.bool)
            keep[r.start : r.stop] = False
            return _samples_of(p, j, keep)

        def count(p: TrainingProblem, j: int = j) -> int:
            batches, _ = distinct_batches(p)
            return batches[j].batch_size if j < len(batches) else 0

        _drop_runs(s, count, without)
        j += 1


def _with_columns(p: TrainingProblem, table: int, columns: Sequence[int]) -> TrainingProblem:
    """Table ``table`` keeping only its columns ``columns`` (grad_output's columns of its
    features go with them)."""
    forward = edits.with_columns(
        Problem(p.tables, p.weights, p.steps[0].batch), table, torch.tensor(list(columns), dtype=torch.int64)
    )
    name = p.tables[table].name
    index = grad_columns(p.tables, forward.tables, lambda t, dim: list(columns) if t == name else None)
    steps = [StepInput(s.batch, s.grad_output[:, index].clone()) for s in p.steps]
    return with_steps(p, steps, tables=forward.tables, weights=forward.weights)


def fewer_columns(s: TrainingShrinker) -> None:
    """Every table's dim 1 at once; then each table's smallest column prefix; then runs of its
    columns dropped anywhere (grad_output's columns go with them)."""
    every = s.current
    for i, t in enumerate(s.current.tables):
        if t.embedding_dim > 1:
            every = _with_columns(every, i, [0])
    if every is not s.current:
        s.attempt(every)
    for i in range(len(s.current.tables)):
        dim = s.current.tables[i].embedding_dim
        if dim > 1:
            passes.smallest(s, 1, dim, lambda p, d, i=i: _with_columns(p, i, range(d)))  # type: ignore[arg-type]

        def without(p: TrainingProblem, r: range, i: int = i) -> TrainingProblem:
            keep = [c for c in range(p.tables[i].embedding_dim) if c not in r]
            return _with_columns(p, i, keep)

        _drop_runs(s, lambda p, i=i: p.tables[i].embedding_dim, without, min_keep=1)


def _rounded(x: torch.Tensor) -> torch.Tensor:
    """Each value as a nearby small integer: rounded, at least 1 in magnitude, at most 64."""
    v = x.to(torch.float64)
    r = torch.round(v).clamp(-64, 64)
    r = torch.where((r == 0) & (v != 0), torch.sign(v), r)
    return torch.where(torch.isfinite(v), r, torch.sign(v).nan_to_num(0.0)).to(x.dtype)


def _grads_replaced(p: TrainingProblem, where: torch.Tensor, to: Callable[[torch.Tensor], torch.Tensor]):
    """``to`` applied to the grad_output elements at flat positions ``where`` (over every step's
    grad_output in turn)."""
    flat = torch.cat([s.grad_output.reshape(-1) for s in p.steps])
    flat = flat.clone()
    flat[where] = to(flat[where])
    steps, start = [], 0
    for s in p.steps:
        n = s.grad_output.numel()
        steps.append(StepInput(s.batch, flat[start : start + n].reshape(s.grad_output.shape).clone()))
        start += n
    return with_steps(p, steps)


def simpler_gradients(s: TrainingShrinker) -> None:
    """grad_output towards zeros, then towards small integers: all of it, each step's, then runs
    of its elements, while the failure persists."""
    for to in (torch.zeros_like, _rounded):

        def units(p: TrainingProblem, to=to) -> torch.Tensor:
            flat = torch.cat([st.grad_output.reshape(-1) for st in p.steps])
            return torch.nonzero(element_costs(to(flat)) < element_costs(flat)).reshape(-1)

        todo = units(s.current)
        if not len(todo):
            continue
        if s.attempt(_grads_replaced(s.current, todo, to)):
            continue
        start = 0
        for st in s.current.steps:
            n = st.grad_output.numel()
            mine = todo[(todo >= start) & (todo < start + n)]
            if 0 < len(mine) < len(todo):
                s.attempt(_grads_replaced(s.current, mine, to))
            start += n
        size = len(units(s.current))
        while size >= 1:
            todo = units(s.current)
            if not len(todo):
                break
            size = min(size, len(todo))
            if -(-len(todo) // size) > CHUNK_LIMIT:
                break
            start = 0
            while start < len(todo):
                if s.attempt(_grads_replaced(s.current, todo[start : start + size], to)):
                    todo = units(s.current)
                    continue
                start += size
            if size == 1:
                break
            size = (size + 1) // 2


_LIFTED = {p.name: lifted(p) for p in passes.PASSES}

TRAINING_PASSES: tuple[TrainingPass, ...] = (
    TrainingPass("drop-steps", drop_steps),
    TrainingPass("reuse-first-batch", reuse_first_batch),
    TrainingPass("simpler-optimizer", simpler_optimizer),
    _LIFTED["drop-tables"],
    _LIFTED["drop-features"],
    _LIFTED["cut-bags"],
    _LIFTED["drop-ids"],
    TrainingPass("drop-samples", drop_samples),
    _LIFTED["shorten-bags"],
    _LIFTED["drop-sample-weights"],
    TrainingPass("fewer-columns", fewer_columns),
    _LIFTED["compact-rows"],
    _LIFTED["simplify-ids"],
    _LIFTED["trim-rows"],
    _LIFTED["float32-tables"],
    _LIFTED["sum-pooling"],
    _LIFTED["int64-ids"],
    _LIFTED["keys-in-table-order"],
    _LIFTED["merge-tables"],
    TrainingPass("simpler-gradients", simpler_gradients),
    _LIFTED["simplify-values"],
)
"""Every training pass, in the order the minimiser runs them each round (the forward ones by
their forward names: `harness.fuzz.minimise.passes`)."""


def minimise_training(
    problem: TrainingProblem,
    verdict: object,
    reproduces: TrainingReproduces,
    *,
    budget: float,
    passes: Sequence[TrainingPass] = TRAINING_PASSES,
) -> MinimisedTraining:
    """The smallest training problem on which ``reproduces`` still reports the same failure,
    found within ``budget`` seconds; ``problem`` (failing with ``verdict``) is never modified."""
    start = time.monotonic()
    shrinker = TrainingShrinker(problem, verdict, reproduces, start + budget)
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
    return MinimisedTraining(
        shrinker.current,
        shrinker.verdict,
        shrinker.steps,
        shrinker.attempts,
        time.monotonic() - start,
        complete,
        shrinker.steps_by_pass,
    )
