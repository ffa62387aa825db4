"""The training check: one training backend judged on one training problem, step by step.

`check_training`:

1. validates the whole problem (`harness.training.validate`) before the backend sees any of it;
2. asks ``supports_training`` about every step's batch (a reason: `Outcome.UNSUPPORTED`);
3. calls ``prepare_training`` once and the step once per step, in order;
4. on every step compares with the oracle (`harness.training.oracle`), which starts each step from
   the weights the backend returned after the previous one: the forward output, every row of
   every table (touched rows under the update's bound, the others bit for bit) and the per-sample
   weight gradient (None exactly when the batch has no per-sample weights);
5. checks that no input was changed: the caller's weights, every batch, every grad_output.

An exception on valid input is a failure (`Outcome.RAISED`), a changed input `Outcome.MUTATED`,
a value outside its bound `Outcome.DISAGREE`: the verdict names the step, the quantity (output
sample and column with its feature; table, row and column; the id of a per-sample weight), the
value got, the value expected and the bound. When a step leaves non-finite weights (float32 may
overflow where the analysis allows it) the later steps cannot be judged and the verdict says so.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from harness.agreement import Outcome
from harness.backend import can_train
from harness.model import JaggedBatch, TableConfig
from harness.tolerance import FINITE, Comparison, compare
from harness.training.contract import OptimizerConfig
from harness.training.oracle import ExpectedStep, TrainingOracle
from harness.training.problem import TrainingProblem
from harness.training.validate import column_owner, validate_training_problem
from harness.validate import IdPolicy


@dataclass(frozen=True)
class TrainingVerdict:
    """One backend's result on one training problem.

    ``step`` is the step that failed (0-based; None when none did); ``steps_judged`` how many steps
    were compared; ``unconstrained`` how many updated elements, over those steps, the analysis could
    not bound (float32 may overflow there); ``worst_ratio`` the largest error / bound seen.
    """

    backend: str
    outcome: Outcome
    detail: str
    step: int | None = None
    steps_judged: int = 0
    unconstrained: int = 0
    worst_ratio: float = 0.0

    @property
    def failed(self) -> bool:
        return self.outcome in (Outcome.DISAGREE, Outcome.RAISED, Outcome.MUTATED)


@dataclass(frozen=True, eq=False)
class StepResult:
    """What the harness keeps of one step's `TrainResult`: copies on the CPU."""

    output: object
    weights: dict[str, torch.Tensor]
    per_sample_weight_grad: object


class ResultError(Exception):
    """A step returned something that is not a `TrainResult` of the problem's tables."""


def keep_result(result: object, tables: Sequence[TableConfig]) -> StepResult:
    """Copy a step's result (views are allowed: the backend may reuse them); `ResultError` when it
    is not a `TrainResult` with a tensor for every table and no other."""
    for attr in ("output", "weights", "per_sample_weight_grad"):
        if not hasattr(result, attr):
            raise ResultError(
                f"the step returned a {type(result).__name__} without {attr!r}, not a TrainResult"
            )
    weights = result.weights
    if not isinstance(weights, Mapping):
        raise ResultError(
            f"TrainResult.weights is a {type(weights).__name__}, not a mapping of table name to tensor"
        )
    names = [t.name for t in tables]
    for extra in sorted(set(weights) - set(names)):
        raise ResultError(f"TrainResult.weights has {extra!r}, which is not a table")
    kept = {}
    for name in names:
        if name not in weights:
            raise ResultError(f"TrainResult.weights has no table {name!r}")
        w = weights[name]
        if not isinstance(w, torch.Tensor):
            raise ResultError(f"TrainResult.weights[{name!r}] is a {type(w).__name__}, not a tensor")
        kept[name] = w.detach().to("cpu", copy=True)

    def copy(x: object) -> object:
        return x.detach().to("cpu", copy=True) if isinstance(x, torch.Tensor) else x

    return StepResult(copy(result.output), kept, copy(result.per_sample_weight_grad))


def _inputs(problem: TrainingProblem) -> list[tuple[str, torch.Tensor]]:
    out = [(f"weights of table {name!r}", w) for name, w in problem.weights.items()]
    many = len(problem.steps) > 1
    for i, s in enumerate(problem.steps):
        at = f" of step {i}" if many else ""
        out += [(f"batch values{at}", s.batch.values), (f"batch lengths{at}", s.batch.lengths)]
        if s.batch.weights is not None:
            out.append((f"batch per-sample weights{at}", s.batch.weights))
        out.append((f"grad_output{at}", s.grad_output))
    return out


