"""The benchmark suite, its JSON, the report and compare: byte model, workloads, refusal, verdicts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from pytest_benchmark.stats import Stats

from harness.bench import runner as bench_runner
from harness.bench.compare import bootstrap_ratio, compare_runs
from harness.bench.conditions import CacheFlush, background_load
from harness.bench.forward import ForwardCase
from harness.bench.metrics import byte_model
from harness.bench.noise import noise_summary
from harness.bench.paired import all_pairs, speedup
from harness.bench.runner import BenchConfig, _Run, run_bench
from harness.bench.runs import load_run
from harness.bench.summary import format_summary
from harness.bench.timing import Slot, time_interleaved
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
from impls.torch_embedding_bag import TorchEmbeddingBag

ROOT = Path(__file__).resolve().parent.parent


# --- a fake machine: time that passes only when a fake backend works -------------------------------


class FakeMachine:
    """A clock that advances only by `spend`, scaled by the machine's slowness at that moment."""

    def __init__(self) -> None:
        self.now = 0.0
        self.slowness: Callable[[float], float] = lambda t: 1.0

    def timer(self) -> float:
        return self.now

    def spend(self, seconds: float) -> None:
        self.now += seconds * self.slowness(self.now)


class PacedBackend(TorchEmbeddingBag):
    """torch's (correct) result, with a fake cost per call: ``costs[k]`` from its k-th ``prepare`` on
    (each repeat prepares again), so a test can make a backend slower in one repeat."""

    def __init__(self, name: str, machine: FakeMachine, costs: Sequence[float]) -> None:
        super().__init__(name=name)
        self.machine, self.costs, self.prepared = machine, list(costs), 0

    def prepare(self, tables, weights):  # type: ignore[no-untyped-def]
        inner = super().prepare(tables, weights)
        cost = self.costs[min(self.prepared, len(self.costs) - 1)]
        self.prepared += 1

        def lookup(batch):  # type: ignore[no-untyped-def]
            self.machine.spend(cost)
            return inner(batch)

        return lookup


def paced_config(
    machine: FakeMachine,
    json_path: Path,
    costs: dict[str, Sequence[float]],
    workloads: Sequence[str] = ("tiny",),
    **kw: object,
) -> BenchConfig:
    """A run of paced backends on the fake clock, with a fixed number of rounds."""
    options: dict[str, object] = {
        "baseline": next(iter(costs)),
        "min_rounds": 12,
        "max_rounds": 12,
        "warmup_rounds": 1,
        "min_round_s": 0.002,
        "check_samples": 8,
        "bandwidth_bytes": 1 << 20,
        "timer": machine.timer,
        "probe": False,
    }
    options.update(kw)
    return BenchConfig(
        backends=[PacedBackend(n, machine, c) for n, c in costs.items()],
        workloads=get_workloads(list(workloads)),
        json_path=json_path,
        **options,  # type: ignore[arg-type]
    )


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
    ref, base = timed["reference"], timed["torch"]
    # Interleaved: both timed in the same rounds; the speedup is the median of the per-round ratios.
    assert ref["extra_info"]["rounds"]["round"] == base["extra_info"]["rounds"]["round"]
    ratios = np.asarray(base["stats"]["data"]) / np.asarray(ref["stats"]["data"])
    assert ref["extra_info"]["speedup_vs_baseline"] == pytest.approx(float(np.median(ratios)))
    low, high = ref["extra_info"]["speedup_interval"]
    assert low <= ref["extra_info"]["speedup_vs_baseline"] <= high
    assert ref["extra_info"]["interleaved_with"] == ["torch"]
    noise = section["noise"]
    assert noise["reference_s"] > 0 and {w["workload"] for w in noise["windows"]} == {"tiny", "tiny-half"}
    assert section["conditions"]["caches"] == "warm" and section["conditions"]["load"] == {"processes": 0}


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


