"""The float64 training reference: DESIGN.md's formulas worked by hand on a tiny problem, the fast
step against its readable loop on generated problems and sequences, and the single rounding."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness.model import JaggedBatch, Pooling, TableConfig
from harness.reference.training import initial_state, round_once, train_step, train_step_loop, train_steps
from harness.training.contract import OPTIMIZER_KINDS, WEIGHT_DECAY_MODES, OptimizerConfig
from harness.training.strategies import training_problems
from harness.training.validate import validate_training_problem

# t0 is shared by f0 and f1 (row 1 occurs twice in one bag and once in the other feature); t1 pools MEAN.
TABLES = (TableConfig("t0", 6, 2, ("f0", "f1")), TableConfig("t1", 3, 2, ("f2",), Pooling.MEAN))
BATCH = JaggedBatch.from_bags({"f0": [[1, 1], [3]], "f1": [[1], []], "f2": [[0, 2], [2]]})
WEIGHTS = {
    "t0": torch.tensor([[r, -r] for r in range(6)], dtype=torch.float32),
    "t1": torch.tensor([[r + 1, 0.5] for r in range(3)], dtype=torch.float32),
}
GRAD = torch.tensor([[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12]], dtype=torch.float32)
# G by hand: t0 row 1 = 2 * [1, 2] + [3, 4]; row 3 = [7, 8]; t1 (MEAN) row 0 = [5, 6] / 2,
# row 2 = [5, 6] / 2 + [11, 12] / 1.
HAND_GRADIENT = {"t0": {1: [5.0, 8.0], 3: [7.0, 8.0]}, "t1": {0: [2.5, 3.0], 2: [13.5, 15.0]}}


def hand_update(opt: OptimizerConfig, w: list[float], g: list[float]) -> list[float]:
    """DESIGN.md's update of one row from a zero state, in plain Python."""
    lr, eps, wd, mode = opt.learning_rate, opt.eps, opt.weight_decay, opt.weight_decay_mode
    gp = [gi + wd * wi for gi, wi in zip(g, w, strict=True)] if mode == "l2" else g
    step = g if mode == "decoupled" else gp
    kept = [(1 - lr * wd) * wi for wi in w] if mode == "decoupled" else w
    if opt.kind == "sgd":
        scale = [lr] * len(w)
    elif opt.kind == "adagrad":
        scale = [lr / (math.sqrt(x * x) + eps) for x in gp]
    else:
        mu = lr / (math.sqrt(sum(x * x for x in gp) / len(gp)) + eps)
        scale = [mu] * len(w)
    return [k - s * x for k, s, x in zip(kept, scale, step, strict=True)]


@pytest.mark.parametrize("kind", OPTIMIZER_KINDS)
@pytest.mark.parametrize("mode", WEIGHT_DECAY_MODES)
@pytest.mark.parametrize("step_fn", [train_step_loop, train_step])
def test_the_reference_is_designs_formulas_worked_by_hand(kind, mode, step_fn):
    opt = OptimizerConfig(kind, 0.5, eps=0.01, weight_decay=0.1, weight_decay_mode=mode)
    ref = step_fn(TABLES, WEIGHTS, BATCH, GRAD, opt)
    expected_output = [[2, -2, 1, -1, 2, 0.5], [3, -3, 0, 0, 3, 0.5]]
    assert ref.forward.value.tolist() == expected_output
    for t in TABLES:
        step = ref.tables[t.name]
        assert step.rows.tolist() == sorted(HAND_GRADIENT[t.name])
        assert step.gradient.tolist() == [HAND_GRADIENT[t.name][r] for r in sorted(HAND_GRADIENT[t.name])]
        after = ref.updated_weights(WEIGHTS)[t.name]
        for r in range(t.num_embeddings):
            w = WEIGHTS[t.name][r].double().tolist()
            want = hand_update(opt, w, HAND_GRADIENT[t.name][r]) if r in HAND_GRADIENT[t.name] else w
            assert after[r].tolist() == pytest.approx(want, rel=1e-14, abs=1e-14), (t.name, r)
    assert ref.per_sample_weight_grad is None


def test_per_sample_weight_gradients_and_weighted_gradients_by_hand():
    tables = (TableConfig("t0", 4, 2, ("f0", "f1")),)
    batch = JaggedBatch.from_bags(
        {"f0": [[1, 2], [1]], "f1": [[1], [0]]}, weights={"f0": [[2, -1], [3]], "f1": [[0.5], [4]]}
    )
    weights = {"t0": torch.tensor([[1, 2], [3, 4], [5, 6], [7, 8]], dtype=torch.float32)}
    grad = torch.tensor([[1, 10, 100, 1000], [2, 20, 200, 2000]], dtype=torch.float32)
    for step_fn in (train_step_loop, train_step):
        ref = step_fn(tables, weights, batch, grad, OptimizerConfig("sgd", 1.0))
        # id 0: row 1 . g[0, f0] = 3 + 40; id 1: row 2 . [1, 10]; id 2: row 1 . [2, 20];
        # id 3: row 1 . g[0, f1] = 300 + 4000; id 4: row 0 . [200, 2000]
        assert ref.per_sample_weight_grad.tolist() == [43.0, 65.0, 86.0, 4300.0, 4200.0]
        g = {
            r: v
            for r, v in zip(ref.tables["t0"].rows.tolist(), ref.tables["t0"].gradient.tolist(), strict=True)
        }
        assert g == {
            0: [800.0, 8000.0],
            1: [2 * 1 + 3 * 2 + 0.5 * 100, 2 * 10 + 3 * 20 + 0.5 * 1000],
            2: [-1.0, -10.0],
        }