def _changed(snapshot: list[tuple[str, torch.Tensor, torch.Tensor]]) -> str | None:
    for what, tensor, copy in snapshot:
        if tensor.shape != copy.shape or not torch.equal(tensor, copy):
            return f"the backend changed its input: {what}"
    return None


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a float tensor, so that -0.0 and 0.0 (and NaN payloads) differ."""
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _ratio_text(c: Comparison) -> str:
    return f"bound {c.worst_bound:.3g}, error / bound {c.worst_ratio:.3g}"


def _describe_id(batch: JaggedBatch, position: int) -> str:
    offsets = batch.offsets
    bag = int(torch.searchsorted(offsets, position, right=True)) - 1
    b = batch.batch_size
    return (
        f"id {position} (feature {batch.keys[bag // b]!r}, sample {bag % b}, position "
        f"{position - int(offsets[bag])} in its bag, row {int(batch.values[position])})"
    )


@dataclass
class _Judgement:
    failures: list[str]
    worst: float = 0.0

    def note(self, c: Comparison) -> None:
        if c.problem is None and math.isfinite(c.worst_ratio):
            self.worst = max(self.worst, c.worst_ratio)


def _judge_output(j: _Judgement, tables: Sequence[TableConfig], got: object, expected: ExpectedStep) -> None:
    c = compare(got, expected.reference.forward.value, expected.output_tolerance)
    j.note(c)
    if c.agree:
        return
    if c.problem is not None:
        j.failures.append(f"output: {c.problem}")
        return
    sample, column = c.worst_index
    j.failures.append(
        f"output sample {sample}, column {column} ({column_owner(tables, column)}): got {c.worst_value!r}, "
        f"expected {c.worst_reference!r}, {_ratio_text(c)}"
    )


def _judge_table(
    j: _Judgement, table: TableConfig, got: torch.Tensor, before: torch.Tensor, expected
) -> None:
    name = table.name
    shape = (table.num_embeddings, table.embedding_dim)
    if tuple(got.shape) != shape:
        j.failures.append(f"table {name!r}: weights have shape {tuple(got.shape)}, expected {shape}")
        return
    if got.dtype != table.dtype:
        j.failures.append(
            f"table {name!r}: weights are {got.dtype}, expected {table.dtype} (the table's dtype)"
        )
        return
    untouched = torch.ones(table.num_embeddings, dtype=torch.bool)
    untouched[expected.rows] = False
    same = _bits(got) == _bits(before)
    moved = untouched & ~same.all(dim=1)
    if bool(moved.any()):
        row = int(moved.nonzero()[0])
        col = int((~same[row]).nonzero()[0])
        j.failures.append(
            f"table {name!r} row {row} does not occur in the batch but changed: column {col} was "
            f"{float(before[row, col])!r}, now {float(got[row, col])!r} "
            "(untouched rows must stay bit-identical)"
        )
    if len(expected.rows) == 0:
        return
    c = compare(got[expected.rows].to(torch.float32), expected.after, expected.tolerance)
    j.note(c)
    if not c.agree:
        i, col = c.worst_index
        row = int(expected.rows[i])
        n = int(expected.occurrences[i])
        j.failures.append(
            f"table {name!r} row {row}, column {col} ({n} occurrence{'s' if n != 1 else ''} in the batch): "
            f"got {c.worst_value!r}, expected {c.worst_reference!r}, {_ratio_text(c)}"
        )


def _judge_psw(j: _Judgement, batch: JaggedBatch, got: object, expected: ExpectedStep) -> None:
    if batch.weights is None:
        if got is not None:
            j.failures.append(
                "per_sample_weight_grad: expected None (the batch has no per-sample weights), "
                f"got a {type(got).__name__}"
            )
        return
    if got is None:
        j.failures.append("per_sample_weight_grad: got None, but the batch has per-sample weights")
        return
    c = compare(got, expected.reference.per_sample_weight_grad, expected.psw_tolerance)
    j.note(c)
    if c.agree:
        return
    if c.problem is not None:
        j.failures.append(f"per_sample_weight_grad: {c.problem}")
        return
    (position,) = c.worst_index
    j.failures.append(
        f"per_sample_weight_grad of {_describe_id(batch, position)}: got {c.worst_value!r}, "
        f"expected {c.worst_reference!r}, {_ratio_text(c)}"
    )


def judge_step(
    tables: Sequence[TableConfig],
    batch: JaggedBatch,
    before: Mapping[str, torch.Tensor],
    result: StepResult,
    expected: ExpectedStep,
) -> tuple[list[str], float]:
    """Every failure of one step's result (one line each: output, each table, the per-sample
    weight gradient) and the worst error / bound seen."""
    j = _Judgement([])
    _judge_output(j, tables, result.output, expected)
    for t in tables:
        _judge_table(j, t, result.weights[t.name], before[t.name], expected.tables[t.name])
    _judge_psw(j, batch, result.per_sample_weight_grad, expected)
    return j.failures, j.worst


def _left_non_finite(weights: Mapping[str, torch.Tensor], expected: ExpectedStep) -> bool:
    """Whether an accepted step left a non-finite weight: only possible in touched rows whose
    tolerance allows one (untouched rows are bit-identical to finite ones), so only those are read."""
    for name, table in expected.tables.items():
        loose = (table.tolerance.classes != FINITE).any(dim=1)
        if bool(loose.any()) and not bool(torch.isfinite(weights[name][table.rows[loose]]).all()):
            return True
    return False


def _name(backend: object) -> str:
    return getattr(backend, "name", type(backend).__name__)


def check_training(
    backend: object, problem: TrainingProblem, *, id_policy: IdPolicy = "reject", validated: bool = False
) -> TrainingVerdict:
    """Judge ``backend`` on ``problem`` (module docstring). Raises `harness.validate.ProblemError`
    for a malformed problem, before the backend runs; ``validated=True`` skips that check."""
    if not validated:
        problem = validate_training_problem(problem, id_policy=id_policy)
    name = _name(backend)
    if not can_train(backend):
        return TrainingVerdict(
            name, Outcome.UNSUPPORTED, "the backend does not train (no supports_training / prepare_training)"
        )
    tables, optimizer = problem.tables, problem.optimizer
    n_steps = len(problem.steps)
    for i, s in enumerate(problem.steps):
        try:
            reason = backend.supports_training(tables, s.batch, optimizer)
        except Exception as e:  # noqa: BLE001 - a backend's exception is the verdict
            return TrainingVerdict(
                name, Outcome.RAISED, f"supports_training() raised {type(e).__name__}: {e}", step=i
            )
        if reason is not None:
            return TrainingVerdict(name, Outcome.UNSUPPORTED, reason)
    snapshot = [(what, t, t.clone()) for what, t in _inputs(problem)]
    try:
        step_fn = backend.prepare_training(tables, problem.weights, optimizer)
    except Exception as e:  # noqa: BLE001
        return TrainingVerdict(name, Outcome.RAISED, f"prepare_training() raised {type(e).__name__}: {e}")
    oracle = TrainingOracle(tables, optimizer)
    current = {t.name: problem.weights[t.name].clone() for t in tables}
    worst = 0.0
    unconstrained = 0
    for i, s in enumerate(problem.steps):
        at = f"step {i} of {n_steps}" if n_steps > 1 else "the step"
        try:
            result = keep_result(step_fn(s.batch, s.grad_output), tables)
        except ResultError as e:
            return TrainingVerdict(name, Outcome.DISAGREE, f"{at}: {e}", i, i, unconstrained, math.inf)
        except Exception as e:  # noqa: BLE001
            return TrainingVerdict(
                name, Outcome.RAISED, f"{at} raised {type(e).__name__}: {e}", i, i, unconstrained, worst
            )
        changed = _changed(snapshot)
        if changed is not None:
            return TrainingVerdict(name, Outcome.MUTATED, f"{at}: {changed}", i, i, unconstrained, worst)
        expected = oracle.step(current, s.batch, s.grad_output)
        failures, ratio = judge_step(tables, s.batch, current, result, expected)
        worst = max(worst, ratio)
        unconstrained += expected.unconstrained
        if failures:
            detail = f"{at} ({optimizer.describe()}): " + "; ".join(failures)
            return TrainingVerdict(
                name, Outcome.DISAGREE, detail, i, i + 1, unconstrained, worst if worst > 1 else math.inf
            )
        current = result.weights
        if i + 1 < n_steps and _left_non_finite(current, expected):
            detail = (
                f"{i + 1} of {n_steps} steps agree; step {i} left non-finite weights (allowed where float32 "
                f"may overflow), so the later steps are not judged"
            )
            return TrainingVerdict(name, Outcome.AGREE, detail, None, i + 1, unconstrained, worst)
    note = (
        f"; {unconstrained} updated elements unbounded (float32 may overflow there)" if unconstrained else ""
    )
    what = f"{n_steps} steps agree" if n_steps > 1 else "the step agrees"
    return TrainingVerdict(
        name,
        Outcome.AGREE,
        f"{what} ({optimizer.describe()}; worst error / bound {worst:.3g}{note})",
        None,
        n_steps,
        unconstrained,
        worst,
    )


def run_training(
    backend: object,
    tables: Sequence[TableConfig],
    weights: Mapping[str, torch.Tensor],
    optimizer: OptimizerConfig,
    steps: Sequence[tuple[JaggedBatch, torch.Tensor]],
) -> list[StepResult]:
    """The backend's results of ``steps`` on one prepared instance (copies; exceptions propagate).
    For relations between runs (`harness.training.metamorphic`); validate first."""
    step_fn = backend.prepare_training(tables, weights, optimizer)
    return [keep_result(step_fn(batch, grad), tables) for batch, grad in steps]