def test_an_interrupted_run_is_read_from_its_sidecar(tmp_path: Path) -> None:
    machine = FakeMachine()
    json_path = tmp_path / "cut.json"
    config = paced_config(
        machine, json_path, {"fast": [0.001], "slow": [0.002]}, workloads=["tiny", "cache-resident"]
    )
    run = _Run(config, None)
    run.bandwidth = {"gbps": 10.0}
    run.partial_path.write_text("")
    header = {"format": "jagbench-run/2", "partial": True, "machine_info": {}, "commit_info": {}}
    run.append({**header, "jagbench": run.section(), "options": run.options()})
    run.window(config.workloads[0], 0, 0)  # the first workload finished, then the run was cut
    loaded = load_run(json_path)
    assert loaded.partial and {b["extra_info"]["workload"] for b in loaded.benchmarks} == {"tiny"}
    slow = loaded.case("slow", "tiny")
    assert slow["extra_info"]["speedup_vs_baseline"] == pytest.approx(0.5)  # rebuilt and paired
    write_report([loaded], tmp_path / "r")
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


def _repeated_run(path: Path, repeat_ms: Sequence[float], seed: int) -> Path:
    """One case whose repeats (40 rounds each) sit at ``repeat_ms``, each with 2% noise per round."""
    rng = np.random.default_rng(seed)
    data, repeats = [], []
    for r, ms in enumerate(repeat_ms):
        data += (ms * 1e-3 * rng.lognormal(0.0, 0.02, 40)).tolist()
        repeats += [r] * 40
    rounds = {"repeat": repeats, "round": list(range(40)) * len(repeat_ms), "position": [0] * len(data)}
    bench = {
        "name": "test_lookup[torch@w]",
        "extra_info": {"backend": "torch", "workload": "w", "bytes": 1e8, "ids": 1e5, "rounds": rounds},
        "stats": {"median": float(np.median(data)), "iqr": 0.0, "rounds": len(data), "data": data},
    }
    path.write_text(json.dumps({"machine_info": {}, "commit_info": {}, "benchmarks": [bench]}))
    return path


