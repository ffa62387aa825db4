"""Figures derived from a run's medians: speedup against the baseline, GB/s, ids/s, bandwidth fraction."""

from __future__ import annotations

from typing import Any


def add_derived(benchmarks: list[dict[str, Any]], baseline: str, bandwidth: dict[str, Any] | None) -> None:
    """Add ``speedup_vs_baseline`` and ``bandwidth_fraction`` to each benchmark's ``extra_info``."""
    base = {
        b["extra_info"]["workload"]: b["stats"]["median"]
        for b in benchmarks
        if b["extra_info"].get("backend") == baseline
    }
    for b in benchmarks:
        info = b["extra_info"]
        median = b["stats"]["median"]
        ref = base.get(info.get("workload"))
        info["baseline"] = baseline
        info["speedup_vs_baseline"] = ref / median if ref and median else None
        info["gbps"] = info["bytes"] / median / 1e9 if median else None
        info["ids_per_s"] = info["ids"] / median if median else None
        if bandwidth:
            info["memory_bandwidth_gbps"] = bandwidth["gbps"]
            info["bandwidth_fraction"] = info["gbps"] / bandwidth["gbps"] if info["gbps"] else None
