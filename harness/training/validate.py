"""Validation of training problems: every error names what is wrong and where, before any backend runs.

On top of the forward problem's checks (`harness.validate`, reused as they are):

- the optimizer (`validate_optimizer`): a known kind and weight-decay mode; a learning rate, eps
  and weight decay that are real numbers, finite, and within float32's normal range (a float32
  backend holds them to its precision: the tolerance counts one rounding of each); a positive
  eps for the adagrad kinds (with eps = 0 a touched row whose gradient is zero divides 0 by 0);
  a weight decay of zero or more;
- the tables (`check_float_tables`): float32, float16 or bfloat16 (a quantized table is not trained);
- the table weights (`check_finite_weights`): finite, because a NaN or infinite weight makes the
  value of an update depend on the order of operations, which no tolerance can bound;
- each grad_output (`validate_grad_output`): a float32 CPU tensor of shape ``[batch_size,
  total_dim]`` holding finite values (a non-finite one is named by sample and column, with the
  feature and table the column belongs to).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from harness.model import SUPPORTED_DTYPES, JaggedBatch, TableConfig, dtype_name, output_columns, total_dim
from harness.training.contract import OPTIMIZER_KINDS, WEIGHT_DECAY_MODES, OptimizerConfig
from harness.training.problem import StepInput, TrainingProblem
from harness.validate import IdPolicy, ProblemError, validate_problem

FLOAT32_TINY = float(torch.finfo(torch.float32).tiny)
FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def _check_real(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ProblemError(f"optimizer {name} must be a real number, got {value!r} ({type(value).__name__})")
    x = float(value)
    if not math.isfinite(x):
        raise ProblemError(f"optimizer {name} must be finite, got {x!r}")
    return x


def _check_float32_range(name: str, x: float) -> None:
    if x < FLOAT32_TINY:
        raise ProblemError(
            f"optimizer {name}={x!r} is below float32's smallest normal number {FLOAT32_TINY:.8g}: "
            "a float32 backend cannot hold it to its precision"
        )
    if x > FLOAT32_MAX:
        raise ProblemError(
            f"optimizer {name}={x!r} is above float32's largest finite number {FLOAT32_MAX:.8g}"
        )


def validate_optimizer(optimizer: OptimizerConfig) -> None:
    """Check an `OptimizerConfig` (module docstring); raises `ProblemError` naming the field."""
    if not isinstance(optimizer, OptimizerConfig):
        raise ProblemError(f"optimizer is a {type(optimizer).__name__}, not an OptimizerConfig")
    if optimizer.kind not in OPTIMIZER_KINDS:
        raise ProblemError(
            f"unknown optimizer kind {optimizer.kind!r}; expected one of {list(OPTIMIZER_KINDS)}"
        )
    if optimizer.weight_decay_mode not in WEIGHT_DECAY_MODES:
        raise ProblemError(
            f"unknown weight_decay_mode {optimizer.weight_decay_mode!r}; "
            f"expected one of {list(WEIGHT_DECAY_MODES)}"
        )
    lr = _check_real("learning_rate", optimizer.learning_rate)
    if lr <= 0:
        raise ProblemError(f"optimizer learning_rate must be positive, got {lr!r}")
    _check_float32_range("learning_rate", lr)
    eps = _check_real("eps", optimizer.eps)
    if eps < 0:
        raise ProblemError(f"optimizer eps must not be negative, got {eps!r}")
    if optimizer.has_state:
        if eps == 0:
            raise ProblemError(
                f"optimizer eps must be positive for {optimizer.kind}: with eps = 0 a touched row "
                "whose gradient is zero divides 0 by 0"
            )
        _check_float32_range("eps", eps)
    decay = _check_real("weight_decay", optimizer.weight_decay)
    if decay < 0:
        raise ProblemError(f"optimizer weight_decay must not be negative, got {decay!r}")
    if decay != 0:
        _check_float32_range("weight_decay", decay)


def check_float_tables(tables: Sequence[TableConfig]) -> None:
    """Training updates float tables only (DESIGN.md: rounded once to the table's float dtype)."""
    for t in tables if isinstance(tables, Sequence) else ():
        if isinstance(t, TableConfig) and t.dtype not in SUPPORTED_DTYPES:
            raise ProblemError(
                f"table {t.name!r} is stored as {t.dtype}: training needs a float table "
                f"({', '.join(dtype_name(d) for d in SUPPORTED_DTYPES)})"
            )


def check_finite_weights(tables: Sequence[TableConfig], weights: Mapping[str, torch.Tensor]) -> None:
    """Every weight of every table is finite (training needs it; see the module docstring)."""
    for t in tables:
        w = weights[t.name]
        if w.numel() == 0 or bool(torch.isfinite(w).all()):
            continue
        bad = (~torch.isfinite(w)).nonzero()[0]
        row, col = int(bad[0]), int(bad[1])
        raise ProblemError(
            f"table {t.name!r} has a non-finite weight {float(w[row, col])!r} at row {row}, column {col}: "
            "training needs finite weights (the update of a NaN or infinite weight has no "
            "order-independent value)"
        )


def column_owner(tables: Sequence[TableConfig], column: int) -> str:
    """``"feature 'f1' of table 't0', its column 3"``: what an output column belongs to."""
    for table, feature, start, dim in output_columns(tables):
        if start <= column < start + dim:
            return f"feature {feature!r} of table {table!r}, its column {column - start}"
    return "no feature"


def validate_grad_output(
    tables: Sequence[TableConfig], batch: JaggedBatch, grad_output: object, *, where: str = ""
) -> None:
    """``grad_output`` is a finite float32 CPU ``[batch_size, total_dim]`` tensor; ``where`` prefixes
    the error (e.g. ``"step 2: "``)."""
    what = f"{where}grad_output"
    if not isinstance(grad_output, torch.Tensor):
        raise ProblemError(f"{what} is a {type(grad_output).__name__}, not a tensor")
    expected = (batch.batch_size, total_dim(tables))
    if tuple(grad_output.shape) != expected:
        raise ProblemError(
            f"{what} has shape {tuple(grad_output.shape)}, expected {expected} "
            f"([batch_size, total_dim]: {expected[0]} samples, {expected[1]} output columns)"
        )
    if grad_output.dtype != torch.float32:
        raise ProblemError(f"{what} is {dtype_name(grad_output.dtype)}, expected float32")
    if grad_output.device.type != "cpu":
        raise ProblemError(f"{what} is on {grad_output.device}; pass it on the CPU (backends move it)")
    if grad_output.numel() == 0 or bool(torch.isfinite(grad_output).all()):
        return
    bad = (~torch.isfinite(grad_output)).nonzero()[0]
    sample, column = int(bad[0]), int(bad[1])
    raise ProblemError(
        f"{what} holds a non-finite value {float(grad_output[sample, column])!r} at sample {sample}, "
        f"column {column} ({column_owner(tables, column)})"
    )


def validate_training_step(
    tables: Sequence[TableConfig],
    batch: JaggedBatch,
    grad_output: object,
    weights: Mapping[str, torch.Tensor] | None = None,
    *,
    id_policy: IdPolicy = "reject",
    where: str = "",
) -> JaggedBatch:
    """One step's problem: the forward checks (`harness.validate.validate_problem`), finite
    weights when given, and ``grad_output``. Returns the batch the backends get (see
    `validate_problem` for the id policy)."""
    check_float_tables(tables)
    try:
        batch = validate_problem(tables, batch, weights, id_policy=id_policy)
    except ProblemError as e:
        if not where:
            raise
        raise ProblemError(f"{where}{e}") from e
    if weights is not None:
        check_finite_weights(tables, weights)
    validate_grad_output(tables, batch, grad_output, where=where)
    return batch


def validate_training_problem(problem: TrainingProblem, *, id_policy: IdPolicy = "reject") -> TrainingProblem:
    """Check a whole training problem; return it with each step's batch as the backends get it.

    Raises `ProblemError` naming the first thing wrong (and the step, when there are several).
    """
    if not isinstance(problem, TrainingProblem):
        raise ProblemError(f"a training problem is a TrainingProblem, got {type(problem).__name__}")
    validate_optimizer(problem.optimizer)
    if not problem.steps:
        raise ProblemError("a training problem needs at least one step")
    steps = []
    for i, s in enumerate(problem.steps):
        if not isinstance(s, StepInput):
            raise ProblemError(f"step {i} is a {type(s).__name__}, not a StepInput")
        where = f"step {i}: " if len(problem.steps) > 1 else ""
        weights = problem.weights if i == 0 else None
        batch = validate_training_step(
            problem.tables, s.batch, s.grad_output, weights, id_policy=id_policy, where=where
        )
        steps.append(s if batch is s.batch else StepInput(batch, s.grad_output))
    if all(a is b for a, b in zip(steps, problem.steps, strict=True)):
        return problem
    return TrainingProblem(problem.tables, problem.weights, problem.optimizer, tuple(steps), problem.metadata)