def test_compare_resamples_the_repeats_so_a_shift_between_repeats_is_not_a_regression(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The same code in two runs: the base's repeats at 1.0, 1.0 and 1.4 ms (the machine changed
    during the run), the new run's all at 1.4. By rounds alone that is a significant 40% regression;
    with the repeats resampled it is within the base run's own spread. A slowdown beyond that spread
    still is one."""
    base = _repeated_run(tmp_path / "base.json", [1.0, 1.0, 1.4], 1)
    same = _repeated_run(tmp_path / "same.json", [1.4, 1.4, 1.4], 2)
    worse = _repeated_run(tmp_path / "worse.json", [2.2, 2.3, 2.25], 3)
    result = compare_runs(load_run(base), load_run(same))
    (change,) = result.changes
    assert change.ratio > 1.3 and not result.single_repeat
    assert change.low <= 1.0 <= change.high and not change.regressed, (change.low, change.high)
    rounds_only = [
        np.asarray(json.loads(f.read_text())["benchmarks"][0]["stats"]["data"]) for f in (base, same)
    ]
    low, _ = bootstrap_ratio(*rounds_only)
    assert low > 1.3  # what the same rounds say without their repeats
    (change,) = compare_runs(load_run(base), load_run(worse)).changes
    assert change.regressed and change.low > 1.5
    assert main(["compare", str(base), str(same)]) == 0
    assert "resample each run's repeats" in capsys.readouterr().out
    single = _repeated_run(tmp_path / "single.json", [1.4], 4)
    assert compare_runs(load_run(base), load_run(single)).single_repeat
    assert main(["compare", str(base), str(single)]) in (0, 1)
    assert "do not cover how much a rerun of the same code differs" in capsys.readouterr().out


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


# --- interleaved timing ------------------------------------------------------------------------


def _slots(machine: FakeMachine, costs: dict[str, float]) -> list[Slot]:
    return [Slot(name, lambda c=cost: machine.spend(c)) for name, cost in costs.items()]


def test_rounds_interleave_every_backend_in_a_new_seeded_order() -> None:
    machine = FakeMachine()
    costs = {"a": 0.001, "b": 0.002, "c": 0.003}

    def timed(seed: int):  # type: ignore[no-untyped-def]
        return time_interleaved(
            _slots(machine, costs), 60, rng=np.random.default_rng(seed), warmup_rounds=2, timer=machine.timer
        )

    run = timed(7)
    assert len(run.orders) == 60 and all(sorted(o) == [0, 1, 2] for o in run.orders)
    assert len({tuple(o) for o in run.orders}) == 6  # every order occurs: drawn anew each round
    firsts = [o[0] for o in run.orders]
    assert min(firsts.count(i) for i in range(3)) >= 10  # each backend leads about a third of the rounds
    for i, t in enumerate(run.slots):
        assert t.rounds == list(range(60)) and len(t.seconds) == 60  # every backend in every round
        assert t.positions == [o.index(i) for o in run.orders]
        assert t.seconds == pytest.approx([costs[t.name]] * 60)
    assert timed(7).orders == run.orders and timed(8).orders != run.orders  # seeded


def test_a_warm_up_call_before_each_span_makes_warm_mean_warm_for_that_case() -> None:
    """``a`` and ``b`` read the same tables, ``c`` its own copy: a call finds its data cached only
    when the call before it read the same tables. Without a warm-up call, ``a``'s span depends on
    whether ``b`` or ``c`` ran just before it; with one, every span is the warm cost."""
    machine = FakeMachine()
    reads = {"a": "shared", "b": "shared", "c": "own"}
    cached = [None]

    def call(name: str) -> None:
        machine.spend(0.001 if cached[0] == reads[name] else 0.003)
        cached[0] = reads[name]

    def spans(warm_up_calls: int) -> list[float]:
        slots = [Slot(n, lambda n=n: call(n), warm_up_calls=warm_up_calls) for n in reads]
        run = time_interleaved(slots, 30, rng=np.random.default_rng(3), timer=machine.timer)
        return run.slots[0].seconds

    assert len({round(x, 6) for x in spans(0)}) == 2  # warm after b, cold after c
    assert spans(1) == pytest.approx([0.001] * 30)


def test_interleaving_gives_the_true_ratio_through_a_burst_that_block_timing_gets_wrong() -> None:
    machine = FakeMachine()
    machine.slowness = lambda t: 3.0 if t > 0.04 else 1.0  # a co-tenant's burst from t = 40 ms on
    run = time_interleaved(
        _slots(machine, {"a": 0.001, "b": 0.002}), 40, rng=np.random.default_rng(0), timer=machine.timer
    )
    a, b = (
        {
            "extra_info": {
                "backend": t.name,
                "workload": "w",
                "rounds": {"repeat": [0] * 40, "round": t.rounds},
            },
            "stats": {"data": t.seconds, "median": float(np.median(t.seconds))},
        }
        for t in run.slots
    )
    assert speedup(a, b).speedup == pytest.approx(2.0)  # a is twice as fast, burst or not
    # The same two backends timed one block after the other: the burst lands on b's block only.
    machine.now = 0.0
    blocks = [
        time_interleaved(_slots(machine, {n: c}), 40, rng=np.random.default_rng(0), timer=machine.timer)
        for n, c in (("a", 0.001), ("b", 0.002))
    ]
    assert np.median(blocks[1].slots[0].seconds) / np.median(blocks[0].slots[0].seconds) > 2.5


def _bench(backend: str, times: np.ndarray, repeats: Sequence[int] | None = None) -> dict:  # type: ignore[type-arg]
    n = len(times)
    info: dict[str, object] = {"backend": backend, "workload": "w"}
    if repeats is not None:
        info["rounds"] = {"repeat": list(repeats), "round": list(range(n)), "position": [0] * n}
    return {"extra_info": info, "stats": {"data": times.tolist(), "median": float(np.median(times))}}


def test_speedup_is_the_median_of_paired_ratios_with_a_bootstrap_interval() -> None:
    rng = np.random.default_rng(3)
    machine = rng.lognormal(0.0, 0.5, 101)  # how slow the machine was in each round
    base = _bench("torch", 0.002 * machine, [0] * 101)
    fast = _bench("numba", 0.001 * machine, [0] * 101)
    s = speedup(fast, base)
    assert s.paired and s.pairs == 101
    assert s.speedup == pytest.approx(2.0) and s.low == pytest.approx(2.0) and s.high == pytest.approx(2.0)
    # Faster in two rounds of three: paired, 2.0; the ratio of the two medians would say 0.5.
    a, b = (
        _bench("numba", np.array([0.5, 4.0, 5.0]), [0] * 3),
        _bench("torch", np.array([1.0, 2.0, 10.0]), [0] * 3),
    )
    assert speedup(a, b).speedup == pytest.approx(2.0)
    noisy = _bench("numba", 0.001 * machine * rng.lognormal(0.0, 0.05, 101), [0] * 101)
    s = speedup(noisy, base)
    assert s.low < s.speedup < s.high and s.low < 2.0 < s.high and s.high / s.low < 1.1
    old = speedup(_bench("numba", 0.001 * machine), _bench("torch", 0.002 * machine))
    assert not old.paired and old.low is None  # a run without round ids: the ratio of medians


def test_noise_monitor_reports_the_cases_own_level_where_the_probe_saw_nothing() -> None:
    """The probe steady in both repeats, the cases 1.3x (numba) and 1.2x (torch) slower in the
    second: its cases' level is their geometric mean, and it warns; the first repeat is at 1."""
    probe = [1e-3] * 40

    def case(backend: str, per_call: float, iterations: int = 2) -> dict[str, object]:
        return {"backend": backend, "iterations": iterations, "seconds": [per_call * iterations] * 40}

    windows = [
        {
            "workload": "w",
            "repeat": 0,
            "probe": probe,
            "cases": [case("numba", 1e-3), case("torch", 2e-3, 1)],
        },
        {
            "workload": "w",
            "repeat": 1,
            "probe": probe,
            "cases": [case("numba", 1.3e-3), case("torch", 2.4e-3, 1)],
        },
    ]
    summary = noise_summary(windows, threshold=0.10)
    first, second = summary["windows"]
    assert first["level"] == second["level"] == 1.0 and first["cases_level"] == pytest.approx(1.0)
    assert second["cases_level"] == pytest.approx((1.3 * 1.2) ** 0.5)
    (warning,) = summary["warnings"]
    assert warning.startswith("w (repeat 2): the cases themselves ran at 1.25x their quickest repeat")
    assert "numba x w, torch x w" in warning


