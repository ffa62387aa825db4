"""The benchmark driver: `run_bench` times every chosen backend on every chosen workload, interleaved.

For each repeat (``--repeat``), for each workload: the problem is generated (seeded) and validated;
each backend's case (`harness.bench.case`) is asked whether it can run, prepared, called once (may
compile) and checked against the reference; then all the cases that passed are timed together in
interleaved rounds (`harness.bench.timing`), a seeded new order each round, the noise probe before
every round (`harness.bench.noise`) and, with ``--flush-cache``, the caches flushed before every
timed call (`harness.bench.conditions`). ``--load N`` keeps N spinning processes running from
before the bandwidth measurement to after the last round.

A case that fails its check (or raises) is recorded with the detail and not timed; one whose raise
is explained by a known discrepancy (``cases/known/``) is recorded as known, with the case's name,
and not timed; one whose wrong result is a known discrepancy is timed and flagged.

The JSON is pytest-benchmark's format (`harness.bench.record`) with a ``jagbench`` section. While
running, each finished window (one workload in one repeat) is appended to ``<json>.partial.jsonl``
(a header line, then one line per window or record); `harness.bench.runs.load_run` reads it when
the run was interrupted. Once the JSON is written the sidecar is removed.
"""

from __future__ import annotations

import gc
import json
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from harness.agreement import Outcome, Verdict
from harness.backend import Backend
from harness.bench.case import BenchCase
from harness.bench.conditions import CacheFlush, background_load, cache_state
from harness.bench.forward import ForwardCase
from harness.bench.metrics import environment, measure_copy_bandwidth
from harness.bench.noise import DEFAULT_THRESHOLD, PROBE_DESCRIPTION, ReferenceKernel
from harness.bench.record import build_output
from harness.bench.timing import Slot, Timer, calibrate, plan_rounds, time_interleaved
from harness.bench.training import TrainCase, options_json
from harness.bench.workloads import Workload
from harness.cases import known_discrepancy, load_cases
from harness.validate import validate_problem

if TYPE_CHECKING:
    from harness.progress import Progress

RUN_FORMAT = "jagbench-run/2"
CASE_KINDS: dict[str, type[BenchCase]] = {"forward": ForwardCase, "train": TrainCase}
"""The kinds of case ``--mode`` chooses from (a quantized lookup would register here too)."""


@dataclass
class BenchConfig:
    """What one `jagbench bench` run measures, and how (see docs/benchmarks.md, "Method")."""

    backends: Sequence[Backend]
    workloads: Sequence[Workload]
    json_path: Path
    baseline: str = "torch"
    mode: str = "forward"
    max_time: float = 1.0
    min_rounds: int = 20
    max_rounds: int = 1000
    warmup_rounds: int = 3
    min_round_s: float = 0.002
    max_call_s: float = 10.0
    check_samples: int = 256
    bandwidth_bytes: int = 1 << 30
    repeat: int = 1
    seed: int = 0
    flush_mib: int | None = None
    load: int = 0
    noise_threshold: float = DEFAULT_THRESHOLD
    probe: bool = True
    timer: Timer | None = None
    case_options: Mapping[str, Any] = field(default_factory=dict)
    """Keyword arguments of the mode's case class (``--mode train``: ``optimizer``)."""


@dataclass
class BenchResult:
    """What a run found: the JSON it wrote and what `jagbench bench` prints about it."""

    json_path: Path
    output: dict[str, Any]
    failed: list[dict[str, Any]] = field(default_factory=list)
    unsupported: list[dict[str, Any]] = field(default_factory=list)
    known: list[dict[str, Any]] = field(default_factory=list)

    @property
    def benchmarks(self) -> list[dict[str, Any]]:
        return self.output["benchmarks"]

    @property
    def jagbench(self) -> dict[str, Any]:
        return self.output["jagbench"]


@dataclass
class _Prepared:
    """A case that passed its check: its slot in the rounds and what the JSON records about it."""

    case: BenchCase
    slot: Slot
    extra_info: dict[str, Any]


