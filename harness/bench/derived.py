"""Figures derived from a run's rounds: speedup against the baseline, GB/s, ids/s, bandwidth fraction.

The speedup is paired (`harness.bench.paired`): the median of per-round ratios against the
baseline's time in the same round, with its bootstrap interval and, with ``--repeat``, each
repeat's value and their spread. GB/s and ids/s divide by the case's own median.
"""

from __future__ import annotations

from typing import Any

from harness.bench.paired import speedup


def add_derived(benchmarks: list[dict[str, Any]], baseline: str, bandwidth: dict[str, Any] | None) -> None:
    """Add ``speedup_vs_baseline`` (+ interval, per repeat, spread), ``gbps``, ``ids_per_s`` and
    ``bandwidth_fraction`` to each benchmark's ``extra_info``."""

    def key(b: dict[str, Any]) -> tuple[str, str | None]:
        return b["extra_info"].get("mode", "forward"), b["extra_info"].get("workload")

    base = {key(b): b for b in benchmarks if b["extra_info"].get("backend") == baseline}
    for b in benchmarks:
        info = b["extra_info"]
        median = b["stats"]["median"]
        ref = base.get(key(b))
        info["baseline"] = baseline
        s = speedup(b, ref) if ref is not None and median else None
        info["speedup_vs_baseline"] = s.speedup if s else None
        info["speedup_interval"] = [s.low, s.high] if s and s.low is not None else None
        info["speedup_by_repeat"] = list(s.by_repeat) if s else None
        info["speedup_spread"] = s.spread if s else None
        info["speedup_paired"] = s.paired if s else None
        info["gbps"] = info["bytes"] / median / 1e9 if median else None
        info["ids_per_s"] = info["ids"] / median if median and "ids" in info else None
        if bandwidth:
            info["memory_bandwidth_gbps"] = bandwidth["gbps"]
            info["bandwidth_fraction"] = info["gbps"] / bandwidth["gbps"] if info["gbps"] else None