def test_noise_monitor_warns_about_the_window_where_the_machine_drifted() -> None:
    steady = [1e-3 * (1 + 0.01 * (i % 3)) for i in range(40)]
    windows = [
        {
            "workload": "wide",
            "repeat": 0,
            "probe": steady,
            "cases": [{"backend": "numba"}, {"backend": "torch"}],
        },
        {
            "workload": "dlrm-like",
            "repeat": 0,
            "probe": steady[:20] + [1.5e-3] * 20,  # the machine slowed half way through
            "cases": [{"backend": "numba"}, {"backend": "torch"}],
        },
        {"workload": "many-small", "repeat": 0, "probe": [1.0e-3] * 40, "cases": [{"backend": "numba"}]},
        {"workload": "many-small", "repeat": 1, "probe": [1.3e-3] * 40, "cases": [{"backend": "numba"}]},
        # Steady but slower than the others throughout: its rounds evict the probe's buffer. Not noise.
        {"workload": "zipf", "repeat": 0, "probe": [2.0e-3] * 40, "cases": [{"backend": "numba"}]},
    ]
    summary = noise_summary(windows, threshold=0.10)
    quiet = float(np.median(steady))
    assert summary["reference_s"] == pytest.approx(1.0e-3)  # the run's quietest window's median probe
    assert summary["reference_by_workload_s"] == pytest.approx(
        {
            "wide": quiet,
            "dlrm-like": float(np.median(windows[1]["probe"])),
            "many-small": 1.0e-3,
            "zipf": 2.0e-3,
        }
    )
    by_workload = {(w["workload"], w["repeat"]): w for w in summary["windows"]}
    assert by_workload["wide", 0]["level"] == 1.0 and by_workload["wide", 0]["drift"] < 1.05
    assert by_workload["dlrm-like", 0]["drift"] == pytest.approx(1.5e-3 / quiet, rel=0.01)
    assert by_workload["many-small", 0]["level"] == 1.0
    assert by_workload["many-small", 1]["level"] == pytest.approx(1.3)
    assert by_workload["many-small", 1]["drift"] == 1.0 and by_workload["many-small", 1]["noisy_rounds"] == 40
    assert by_workload["zipf", 0]["level"] == 1.0 and by_workload["zipf", 0]["noisy_rounds"] == 0
    warnings = summary["warnings"]
    assert len(warnings) == 2 and not any(w.startswith(("wide", "zipf")) for w in warnings)
    assert (
        warnings[0].startswith("dlrm-like (repeat 1)")
        and "numba x dlrm-like, torch x dlrm-like" in warnings[0]
    )
    assert "drifted by 1.4" in warnings[0] and "20 of 40 rounds" in warnings[0]
    assert warnings[1].startswith("many-small (repeat 2): the reference kernel ran at 1.30x its level")


