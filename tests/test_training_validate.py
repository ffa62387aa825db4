"""Validation of training problems: each malformed input gets an error naming what and where,
before any backend runs."""

from __future__ import annotations

import math

import pytest
import torch

from harness.model import JaggedBatch, Pooling, TableConfig
from harness.training.check import check_training
from harness.training.contract import OptimizerConfig
from harness.training.problem import TrainingProblem
from harness.training.validate import validate_grad_output, validate_optimizer, validate_training_problem
from harness.validate import ProblemError

TABLES = (
    TableConfig("t0", 6, 4, ("f0", "f1")),
    TableConfig("t1", 5, 3, ("f2",), Pooling.MEAN),
)
BATCH = JaggedBatch.from_bags({"f0": [[1, 1], [3]], "f1": [[2], []], "f2": [[0, 4], [4]]})
WEIGHTS = {"t0": torch.ones(6, 4), "t1": torch.ones(5, 3)}
SGD = OptimizerConfig("sgd", 0.1)


def grad(**changes) -> torch.Tensor:
    g = torch.zeros(2, 11)
    for (sample, col), value in changes.get("at", {}).items():
        g[sample, col] = value
    return g


def problem(optimizer=SGD, steps=None, weights=WEIGHTS) -> TrainingProblem:
    return TrainingProblem.of(TABLES, weights, optimizer, steps or [(BATCH, grad())])


def test_a_valid_problem_passes_and_comes_back_unchanged():
    p = problem()
    assert validate_training_problem(p) is p


@pytest.mark.parametrize(
    ("optimizer", "message"),
    [
        (OptimizerConfig("adam", 0.1), "unknown optimizer kind 'adam'"),
        (OptimizerConfig("sgd", 0.1, weight_decay_mode="l1"), "unknown weight_decay_mode 'l1'"),
        (OptimizerConfig("sgd", math.nan), "learning_rate must be finite"),
        (OptimizerConfig("sgd", math.inf), "learning_rate must be finite"),
        (OptimizerConfig("sgd", 0.0), "learning_rate must be positive, got 0.0"),
        (OptimizerConfig("sgd", -1.0), "learning_rate must be positive"),
        (OptimizerConfig("sgd", True), "learning_rate must be a real number"),
        (OptimizerConfig("sgd", "0.1"), "learning_rate must be a real number"),
        (OptimizerConfig("sgd", 1e-40), "below float32's smallest normal"),
        (OptimizerConfig("sgd", 1e39), "above float32's largest finite"),
        (OptimizerConfig("adagrad", 0.1, eps=-1e-8), "eps must not be negative"),
        (OptimizerConfig("adagrad", 0.1, eps=math.nan), "eps must be finite"),
        (OptimizerConfig("rowwise_adagrad", 0.1, eps=0.0), "eps must be positive for rowwise_adagrad"),
        (OptimizerConfig("adagrad", 0.1, eps=1e-45), "eps=1e-45 is below float32's smallest normal"),
        (
            OptimizerConfig("sgd", 0.1, weight_decay=-0.1, weight_decay_mode="l2"),
            "weight_decay must not be negative",
        ),
        (
            OptimizerConfig("sgd", 0.1, weight_decay=math.inf, weight_decay_mode="l2"),
            "weight_decay must be finite",
        ),
    ],
)
def test_bad_optimizers_are_named(optimizer, message):
    with pytest.raises(ProblemError, match=message.replace("(", r"\(")):
        validate_optimizer(optimizer)
    with pytest.raises(ProblemError, match=message.replace("(", r"\(")):
        validate_training_problem(problem(optimizer))


def test_eps_zero_is_fine_for_sgd_and_decay_zero_in_any_mode():
    validate_optimizer(OptimizerConfig("sgd", 0.1, eps=0.0))
    for mode in ("none", "l2", "decoupled"):
        validate_optimizer(OptimizerConfig("rowwise_adagrad", 0.1, weight_decay=0.0, weight_decay_mode=mode))


