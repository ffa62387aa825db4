"""The benchmark suite, its JSON, the report and compare: byte model, workloads, refusal, verdicts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from harness.bench.compare import compare_runs
from harness.bench.metrics import byte_model
from harness.bench.runs import load_run
from harness.bench.workloads import (
    STANDARD,
    WorkloadError,
    WorkloadTooLarge,
    check_fits,
    get_workloads,
    load_workloads,
    workloads_from_json,
)
from harness.cli import main
from harness.model import JaggedBatch, TableConfig
from harness.report.document import write_report

ROOT = Path(__file__).resolve().parent.parent


# --- byte model ------------------------------------------------------------------------------


def test_byte_model_counts_rows_read_and_output_not_indices() -> None:
    tables = [
        TableConfig("a", 10, 4, ("fa",)),
        TableConfig("b", 10, 8, ("fb",), dtype=torch.float16),
    ]
    batch = JaggedBatch.from_bags({"fa": [[1, 2, 3], []], "fb": [[4], [5, 6]]})
    m = byte_model(tables, batch)
    assert m["ids"] == 6
    assert m["rows_read_bytes"] == 3 * 4 * 4 + 3 * 8 * 2  # fa: 3 ids x D4 x fp32; fb: 3 ids x D8 x fp16
    assert m["output_bytes"] == 2 * (4 + 8) * 4  # B x total_dim x float32
    assert m["bytes"] == m["rows_read_bytes"] + m["output_bytes"]
    assert m["index_bytes"] == 6 * 8 + (4 + 1) * 8


# --- workloads -------------------------------------------------------------------------------


def test_every_workload_file_loads_and_names_are_stable() -> None:
    known = load_workloads()
    for name in (*STANDARD, "tiny", "dlrm-criteo-kaggle", "dlrm-v2-mlperf"):
        assert name in known
    like = known["dlrm-like"].parameters()
    assert (like["T"], like["E"], like["D"], like["B"], like["L"]) == (8, 1_000_000, 64, 2048, 20.0)
    kaggle = known["dlrm-criteo-kaggle"]
    assert len(kaggle.tables) == 26 and {t.embedding_dim for t in kaggle.tables} == {16}
    mlperf = known["dlrm-v2-mlperf"]
    assert len(mlperf.tables) == 26 and max(t.num_embeddings for t in mlperf.tables) == 400_000
    assert mlperf.scaled and "40,000,000" in mlperf.scaled
    assert [w.name for w in get_workloads(["sweep-B"])] == [f"sweep-B-{b}" for b in (64, 256, 1024, 4096)]
    assert [w.name for w in get_workloads(["standard"])] == sorted(STANDARD)


def test_workload_generation_is_seeded_and_matches_its_spec() -> None:
    tiny = load_workloads()["tiny"]
    a, b = tiny.problem(), tiny.problem()
    assert torch.equal(a.batch.values, b.batch.values) and torch.equal(a.batch.lengths, b.batch.lengths)
    for t in a.tables:
        assert torch.equal(a.weights[t.name], b.weights[t.name])
        assert a.weights[t.name].shape == (t.num_embeddings, t.embedding_dim)
    assert a.batch.batch_size == tiny.batch_size
    lengths = a.batch.lengths.reshape(len(a.batch.keys), -1)
    assert int(lengths[0].max()) <= 8 and int(lengths[2].min()) == int(lengths[2].max()) == 3


def test_zipf_hot_rows_are_scattered_over_the_table() -> None:
    spec = {
        "format": "jagbench-workload/1",
        "name": "z",
        "batch_size": 4096,
        "tables": [
            {
                "num_embeddings": 100_000,
                "embedding_dim": 4,
                "bag": {"dist": "fixed", "L": 4},
                "ids": {"dist": "zipf", "alpha": 1.5},
            }
        ],
    }
    ids = workloads_from_json(spec)[0].problem().batch.values
    counts = torch.bincount(ids, minlength=100_000)
    hot = torch.topk(counts, 10).indices
    assert counts.max() > 20 * counts.float().mean()  # skewed
    assert int(hot.max()) > 10_000  # hot rows are not packed at the start of the table


def test_bad_workload_files_are_refused_with_the_field_named() -> None:
    with pytest.raises(WorkloadError, match="bag dist"):
        workloads_from_json(
            {
                "format": "jagbench-workload/1",
                "name": "x",
                "batch_size": 1,
                "tables": [{"num_embeddings": 2, "embedding_dim": 2, "bag": {"dist": "poisson"}}],
            }
        )
    with pytest.raises(WorkloadError, match="3 entries but count is 2"):
        workloads_from_json(
            {
                "format": "jagbench-workload/1",
                "name": "x",
                "batch_size": 1,
                "tables": [
                    {
                        "count": 2,
                        "num_embeddings": [1, 2, 3],
                        "embedding_dim": 2,
                        "bag": {"dist": "fixed", "L": 1},
                    }
                ],
            }
        )
    with pytest.raises(WorkloadError, match="unknown workload 'nope'"):
        get_workloads(["nope"])


def test_a_workload_too_large_for_memory_is_refused_up_front(capsys: pytest.CaptureFixture[str]) -> None:
    wide = load_workloads()["wide"]
    with pytest.raises(WorkloadTooLarge, match=r"'wide' needs about 11\.\d GiB .* only 4\.0 GiB"):
        check_fits(wide, copies=3, available=4 << 30)
    check_fits(wide, copies=3, available=64 << 30)
    assert main(["bench", "--workload", "dlrm-like", "--copies", "1000", "--json", "/dev/null"]) == 2
    assert "needs about" in capsys.readouterr().err


# --- one real run: JSON contents and report ----------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    out = tmp_path_factory.mktemp("bench") / "run.json"
    half = out.parent / "tiny-half.json"  # a float16 table: torch's known discrepancy applies
    half.write_text(
        json.dumps(
            {
                "format": "jagbench-workload/1",
                "name": "tiny-half",
                "batch_size": 16,
                "tables": [
                    {
                        "num_embeddings": 50,
                        "embedding_dim": 8,
                        "dtype": "float16",
                        "bag": {"dist": "fixed", "L": 40},
                    }
                ],
            }
        )
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "harness.cli",
            "bench",
            "--workload",
            "tiny",
            "--workload",
            str(half),
            "--backend",
            "torch",
            "--backend",
            "reference",
            "--backend",
            "tests/off_by_one_backend.py:OffByOne",
            "--json",
            str(out),
            "--max-time",
            "0.05",
            "--bandwidth-mib",
            "32",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return out, proc


def test_bench_json_records_cases_machine_and_bandwidth(tiny_run) -> None:  # type: ignore[no-untyped-def]
    path, proc = tiny_run
    assert proc.returncode == 1, proc.stderr[-2000:]  # the off-by-one backend failed its check
    assert "off-by-one x tiny: disagree" in proc.stderr
    data = json.loads(path.read_text())
    assert not path.with_name(path.name + ".partial.jsonl").exists()
    machine = data["machine_info"]
    assert machine["memory_bandwidth_gbps"] > 0
    assert machine["jagbench"]["versions"]["torch"] == torch.__version__.split("+")[0] or machine["jagbench"][
        "versions"
    ]["torch"].startswith(torch.__version__.split("+")[0])
    assert machine["jagbench"]["threads"]["torch_threads"] >= 1
    assert "id" in data["commit_info"] or "error" in data["commit_info"]
    section = data["jagbench"]
    assert section["bandwidth"]["buffer_bytes"] == 32 << 20 and section["baseline"] == "torch"
    failed = {(f["backend"], f["workload"], f["outcome"]) for f in section["failed"]}
    assert failed == {("off-by-one", "tiny", "disagree"), ("off-by-one", "tiny-half", "disagree")}
    half = [b for b in data["benchmarks"] if b["extra_info"]["workload"] == "tiny-half"]
    known = {b["extra_info"]["backend"]: b["extra_info"]["known_discrepancy"] for b in half}
    assert "torch-float16-pooled-output" in known["torch"] and known["reference"] is None  # timed, flagged
    timed = {
        b["extra_info"]["backend"]: b for b in data["benchmarks"] if b["extra_info"]["workload"] == "tiny"
    }
    assert set(timed) == {"torch", "reference"}  # the wrong backend was not timed
    tiny = load_workloads()["tiny"]
    for b in timed.values():
        info = b["extra_info"]
        assert info["workload"] == "tiny" and info["parameters"]["B"] == tiny.batch_size
        assert info["checked"]["outcome"] == "agree" and info["index_bytes_counted"] is False
        assert info["bytes"] == info["rows_read_bytes"] + info["output_bytes"]
        assert len(b["stats"]["data"]) == b["stats"]["rounds"] >= 5
        assert info["gbps"] == pytest.approx(info["bytes"] / b["stats"]["median"] / 1e9)
        assert info["bandwidth_fraction"] == pytest.approx(info["gbps"] / machine["memory_bandwidth_gbps"])
    assert timed["torch"]["extra_info"]["speedup_vs_baseline"] == 1.0
    ref = timed["reference"]
    assert ref["extra_info"]["speedup_vs_baseline"] == pytest.approx(
        timed["torch"]["stats"]["median"] / ref["stats"]["median"]
    )


def test_report_writes_markdown_html_and_plots(tiny_run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path, _ = tiny_run
    extra = "## Robustness matrix\n\n| backend | bad id |\n|---|---|\n| torch | raises |"
    written = write_report([load_run(path)], tmp_path, extra_sections=[extra])
    md = (tmp_path / "report.md").read_text()
    page = (tmp_path / "report.html").read_text()
    for text in (
        "torch",
        "reference",
        "tiny",
        "Robustness matrix",
        "torch-float16-pooled-output",
        "off-by-one",
        "GB/s",
    ):
        assert text in md and text in page
    assert page.count("data:image/png;base64,iVBOR") == 2  # both plots embedded, self-contained
    pngs = [p for p in written if p.suffix == ".png"]
    assert len(pngs) == 2 and all(p.read_bytes()[:4] == b"\x89PNG" for p in pngs)


def test_an_interrupted_run_is_read_from_its_sidecar(tiny_run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    data = json.loads(tiny_run[0].read_text())
    partial = tmp_path / "cut.json.partial.jsonl"
    lines = [
        {
            "format": "jagbench-run/1",
            "partial": True,
            "machine_info": data["machine_info"],
            "commit_info": data["commit_info"],
            "jagbench": data["jagbench"],
        },
        {"benchmark": data["benchmarks"][0]},
    ]
    partial.write_text("".join(json.dumps(x) + "\n" for x in lines))
    run = load_run(tmp_path / "cut.json")
    assert run.partial and len(run.benchmarks) == 1
    write_report([run], tmp_path / "r")
    assert "interrupted run" in (tmp_path / "r" / "report.md").read_text()


# --- compare ---------------------------------------------------------------------------------


def _synthetic_run(path: Path, slowdown: float, seed: int, torch_version: str = "2.13.0") -> Path:
    rng = np.random.default_rng(seed)
    benchmarks = []
    for backend in ("torch", "numba"):
        for workload, ms in (("dlrm-like", 7.0), ("wide", 6.5)):
            data = (ms * 1e-3 * slowdown * rng.lognormal(0.0, 0.03, 40)).tolist()
            benchmarks.append(
                {
                    "name": f"test_lookup[{backend}@{workload}]",
                    "extra_info": {"backend": backend, "workload": workload, "bytes": 1e8, "ids": 1e5},
                    "stats": {"median": float(np.median(data)), "iqr": 0.0, "rounds": 40, "data": data},
                }
            )
    path.write_text(
        json.dumps(
            {
                "machine_info": {"node": "m", "jagbench": {"versions": {"torch": torch_version}}},
                "commit_info": {"id": "x"},
                "benchmarks": benchmarks,
                "version": "5.3.1",
            }
        )
    )
    return path


def test_compare_flags_a_30_percent_slowdown_and_not_a_1_percent_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = _synthetic_run(tmp_path / "base.json", 1.0, 1)
    slow = _synthetic_run(tmp_path / "slow.json", 1.3, 2)
    same = _synthetic_run(tmp_path / "same.json", 1.01, 3)
    assert main(["compare", str(base), str(slow)]) == 1
    out = capsys.readouterr().out
    assert out.count("REGRESSED") == 4 and "4 regression(s) beyond 10%" in out
    assert main(["compare", str(base), str(same)]) == 0
    result = compare_runs(load_run(base), load_run(same))
    assert not result.regressions and result.geometric_mean == pytest.approx(1.01, abs=0.03)
    assert main(["compare", str(base), str(slow), "--threshold", "40%"]) == 0


def test_compare_flags_different_versions_and_never_turns_errors_into_verdicts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = _synthetic_run(tmp_path / "base.json", 1.0, 1)
    other = _synthetic_run(tmp_path / "other.json", 1.0, 4, torch_version="2.11.0")
    assert main(["compare", str(base), str(other)]) == 0
    assert "version torch: 2.13.0 -> 2.11.0" in capsys.readouterr().out
    nodata = json.loads(base.read_text())
    for b in nodata["benchmarks"]:
        del b["stats"]["data"]
    (tmp_path / "nodata.json").write_text(json.dumps(nodata))
    assert main(["compare", str(base), str(tmp_path / "nodata.json")]) == 2
    assert "no per-round data" in capsys.readouterr().err
    assert main(["compare", str(base), str(tmp_path / "missing.json")]) == 2
    with pytest.raises(SystemExit) as usage:
        main(["compare", str(base), str(base), "--threshold", "ten"])
    assert usage.value.code == 2