class CompilingBackend(PacedBackend):
    """A paced backend whose first call after each ``prepare`` costs a second more (a compile)."""

    def prepare(self, tables, weights):  # type: ignore[no-untyped-def]
        lookup, first = super().prepare(tables, weights), [True]

        def compiling(batch):  # type: ignore[no-untyped-def]
            if first[0]:
                first[0] = False
                self.machine.spend(1.0)
            return lookup(batch)

        return compiling


def test_every_repeat_plans_its_rounds_from_the_calibrated_call_not_the_first(tmp_path: Path) -> None:
    """The rounds that fill the time budget are planned from the calibrated time per call in
    every repeat; planned from a repeat's first call (its compile) they were far fewer."""
    machine = FakeMachine()
    config = paced_config(
        machine,
        tmp_path / "c.json",
        {"fast": [0.001]},
        repeat=2,
        min_rounds=5,
        max_rounds=10_000,
        max_time=0.2,
    )
    config.backends = [CompilingBackend("fast", machine, [0.001])]
    run_bench(config)
    (bench,) = json.loads((tmp_path / "c.json").read_text())["benchmarks"]
    per_repeat = [bench["extra_info"]["rounds"]["repeat"].count(r) for r in (0, 1)]
    assert per_repeat[0] > 20 and per_repeat[1] == per_repeat[0], per_repeat


