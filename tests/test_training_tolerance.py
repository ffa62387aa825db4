"""The training tolerance against float32 implementations: every correct operation order stays
within the bound, on generated problems and on adversarial ones; deliberately wrong updates do not.

`ORDERINGS` (tests/training_faulty_backends.py) evaluate DESIGN.md's update in float32 in
different orders: ``lr * H / b``, ``(lr / b) * H``, ``lr * (H / b)``; the rowwise mean as
``sum / dim``, ``sum * (1 / dim)`` or ``sum of q / dim``; a fused (single-rounding) last step;
FBGEMM's ``(1 - mu wd) w - mu G`` form of l2; both forms of decoupled decay; gradient terms added
forwards or backwards; the state in float32 or float64.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from training_faulty_backends import (
    ORDERINGS,
    DecaysEveryRow,
    DoubleRoundedHalf,
    EpsInsideSqrt,
    Float32Trainer,
    LearningRateTwice,
    MeanNotDivided,
    RowwisePerElement,
    StateInHalf,
)

from harness.model import JaggedBatch, Pooling, TableConfig
from harness.training.check import check_training
from harness.training.contract import OptimizerConfig
from harness.training.problem import TrainingProblem
from harness.training.strategies import training_problems
from harness.training.tolerance import gradient_error, update_tolerance

GENERATED = settings(
    max_examples=30, deadline=None, phases=[Phase.generate], database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)  # fmt: skip


@pytest.mark.parametrize("trainer", ORDERINGS, ids=lambda c: c.name)
@GENERATED
@given(problem=training_problems(max_cost=2**14))
def test_every_float32_order_is_within_the_bound_on_generated_problems(trainer, problem):
    verdict = check_training(trainer(), problem)
    assert not verdict.failed, verdict.detail


# ---------------------------------------------------------------------------------------------
# Adversarial problems


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _problem(opt, tables, bags, grads, weights=None, seed=0, psw=None) -> TrainingProblem:
    """``bags``: one ``{feature: [[ids of sample 0], ...]}`` per step (or one for all), ``grads``
    one grad_output per step."""
    g = _gen(seed)
    weights = weights or {
        t.name: torch.randn(t.num_embeddings, t.embedding_dim, generator=g).to(t.dtype) for t in tables
    }
    batches = [
        JaggedBatch.from_bags(b, psw) for b in (bags if isinstance(bags, list) else [bags] * len(grads))
    ]
    return TrainingProblem.of(tables, weights, opt, list(zip(batches, grads, strict=True)))


def m_near_zero(opt):
    """Tiny gradients (their squares underflow float32) with eps 1e-10: 1 / (sqrt(m) + eps) is steep."""
    t = (TableConfig("t", 8, 8, ("f",)),)
    g = torch.ldexp(torch.randn(2, 8, generator=_gen(1)), torch.randint(-80, -60, (2, 8), generator=_gen(2)))
    return _problem(opt, t, {"f": [[1, 2, 2], [2, 5]]}, [g, g * 3])


def cancelling_gradient(opt):
    """Two samples read one row with opposite gradients that nearly cancel (and l2's G ~ -wd w)."""
    t = (TableConfig("t", 4, 6, ("f", "h")),)
    base = torch.randn(1, 6, generator=_gen(3))
    other = -base * (1 + 2.0**-20)
    g = torch.cat([torch.cat([base, base * 0.5], 1), torch.cat([other, -base * 0.5], 1)])
    return _problem(opt, t, {"f": [[1], [1]], "h": [[1, 3], [3]]}, [g])


def l2_cancelling(opt):
    """With l2, gradients that nearly cancel the decay term: ``G ~ -wd w``, so ``H`` is tiny and
    known only roughly, while FBGEMM's ``(1 - mu wd) w - mu G`` still meets ``mu``'s error twice."""
    t = (TableConfig("t", 4, 8, ("f",)),)
    w = torch.randn(4, 8, generator=_gen(11))
    wd = opt.weight_decay or 0.3
    g = torch.zeros(4, 8)
    for r in range(4):
        g[r] = -wd * w[r] * (1 + torch.randn(8, generator=_gen(20 + r)) * 2.0**-18)
    return _problem(opt, t, {"f": [[r] for r in range(4)]}, [g, g], weights={"t": w})


def huge_gradients(opt):
    """Gradients near 1e18 (their squares near float32's limit) and 1e20 (beyond: unbounded)."""
    t = (TableConfig("t", 6, 4, ("f",)),)
    g = torch.randn(3, 4, generator=_gen(4)) * 1e18
    g[2] *= 100
    return _problem(opt, t, {"f": [[0, 1], [1], [4]]}, [g, g])


def extreme_learning_rate(opt):
    t = (TableConfig("t", 5, 3, ("f",)), TableConfig("u", 5, 5, ("g",), dtype=torch.float16))
    g = torch.randn(2, 8, generator=_gen(5))
    return _problem(opt, t, {"f": [[0, 1, 1], [4]], "g": [[2], [2, 3]]}, [g, g * 0.5])


def half_table_cancelling_update(opt):
    """A float16 table whose update nearly cancels the weight: rounding the step first shows."""
    t = (TableConfig("t", 64, 8, ("f",), dtype=torch.float16),)
    w = torch.randn(64, 8, generator=_gen(6)).to(torch.float16)
    g = torch.zeros(64, 8)
    for r in range(64):
        g[r] = w[r].float() / opt.learning_rate * (1 + torch.randn(8, generator=_gen(r)) * 2**-9)
    return _problem(opt, t, {"f": [[r] for r in range(64)]}, [g], weights={"t": w})


def mean_and_untouched_rows(opt):
    """MEAN bags of 1 to 40 ids over a table with rows no bag reads, shared by two features."""
    t = (TableConfig("t", 50, 4, ("f", "h"), Pooling.MEAN),)
    g = _gen(7)
    bags = {
        "f": [torch.randint(0, 20, (n,), generator=g).tolist() for n in (1, 7, 40, 0)],
        "h": [torch.randint(10, 30, (n,), generator=g).tolist() for n in (3, 0, 12, 25)],
    }
    return _problem(opt, t, bags, [torch.randn(4, 8, generator=g) for _ in range(3)])


def weighted_steps(opt):
    """Per-sample weights over a wide range, three steps over different batches."""
    t = (TableConfig("t", 10, 16, ("f", "h")),)
    g = _gen(8)
    bags, psw = [], None
    for step in range(3):
        bags.append({"f": [[1, 2, 1], [step]], "h": [[3], [1, 1, 9]]})
    psw = {"f": [[1e3, -2.0, 1e-3], [0.5]], "h": [[-7.0], [2.0, 2.0, 1e-5]]}
    return _problem(
        opt, t, bags, [torch.randn(2, 32, generator=g) * 10.0 ** (step - 1) for step in range(3)], psw=psw
    )


ADVERSARIAL = (m_near_zero, cancelling_gradient, l2_cancelling, huge_gradients, extreme_learning_rate,
               half_table_cancelling_update, mean_and_untouched_rows, weighted_steps)  # fmt: skip

OPTIMIZERS = [
    OptimizerConfig(kind, lr, eps, wd, mode)
    for kind in ("sgd", "adagrad", "rowwise_adagrad")
    for lr, eps in ((1.0, 1e-10), (1e-30, 1e-8), (1e4, 1.0), (0.05, 2.0**-126))
    for wd, mode in ((0.0, "none"), (0.3, "l2"), (0.3, "decoupled"))
]


def _adversarial_cases():
    for build in ADVERSARIAL:
        for opt in OPTIMIZERS:
            yield build, opt


@pytest.mark.parametrize("trainer", ORDERINGS, ids=lambda c: c.name)
def test_every_float32_order_is_within_the_bound_on_adversarial_problems(trainer):
    unbounded = 0
    for build, opt in _adversarial_cases():
        verdict = check_training(trainer(), build(opt))
        assert not verdict.failed, f"{build.__name__}, {opt.describe()}: {verdict.detail}"
        unbounded += verdict.unconstrained
    assert unbounded > 0  # the 1e20 gradients: float32 overflows there, and the check says so


@pytest.mark.parametrize(
    ("wrong", "where"),
    [
        (EpsInsideSqrt, m_near_zero),
        (LearningRateTwice, extreme_learning_rate),
        (RowwisePerElement, cancelling_gradient),
        (DecaysEveryRow, mean_and_untouched_rows),
        (MeanNotDivided, mean_and_untouched_rows),
        (StateInHalf, weighted_steps),
        (DoubleRoundedHalf, half_table_cancelling_update),
    ],
    ids=lambda x: getattr(x, "name", getattr(x, "__name__", "")),
)
def test_wrong_updates_exceed_the_bound(wrong, where):
    caught = [opt.describe() for opt in OPTIMIZERS if check_training(wrong(), where(opt)).failed]
    assert caught, f"{wrong.name} was never caught on {where.__name__}"


def test_the_bound_is_tight_enough_to_mean_something():
    """On an ordinary float32 step the bound is a few ulps; on float16, about half an ulp."""
    opt = OptimizerConfig("rowwise_adagrad", 0.1)
    for dtype, most in ((torch.float32, 2.0**-19), (torch.float16, 2.0**-10)):
        tables = (TableConfig("t", 8, 16, ("f",), dtype=dtype),)
        p = _problem(opt, tables, {"f": [[1, 2], [3]]}, [torch.randn(2, 16, generator=_gen(9))])
        verdict = check_training(Float32Trainer(), p)
        assert not verdict.failed
        from harness.training.oracle import TrainingOracle

        e = TrainingOracle(tables, opt).step(p.weights, p.steps[0].batch, p.steps[0].grad_output)
        rel = e.tables["t"].tolerance.bound / e.tables["t"].after.abs().clamp(min=1e-3)
        assert float(rel.max()) < most, (dtype, float(rel.max()))


def test_the_gradient_bound_covers_float32_sums_in_any_order():
    gen = _gen(10)
    for n in (2, 3, 17, 1000):
        terms = torch.randn(n, 64, generator=gen, dtype=torch.float64).to(torch.float32)
        terms[1::2] = -terms[0::2][: n // 2] * (1 + 2.0**-22)  # cancellation
        exact = terms.double().sum(0)
        bound = gradient_error(terms.double().abs().sum(0, keepdim=True), torch.tensor([n]))[0]
        sums = [torch.zeros(64), torch.zeros(64)]
        for x in terms:
            sums[0] = sums[0] + x
        for x in terms.flip(0):
            sums[1] = sums[1] + x
        sums.append(terms.sum(0))  # torch's blocked order
        for s in sums:
            assert bool(((s.double() - exact).abs() <= bound).all())


def test_the_state_error_grows_with_the_steps():
    opt = OptimizerConfig("adagrad", 0.1, 1e-8)
    before = torch.ones(2, 3, dtype=torch.float64)
    g = torch.full((2, 3), 0.5, dtype=torch.float64)
    args = (opt, torch.float32, before, g, g.abs(), torch.tensor([1, 1]), before - 0.05 * g)
    first = update_tolerance(
        *args, torch.full((2, 3), 0.25, dtype=torch.float64), torch.zeros(2, 3, dtype=torch.float64)
    )
    second = update_tolerance(*args, torch.full((2, 3), 0.5, dtype=torch.float64), first.moment_error)
    assert bool((first.moment_error > 0).all()) and bool((second.moment_error > first.moment_error).all())
    unbounded = update_tolerance(
        *args, torch.full((2, 3), 0.5, dtype=torch.float64), torch.full((2, 3), math.inf, dtype=torch.float64)
    )
    assert bool(unbounded.unconstrained.all()) and bool(torch.isinf(unbounded.moment_error).all())
