"""scripts/gpu_check.py's steps run end to end on the CPU (device timing replaced), so that the one
run on a GPU machine does not fail on a slip that a CPU could have caught."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

import harness.bench.workloads as hw  # noqa: E402
from harness.model import TableConfig  # noqa: E402
from harness.weights import make_weights  # noqa: E402

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "gpu_check.py"


@pytest.fixture()
def gpu_check(monkeypatch: pytest.MonkeyPatch):
    spec = importlib.util.spec_from_file_location("gpu_check_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(hw, "make_weights", hw.make_weights)  # restored after the test
    return module


def test_cached_weights_are_the_workloads_own(gpu_check) -> None:
    tables = [TableConfig("t0", 50, 8, ("a",), dtype=torch.bfloat16), TableConfig("t1", 20, 4, ("b",))]
    gpu_check._cache_weights()
    cached = hw.make_weights(tables, 3)
    fresh = make_weights(tables, 3)
    for t in tables:
        assert cached[t.name].dtype == t.dtype
        assert torch.equal(cached[t.name], fresh[t.name])


def test_kernels_and_summary_steps_on_the_cpu(
    gpu_check, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(gpu_check, "BACKENDS", ("torch", "triton"))
    monkeypatch.setattr(gpu_check, "device_copy_bandwidth", lambda: {"gbps": 10.0, "median_ms": 1.0})
    monkeypatch.setattr(gpu_check, "_resident", lambda batch: batch)
    monkeypatch.setattr(gpu_check, "_time", lambda lookup, batch: (lookup(batch), 2.0)[1])
    assert gpu_check.cmd_kernels(tmp_path, ["tiny"], tune_seconds=3) == 0
    data = json.loads((tmp_path / "kernels.json").read_text())
    rows = {r["backend"]: r for r in data["cases"]}
    assert set(rows) == {"torch", "triton"} and all("error" not in r for r in rows.values())
    assert rows["triton"]["fraction_of_copy_bandwidth"] == pytest.approx(rows["triton"]["gbps"] / 10.0)
    assert data["tuning"] and all("error" not in t for t in data["tuning"])
    assert gpu_check.cmd_summary(tmp_path) == 0
    assert "| tiny | triton |" in (tmp_path / "summary.md").read_text()