def test_repeat_reports_each_speedups_spread_and_keeps_pytest_benchmarks_stats(tmp_path: Path) -> None:
    machine = FakeMachine()
    # slow is 2.0x fast's time in the first repeat and 2.2x in the second: a spread of 1.1.
    config = paced_config(machine, tmp_path / "r.json", {"fast": [0.001], "slow": [0.002, 0.0022]}, repeat=2)
    result = run_bench(config)
    data = json.loads((tmp_path / "r.json").read_text())
    assert set(data) >= {"machine_info", "commit_info", "benchmarks", "datetime", "version", "jagbench"}
    fast, slow = (
        next(b for b in data["benchmarks"] if b["extra_info"]["backend"] == n) for n in ("fast", "slow")
    )
    assert fast["stats"]["iterations"] == 2 and slow["stats"]["iterations"] == 1  # spans of >= 2 ms
    for b in (fast, slow):
        stats = Stats()
        for t in b["stats"]["data"]:
            stats.update(t)
        assert {k: b["stats"][k] for k in Stats.fields} == pytest.approx(
            stats.as_dict()
        )  # its own statistics
        rounds = b["extra_info"]["rounds"]
        assert rounds["repeat"] == [0] * 12 + [1] * 12 and rounds["round"] == list(range(12)) * 2
    assert fast["stats"]["data"] == pytest.approx([0.001] * 24)  # per call: the span over its iterations
    info = slow["extra_info"]
    assert info["speedup_by_repeat"] == pytest.approx([0.5, 1 / 2.2])
    assert info["speedup_spread"] == pytest.approx(1.1)
    pair = data["jagbench"]["pairs"][0]
    assert (pair["backend"], pair["over"]) == ("fast", "slow") and pair["by_repeat"] == pytest.approx(
        [2.0, 2.2]
    )
    assert pair["spread"] == pytest.approx(1.1)
    (flipped,) = all_pairs(list(reversed(data["benchmarks"])))  # the faster one first, whatever the order
    assert (flipped.fast, flipped.slow, flipped.speedup) == ("fast", "slow", pytest.approx(2.1))
    text = format_summary(result.output)
    assert "| tiny     | fast over slow | 2.000 / 2.200      | 1.100   | faster in 2 of 2 |" in text
    assert "Largest spread: 1.100 (fast over slow on tiny)" in text and "No stable verdict" not in text
    write_report([load_run(tmp_path / "r.json")], tmp_path / "report")
    md = (tmp_path / "report" / "report.md").read_text()
    assert "Spread of each paired speedup over 2 repeats (largest 1.100" in md and "0.50 / 0.45 (1.100)" in md


def test_a_pair_whose_order_changes_between_repeats_is_reported_as_a_split_verdict(tmp_path: Path) -> None:
    machine = FakeMachine()
    # "b" takes 1.1 ms in the first repeat and 0.9 ms in the second, "a" 1 ms in both.
    config = paced_config(machine, tmp_path / "s.json", {"a": [0.001], "b": [0.0011, 0.0009]}, repeat=2)
    result = run_bench(config)
    (pair,) = result.jagbench["pairs"]
    assert pair["by_repeat"][0] > 1 > pair["by_repeat"][1] and pair["faster_in"] == 1
    text = format_summary(result.output)
    assert "| split: faster in 1 of 2 |" in text
    expected = "No stable verdict for 1 pair(s), faster and slower in different repeats"
    assert expected in text and f"{pair['backend']} and {pair['over']} on tiny." in text
    write_report([load_run(tmp_path / "s.json")], tmp_path / "report")
    md = (tmp_path / "report" / "report.md").read_text()
    assert "split: faster in 1 of 2" in md and expected in md


def test_flush_and_load_apply_to_every_timed_call_and_are_recorded(tmp_path: Path) -> None:
    machine = FakeMachine()
    config = paced_config(
        machine, tmp_path / "cold.json", {"fast": [0.001], "slow": [0.002]}, flush_mib=1, load=1
    )
    run = _Run(config, None)
    spawned = []
    real_load = bench_runner.background_load

    def watched(n: int):  # type: ignore[no-untyped-def]
        spawned.append(n)
        return real_load(n)

    bench_runner.background_load = watched  # type: ignore[assignment]
    try:
        result = run.run()
    finally:
        bench_runner.background_load = real_load  # type: ignore[assignment]
    assert spawned == [1] and run.load_pids and not _alive(run.load_pids[0])
    assert run.flush is not None and run.flush.calls == 2 * (12 + 1)  # every span of every round, warm-up too
    assert all(b["stats"]["iterations"] == 1 for b in result.benchmarks)  # one call per span when cold
    section = result.jagbench
    assert section["conditions"]["caches"] == "cold" and section["conditions"]["flush_mib"] == 1
    assert section["conditions"]["load"] == {"processes": 1}
    assert result.benchmarks[0]["extra_info"]["conditions"]["caches"] == "cold"
    write_report([load_run(tmp_path / "cold.json")], tmp_path / "report")
    md = (tmp_path / "report" / "report.md").read_text()
    assert "Caches cold (flush 1 MiB before every timed call); background load: 1 spinning process" in md