def test_not_an_optimizer():
    with pytest.raises(ProblemError, match="not an OptimizerConfig"):
        validate_optimizer({"kind": "sgd"})


@pytest.mark.parametrize(
    ("grad_output", "message"),
    [
        ([[0.0] * 11] * 2, "grad_output is a list, not a tensor"),
        (torch.zeros(2, 10), r"shape \(2, 10\), expected \(2, 11\)"),
        (torch.zeros(3, 11), r"shape \(3, 11\), expected \(2, 11\)"),
        (torch.zeros(22), r"shape \(22,\)"),
        (torch.zeros(2, 11, dtype=torch.float64), "grad_output is float64, expected float32"),
        (torch.zeros(2, 11, dtype=torch.float16), "grad_output is float16, expected float32"),
        (torch.zeros(2, 11, device="meta"), "grad_output is on meta"),
    ],
)
def test_bad_grad_outputs_are_named(grad_output, message):
    with pytest.raises(ProblemError, match=message):
        validate_grad_output(TABLES, BATCH, grad_output)


@pytest.mark.parametrize(
    ("column", "owner"),
    [(1, "feature 'f0' of table 't0', its column 1"), (6, "feature 'f1' of table 't0', its column 2"),
     (10, "feature 'f2' of table 't1', its column 2")],
)  # fmt: skip
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_a_non_finite_grad_output_names_sample_column_feature_and_table(column, owner, value):
    g = grad(at={(1, column): value})
    with pytest.raises(ProblemError) as e:
        validate_grad_output(TABLES, BATCH, g)
    assert f"non-finite value {value!r} at sample 1, column {column} ({owner})" in str(e.value)


def test_non_finite_table_weights_are_named():
    w = {"t0": torch.ones(6, 4), "t1": torch.ones(5, 3)}
    w["t1"][3, 2] = math.nan
    with pytest.raises(ProblemError, match="table 't1' has a non-finite weight nan at row 3, column 2"):
        validate_training_problem(problem(weights=w))


def test_the_forward_checks_apply_and_name_the_step():
    bad = JaggedBatch.from_bags({"f0": [[1], [9]], "f1": [[2], []], "f2": [[0], [4]]})
    with pytest.raises(ProblemError, match=r"^step 1: id out of range: feature 'f0', sample 1"):
        validate_training_problem(problem(steps=[(BATCH, grad()), (bad, grad())]))
    with pytest.raises(ProblemError, match="^step 1: grad_output has shape"):
        validate_training_problem(problem(steps=[(BATCH, grad()), (BATCH, torch.zeros(2, 3))]))


def test_no_steps():
    with pytest.raises(ProblemError, match="at least one step"):
        validate_training_problem(TrainingProblem(TABLES, WEIGHTS, SGD, ()))


def test_the_check_validates_before_the_backend_runs():
    calls = []

    class Recorder:
        name = "recorder"

        def supports(self, tables, batch):
            calls.append("supports")

        def prepare(self, tables, weights):
            calls.append("prepare")

        def supports_training(self, tables, batch, optimizer):
            calls.append("supports_training")

        def prepare_training(self, tables, weights, optimizer):
            calls.append("prepare_training")

    with pytest.raises(ProblemError):
        check_training(Recorder(), problem(OptimizerConfig("sgd", -1.0)))
    with pytest.raises(ProblemError):
        check_training(Recorder(), problem(steps=[(BATCH, torch.zeros(2, 3))]))
    assert calls == []


def test_a_quantized_table_is_not_trained():
    tables = (TableConfig("q", 6, 4, ("f0", "f1"), dtype="int8"), TABLES[1])
    with pytest.raises(ProblemError, match="table 'q' is stored as int8: training needs a float table"):
        validate_training_problem(TrainingProblem.of(tables, WEIGHTS, SGD, [(BATCH, grad())]))