def test_the_state_carries_over_steps():
    opt = OptimizerConfig("adagrad", 0.5, eps=0.01)
    first = train_step(TABLES, WEIGHTS, BATCH, GRAD, opt)
    assert first.state.moments["t0"][1].tolist() == [25.0, 64.0]
    second = train_step(TABLES, first.rounded_weights(WEIGHTS), BATCH, GRAD, opt, first.state)
    assert second.state.moments["t0"][1].tolist() == [50.0, 128.0]
    assert second.tables["t0"].moment_before.tolist() == [[25.0, 64.0], [49.0, 64.0]]
    rowwise = OptimizerConfig("rowwise_adagrad", 0.5, eps=0.01)
    assert train_step(TABLES, WEIGHTS, BATCH, GRAD, rowwise).state.moments["t1"].tolist() == [
        (2.5**2 + 3**2) / 2, 0.0, (13.5**2 + 15**2) / 2
    ]  # fmt: skip
    assert initial_state(TABLES, OptimizerConfig("sgd", 0.1)).moments == {}
    assert train_step(TABLES, WEIGHTS, BATCH, GRAD, opt).state.moments["t0"].shape == (6, 2)
    assert WEIGHTS["t0"][1].tolist() == [1.0, -1.0]  # inputs untouched


SMALL = dict(max_cost=6_000, max_tables=4, max_features=8, max_dim=24, max_batch_size=16, max_bag_length=24,
             max_long_bag_length=80)  # fmt: skip
LOOP = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)


def assert_same(fast, loop) -> None:
    def same(a, b, what):
        assert (a is None) == (b is None), what
        if a is not None:
            assert a.shape == b.shape and a.dtype == b.dtype, what
            assert torch.equal(a, b), f"{what}: {(a - b).abs().max() if a.is_floating_point() else 'differs'}"

    same(fast.forward.value, loop.forward.value, "output")
    same(fast.per_sample_weight_grad, loop.per_sample_weight_grad, "psw grad")
    same(fast.psw_positive, loop.psw_positive, "psw positive")
    same(fast.psw_negative, loop.psw_negative, "psw negative")
    for name, a in fast.tables.items():
        b = loop.tables[name]
        for field in (
            "rows",
            "gradient",
            "gradient_magnitude",
            "occurrences",
            "before",
            "after",
            "moment_before",
            "moment_after",
        ):
            same(getattr(a, field), getattr(b, field), f"{name}.{field}")
    for name, m in fast.state.moments.items():
        same(m, loop.state.moments[name], f"state {name}")


@LOOP
@given(training_problems(**SMALL))
def test_the_fast_step_is_the_loop_on_generated_sequences(problem):
    problem = validate_training_problem(problem)
    steps = [(s.batch, s.grad_output) for s in problem.steps]
    fast = train_steps(problem.tables, problem.weights, steps, problem.optimizer)
    loop = train_steps(problem.tables, problem.weights, steps, problem.optimizer, loop=True)
    for a, b in zip(fast, loop, strict=True):
        assert_same(a, b)


@LOOP
@given(training_problems(**SMALL, weighted=True, max_steps=1), st.sampled_from(OPTIMIZER_KINDS))
def test_the_fast_step_is_the_loop_with_per_sample_weights(problem, kind):
    s = problem.steps[0]
    opt = OptimizerConfig(kind, 0.25, 1e-3, 0.01, "l2")
    assert_same(
        train_step(problem.tables, problem.weights, s.batch, s.grad_output, opt),
        train_step_loop(problem.tables, problem.weights, s.batch, s.grad_output, opt),
    )


def _bfloat16_nearest(x: float) -> float:
    """The bfloat16 value nearest ``x`` (ties to even mantissa), by brute force over neighbours."""
    if x == 0 or not math.isfinite(x):
        return x
    biggest = float(torch.finfo(torch.bfloat16).max)
    if abs(x) >= biggest + 2.0 ** (math.floor(math.log2(biggest)) - 8):
        return math.copysign(math.inf, x)
    e = max(math.frexp(x)[1] - 1, -126)
    ulp = 2.0 ** (e - 7)
    low = math.floor(x / ulp) * ulp
    candidates = [low, low + ulp]
    best = min(candidates, key=lambda c: (abs(c - x), (round(c / ulp) % 2)))
    return best


def test_round_once_rounds_float64_once():
    tie = torch.tensor([1 + 2**-11 + 2**-40, 1 + 2**-8 + 2**-40, -(1 + 2**-11 + 2**-40)], dtype=torch.float64)
    assert tie.to(torch.float16)[0] == 1.0  # torch rounds twice (through float32)
    assert round_once(tie, torch.float16).tolist() == [
        1 + 2**-10,
        pytest.approx(1 + 2**-8, abs=2**-10),
        -(1 + 2**-10),
    ]
    assert round_once(tie, torch.bfloat16)[1] == 1 + 2**-7
    gen = torch.Generator().manual_seed(0)
    for scale in (1.0, 1e-5, 1e-7, 6e4, 1e-40, 1e38):
        x = torch.randn(20_000, dtype=torch.float64, generator=gen) * scale
        x[::7] = x[::7].to(torch.float16).double() + x[::7].to(torch.float16).double().abs() * 2**-11  # ties
        with np.errstate(over="ignore"):
            by_numpy = torch.from_numpy(x.numpy().astype(np.float16))  # numpy rounds float64 once
        ours = round_once(x, torch.float16)
        assert torch.equal(ours.isnan(), by_numpy.isnan()) and torch.equal(
            ours.nan_to_num(), by_numpy.nan_to_num()
        )
        finite = x[:3000][torch.isfinite(x[:3000])]
        exact = [_bfloat16_nearest(v) for v in finite.tolist()]
        assert round_once(finite, torch.bfloat16).double().tolist() == exact
        assert torch.equal(round_once(finite, torch.float32), finite.to(torch.float32))