def test_cache_flush_reads_and_writes_its_whole_buffer() -> None:
    flush = CacheFlush(1)
    flush()
    flush()
    assert flush.buffer.numel() * 4 == 1 << 20 and int(flush.buffer.min()) == int(flush.buffer.max()) == 2
    with pytest.raises(ValueError, match="> 0 MiB"):
        CacheFlush(0)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split()[2]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_background_load_spins_during_the_block_and_stops_after_ctrl_c() -> None:
    with pytest.raises(KeyboardInterrupt), background_load(2) as pids:
        assert len(pids) == 2 and all(_alive(p) for p in pids)
        time.sleep(1.0)
        assert all(_cpu_seconds(p) > 0.1 for p in pids)  # spinning, not sleeping
        raise KeyboardInterrupt
    assert not any(_alive(p) for p in pids)


# --- recorded, not timed -----------------------------------------------------------------------


def test_a_known_raise_is_recorded_as_known_with_its_case_name_and_not_timed(tmp_path: Path) -> None:
    """Issue 14: `bench --workload weighted-mixed --backend torchrec` crashed with UnboundLocalError."""
    pytest.importorskip("torchrec")
    workload = tmp_path / "weighted-half.json"
    workload.write_text(
        json.dumps(
            {
                "format": "jagbench-workload/1",
                "name": "weighted-half",
                "batch_size": 8,
                "weighted": True,
                "tables": [
                    {
                        "num_embeddings": 20,
                        "embedding_dim": 4,
                        "dtype": "float16",
                        "bag": {"dist": "fixed", "L": 3},
                    }
                ],
            }
        )
    )
    out = tmp_path / "run.json"
    args = ["bench", "--workload", str(workload), "--backend", "torchrec", "--backend", "torch"]
    args += ["--json", str(out), "--max-time", "0.01", "--min-rounds", "3", "--bandwidth-mib", "1", "--quiet"]
    assert main(args) == 0
    section = json.loads(out.read_text())["jagbench"]
    assert section["known"] == [
        {
            "backend": "torchrec",
            "workload": "weighted-half",
            "case": "torchrec-half-table-weighted-raises",
            "detail": section["known"][0]["detail"],
        }
    ]
    assert section["failed"] == []
    timed = {b["extra_info"]["backend"] for b in json.loads(out.read_text())["benchmarks"]}
    assert timed == {"torch"}  # torchrec not timed; torch's float16 output is a known discrepancy, timed
    write_report([load_run(out)], tmp_path / "report")
    md = (tmp_path / "report" / "report.md").read_text()
    assert (
        "known discrepancy, not timed: torchrec x weighted-half: case `torchrec-half-table-weighted-raises`"
        in md
    )


