"""Metamorphic relations of a training step: transformations whose effect is known without a reference value.

Each relation runs the backend on a problem's first step and on a transformed version of it, and
compares the backend with itself:

- ``zero-gradient`` (no weight decay): a step with a zero grad_output changes no weight and
  gives zero per-sample weight gradients, and leaves the state as it was: the real step after it
  gives what the real step gives from fresh;
- ``double-gradient`` (sgd, no weight decay): twice the grad_output moves every row twice as far
  and doubles the per-sample weight gradients;
- ``permute``: permuting the ids (with their per-sample weights) inside every bag changes
  nothing (the per-sample weight gradients move with their ids);
- ``reorder-keys``: the batch's features in reverse order (columns follow the tables, so nothing
  changes);
- ``split-batch`` (sgd, no weight decay, two or more samples): a step over the first samples then
  one over the rest ends where one step over the whole batch does (sgd without decay is linear
  in the gradient, and the gradient does not depend on the weights).

Exact equality is not owed: each result is within its bound (`harness.training.tolerance`) of
its exact value, so two results whose exact values are equal may differ by the sum of their
bounds. The bounds come from the oracle's magnitudes; the *values* compared are only the
backend's. Relations that do not hold in general are left out: splitting a shared table changes
the update (the features' gradients are no longer summed before the nonlinear step), and so
does splitting a batch under adagrad or weight decay.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch

from harness.model import JaggedBatch
from harness.tolerance import FINITE, Tolerance, first_apart
from harness.training.check import StepResult, run_training
from harness.training.oracle import ExpectedStep, TrainingOracle
from harness.training.problem import TrainingProblem

RELATIONS: tuple[str, ...] = ("zero-gradient", "double-gradient", "permute", "reorder-keys", "split-batch")


def applies(relation: str, problem: TrainingProblem) -> bool:
    """Whether ``relation`` holds for ``problem``'s first step (module docstring)."""
    opt = problem.optimizer
    batch, grad = problem.steps[0].batch, problem.steps[0].grad_output
    if relation == "zero-gradient":
        return not opt.decays
    if relation == "double-gradient":
        return opt.kind == "sgd" and not opt.decays and bool(torch.isfinite(grad * 2).all())
    if relation in ("permute", "reorder-keys"):
        return len(batch.values) > 1 or len(batch.keys) > 1
    if relation == "split-batch":
        return opt.kind == "sgd" and not opt.decays and batch.batch_size >= 2
    raise ValueError(f"unknown relation {relation!r}; expected one of {list(RELATIONS)}")


def _full_bounds(problem: TrainingProblem, *expected: ExpectedStep) -> dict[str, torch.Tensor]:
    """Per table, the sum of the steps' bounds on every element (0 where no step touches it)."""
    out = {}
    for t in problem.tables:
        total = torch.zeros(t.num_embeddings, t.embedding_dim, dtype=torch.float64)
        for e in expected:
            total[e.tables[t.name].rows] += _loose(e.tables[t.name].tolerance)
        out[t.name] = total
    return out


def _loose(tolerance: Tolerance) -> torch.Tensor:
    """The bound, infinite where a non-finite value is allowed (overflow): nothing to compare there."""
    return torch.where(
        tolerance.classes == FINITE, tolerance.bound, torch.full_like(tolerance.bound, math.inf)
    )


def _weights_apart(
    a: Mapping[str, torch.Tensor],
    b: Mapping[str, torch.Tensor],
    bounds: Mapping[str, torch.Tensor],
    what: str,
) -> str | None:
    for name, bound in bounds.items():
        x, y = a[name].to(torch.float64), b[name].to(torch.float64)
        same = (x == y) | (torch.isnan(x) & torch.isnan(y))
        apart = ~same & ~((x - y).abs() <= bound) & ~torch.isinf(bound)  # inf: anything, NaN too
        if bool(apart.any()):
            row, col = (int(i) for i in apart.nonzero()[0])
            return (
                f"{what}: table {name!r} row {row}, column {col}: {float(x[row, col])!r} against "
                f"{float(y[row, col])!r}, allowed difference {float(bound[row, col]):.3g}"
            )
    return None


