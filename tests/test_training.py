"""The training check: planted faults of training kernels caught on generated problems, the
verdict's other outcomes, the metamorphic relations, the strategies and the reference backend."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from training_faulty_backends import (
    FAULTS,
    ORDERINGS,
    ColumnsInKeyOrder,
    DuplicatesNotAggregated,
    Float32Trainer,
    GradientClipped,
    SkipsFirstIdOfBag,
    WrongTable,
)

from harness.agreement import Outcome
from harness.backend import can_train, load_backend
from harness.model import JaggedBatch, TableConfig
from harness.training.check import check_training
from harness.training.contract import (
    OPTIMIZER_KINDS,
    WEIGHT_DECAY_MODES,
    OptimizerConfig,
    TrainingBackend,
    TrainResult,
)
from harness.training.metamorphic import RELATIONS, applies, check_relation
from harness.training.problem import TrainingProblem
from harness.training.spec import GRAD_PROFILES, TrainingSpec, build_training_problem
from harness.training.strategies import training_problems, training_specs
from harness.training.validate import validate_training_problem

CHEAP = dict(max_cost=2**14)
SEARCH_SECONDS = 60


class _Found(BaseException):
    """Stops a Hypothesis search at once (not an Exception: Hypothesis neither shrinks nor replays it)."""


def first_failure(backend, strategy, seconds: float = SEARCH_SECONDS):
    """The first failing verdict of ``backend`` over ``strategy``'s examples (deterministic), the
    seconds it took and the examples tried; None when none failed within ``seconds``."""
    found, tried = [], [0]
    start = time.perf_counter()

    @settings(
        max_examples=10_000, deadline=None, phases=[Phase.generate], database=None, derandomize=True,
        suppress_health_check=list(HealthCheck),
    )  # fmt: skip
    @given(strategy)
    def search(problem):
        if time.perf_counter() - start > seconds:
            raise _Found
        tried[0] += 1
        verdict = check_training(backend, problem)
        if verdict.failed:
            found.append(verdict)
            raise _Found

    try:
        search()
    except _Found:
        pass
    return (found[0] if found else None), time.perf_counter() - start, tried[0]


@pytest.mark.parametrize("fault", FAULTS, ids=lambda c: c.name)
def test_every_planted_fault_is_caught_within_a_minute(fault):
    verdict, seconds, tried = first_failure(fault(), training_problems(**CHEAP))
    assert verdict is not None, f"{fault.name}: not caught in {seconds:.0f} s ({tried} examples)"
    assert verdict.outcome is Outcome.DISAGREE and verdict.step is not None
    assert "step" in verdict.detail and (
        "table" in verdict.detail or "per_sample_weight_grad" in verdict.detail
    )


def test_the_correct_trainer_and_the_reference_pass_where_the_faults_are_searched():
    for backend in (Float32Trainer(), load_backend("reference")):
        verdict, seconds, tried = first_failure(backend, training_problems(**CHEAP), seconds=10)
        assert verdict is None, verdict.detail
        assert tried > 5


# ---------------------------------------------------------------------------------------------
# The verdict's outcomes


TABLES = (TableConfig("t0", 6, 4, ("f0", "f1")), TableConfig("t1", 5, 4, ("f2",)))
BATCH = JaggedBatch.from_bags({"f0": [[1, 1], [3]], "f1": [[2], []], "f2": [[0, 4], [4]]})
WEIGHTED = JaggedBatch.from_bags(
    {"f0": [[1, 1], [3]], "f1": [[2], []], "f2": [[0, 4], [4]]},
    weights={"f0": [[0.5, 2.0], [1.0]], "f1": [[-1.0], []], "f2": [[1.0, 1.0], [3.0]]},
)


ROWWISE = OptimizerConfig("rowwise_adagrad", 0.1)


def tiny_problem(batch=BATCH, opt=ROWWISE, steps=2) -> TrainingProblem:
    g = torch.Generator().manual_seed(0)
    weights = {t.name: torch.randn(t.num_embeddings, 4, generator=g) for t in TABLES}
    return TrainingProblem.of(
        TABLES, weights, opt, [(batch, torch.randn(2, 12, generator=g)) for _ in range(steps)]
    )


class Tweaked(Float32Trainer):
    """Float32Trainer whose result or behaviour a test changes through ``tweak(step, result)``."""

    def __init__(self, tweak=None, fail=None):
        self.tweak, self.fail = tweak, fail

    def supports_training(self, tables, batch, optimizer):
        if self.fail == "supports":
            raise RuntimeError("boom in supports")
        return "no rowwise here" if self.fail == "unsupported" else None

    def prepare_training(self, tables, weights, optimizer):
        if self.fail == "prepare":
            raise RuntimeError("boom in prepare")
        step = super().prepare_training(tables, weights, optimizer)
        count = [0]

        def tweaked(batch, grad):
            count[0] += 1
            if self.fail == "step" and count[0] == 2:
                raise ValueError("boom in step 2")
            result = step(batch, grad)
            return self.tweak(count[0], result, weights, batch, grad) if self.tweak else result

        return tweaked


def test_a_correct_backend_agrees_and_the_verdict_says_how_closely():
    verdict = check_training(Float32Trainer(), tiny_problem(WEIGHTED))
    assert verdict.outcome is Outcome.AGREE and verdict.steps_judged == 2
    assert "2 steps agree (rowwise_adagrad lr=0.1 eps=1e-08; worst error / bound" in verdict.detail


@pytest.mark.parametrize(
    ("fail", "outcome", "text"),
    [
        ("supports", Outcome.RAISED, "supports_training() raised RuntimeError: boom in supports"),
        ("unsupported", Outcome.UNSUPPORTED, "no rowwise here"),
        ("prepare", Outcome.RAISED, "prepare_training() raised RuntimeError: boom in prepare"),
        ("step", Outcome.RAISED, "step 1 of 2 raised ValueError: boom in step 2"),
    ],
)
def test_exceptions_and_unsupported(fail, outcome, text):
    verdict = check_training(Tweaked(fail=fail), tiny_problem())
    assert verdict.outcome is outcome and text in verdict.detail


def _mutate_weights(step, result, weights, batch, grad):
    weights["t1"][2, 1] += 1
    return result


def _mutate_grad(step, result, weights, batch, grad):
    grad[0, 0] = 7.0
    return result


@pytest.mark.parametrize(
    ("tweak", "text"),
    [(_mutate_weights, "weights of table 't1'"), (_mutate_grad, "grad_output of step 0")],
)
def test_a_changed_input_is_found(tweak, text):
    verdict = check_training(Tweaked(tweak), tiny_problem())
    assert verdict.outcome is Outcome.MUTATED and text in verdict.detail


def _result(**changes):
    def tweak(step, result, weights, batch, grad):
        fields = {
            "output": result.output,
            "weights": dict(result.weights),
            "per_sample_weight_grad": result.per_sample_weight_grad,
        }
        for k, v in changes.items():
            fields[k] = v(fields[k]) if callable(v) else v
        return TrainResult(**fields)

    return tweak


def _poke(t: torch.Tensor, index, value) -> torch.Tensor:
    t = t.clone()
    t[index] = value
    return t


def _t0(w, index, value):
    return {**w, "t0": _poke(w["t0"], index, value)}


WRONG_RESULTS = [
    (_result(output=lambda o: o.double()), BATCH, "output: result is torch.float64"),
    (
        _result(output=lambda o: _poke(o, (1, 9), 5.0)),
        BATCH,
        "output sample 1, column 9 (feature 'f2' of table 't1', its column 1)",
    ),
    (
        _result(weights=lambda w: {**w, "t0": w["t0"].half()}),
        BATCH,
        "weights are torch.float16, expected torch.float32",
    ),
    (_result(weights=lambda w: {"t0": w["t0"]}), BATCH, "TrainResult.weights has no table 't1'"),
    (
        _result(weights=lambda w: _t0(w, (5, 3), 9.0)),
        BATCH,
        "table 't0' row 5 does not occur in the batch but changed: column 3",
    ),
    (
        _result(weights=lambda w: _t0(w, (1, 2), 9.0)),
        BATCH,
        "table 't0' row 1, column 2 (2 occurrences in the batch): got 9.0",
    ),
    (_result(per_sample_weight_grad=torch.zeros(8)), BATCH, "per_sample_weight_grad: expected None"),
    (_result(per_sample_weight_grad=None), WEIGHTED, "per_sample_weight_grad: got None"),
    (
        _result(per_sample_weight_grad=lambda p: _poke(p, 6, 1e3)),
        WEIGHTED,
        "per_sample_weight_grad of id 6 (feature 'f2', sample 1, position 0 in its bag, row 4)",
    ),
    (lambda *a: "not a result", BATCH, "the step returned a str without 'output'"),
]


@pytest.mark.parametrize(("tweak", "batch", "text"), WRONG_RESULTS)
def test_wrong_results_are_named(tweak, batch, text):
    verdict = check_training(Tweaked(tweak), tiny_problem(batch))
    assert verdict.outcome is Outcome.DISAGREE and verdict.step == 0, verdict.detail
    assert text in verdict.detail, verdict.detail


def test_the_later_step_is_judged_from_the_backends_own_weights():
    def drift(step, result, weights, batch, grad):  # a tiny legal difference at step 1 ...
        if step == 1:
            w = dict(result.weights)
            w["t0"][1, 0] = torch.nextafter(w["t0"][1, 0], torch.tensor(10.0))
        return result

    verdict = check_training(Tweaked(drift), tiny_problem(steps=3))
    assert verdict.outcome is Outcome.AGREE, verdict.detail  # ... does not make step 2 wrong


def test_a_backend_that_does_not_train():
    class ForwardOnly:
        name = "forward-only"

        def supports(self, tables, batch):
            return None

        def prepare(self, tables, weights):
            return Float32Trainer().prepare(tables, weights)

    forward_only = ForwardOnly()
    assert not can_train(forward_only)
    assert check_training(forward_only, tiny_problem()).outcome is Outcome.UNSUPPORTED


def test_the_reference_backend_trains_through_the_registry():
    reference = load_backend("reference")
    assert can_train(reference) and isinstance(reference, TrainingBackend)
    for kind in OPTIMIZER_KINDS:
        for mode in WEIGHT_DECAY_MODES:
            p = tiny_problem(WEIGHTED, OptimizerConfig(kind, 0.3, 1e-3, 0.1, mode), steps=3)
            verdict = check_training(reference, p)
            assert verdict.outcome is Outcome.AGREE, verdict.detail


# ---------------------------------------------------------------------------------------------
# Metamorphic relations


RELATION_SETTINGS = settings(
    max_examples=25, deadline=None, phases=[Phase.generate], database=None, derandomize=True,
    suppress_health_check=list(HealthCheck),
)  # fmt: skip


@pytest.mark.parametrize("relation", RELATIONS)
@pytest.mark.parametrize("backend", [Float32Trainer, *ORDERINGS[1:3], lambda: load_backend("reference")])
@RELATION_SETTINGS
@given(problem=training_problems(**CHEAP, max_steps=1))
def test_relations_hold_for_correct_backends(relation, backend, problem):
    problem = validate_training_problem(problem)
    assert check_relation(backend(), problem, relation, seed=3) is None


@pytest.mark.parametrize(
    ("relation", "fault"),
    [
        ("zero-gradient", WrongTable),
        ("double-gradient", GradientClipped),
        ("permute", SkipsFirstIdOfBag),
        ("reorder-keys", ColumnsInKeyOrder),
        ("split-batch", DuplicatesNotAggregated),
    ],
)
def test_each_relation_catches_a_fault_without_a_reference(relation, fault):
    found = []

    @RELATION_SETTINGS
    @given(problem=training_problems(**CHEAP, max_steps=1))
    def search(problem):
        if found:
            return
        problem = validate_training_problem(problem)
        broken = check_relation(fault(), problem, relation, seed=3)
        if broken:
            found.append(broken)

    search()
    assert found, f"{relation} never broke for {fault.name}"


def test_relations_say_where_they_apply():
    sgd = tiny_problem(opt=OptimizerConfig("sgd", 0.1))
    decayed = tiny_problem(opt=OptimizerConfig("sgd", 0.1, weight_decay=0.1, weight_decay_mode="l2"))
    assert applies("double-gradient", sgd) and applies("split-batch", sgd)
    assert not applies("zero-gradient", decayed) and not applies("split-batch", tiny_problem())
    with pytest.raises(ValueError, match="unknown relation"):
        applies("split-table", sgd)


# ---------------------------------------------------------------------------------------------
# Strategies


def test_the_strategies_cover_kinds_modes_steps_profiles_and_shared_rows():
    counts = ("new batch", "same batch", "shared rows", "tiny lr", "large lr", "decay", "examples")
    seen = {
        "kind": set(),
        "mode": set(),
        "steps": set(),
        "grad": set(),
        "eps": set(),
        **dict.fromkeys(counts, 0),
    }

    @settings(max_examples=300, deadline=None, phases=[Phase.generate], database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(training_specs(**CHEAP))
    def count(spec: TrainingSpec):
        problem = build_training_problem(spec)
        validate_training_problem(problem)
        opt = spec.optimizer
        seen["examples"] += 1
        seen["kind"].add(opt.kind)
        seen["mode"].add(opt.weight_decay_mode)
        seen["steps"].add(len(spec.steps))
        seen["grad"].update(s.grad_profile for s in spec.steps)
        seen["new batch"] += any(s.batch_seed is not None for s in spec.steps)
        seen["same batch"] += any(s.batch_seed is None for s in spec.steps[1:])
        seen["tiny lr"] += opt.learning_rate < 1e-8
        seen["large lr"] += opt.learning_rate > 10
        seen["eps"].add(round(math.log10(opt.eps)))
        seen["decay"] += opt.decays
        batch = problem.steps[0].batch
        for t in problem.tables:
            if len(t.feature_names) > 1:
                rows = [set(batch.values[batch.feature_slice(f)].tolist()) for f in t.feature_names]
                if any(rows[0] & other for other in rows[1:]):
                    seen["shared rows"] += 1
                    break

    count()
    n = seen["examples"]
    assert seen["kind"] == set(OPTIMIZER_KINDS) and seen["mode"] == set(WEIGHT_DECAY_MODES)
    assert seen["steps"] == {1, 2, 3} and seen["grad"] == set(GRAD_PROFILES)
    assert seen["eps"] >= {-10, -8, 0}
    for key in ("new batch", "same batch", "tiny lr", "large lr", "decay"):
        assert seen[key] >= n // 20, (key, seen[key], n)
    assert seen["shared rows"] >= n // 10, seen["shared rows"]


def test_a_spec_is_json_and_builds_the_same_tensors():
    @settings(max_examples=10, deadline=None, phases=[Phase.generate], database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(training_specs(**CHEAP))
    def roundtrip(spec):
        again = TrainingSpec.from_json(json.loads(json.dumps(spec.to_json())))
        assert again == spec
        a, b = build_training_problem(spec), build_training_problem(again)
        for x, y in zip(a.steps, b.steps, strict=True):
            assert torch.equal(x.grad_output, y.grad_output) and torch.equal(x.batch.values, y.batch.values)
        assert a.metadata["training_spec"] == spec.to_json()

    roundtrip()


def test_a_step_that_overflows_the_table_dtype_ends_the_judging():
    tables = (TableConfig("t", 3, 4, ("f",), dtype=torch.float16),)
    weights = {"t": torch.full((3, 4), 60000.0, dtype=torch.float16)}
    batch = JaggedBatch.from_bags({"f": [[1]]})
    grad = torch.full((1, 4), -20000.0)  # 60000 + 20000 is beyond float16's 65504: rounds to inf
    problem = TrainingProblem.of(tables, weights, OptimizerConfig("sgd", 1.0), [(batch, grad), (batch, grad)])
    verdict = check_training(Float32Trainer(), problem)
    assert verdict.outcome is Outcome.AGREE and verdict.steps_judged == 1
    assert "step 0 left non-finite weights" in verdict.detail
    finite = TrainingProblem.of(tables, weights, OptimizerConfig("sgd", 1.0), [(batch, grad / 100)] * 2)
    assert check_training(Float32Trainer(), finite).steps_judged == 2
