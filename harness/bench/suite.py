"""The pytest-benchmark suite that `jagbench bench` runs: one test per (backend, workload).

Not collected by the repository's own tests (it lives outside ``tests/``); `harness.bench.runner.run_bench`
runs it with a `harness.bench.BenchPlugin` that parametrises ``case``. Per case:

1. ``supports`` -- an unsupported case is skipped and recorded, not failed;
2. ``prepare`` -- outside the timing;
3. one call, checked against the reference on up to ``check_samples`` samples spread over the
   batch (the float64 oracle is a Python loop; the rows it checks are the timed call's own rows).
   A wrong result fails the test and is recorded with the detail, and is not timed; a
   disagreement explained by a known-discrepancy case (``cases/known/``) is timed but flagged;
4. timing with ``benchmark.pedantic``, the device synchronised before and after each round on CUDA.
"""

from __future__ import annotations

import gc
import math
import time
from typing import Any

import pytest
import torch

from harness.agreement import Oracle, Outcome, Verdict, mark_known
from harness.bench.metrics import BYTE_MODEL, byte_model
from harness.bench.runner import BenchPlugin, synchronize_for
from harness.bench.workloads import case_fits
from harness.cases import load_cases
from harness.model import JaggedBatch, Problem, total_dim
from harness.tolerance import compare
from harness.validate import validate_problem

pytestmark = pytest.mark.benchmark_suite


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
    step = (batch_size - 1) / (limit - 1)
    return sorted({round(i * step) for i in range(limit)})


def check_result(problem: Problem, batch: JaggedBatch, result: torch.Tensor, samples: list[int]) -> Verdict:
    """Judge the full-batch result on the chosen samples' rows against the reference."""
    want = (batch.batch_size, total_dim(problem.tables))
    if tuple(result.shape) != want or result.dtype != torch.float32:
        return Verdict(
            "?", Outcome.DISAGREE, f"result is {result.dtype} {tuple(result.shape)}, expected float32 {want}"
        )
    sub = sub_batch(batch, samples)
    oracle = Oracle.of(problem.tables, problem.weights, sub)
    comparison = compare(result.detach().cpu()[samples], oracle.reference.value, oracle.bound)
    outcome = Outcome.AGREE if comparison.agree else Outcome.DISAGREE
    return Verdict("?", outcome, comparison.describe(), comparison)


def test_lookup(benchmark: Any, case: str, request: pytest.FixtureRequest) -> None:
    plugin: BenchPlugin = next(
        p for p in request.config.pluginmanager.get_plugins() if isinstance(p, BenchPlugin)
    )
    workload, backend = plugin.case(case)
    cfg = plugin.config
    label = f"{backend.name} x {workload.name}"
    index = plugin.cases.index((workload, backend)) + 1
    plugin.say(f"[{index}/{len(plugin.cases)}] {label}: generating / preparing")
    gc.collect()  # free the previous case's prepared state now: modules in reference cycles hold tables
    problem = plugin.problem(workload)
    batch = validate_problem(problem.tables, problem.batch, problem.weights)
    record = {"backend": backend.name, "workload": workload.name}

    reason = backend.supports(problem.tables, batch) or case_fits(workload, backend)
    if reason is not None:
        plugin.unsupported.append({**record, "reason": reason})
        plugin.append({"unsupported": {**record, "reason": reason}})
        plugin.done += 1
        pytest.skip(f"{label}: unsupported: {reason}")

    samples = checked_samples(batch.batch_size, cfg.check_samples)
    try:
        lookup = backend.prepare(problem.tables, problem.weights)
        start = time.perf_counter()
        result = lookup(batch)  # first call: may compile; not timed
        sync = synchronize_for(result)
        one_call = time.perf_counter() - start
        if one_call <= cfg.max_call_s:  # a second call, compiled, sizes the number of rounds
            start = time.perf_counter()
            result = lookup(batch)
            if sync is not None:
                sync()
            one_call = time.perf_counter() - start
    except Exception as e:  # noqa: BLE001 - a backend's exception is its verdict
        verdict = Verdict(backend.name, Outcome.RAISED, f"{type(e).__name__}: {e}")
    else:
        verdict = check_result(problem, batch, result, samples)
    verdict = Verdict(backend.name, verdict.outcome, verdict.detail, verdict.comparison)
    verdict = mark_known([verdict], problem, load_cases())[0]
    if verdict.outcome in (Outcome.DISAGREE, Outcome.RAISED):
        failure = {**record, "outcome": verdict.outcome.value, "detail": verdict.detail}
        plugin.failed.append(failure)
        plugin.append({"failed": failure})
        plugin.done += 1
        plugin.say(
            f"[{index}/{len(plugin.cases)}] {label}: FAILED ({verdict.outcome.value}): {verdict.detail}"
        )
        pytest.fail(f"{label}: {verdict.outcome.value}: {verdict.detail}", pytrace=False)

    if one_call > cfg.max_call_s:
        reason = f"too slow to time: one call took {one_call:.1f} s (> --max-call-s {cfg.max_call_s:g})"
        plugin.unsupported.append({**record, "reason": reason})
        plugin.append({"unsupported": {**record, "reason": reason}})
        plugin.done += 1
        pytest.skip(f"{label}: {reason}")
    rounds = int(min(cfg.max_rounds, max(cfg.min_rounds, math.ceil(cfg.max_time / max(one_call, 1e-9)))))
    bytes_ = byte_model(problem.tables, batch)
    benchmark.group = workload.name
    benchmark.extra_info.update(
        {
            "backend": backend.name,
            "workload": workload.name,
            "parameters": workload.parameters(),
            **bytes_,
            "byte_model": BYTE_MODEL,
            "index_bytes_counted": False,
            "checked": {"outcome": verdict.outcome.value, "samples": len(samples), "detail": verdict.detail},
            "known_discrepancy": verdict.detail if verdict.outcome is Outcome.KNOWN else None,
            "device": str(result.device),
            "synchronized": sync is not None,
            "torch_threads": torch.get_num_threads(),
        }
    )
    del result
    if sync is None:
        benchmark.pedantic(lookup, args=(batch,), rounds=rounds, warmup_rounds=1)
    else:

        def timed() -> torch.Tensor:
            out = lookup(batch)
            sync()
            return out

        benchmark.pedantic(timed, setup=sync, rounds=rounds, warmup_rounds=1)
    stats = benchmark.stats
    entry = stats.as_dict(include_data=True)
    entry["extra_info"] = dict(benchmark.extra_info)
    plugin.append({"benchmark": entry})
    plugin.done += 1
    median = stats.stats.median
    plugin.say(
        f"[{index}/{len(plugin.cases)}] {label}: median {median * 1e3:.3f} ms, "
        f"{bytes_['bytes'] / median / 1e9:.2f} GB/s, {rounds} rounds"
        + (" (known discrepancy)" if verdict.outcome is Outcome.KNOWN else "")
    )
