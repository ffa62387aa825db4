"""What a training problem exercises: the forward buckets of its batches and the training ones.

`training_buckets` reads a concrete `TrainingProblem` (not the spec it was drawn from), so it
describes a minimised or replayed case as well as a generated one. The forward dimensions
(`harness.fuzz.coverage.DIMENSIONS`: tables, dtypes, pooling, weighted, ...) are those of the
first step's problem; `TRAINING_DIMENSIONS` adds the optimizer and the steps.
"""

from __future__ import annotations

import math

import torch

from harness.fuzz.coverage import DIMENSIONS, buckets
from harness.training.problem import TrainingProblem

TRAINING_DIMENSIONS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("optimizer", ("sgd", "adagrad", "rowwise_adagrad")),
    ("weight decay", ("none", "l2", "decoupled", "mode with zero decay")),
    ("learning rate", ("<1e-6", "1e-6-1e-2", "1e-2-1", ">1")),
    ("steps", ("1", "2", "3", ">3")),
    ("batches", ("one step", "same batch", "other batches")),
    ("duplicate rows", ("none", "within a feature", "across features")),
    ("grad_output", ("all zero", "integers", "other")),
)
"""The training dimensions and their buckets, in display order:

- ``weight decay``: the mode, or "mode with zero decay" (a mode set, the decay 0: no decay);
- ``batches``: whether later steps reuse the first step's batch or bring others;
- ``duplicate rows``: whether some row occurs more than once in a step, within one feature's ids
  or only across the features of a shared table (where the gradients of several features meet);
- ``grad_output``: all zeros, all integers (exact gradient sums) or anything else.
"""

ALL_DIMENSIONS = DIMENSIONS + TRAINING_DIMENSIONS


def _learning_rate(lr: float) -> str:
    if lr < 1e-6:
        return "<1e-6"
    if lr <= 1e-2:
        return "1e-6-1e-2"
    return "1e-2-1" if lr <= 1 else ">1"


def _duplicates(problem: TrainingProblem) -> str:
    """The strongest kind of repeated row in any step (across features beats within one)."""
    owner = {f: i for i, t in enumerate(problem.tables) for f in t.feature_names}
    found = "none"
    for s in problem.steps:
        batch = s.batch
        for i in range(len(problem.tables)):
            per_feature = []
            for key in batch.keys:
                if owner.get(key) == i:
                    ids = torch.unique(batch.values[batch.feature_slice(key)].to(torch.int64))
                    per_feature.append(ids)
                    if len(ids) < batch.feature_slice(key).stop - batch.feature_slice(key).start:
                        found = "within a feature"
            if len(per_feature) > 1:
                together = torch.cat(per_feature)
                if len(torch.unique(together)) < len(together):
                    return "across features"
    return found


def _grad_kind(problem: TrainingProblem) -> str:
    grads = [s.grad_output for s in problem.steps if s.grad_output.numel()]
    if all(bool((g == 0).all()) for g in grads):
        return "all zero"
    if all(bool((g == torch.round(g)).all()) for g in grads):
        return "integers"
    return "other"


def training_buckets(problem: TrainingProblem) -> dict[str, str]:
    """One bucket per dimension of `ALL_DIMENSIONS` (forward ones from the first step)."""
    o = problem.optimizer
    n = len(problem.steps)
    first = problem.steps[0].batch
    if n == 1:
        batches = "one step"
    else:
        batches = "same batch" if all(s.batch is first for s in problem.steps) else "other batches"
    if o.weight_decay_mode == "none":
        decay = "none"
    else:
        decay = o.weight_decay_mode if o.weight_decay != 0 else "mode with zero decay"
    lr = o.learning_rate
    return {
        **buckets(problem.forward_problem(0)),
        "optimizer": o.kind,
        "weight decay": decay,
        "learning rate": _learning_rate(lr) if math.isfinite(lr) else ">1",
        "steps": str(n) if n <= 3 else ">3",
        "batches": batches,
        "duplicate rows": _duplicates(problem),
        "grad_output": _grad_kind(problem),
    }
