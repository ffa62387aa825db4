"""The forward lookup as a benchmark case: ``prepare`` once, then ``lookup(batch)`` is timed.

The check before timing compares the full batch's result, on up to ``samples`` samples spread
over the batch (first and last included), with the float64 reference: the oracle is a Python
loop, so checking every sample of a large workload would take minutes; the rows it checks are the
timed call's own rows, not those of a smaller problem.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch

from harness.agreement import Oracle, Outcome, Verdict
from harness.bench.case import BenchCase
from harness.bench.metrics import BYTE_MODEL, byte_model
from harness.known import Observation
from harness.model import JaggedBatch, Problem, total_dim
from harness.tolerance import compare


def sub_batch(batch: JaggedBatch, samples: list[int]) -> JaggedBatch:
    """The bags of ``samples`` (in that order) for every feature, as a smaller batch."""
    b = batch.batch_size
    offsets = batch.offsets.tolist()
    picks: list[torch.Tensor] = []
    weights: list[torch.Tensor] = []
    lengths = []
    for f in range(len(batch.keys)):
        for s in samples:
            lo, hi = offsets[f * b + s], offsets[f * b + s + 1]
            picks.append(batch.values[lo:hi])
            if batch.weights is not None:
                weights.append(batch.weights[lo:hi])
            lengths.append(hi - lo)
    values = torch.cat(picks) if picks else batch.values[:0]
    w = (torch.cat(weights) if weights else batch.weights[:0]) if batch.weights is not None else None
    return JaggedBatch(batch.keys, values, torch.tensor(lengths, dtype=torch.int64), w)


def checked_samples(batch_size: int, limit: int) -> list[int]:
    """Every sample, or ``limit`` of them spread evenly over the batch (first and last included)."""
    if batch_size <= limit:
        return list(range(batch_size))
    if limit <= 1:
        return [0][:limit]
    step = (batch_size - 1) / (limit - 1)
    return sorted({round(i * step) for i in range(limit)})


def check_result(problem: Problem, batch: JaggedBatch, result: Any, samples: list[int]) -> Verdict:
    """Judge the full-batch result on the chosen samples' rows against the reference."""
    want = (batch.batch_size, total_dim(problem.tables))
    if not isinstance(result, torch.Tensor):
        return Verdict("?", Outcome.DISAGREE, f"result is a {type(result).__name__}, expected a tensor")
    if tuple(result.shape) != want or result.dtype != torch.float32:
        return Verdict(
            "?", Outcome.DISAGREE, f"result is {result.dtype} {tuple(result.shape)}, expected float32 {want}"
        )
    sub = sub_batch(batch, samples)
    oracle = Oracle.of(problem.tables, problem.weights, sub)
    rows = result.detach().cpu()[samples]
    comparison = compare(rows, oracle.reference.value, oracle.tolerance)
    outcome = Outcome.AGREE if comparison.agree else Outcome.DISAGREE
    # What was checked, for a known case's model (`mark_known`): these rows, on these samples.
    checked = Problem(problem.tables, problem.weights, sub, problem.metadata)
    observed = None if comparison.agree else Observation(result=rows, problem=checked)
    return Verdict("?", outcome, comparison.describe(), comparison, observed)


class ForwardCase(BenchCase):
    """``backend.prepare(tables, weights)``, then the timed call ``lookup(batch)``."""

    mode: ClassVar[str] = "forward"
    test_name: ClassVar[str] = "test_lookup"
    byte_model_text: ClassVar[str] = BYTE_MODEL

    def backend_declines(self) -> str | None:
        return self.backend.supports(self.problem.tables, self.batch)

    def prepare(self) -> Callable[[], Any]:
        lookup = self.backend.prepare(self.problem.tables, self.problem.weights)
        batch = self.batch
        return lambda: lookup(batch)

    def check(self, result: Any, samples: int) -> Verdict:
        return check_result(self.problem, self.batch, result, checked_samples(self.batch.batch_size, samples))

    def byte_model(self) -> dict[str, int]:
        return byte_model(self.problem.tables, self.batch)

    def extra_info(self) -> dict[str, Any]:
        return {**super().extra_info(), "index_bytes_counted": False}