class _Run:
    """The state of one run: records, windows, the sidecar file."""

    def __init__(self, config: BenchConfig, progress: Progress | None) -> None:
        self.config = config
        self.progress = progress
        self.kind = CASE_KINDS[config.mode]
        self.timer = config.timer
        self.failed: list[dict[str, Any]] = []
        self.unsupported: list[dict[str, Any]] = []
        self.known: list[dict[str, Any]] = []
        self.windows: list[dict[str, Any]] = []
        # (workload, slot) -> (seconds per call, iterations per span), from the first repeat.
        self.calibrated: dict[tuple[str, str], tuple[float, int]] = {}
        self.recorded: set[tuple[str, str, str]] = set()
        self.done = 0
        self.bandwidth: dict[str, Any] | None = None
        self.load_pids: list[int] = []
        self.flush = CacheFlush(config.flush_mib) if config.flush_mib else None
        self.probe: ReferenceKernel | None = None
        self.known_cases = load_cases()

    @property
    def partial_path(self) -> Path:
        return self.config.json_path.with_name(self.config.json_path.name + ".partial.jsonl")

    def note(self, message: str) -> None:
        if self.progress is not None:
            self.progress.note(message)

    def append(self, record: dict[str, Any]) -> None:
        with self.partial_path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def record(self, kind: str, entry: dict[str, Any]) -> None:
        """A failed, unsupported or known case, once per (backend, workload) over the repeats."""
        key = (kind, entry["backend"], entry["workload"])
        if key in self.recorded:
            return
        self.recorded.add(key)
        {"failed": self.failed, "unsupported": self.unsupported, "known": self.known}[kind].append(entry)
        self.append({kind: entry})

    def options(self) -> dict[str, Any]:
        """pytest-benchmark's ``options`` of each benchmark, with jagbench's method added."""
        c = self.config
        return {
            "disable_gc": True,
            "timer": getattr(self.timer, "__name__", "perf_counter") if self.timer else "perf_counter",
            "min_rounds": c.min_rounds,
            "max_rounds": c.max_rounds,
            "max_time": c.max_time,
            "min_time": c.min_round_s,
            "warmup": c.warmup_rounds,
            "interleaved": True,
            "seed": c.seed,
        }

    def section(self) -> dict[str, Any]:
        c = self.config
        return {
            "format": RUN_FORMAT,
            "mode": c.mode,
            "case_options": options_json(c.case_options),
            "bandwidth": self.bandwidth,
            "byte_model": self.kind.byte_model_text,
            "baseline": c.baseline,
            "backends": [b.name for b in c.backends],
            "workloads": [w.name for w in c.workloads],
            "failed": self.failed,
            "unsupported": self.unsupported,
            "known": self.known,
            "cases_total": len(c.backends) * len(c.workloads) * c.repeat,
            "cases_finished": self.done,
            "argv": sys.argv,
            "method": {
                "interleaved": True,
                "seed": c.seed,
                "repeat": c.repeat,
                "max_time_per_case_s": c.max_time,
                "min_rounds": c.min_rounds,
                "max_rounds": c.max_rounds,
                "warmup_rounds": c.warmup_rounds,
                "min_round_s": c.min_round_s,
                "probe": PROBE_DESCRIPTION if c.probe else None,
            },
            "conditions": {**cache_state(c.flush_mib), "load": {"processes": c.load}},
        }

    # --- one window ---------------------------------------------------------------------------

    def prepare(self, case: BenchCase) -> _Prepared | None:
        """Ask, prepare, call once and check; record and return ``None`` for a case not to time."""
        c = self.config
        record = {"backend": case.backend.name, "workload": case.workload.name}
        try:
            reason = case.unsupported()
        except Exception as e:  # noqa: BLE001 - a backend's exception is its verdict
            reason, verdict = (
                None,
                Verdict(case.backend.name, Outcome.RAISED, f"supports raised {type(e).__name__}: {e}"),
            )
            result = None
        else:
            verdict = None
        if reason is not None:
            self.record("unsupported", {**record, "reason": reason})
            return None
        one_call, sync, result = 0.0, None, None
        if verdict is None:
            try:
                call = case.prepare()
                start = time.perf_counter()
                result = call()  # first call: may compile; not timed
                sync = torch.cuda.synchronize if case.device_of(result).startswith("cuda") else None
                one_call = time.perf_counter() - start
                if one_call <= c.max_call_s:  # a second call, compiled, for the size of a round
                    start = time.perf_counter()
                    result = call()
                    if sync is not None:
                        sync()
                    one_call = time.perf_counter() - start
            except Exception as e:  # noqa: BLE001 - a backend's exception is its verdict
                verdict = Verdict.of_exception(case.backend, e)
                result = None
            else:
                checked = case.check(result, c.check_samples)
                observed = checked.observed and replace(checked.observed, backend=case.backend)
                verdict = replace(checked, backend=case.backend.name, observed=observed)
        verdict = case.mark_known(verdict, self.known_cases)
        raised = result is None
        if verdict.outcome is Outcome.KNOWN and raised:
            explained = known_discrepancy(self.known_cases, case.backend.name, case.problem)
            name = verdict.known_cases[0] if verdict.known_cases else explained.name if explained else None
            entry = {**record, "case": name, "detail": verdict.detail}
            self.record("known", entry)
            self.note(
                f"{case.backend.name} x {case.workload.name}: known discrepancy, not timed: {verdict.detail}"
            )
            return None
        if verdict.outcome in (Outcome.DISAGREE, Outcome.RAISED):
            self.record("failed", {**record, "outcome": verdict.outcome.value, "detail": verdict.detail})
            label = f"{case.backend.name} x {case.workload.name}"
            self.note(f"{label}: FAILED ({verdict.outcome.value}): {verdict.detail}")
            return None
        if one_call > c.max_call_s:
            reason = f"too slow to time: one call took {one_call:.1f} s (> --max-call-s {c.max_call_s:g})"
            self.record("unsupported", {**record, "reason": reason})
            return None
        samples = min(c.check_samples, case.batch.batch_size)
        extra = {
            **case.extra_info(),
            "checked": {"outcome": verdict.outcome.value, "samples": samples, "detail": verdict.detail},
            "known_discrepancy": verdict.detail if verdict.outcome is Outcome.KNOWN else None,
            "device": case.device_of(result),
            "synchronized": sync is not None,
            "torch_threads": torch.get_num_threads(),
            "conditions": {**cache_state(c.flush_mib), "load": c.load},
        }
        slot = Slot(case.backend.name, call, 1, sync)
        del result
        return _Prepared(case, slot, extra)

    @property
    def timer_kw(self) -> dict[str, Timer]:
        return {"timer": self.timer} if self.timer else {}

    def plan(self, workload: Workload, prepared: Sequence[_Prepared]) -> int:
        """Set each slot's iterations (calibrated in the first repeat, kept for the others; one
        when the caches are flushed) and its warm-up call before each span (none when the caches
        are flushed), and return the rounds that fill the workload's budget."""
        c = self.config
        round_s = 0.0
        for p in prepared:
            key = (workload.name, p.slot.name)
            if key not in self.calibrated:
                per_call, iterations = calibrate(p.slot, min_round_s=c.min_round_s, **self.timer_kw)
                self.calibrated[key] = (per_call, 1 if self.flush else iterations)
            per_call, p.slot.iterations = self.calibrated[key]
            p.slot.warm_up_calls = 0 if self.flush else 1
            round_s += per_call * (p.slot.iterations + p.slot.warm_up_calls)
        if self.probe is not None:
            round_s += self.probe()
        return plan_rounds(round_s, c.max_time * len(prepared), c.min_rounds, c.max_rounds)

    def window(self, workload: Workload, index: int, repeat: int) -> None:
        """Time ``workload``'s cases in one repeat: check them, interleave them, record the window."""
        c = self.config
        gc.collect()  # the previous window's prepared state goes first: modules in cycles hold tables
        problem = workload.problem()
        batch = validate_problem(problem.tables, problem.batch, problem.weights)
        prepared = []
        for backend in c.backends:
            self.status(workload, repeat, checking=backend.name)
            p = self.prepare(self.kind(backend, workload, problem, batch, **c.case_options))
            if p is not None:
                prepared.append(p)
        if not prepared:
            self.done += len(c.backends)
            return
        rounds = self.plan(workload, prepared)
        self.status(workload, repeat, timing=f"{len(prepared)} backend(s) x {rounds} rounds")
        rng = np.random.default_rng([c.seed, repeat, index])
        base = repeat * len(c.workloads) + index

        def on_round(r: int) -> None:
            if self.progress is not None:
                self.progress.update(
                    base + (r + 1) / rounds, workload=workload.name, round=f"{r + 1}/{rounds}"
                )

        timed = time_interleaved(
            [p.slot for p in prepared],
            rounds,
            rng=rng,
            warmup_rounds=c.warmup_rounds,
            between=self.flush,
            probe=self.probe,
            on_round=on_round,
            **self.timer_kw,
        )
        cases = []
        for p, t in zip(prepared, timed.slots, strict=True):
            if t.error is not None:
                self.record(
                    "failed",
                    {
                        "backend": t.name,
                        "workload": workload.name,
                        "outcome": "raised",
                        "detail": f"while timed (round {t.error_round}): {t.error}",
                    },
                )
            cases.append(
                {
                    "backend": t.name,
                    "name": p.case.name,
                    "iterations": t.iterations,
                    "seconds": t.seconds,
                    "rounds": t.rounds,
                    "positions": t.positions,
                    "extra_info": p.extra_info,
                }
            )
        window = {
            "workload": workload.name,
            "repeat": repeat,
            "mode": c.mode,
            "rounds": rounds,
            "warmup_rounds": timed.warmup_rounds,
            "seconds": timed.seconds,
            "probe": timed.probe,
            "cases": cases,
        }
        self.windows.append(window)
        self.append({"window": window})
        self.done += len(c.backends)
        medians = [
            f"{t.name} {sorted(t.seconds)[len(t.seconds) // 2] / t.iterations * 1e3:.4g} ms"
            for t in timed.slots
            if t.seconds
        ]
        where = f"[repeat {repeat + 1}/{c.repeat}] " if c.repeat > 1 else ""
        self.note(f"{where}{workload.name}: {', '.join(medians)} ({rounds} rounds)")

    def status(self, workload: Workload, repeat: int, **status: object) -> None:
        if self.progress is not None:
            done = repeat * len(self.config.workloads) + self.config.workloads.index(workload)
            self.progress.update(done, workload=workload.name, **status)

    # --- the whole run ------------------------------------------------------------------------

    def run(self) -> BenchResult:
        import pytest_benchmark
        from pytest_benchmark.plugin import pytest_benchmark_generate_machine_info
        from pytest_benchmark.utils import get_commit_info

        c = self.config
        c.json_path.parent.mkdir(parents=True, exist_ok=True)
        with background_load(c.load) as pids:
            self.load_pids = pids
            if c.load:
                self.note(f"background load: {c.load} spinning process(es)")
            self.note(f"measuring copy bandwidth ({c.bandwidth_bytes / 2**20:.0f} MiB buffer)")
            self.bandwidth = measure_copy_bandwidth(c.bandwidth_bytes)
            self.note(f"copy bandwidth {self.bandwidth['gbps']:.1f} GB/s (read + write)")
            machine = pytest_benchmark_generate_machine_info()
            machine["jagbench"] = environment()
            machine["memory_bandwidth_gbps"] = self.bandwidth["gbps"]
            commit = get_commit_info()
            self.partial_path.write_text("")
            header = {"format": RUN_FORMAT, "partial": True, "machine_info": machine, "commit_info": commit}
            self.append({**header, "jagbench": self.section(), "options": self.options()})
            if c.probe:
                self.probe = ReferenceKernel(**self.timer_kw)
            if self.progress is not None:
                self.progress.start(
                    f"bench {len(c.backends)} backend(s)", total=len(c.workloads) * c.repeat, unit="workload"
                )
            try:
                for repeat in range(c.repeat):
                    for index, workload in enumerate(c.workloads):
                        self.window(workload, index, repeat)
                        gc.collect()
            finally:
                if self.progress is not None:
                    self.progress.finish()
        output = build_output(
            machine,
            commit,
            self.windows,
            self.options(),
            self.section(),
            c.baseline,
            self.bandwidth,
            c.noise_threshold,
        )
        output["datetime"] = datetime.now(timezone.utc).isoformat()
        output["version"] = pytest_benchmark.__version__
        c.json_path.write_text(json.dumps(output, indent=1))
        self.partial_path.unlink(missing_ok=True)
        return BenchResult(c.json_path, output, self.failed, self.unsupported, self.known)


def run_bench(config: BenchConfig, progress: Progress | None = None) -> BenchResult:
    """Run the benchmark (see the module docstring); the JSON is written to ``config.json_path``.

    On an error or Ctrl-C the background load is stopped and the sidecar keeps the finished windows.
    """
    if config.mode not in CASE_KINDS:
        raise ValueError(f"unknown mode {config.mode!r}; known: {', '.join(CASE_KINDS)}")
    return _Run(config, progress).run()
