"""The benchmark driver: `run_bench` runs pytest-benchmark on `harness.bench.suite` in-process.

Each (backend, workload) is one pytest test and one benchmark. A pytest plugin object (`BenchPlugin`)
carries the chosen backends and workloads into the suite, parametrises it, and adds jagbench's
records to pytest-benchmark's JSON: versions, threads and the copy bandwidth in ``machine_info``,
a ``jagbench`` section (bandwidth, byte model, baseline, failed and unsupported cases), and per
benchmark ``speedup_vs_baseline`` and ``bandwidth_fraction`` in ``extra_info``.

While running, each finished case is appended to ``<json>.partial.jsonl`` (a header line, then one
line per case); `harness.bench.runs.load_run` reads it when the run was interrupted. When pytest-benchmark
writes the final JSON the sidecar is removed.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from harness.backend import Backend
from harness.bench.derived import add_derived
from harness.bench.metrics import BYTE_MODEL, environment, measure_copy_bandwidth
from harness.bench.workloads import Workload

RUN_FORMAT = "jagbench-run/1"
SUITE = Path(__file__).resolve().parent / "suite.py"


@dataclass
class BenchConfig:
    """What one `jagbench bench` run measures, and how long it may spend per case."""

    backends: Sequence[Backend]
    workloads: Sequence[Workload]
    json_path: Path
    baseline: str = "torch"
    max_time: float = 1.0
    min_rounds: int = 5
    max_rounds: int = 500
    max_call_s: float = 10.0
    check_samples: int = 256
    bandwidth_bytes: int = 1 << 30
    progress: Callable[[str], None] | None = None


@dataclass(eq=False)
class BenchPlugin:
    """The pytest plugin object that `run_bench` hands to ``pytest.main``."""

    config: BenchConfig
    bandwidth: dict[str, Any] | None = None
    failed: list[dict[str, Any]] = field(default_factory=list)
    unsupported: list[dict[str, Any]] = field(default_factory=list)
    done: int = 0
    _problem_key: str | None = None
    _problem: Any = None

    @property
    def partial_path(self) -> Path:
        return self.config.json_path.with_name(self.config.json_path.name + ".partial.jsonl")

    @property
    def cases(self) -> list[tuple[Workload, Backend]]:
        """Workload-major, so each workload's problem is generated once and freed before the next."""
        return [(w, b) for w in self.config.workloads for b in self.config.backends]

    def problem(self, workload: Workload) -> Any:
        if self._problem_key != workload.name:
            self._problem = None  # free the previous workload's weights first
            self._problem = workload.problem()
            self._problem_key = workload.name
        return self._problem

    def say(self, message: str) -> None:
        if self.config.progress is not None:
            self.config.progress(message)

    def append(self, record: dict[str, Any]) -> None:
        with self.partial_path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    # pytest hooks ---------------------------------------------------------------------------

    def case(self, key: str) -> tuple[Workload, Backend]:
        return self.cases[[case_key(w, b) for w, b in self.cases].index(key)]

    def pytest_generate_tests(self, metafunc: Any) -> None:
        if "case" in metafunc.fixturenames:
            keys = [case_key(w, b) for w, b in self.cases]
            metafunc.parametrize("case", keys, ids=keys)

    def pytest_sessionstart(self, session: Any) -> None:
        self.say(f"measuring copy bandwidth ({self.config.bandwidth_bytes / 2**20:.0f} MiB buffer)")
        self.bandwidth = measure_copy_bandwidth(self.config.bandwidth_bytes)
        self.say(f"copy bandwidth {self.bandwidth['gbps']:.1f} GB/s (read + write)")
        hook = session.config.hook
        machine = hook.pytest_benchmark_generate_machine_info(config=session.config)
        hook.pytest_benchmark_update_machine_info(config=session.config, machine_info=machine)
        commit = hook.pytest_benchmark_generate_commit_info(config=session.config)
        self.partial_path.parent.mkdir(parents=True, exist_ok=True)
        self.partial_path.write_text("")
        self.append(
            {
                "format": RUN_FORMAT,
                "partial": True,
                "machine_info": machine,
                "commit_info": commit,
                "jagbench": self.run_section(),
            }
        )

    def pytest_benchmark_update_machine_info(self, config: Any, machine_info: dict[str, Any]) -> None:
        machine_info["jagbench"] = environment()
        if self.bandwidth is not None:
            machine_info["memory_bandwidth_gbps"] = self.bandwidth["gbps"]

    def pytest_benchmark_update_json(self, config: Any, benchmarks: Any, output_json: dict[str, Any]) -> None:
        output_json["jagbench"] = self.run_section()
        add_derived(output_json["benchmarks"], self.config.baseline, self.bandwidth)

    def pytest_sessionfinish(self, session: Any, exitstatus: int) -> None:
        if self.config.json_path.exists() and self.partial_path.exists():
            self.partial_path.unlink()

    def run_section(self) -> dict[str, Any]:
        return {
            "format": RUN_FORMAT,
            "bandwidth": self.bandwidth,
            "byte_model": BYTE_MODEL,
            "baseline": self.config.baseline,
            "backends": [b.name for b in self.config.backends],
            "workloads": [w.name for w in self.config.workloads],
            "failed": self.failed,
            "unsupported": self.unsupported,
            "cases_total": len(self.cases),
            "cases_finished": self.done,
            "argv": sys.argv,
        }


def case_key(workload: Workload, backend: Backend) -> str:
    """The pytest parameter of one case (a string, so pytest-benchmark can store it)."""
    return f"{backend.name}@{workload.name}"


def synchronize_for(result: torch.Tensor) -> Callable[[], None] | None:
    """``torch.cuda.synchronize`` when the lookup returns a CUDA tensor, else ``None``."""
    return torch.cuda.synchronize if result.is_cuda else None


def run_bench(config: BenchConfig, extra_args: Sequence[str] = ()) -> tuple[int, BenchPlugin]:
    """Run the suite; returns pytest's exit code and the plugin (with failed / unsupported cases)."""
    import pytest

    plugin = BenchPlugin(config)
    config.json_path.parent.mkdir(parents=True, exist_ok=True)
    args = [
        str(SUITE),
        "-p",
        "no:cacheprovider",
        "-q",
        "-rfEs",
        "--capture=no",
        f"--benchmark-json={config.json_path}",
        "--benchmark-columns=median,iqr,rounds",
        "--benchmark-sort=name",
        *extra_args,
    ]
    code = pytest.main(args, plugins=[plugin])
    return int(code), plugin
