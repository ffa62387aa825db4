"""Timing windows -> pytest-benchmark's benchmark entries, with its own statistics.

A window is what `harness.bench.runner` records for one workload in one repeat: every case's
rounds (the span of each and its iterations, the round and its position in it), the probe's times
and how the rounds ran. It is written to the interrupted-run sidecar as it finishes and kept in
the JSON (``jagbench.windows``).

`benchmark_entries` turns the windows into one benchmark per (mode, backend, workload), the rounds
of every repeat together, built by pytest-benchmark's own `pytest_benchmark.stats.Metadata`
(``update`` divides a span by its iterations; ``as_dict`` writes ``stats`` with min, max, mean,
stddev, median, iqr, outliers, ops and ``data``). Beside the data, ``extra_info.rounds`` says which
repeat, round and position each entry came from, so that `harness.bench.paired` can pair them, and
``extra_info.repeats`` holds each repeat's median.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pytest_benchmark.stats import Metadata

from harness.bench.derived import add_derived
from harness.bench.noise import DEFAULT_THRESHOLD, noise_summary
from harness.bench.paired import all_pairs


@dataclass
class _Named:
    """What `Metadata` reads from a pytest-benchmark fixture, for a benchmark made without one."""

    name: str
    fullname: str
    group: str
    param: str
    params: dict[str, str]
    extra_info: dict[str, Any] = field(default_factory=dict)
    cprofile_stats: None = None
    has_error: bool = False


def _key(window: dict[str, Any], case: dict[str, Any]) -> tuple[str, str, str]:
    return window.get("mode", "forward"), case["backend"], window["workload"]


def benchmark_entries(windows: Sequence[dict[str, Any]], options: dict[str, Any]) -> list[dict[str, Any]]:
    """One pytest-benchmark benchmark dict per (mode, backend, workload), in first-seen order."""
    grouped: dict[tuple[str, str, str], list[tuple[dict[str, Any], dict[str, Any]]]] = {}
    for w in windows:
        for c in w["cases"]:
            if c["seconds"]:
                grouped.setdefault(_key(w, c), []).append((w, c))
    out = []
    for (mode, backend, workload), parts in grouped.items():
        first = parts[0][1]
        param = f"{backend}@{workload}"
        named = _Named(
            name=first["name"],
            fullname=f"jagbench/{mode}::{first['name']}",
            group=workload,
            param=param,
            params={"case": param},
        )
        iterations = int(first["iterations"])
        meta = Metadata(named, iterations=iterations, options=options)
        rounds: dict[str, list[int]] = {"repeat": [], "round": [], "position": []}
        repeats = []
        for w, c in parts:
            per_iteration = []
            for span in c["seconds"]:
                # Metadata.update divides by its iterations; a repeat calibrated differently is scaled.
                meta.update(span * iterations / c["iterations"])
                per_iteration.append(span / c["iterations"])
            rounds["repeat"] += [int(w.get("repeat", 0))] * len(c["seconds"])
            rounds["round"] += list(c["rounds"])
            rounds["position"] += list(c["positions"])
            repeats.append(
                {
                    "repeat": int(w.get("repeat", 0)),
                    "rounds": len(c["seconds"]),
                    "iterations": c["iterations"],
                    "median": statistics.median(per_iteration),
                }
            )
        named.extra_info.update(first["extra_info"])
        named.extra_info["rounds"] = rounds
        named.extra_info["repeats"] = repeats
        named.extra_info["interleaved_with"] = [o["backend"] for o in parts[0][0]["cases"] if o is not first]
        out.append(meta.as_dict(include_data=True))
    return out


def slim_window(window: dict[str, Any]) -> dict[str, Any]:
    """A window without its cases' times (those are in the benchmarks): kept in ``jagbench.windows``."""
    out = {k: v for k, v in window.items() if k != "cases"}
    out["cases"] = [{"backend": c["backend"], "iterations": c["iterations"]} for c in window["cases"]]
    return out


def build_output(
    machine: dict[str, Any],
    commit: dict[str, Any],
    windows: Sequence[dict[str, Any]],
    options: dict[str, Any],
    section: dict[str, Any],
    baseline: str,
    bandwidth: dict[str, Any] | None,
    noise_threshold: float = DEFAULT_THRESHOLD,
) -> dict[str, Any]:
    """pytest-benchmark's JSON document from the windows: benchmarks, derived figures, noise, pairs."""
    benchmarks = benchmark_entries(windows, options)
    add_derived(benchmarks, baseline, bandwidth)
    section = dict(section)
    section["noise"] = noise_summary(windows, noise_threshold)
    section["pairs"] = [s.as_dict() for s in all_pairs(benchmarks)]
    section["windows"] = [slim_window(w) for w in windows]
    return {"machine_info": machine, "commit_info": commit, "benchmarks": benchmarks, "jagbench": section}
