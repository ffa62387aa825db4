"""The fuzz driver catches every faulty backend, raises no false alarm, saves replayable cases."""

import json
import time
from pathlib import Path

import pytest
import torch
from faulty_backends import FAULTY_BACKENDS, LastBagDropped, VectorPool

from harness.agreement import Outcome
from harness.backend import load_backend
from harness.cases import load_case, load_cases
from harness.cli import main
from harness.fuzz.driver import fuzz, fuzz_backend
from harness.fuzz.format import format_failure, format_report
from harness.fuzz.replay import replay

CATCH_BUDGET_S = 60


@pytest.fixture(scope="module")
def known():
    return load_cases()


@pytest.mark.parametrize("fault", FAULTY_BACKENDS, ids=lambda c: c.name)
def test_fuzz_catches_faulty_backend(fault, tmp_path, known):
    start = time.monotonic()
    report = fuzz(
        [fault()], time_budget=CATCH_BUDGET_S, seed=0, save_dir=tmp_path, known=known, shrink_budget=0.5
    )
    assert report.failed, f"{fault.name} was not caught in {CATCH_BUDGET_S} s:\n{format_report(report)}"
    (failure,) = report.failures
    print(
        f"{fault.name}: caught after {failure.seconds_to_find:.1f} s, {time.monotonic() - start:.1f} s in all"
    )
    # The saved case is self-contained: loading it and rerunning the backend reproduces the failure.
    case = load_case(failure.case_path)
    assert case.kind == "regression" and case.expect == "agree" and case.backend == fault.name
    (result,) = replay([case], [fault()], known=known)
    assert not result.as_expected and result.verdict.failed, result.verdict.detail
    assert failure.verdict.detail.split(" [after")[0] in format_report(report)


@pytest.mark.parametrize("backend", ["vector-pool", "torch", "reference"])
def test_correct_backends_raise_no_false_alarm(backend, tmp_path, known):
    chosen = VectorPool() if backend == "vector-pool" else load_backend(backend)
    report = fuzz([chosen], max_examples=60, seed=1, save_dir=tmp_path, known=known)
    assert not report.failed, format_report(report)
    (stats,) = report.stats
    assert stats.examples == 60 and stats.agreed + stats.known == 60
    assert 0 <= stats.worst_ratio <= 1
    assert list(tmp_path.iterdir()) == []


class _Recorder(VectorPool):
    name = "recorder"

    def __init__(self):
        self.seen = []

    def prepare(self, tables, weights):
        lookup = super().prepare(tables, weights)

        def record(batch):
            self.seen.append((tuple(tables), batch.values.tolist(), batch.lengths.tolist()))
            return lookup(batch)

        return record


def test_same_seed_same_run(known):
    runs = []
    for _ in range(2):
        r = _Recorder()
        fuzz_backend(r, max_examples=12, seed=7, save_dir=None, known=known, metamorphic=False)
        runs.append(r.seen)
    assert runs[0] == runs[1] and len(runs[0]) >= 12
    other = _Recorder()
    fuzz_backend(other, max_examples=12, seed=8, save_dir=None, known=known, metamorphic=False)
    assert other.seen != runs[0]


def test_known_discrepancies_are_counted_not_failed(known):
    stats, failure = fuzz_backend(
        load_backend("torch"), max_examples=60, seed=3, save_dir=None, known=known, metamorphic=False
    )
    assert failure is None and stats.known > 0
    assert set(stats.known_cases) <= {c.name for c in known if c.backend == "torch"}
    stats, failure = fuzz_backend(load_backend("torch"), max_examples=200, seed=3, save_dir=None, known=[])
    assert failure is not None and failure.verdict.outcome is Outcome.DISAGREE


def test_cli_fuzz_saves_a_case_that_replay_reruns(tmp_path, capsys):
    spec = f"{Path(__file__).parent / 'faulty_backends.py'}:LastBagDropped"
    code = main(
        [
            "fuzz",
            "--backend",
            spec,
            "--max-examples",
            "200",
            "--save-dir",
            str(tmp_path),
            "--shrink-budget",
            "2",
        ]
    )
    out = capsys.readouterr().out
    assert code == 1
    assert "| backend" in out and "worst element" in out and "reference" in out
    (path,) = tmp_path.glob("*.json")
    saved = json.loads(path.read_text())
    assert saved["backend"] == spec and saved["kind"] == "regression"
    assert main(["replay", str(path)]) == 1  # the bug is still there
    assert "| NO" in capsys.readouterr().out
    assert main(["replay", str(path), "--backend", "reference"]) == 0  # the reference agrees
    assert "| NO" not in capsys.readouterr().out


def test_cli_fuzz_exit_codes(tmp_path, capsys):
    assert main(["fuzz", "--backend", "reference", "--max-examples", "10", "--save-dir", str(tmp_path)]) == 0
    assert main(["fuzz", "--backend", "no-such-backend"]) == 2
    assert main(["replay", str(tmp_path / "missing.json")]) == 2
    with pytest.raises(SystemExit):
        main(["fuzz", "--max-examples", "5", "--time-budget", "3"])


def test_failure_text_names_the_worst_element(tmp_path, known):
    stats, failure = fuzz_backend(
        LastBagDropped(), max_examples=100, seed=0, save_dir=tmp_path, known=known, shrink_budget=3
    )
    text = format_failure(failure)
    for needle in (
        "tables (in output column order)",
        "batch: keys",
        "worst element: sample",
        "bound",
        "saved as",
    ):
        assert needle in text
    assert torch.isfinite(torch.tensor(failure.verdict.comparison.worst_reference))


class _WrongUnlessSorted(VectorPool):
    """Drops the first id of any bag whose ids are not in ascending order."""

    name = "wrong-unless-sorted"

    def pool(self, tables, weights, batch):
        out = super().pool(tables, weights, batch)
        offsets = batch.offsets.tolist()
        ids = batch.values.tolist()
        unsorted = any(
            ids[o : offsets[i + 1]] != sorted(ids[o : offsets[i + 1]]) for i, o in enumerate(offsets[:-1])
        )
        return out * 0.5 if unsorted else out


def test_metamorphic_relation_finds_the_transformed_counterexample(known):
    from harness.fuzz.driver import check_relation, judge
    from harness.model import JaggedBatch, Problem, TableConfig

    tables = (TableConfig("t", 4, 2, ("f",)),)
    weights = {"t": torch.arange(8, dtype=torch.float32).reshape(4, 2) + 1}
    problem = Problem(tables, weights, JaggedBatch.from_bags({"f": [[0, 1, 2, 3]]}))
    verdict, oracle = judge(_WrongUnlessSorted(), problem, known)
    assert verdict.outcome is Outcome.AGREE
    broken = check_relation(_WrongUnlessSorted(), problem, oracle, "permute", 1, known)
    assert broken is not None
    failed, counterexample = broken
    assert failed.outcome is Outcome.DISAGREE and "[after permute]" in failed.detail
    assert counterexample.batch.values.tolist() != [0, 1, 2, 3]
    assert check_relation(VectorPool(), problem, oracle, "permute", 1, known) is None
    assert check_relation(VectorPool(), problem, oracle, "split-table", 1, known) is None
