"""Reading benchmark runs: pytest-benchmark JSON files, or the ``.partial.jsonl`` of an interrupted run.

An interrupted run's sidecar holds its finished timing windows; they are turned into benchmarks
the same way the runner does (`harness.bench.record.build_output`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.bench.noise import DEFAULT_THRESHOLD
from harness.bench.record import build_output


class RunError(ValueError):
    """A file that is not a readable jagbench / pytest-benchmark run; names the file and why."""


@dataclass
class Run:
    """One run: its cases (pytest-benchmark's benchmark dicts) and what it recorded about itself."""

    path: Path
    machine_info: dict[str, Any]
    commit_info: dict[str, Any]
    benchmarks: list[dict[str, Any]]
    jagbench: dict[str, Any] = field(default_factory=dict)
    datetime: str | None = None
    partial: bool = False

    @property
    def bandwidth_gbps(self) -> float | None:
        bw = self.jagbench.get("bandwidth") or {}
        return bw.get("gbps") or self.machine_info.get("memory_bandwidth_gbps")

    @property
    def baseline(self) -> str:
        return self.jagbench.get("baseline") or "torch"

    def case(self, backend: str, workload: str, mode: str = "forward") -> dict[str, Any] | None:
        for b in self.benchmarks:
            info = b["extra_info"]
            if (info.get("backend"), info.get("workload"), info.get("mode", "forward")) == (
                backend,
                workload,
                mode,
            ):
                return b
        return None


def _key(b: dict[str, Any], where: str) -> tuple[str, str]:
    info = b.get("extra_info") or {}
    if "backend" not in info or "workload" not in info:
        raise RunError(
            f"{where}: benchmark {b.get('name')!r} has no extra_info backend/workload (not a jagbench run?)"
        )
    if "stats" not in b or "median" not in b["stats"]:
        raise RunError(f"{where}: benchmark {b.get('name')!r} has no stats")
    return info["backend"], info["workload"]


def load_run(path: str | Path) -> Run:
    """A run from ``RUN.json`` or ``RUN.json.partial.jsonl`` (given either; the JSON wins if both exist)."""
    path = Path(path)
    partial = path if path.name.endswith(".partial.jsonl") else path.with_name(path.name + ".partial.jsonl")
    if not path.name.endswith(".partial.jsonl") and path.exists():
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise RunError(f"{path}: not JSON: {e}") from e
        except OSError as e:
            raise RunError(f"cannot read {path}: {e.strerror}") from e
        if not isinstance(data, dict) or "benchmarks" not in data:
            raise RunError(f"{path}: not a pytest-benchmark JSON (no 'benchmarks')")
        for b in data["benchmarks"]:
            _key(b, str(path))
        return Run(
            path,
            data.get("machine_info", {}),
            data.get("commit_info", {}),
            data["benchmarks"],
            data.get("jagbench", {}),
            data.get("datetime"),
        )
    if not partial.exists():
        raise RunError(f"no such run: {path} (nor an interrupted run's {partial.name})")
    lines = [json.loads(line) for line in partial.read_text().splitlines() if line.strip()]
    if not lines or not lines[0].get("partial"):
        raise RunError(f"{partial}: no header line; not a jagbench partial run")
    header = lines[0]
    section = dict(header.get("jagbench", {}))
    for kind in ("failed", "unsupported", "known"):
        section[kind] = [r[kind] for r in lines[1:] if kind in r]
    windows = [r["window"] for r in lines[1:] if "window" in r]
    section["cases_finished"] = sum(len(w["cases"]) for w in windows) + sum(
        1 for r in lines[1:] if "window" not in r
    )
    output = build_output(
        header.get("machine_info", {}),
        header.get("commit_info", {}),
        windows,
        header.get("options", {}),
        section,
        section.get("baseline") or "torch",
        section.get("bandwidth"),
        (section.get("noise") or {}).get("threshold", DEFAULT_THRESHOLD),
    )
    for b in output["benchmarks"]:
        _key(b, str(partial))
    return Run(
        partial,
        output["machine_info"],
        output["commit_info"],
        output["benchmarks"],
        output["jagbench"],
        partial=True,
    )