def _psw_apart(a: object, b: object, bound: torch.Tensor | None, what: str) -> str | None:
    if bound is None:
        return None
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor) or a.shape != b.shape:
        return f"{what}: per-sample weight gradients of different types or shapes"
    x, y = a.to(torch.float64), b.to(torch.float64)
    apart = ~((x == y) | (torch.isnan(x) & torch.isnan(y))) & ~((x - y).abs() <= bound) & ~torch.isinf(bound)
    if bool(apart.any()):
        i = int(apart.nonzero()[0])
        got, other, allowed = float(x[i]), float(y[i]), float(bound[i])
        return f"{what}: per-sample weight gradient {i}: {got!r} against {other!r}, allowed {allowed:.3g}"
    return None


def _run(backend: object, problem: TrainingProblem, steps) -> list[StepResult]:
    return run_training(backend, problem.tables, problem.weights, problem.optimizer, steps)


def _expect(problem: TrainingProblem, steps, results: list[StepResult] | None = None) -> list[ExpectedStep]:
    """The oracle's steps, each from the backend's weights after the previous one (as the check does)."""
    oracle = TrainingOracle(problem.tables, problem.optimizer)
    current = problem.weights
    out = []
    for i, (batch, grad) in enumerate(steps):
        out.append(oracle.step(current, batch, grad))
        if results is not None:
            current = results[i].weights
    return out


def _reordered(
    batch: JaggedBatch, order: np.ndarray, lengths: torch.Tensor, keys: tuple[str, ...]
) -> JaggedBatch:
    index = torch.from_numpy(order)
    return JaggedBatch(
        keys,
        batch.values[index].clone(),
        lengths,
        None if batch.weights is None else batch.weights[index].clone(),
    )


def permuted(batch: JaggedBatch, seed: int) -> tuple[JaggedBatch, np.ndarray]:
    """The batch with every bag's ids (and weights) in a seeded order, and ``order``: the new
    batch's id ``i`` is the old one's ``order[i]``."""
    lengths = batch.lengths.to(torch.int64).numpy()
    bag = np.repeat(np.arange(len(lengths)), lengths)
    rng = np.random.default_rng(seed)
    order = np.lexsort((rng.random(len(bag)), bag)).astype(np.int64)
    return _reordered(batch, order, batch.lengths.clone(), batch.keys), order


def keys_reversed(batch: JaggedBatch) -> tuple[JaggedBatch, np.ndarray]:
    """The batch with its features in reverse order (each with its own bags), and ``order`` as in
    `permuted`."""
    b = batch.batch_size
    lengths = batch.lengths.to(torch.int64).numpy().reshape(len(batch.keys), b)
    counts = lengths.sum(1)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    order = np.concatenate(
        [np.arange(starts[k], starts[k] + counts[k]) for k in reversed(range(len(counts)))]
        + [np.zeros(0, np.int64)]
    )
    new_lengths = torch.from_numpy(np.ascontiguousarray(lengths[::-1]).reshape(-1)).to(batch.lengths.dtype)
    return _reordered(batch, order.astype(np.int64), new_lengths, tuple(reversed(batch.keys))), order


def _added(*bounds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: sum(b[name] for b in bounds) for name in bounds[0]}


def _zero_gradient(
    backend: object, problem: TrainingProblem, batch: JaggedBatch, grad: torch.Tensor
) -> str | None:
    steps = [(batch, torch.zeros_like(grad)), (batch, grad)]
    results = _run(backend, problem, steps)
    unchanged = _full_bounds(problem)  # all zero: the weights must equal the starting ones
    bad = _weights_apart(
        results[0].weights, problem.weights, unchanged, "a zero grad_output changed a weight"
    )
    if bad:
        return bad
    psw = results[0].per_sample_weight_grad
    if isinstance(psw, torch.Tensor) and bool((psw != 0).any()):
        i = int((psw != 0).nonzero()[0])
        return f"a zero grad_output gave the per-sample weight gradient {float(psw[i])!r} at id {i}"
    fresh = _run(backend, problem, [(batch, grad)])[0]
    bounds = _full_bounds(problem, _expect(problem, steps, results)[1], _expect(problem, [(batch, grad)])[0])
    what = "a step after a zero-gradient step differs from the same step from fresh"
    return _weights_apart(results[1].weights, fresh.weights, bounds, what)


