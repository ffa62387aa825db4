"""`jagbench bench --mode train`: one training step timed per round with the interleaved timing;
its byte model; the check before timing (sampled, compacted for large tables); pytest-benchmark's
JSON; the report and compare keyed by mode."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from pytest_benchmark.stats import Stats
from training_faulty_backends import DecaysEveryRow, Float32Trainer, LearningRateTwice

from harness.bench import training as bench_training
from harness.bench.compare import CompareError, compare_runs
from harness.bench.runner import BenchConfig, run_bench
from harness.bench.runs import load_run
from harness.bench.training import TrainCase, compacted, training_byte_model
from harness.bench.workloads import get_workloads
from harness.cli import main
from harness.model import JaggedBatch, Problem, TableConfig
from harness.report.document import write_report
from harness.training.check import check_training
from harness.training.contract import OptimizerConfig

HERE = Path(__file__).parent


def test_the_byte_model_counts_reads_every_time_and_updates_once_per_unique_row():
    tables = (TableConfig("a", 10, 4, ("f0", "f1")), TableConfig("b", 20, 8, ("f2",), dtype=torch.float16))
    # Table a: ids 1, 1, 2 (f0) and 2, 3 (f1): 5 reads, 3 unique rows; table b: 5, 5: 2 reads, 1 row.
    batch = JaggedBatch.from_bags({"f0": [[1, 1], [2]], "f1": [[2], [3]], "f2": [[5], [5]]})
    for kind, state_per_row in (("sgd", (0, 0)), ("adagrad", (16, 32)), ("rowwise_adagrad", (4, 4))):
        m = training_byte_model(tables, batch, OptimizerConfig(kind, 0.1))
        assert m["ids"] == 7 and m["unique_rows"] == 4
        assert m["rows_read_bytes"] == 5 * 16 + 2 * 16  # float32 rows of 4, float16 rows of 8
        assert m["output_bytes"] == m["grad_output_bytes"] == 2 * (4 + 4 + 8) * 4
        assert m["update_rows_read_bytes"] == m["update_rows_written_bytes"] == 3 * 16 + 1 * 16
        assert m["state_read_bytes"] == m["state_written_bytes"] == 3 * state_per_row[0] + state_per_row[1]
        assert m["per_sample_weight_grad_bytes"] == 0
        parts = [k for k in m if k.endswith("_bytes") and k not in ("index_bytes", "forward_bytes")]
        assert m["bytes"] == sum(m[k] for k in parts)
        assert m["forward_bytes"] == m["rows_read_bytes"] + m["output_bytes"]
    weighted = JaggedBatch(batch.keys, batch.values, batch.lengths, torch.ones(7))
    assert (
        training_byte_model(tables, weighted, OptimizerConfig("sgd", 0.1))["per_sample_weight_grad_bytes"]
        == 28
    )


def test_the_compacted_check_keeps_the_touched_rows_and_one_untouched_row():
    workload = get_workloads(["tiny"])[0]
    problem = workload.problem()
    small = compacted(Problem(problem.tables, problem.weights, problem.batch))
    for t, c in zip(problem.tables, small.tables, strict=True):
        assert c.num_embeddings < t.num_embeddings
    # The same rows with the same values are read: the lookup gives the same result.
    reference = _load("reference")
    same = reference.prepare(small.tables, small.weights)(small.batch)
    assert torch.equal(same, reference.prepare(problem.tables, problem.weights)(problem.batch))
    case = TrainCase(Float32Trainer(), workload, problem, problem.batch)
    full = case.checked_problem(16)  # tiny's tables are small: checked whole
    assert full.tables == problem.tables
    assert check_training(Float32Trainer(), full).outcome.value == "agree"


def test_the_check_before_timing_catches_a_fault_on_compacted_tables(monkeypatch):
    monkeypatch.setattr(bench_training, "FULL_TABLES_BYTES", 0)  # every workload counts as large
    workload = get_workloads(["tiny"])[0]
    problem = workload.problem()
    for backend, outcome in ((Float32Trainer(), "agree"), (DecaysEveryRow(), "disagree")):
        optimizer = OptimizerConfig("sgd", 0.01, weight_decay=0.1, weight_decay_mode="l2")
        case = TrainCase(backend, workload, problem, problem.batch, optimizer=optimizer)
        checked = case.checked_problem(8)
        assert checked.steps[0].batch.batch_size == 8
        assert sum(t.num_embeddings for t in checked.tables) < sum(t.num_embeddings for t in problem.tables)
        # the untouched row each compacted table keeps is what shows a step that decays every row
        verdict = case.check(case.prepare()(), 8)
        assert verdict.outcome.value == outcome, verdict.detail


@pytest.fixture(scope="module")
def train_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("train") / "train.json"
    faulty = f"{HERE / 'training_faulty_backends.py'}"
    code = main(
        [
            "bench", "--mode", "train", "--workload", "tiny",
            "--backend", f"{faulty}:Float32Trainer", "--backend", "reference",
            "--backend", f"{faulty}:LearningRateTwice", "--backend", "torch",
            "--baseline", "reference", "--optimizer", "adagrad", "--learning-rate", "0.05",
            "--max-time", "0.05", "--min-rounds", "5", "--bandwidth-mib", "16",
            "--json", str(path), "--quiet",
        ]
    )  # fmt: skip
    assert code == 1  # the planted fault failed its check
    return path


def test_bench_train_times_a_step_and_writes_pytest_benchmarks_json(train_run: Path) -> None:
    data = json.loads(train_run.read_text())
    section = data["jagbench"]
    assert section["mode"] == "train" and section["case_options"]["optimizer"]["kind"] == "adagrad"
    assert section["byte_model"] == bench_training.TRAIN_BYTE_MODEL
    assert {(f["backend"], f["outcome"]) for f in section["failed"]} == {
        ("fault-learning-rate-twice", "disagree")
    }
    assert not section["unsupported"]  # torch trains adagrad without weight decay
    timed = {b["extra_info"]["backend"]: b for b in data["benchmarks"]}
    assert set(timed) == {"float32-trainer", "reference", "torch"}
    workload = get_workloads(["tiny"])[0]
    problem = workload.problem()
    expected = training_byte_model(problem.tables, problem.batch, OptimizerConfig("adagrad", 0.05))
    for name, b in timed.items():
        info = b["extra_info"]
        assert b["name"] == f"test_train_step[{name}@tiny]" and b["fullname"].startswith("jagbench/train::")
        assert info["mode"] == "train" and info["optimizer"]["learning_rate"] == 0.05
        assert info["checked"]["outcome"] == "agree", info["checked"]
        assert info["checked"]["samples"] == workload.batch_size
        assert {k: info[k] for k in expected} == expected
        assert info["gbps"] == pytest.approx(info["bytes"] / b["stats"]["median"] / 1e9)
        assert len(b["stats"]["data"]) == b["stats"]["rounds"] >= 5
        # pytest-benchmark's own statistics of the rounds, as its JSON holds them
        stats = Stats()
        for x in b["stats"]["data"]:
            stats.update(x)
        assert b["stats"]["median"] == pytest.approx(stats.median)
        assert b["stats"]["iqr"] == pytest.approx(stats.iqr)
    assert timed["reference"]["extra_info"]["speedup_vs_baseline"] == 1.0
    assert timed["torch"]["extra_info"]["interleaved_with"]


def test_report_shows_training_beside_forward_and_compare_keys_by_mode(
    train_run: Path, tmp_path: Path
) -> None:
    forward = tmp_path / "forward.json"
    code = main(
        [
            "bench", "--workload", "tiny", "--backend", "reference", "--backend", "torch",
            "--max-time", "0.05", "--min-rounds", "5", "--bandwidth-mib", "16",
            "--json", str(forward), "--quiet",
        ]
    )  # fmt: skip
    assert code == 0
    runs = [load_run(forward), load_run(train_run)]
    written = write_report(runs, tmp_path / "report")
    md = (tmp_path / "report" / "report.md").read_text()
    assert "### Forward lookup" in md and "### Training step (`--mode train`)" in md
    assert md.index("### Forward lookup") < md.index("### Training step (`--mode train`)")
    assert "Byte model (train):" in md and "per unique (table, row)" in md
    assert "adagrad lr=0.05" in md and "[training step] FAILED the reference check" in md
    assert "### Training (`cases/known/training/`)" in md and "torch-sgd-sparse-duplicates" in md
    assert {p.name for p in written} >= {"throughput.png", "throughput-train.png"}
    # torch and reference ran in both modes on tiny: the report keeps them apart (no clash labels)
    assert "torch [forward]" not in md and "torch [train]" not in md
    with pytest.raises(CompareError, match="no \\(mode, backend, workload\\) case in common"):
        compare_runs(runs[0], runs[1])
    same = compare_runs(runs[1], runs[1])
    assert {c.mode for c in same.changes} == {"train"} and not same.regressions


def test_bench_train_options_are_checked(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--optimizer", "sgd", "--workload", "tiny"]) == 2
    assert "--mode train" in capsys.readouterr().err
    assert main(["bench", "--mode", "train", "--learning-rate", "-1", "--workload", "tiny"]) == 2
    assert "learning" in capsys.readouterr().err


def test_a_known_training_discrepancy_is_timed_and_flagged(tmp_path: Path) -> None:
    """torch's SGD applies duplicates one at a time (a known case): on a workload with duplicate
    ids its step fails the contract, the case's model explains it, and it is timed, flagged."""
    workload = get_workloads(["tiny"])[0]
    config = BenchConfig(
        backends=[_load("torch")],
        workloads=[workload],
        json_path=tmp_path / "t.json",
        mode="train",
        max_time=0.02,
        min_rounds=3,
        bandwidth_bytes=1 << 20,
        case_options={"optimizer": OptimizerConfig("sgd", 1.0)},
    )
    result = run_bench(config)
    (b,) = result.benchmarks
    known = b["extra_info"]["known_discrepancy"]
    checked = b["extra_info"]["checked"]["outcome"]
    if checked == "known":
        assert "torch-sgd-sparse-duplicates-applied-one-at-a-time" in known
    else:  # torch happened to round every duplicate as the contract does on this workload
        assert checked == "agree" and known is None
    assert not result.failed