def test_a_new_kind_of_case_plugs_into_the_same_timing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class TwiceCase(ForwardCase):
        """Two lookups per call, counted as twice the bytes: a stand-in for a training step."""

        mode = "twice"
        test_name = "test_twice"
        byte_model_text = "twice the forward bytes"

        def prepare(self):  # type: ignore[no-untyped-def]
            call = super().prepare()
            return lambda: (call(), call())[1]

        def byte_model(self) -> dict[str, int]:
            return {k: 2 * v for k, v in super().byte_model().items()}

    monkeypatch.setitem(bench_runner.CASE_KINDS, "twice", TwiceCase)
    machine = FakeMachine()
    result = run_bench(paced_config(machine, tmp_path / "t.json", {"fast": [0.001]}, mode="twice"))
    (b,) = result.benchmarks
    assert b["name"] == "test_twice[fast@tiny]" and b["extra_info"]["mode"] == "twice"
    assert b["stats"]["median"] == pytest.approx(0.002)  # the call the case made is what was timed
    problem = get_workloads(["tiny"])[0].problem()
    assert b["extra_info"]["bytes"] == 2 * byte_model(problem.tables, problem.batch)["bytes"]
    assert result.jagbench["byte_model"] == "twice the forward bytes" and result.jagbench["mode"] == "twice"


def test_bench_options_are_checked_before_anything_runs(capsys: pytest.CaptureFixture[str]) -> None:
    for bad in (["--flush-cache", "0"], ["--repeat", "0"], ["--min-rounds", "0"]):
        with pytest.raises(SystemExit) as usage:
            main(["bench", "--json", "/dev/null", *bad])
        assert usage.value.code == 2
    assert main(["bench", "--json", "/dev/null", "--load", "-1"]) == 2
    assert "--load must be >= 0" in capsys.readouterr().err
    assert main(["bench", "--json", "/dev/null", "--mode", "sideways"]) == 2
    assert "unknown --mode 'sideways'; known: forward" in capsys.readouterr().err


# --- compare with paired rounds ------------------------------------------------------------------


def _paired_run(path: Path, machine: float, numba_factor: float, seed: int) -> Path:
    """torch and numba on one workload in 40 interleaved rounds; ``machine`` scales both."""
    rng = np.random.default_rng(seed)
    burst = machine * rng.lognormal(0.0, 0.1, 40)  # the machine's speed in each round, shared
    benchmarks = []
    for backend, ms in (("torch", 1.0), ("numba", 0.8 * numba_factor)):
        data = (ms * 1e-3 * burst * rng.lognormal(0.0, 0.01, 40)).tolist()
        benchmarks.append(
            {
                "name": f"test_lookup[{backend}@w]",
                "extra_info": {
                    "backend": backend,
                    "workload": "w",
                    "bytes": 1e8,
                    "ids": 1e5,
                    "rounds": {"repeat": [0] * 40, "round": list(range(40)), "position": [0] * 40},
                },
                "stats": {"median": float(np.median(data)), "iqr": 0.0, "rounds": 40, "data": data},
            }
        )
    path.write_text(json.dumps({"machine_info": {}, "commit_info": {}, "benchmarks": benchmarks}))
    return path


def test_compare_relative_to_the_baseline_cancels_a_slower_machine(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = _paired_run(tmp_path / "base.json", 1.0, 1.0, 1)
    busy = _paired_run(tmp_path / "busy.json", 1.3, 1.0, 2)  # the same code on a 30% slower machine
    worse = _paired_run(tmp_path / "worse.json", 1.0, 1.3, 3)  # numba itself 30% slower
    assert main(["compare", str(base), str(busy)]) == 1  # by time, both "regressed"
    capsys.readouterr()
    assert main(["compare", str(base), str(busy), "--relative"]) == 0
    out = capsys.readouterr().out
    assert "vs torch: new/base" in out and "judged relative to the baseline" in out
    assert main(["compare", str(base), str(worse), "--relative"]) == 1
    capsys.readouterr()
    result = compare_runs(load_run(base), load_run(worse), relative=True)
    (numba,) = [c for c in result.changes if c.backend == "numba"]
    assert numba.regressed and numba.relative == pytest.approx(1.3, rel=0.03) and numba.basis == "vs baseline"
    assert main(["compare", str(base), str(worse), "--relative", "--quiet"]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and "REGRESSED: numba x w" in captured.err
