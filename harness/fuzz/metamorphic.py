"""Metamorphic relations: transformations of a problem whose pooled result is known without a reference.

- ``permute``: permuting the ids (with their per-sample weights) inside every bag leaves each
  pooled value unchanged;
- ``split-batch``: pooling samples ``[0, k)`` and ``[k, B)`` separately and stacking the rows gives
  the whole batch's result;
- ``split-table``: moving a shared table's later features into a copy of that table, placed right
  after it, leaves the result (and its column order) unchanged.

Exact equality is not owed. A permutation changes the order of the additions; a backend may also
block or vectorise its sums differently for another batch size or table layout. The written error
analysis (`harness.tolerance`) bounds *each* result by ``bound`` around the exact value whatever the
summation order, so two correct results differ by at most ``2 * bound`` per element; that is the
tolerance used here, and each must be of a class (finite, +-inf, NaN) its element may take. The
tolerance needs only the terms' magnitudes, signs and the bag lengths, which do not change under
these transformations, not the reference value.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from harness.model import JaggedBatch, Problem, TableConfig
from harness.tolerance import Tolerance, describe_classes, first_apart

RELATIONS: tuple[str, ...] = ("permute", "split-batch", "split-table")


def permute_bags(batch: JaggedBatch, seed: int) -> JaggedBatch:
    """The same batch with the ids (and per-sample weights) of every bag in a seeded random order."""
    n = len(batch.values)
    if n == 0:
        return batch
    gen = torch.Generator().manual_seed(seed)
    bag_of = torch.repeat_interleave(torch.arange(len(batch.lengths)), batch.lengths.to(torch.int64))
    key = bag_of.to(torch.float64) + torch.rand(n, generator=gen, dtype=torch.float64) * 0.5
    order = torch.argsort(key)
    return JaggedBatch(
        batch.keys,
        batch.values[order].clone(),
        batch.lengths.clone(),
        None if batch.weights is None else batch.weights[order].clone(),
    )


def split_table(problem: Problem) -> Problem | None:
    """The first table with several features split in two (the copy named ``<name>_split``), or None."""
    for i, t in enumerate(problem.tables):
        if len(t.feature_names) > 1:
            k = len(t.feature_names) // 2
            first = TableConfig(
                t.name, t.num_embeddings, t.embedding_dim, t.feature_names[:k], t.pooling, t.dtype
            )
            second = TableConfig(
                f"{t.name}_split", t.num_embeddings, t.embedding_dim, t.feature_names[k:], t.pooling, t.dtype
            )
            tables = problem.tables[:i] + (first, second) + problem.tables[i + 1 :]
            weights = dict(problem.weights)
            weights[second.name] = problem.weights[t.name].clone()
            return Problem(tables, weights, problem.batch, dict(problem.metadata))
    return None


def within(
    got: torch.Tensor, expected: torch.Tensor, tolerance: Tolerance | torch.Tensor
) -> tuple[bool, str]:
    """Whether ``got`` and ``expected`` (two results of the same backend) can both be correct.

    Each must be of a class its element may take (`harness.tolerance`: finite, or an infinity or
    NaN only where some summation order overflows or the reference is not finite), and where
    both are finite they may differ by at most ``2 * bound``. A bare bound tensor allows
    non-finite values only where ``expected`` has the same one.
    """
    if tuple(got.shape) != tuple(expected.shape):
        return False, f"shape {tuple(got.shape)} instead of {tuple(expected.shape)}"
    flat = first_apart(got, expected, tolerance)
    if flat < 0:
        return True, ""
    idx = tuple(int(i) for i in np.unravel_index(flat, tuple(got.shape)))
    a, e = float(got[idx]), float(expected[idx])
    if isinstance(tolerance, Tolerance):
        bound, allowed = float(tolerance.bound[idx]), describe_classes(int(tolerance.classes[idx]))
    else:
        bound, allowed = float(tolerance[idx]), "finite or the value before"
    return False, (
        f"element {list(idx)}: {a!r} vs {e!r} before the transformation, "
        f"allowed difference 2 * {bound:.3g} (the element may be {allowed})"
    )


def transformed_results(
    relation: str,
    problem: Problem,
    run: Callable[[Problem], torch.Tensor],
    seed: int,
) -> tuple[list[Problem], torch.Tensor] | None:
    """Apply ``relation`` to ``problem``: the transformed problem(s) and their recombined result.

    ``split-batch`` gives two problems (the halves), the others one. None when the relation does
    not apply (no shared table to split).
    """
    if relation == "permute":
        p = Problem(
            problem.tables, problem.weights, permute_bags(problem.batch, seed), dict(problem.metadata)
        )
        return [p], run(p)
    if relation == "split-batch":
        b = problem.batch.batch_size
        k = seed % (b + 1)
        halves = [problem.batch.select_samples(0, k), problem.batch.select_samples(k, b)]
        parts = [Problem(problem.tables, problem.weights, h, dict(problem.metadata)) for h in halves]
        results = [run(p) for p in parts]
        return parts, torch.cat([r.detach().to("cpu") for r in results], dim=0)
    if relation == "split-table":
        p = split_table(problem)
        return None if p is None else ([p], run(p))
    raise ValueError(f"unknown relation {relation!r}; expected one of {RELATIONS}")