def _load(name: str):  # type: ignore[no-untyped-def]
    from harness.backend import load_backend

    return load_backend(name)


def test_a_step_that_raises_while_timed_is_recorded_failed(tmp_path: Path) -> None:
    class RaisesSecondCall(Float32Trainer):
        name = "raises-second-call"

        def prepare_training(self, tables, weights, optimizer):  # type: ignore[no-untyped-def]
            step = super().prepare_training(tables, weights, optimizer)
            calls = [0]

            def once(batch, grad):  # type: ignore[no-untyped-def]
                calls[0] += 1
                if calls[0] == 2:
                    raise RuntimeError("boom on the second step")
                return step(batch, grad)

            return once

    config = BenchConfig(
        backends=[RaisesSecondCall(), LearningRateTwice()],
        workloads=get_workloads(["tiny"]),
        json_path=tmp_path / "t.json",
        mode="train",
        max_time=0.02,
        min_rounds=3,
        bandwidth_bytes=1 << 20,
    )
    result = run_bench(config)
    failed = {f["backend"]: f for f in result.failed}
    assert (
        failed["raises-second-call"]["outcome"] == "raised"
        and "boom" in failed["raises-second-call"]["detail"]
    )
    assert failed["fault-learning-rate-twice"]["outcome"] == "disagree"
    assert not result.benchmarks