def _double_gradient(
    backend: object, problem: TrainingProblem, batch: JaggedBatch, grad: torch.Tensor
) -> str | None:
    one = _run(backend, problem, [(batch, grad)])[0]
    two = _run(backend, problem, [(batch, grad * 2)])[0]
    e1, e2 = _expect(problem, [(batch, grad)])[0], _expect(problem, [(batch, grad * 2)])[0]
    # |w2 - (w0 - 2 D)| <= B2 and |w1 - (w0 - D)| <= B1, so |w2 - (2 w1 - w0)| <= B2 + 2 B1
    doubled = {
        n: 2 * one.weights[n].to(torch.float64) - w.to(torch.float64) for n, w in problem.weights.items()
    }
    b1, b2 = _full_bounds(problem, e1), _full_bounds(problem, e2)
    bad = _weights_apart(
        two.weights, doubled, _added(b1, b1, b2), "twice the gradient is not twice the change"
    )
    if bad or e1.psw_tolerance is None or not isinstance(one.per_sample_weight_grad, torch.Tensor):
        return bad
    twice = 2 * one.per_sample_weight_grad.to(torch.float64)
    bound = 2 * _loose(e1.psw_tolerance) + _loose(e2.psw_tolerance)
    return _psw_apart(
        two.per_sample_weight_grad,
        twice,
        bound,
        "twice the gradient is not twice its per-sample weight gradient",
    )


def _reordered_batch(
    backend: object,
    problem: TrainingProblem,
    batch: JaggedBatch,
    grad: torch.Tensor,
    relation: str,
    seed: int,
) -> str | None:
    other, order = permuted(batch, seed) if relation == "permute" else keys_reversed(batch)
    what = "ids permuted within their bags" if relation == "permute" else "the batch's keys reversed"
    a = _run(backend, problem, [(batch, grad)])[0]
    b = _run(backend, problem, [(other, grad)])[0]
    ea, eb = _expect(problem, [(batch, grad)])[0], _expect(problem, [(other, grad)])[0]
    outputs = (a.output, b.output)
    if all(isinstance(x, torch.Tensor) for x in outputs) and a.output.shape == b.output.shape:
        i = first_apart(b.output, a.output, ea.output_tolerance)
        if i >= 0:
            sample, col = divmod(i, a.output.shape[1])
            got, before = float(b.output[sample, col]), float(a.output[sample, col])
            return f"{what}: output sample {sample}, column {col}: {got!r} against {before!r}"
    bad = _weights_apart(
        b.weights, a.weights, _added(_full_bounds(problem, ea), _full_bounds(problem, eb)), what
    )
    if bad or ea.psw_tolerance is None or not isinstance(a.per_sample_weight_grad, torch.Tensor):
        return bad
    index = torch.from_numpy(order)
    bound = _loose(ea.psw_tolerance)[index] + _loose(eb.psw_tolerance)
    return _psw_apart(b.per_sample_weight_grad, a.per_sample_weight_grad[index], bound, what)


def _split_batch(
    backend: object, problem: TrainingProblem, batch: JaggedBatch, grad: torch.Tensor
) -> str | None:
    k, n = batch.batch_size // 2, batch.batch_size
    halves = [(batch.select_samples(0, k), grad[:k].clone()), (batch.select_samples(k, n), grad[k:].clone())]
    split = _run(backend, problem, halves)
    whole = _run(backend, problem, [(batch, grad)])[0]
    bounds = _full_bounds(problem, *_expect(problem, halves, split), *_expect(problem, [(batch, grad)]))
    what = "two half-batch steps do not end where the whole-batch step does"
    return _weights_apart(split[1].weights, whole.weights, bounds, what)


def check_relation(backend: object, problem: TrainingProblem, relation: str, *, seed: int = 0) -> str | None:
    """``None`` when ``relation`` holds for the backend on ``problem``'s first step (or does not
    apply, see `applies`), else what broke it. The problem must be validated and supported;
    exceptions of the backend propagate."""
    if not applies(relation, problem):
        return None
    batch, grad = problem.steps[0].batch, problem.steps[0].grad_output
    if relation == "zero-gradient":
        return _zero_gradient(backend, problem, batch, grad)
    if relation == "double-gradient":
        return _double_gradient(backend, problem, batch, grad)
    if relation in ("permute", "reorder-keys"):
        return _reordered_batch(backend, problem, batch, grad, relation, seed)
    return _split_batch(backend, problem, batch, grad)
