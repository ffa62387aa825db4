"""`jagbench fuzz --mode train`: the sixteen planted faults of training kernels are caught within 60 s each,
minimised to the little each needs, saved as training cases that `jagbench replay` reruns;
correct trainers pass, relations included; the minimiser's training passes; the command line."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from training_faulty_backends import (
    FAULTS,
    AdagradStatePerRow,
    ColumnsInKeyOrder,
    DecaysEveryRow,
    DropsSecondFeature,
    EpsInsideSqrt,
    Float32Trainer,
    IgnoresSampleWeights,
    LearningRateTwice,
    MeanNotDivided,
    RowwisePerElement,
    RowwiseSumNotMean,
    StateResetEachStep,
    WrongTable,
)

from harness.agreement import Outcome
from harness.backend import load_backend
from harness.cli import main
from harness.fuzz.minimise.training import (
    TRAINING_PASSES,
    ForwardView,
    describe_training_size,
    minimise_training,
    training_smaller,
)
from harness.fuzz.training import (
    failure_categories,
    fuzz_training,
    judge_training,
    same_training_failure,
    training_failure_kind,
)
from harness.model import JaggedBatch, TableConfig
from harness.training.cases import load_training_case, replay_training
from harness.training.check import TrainingVerdict
from harness.training.contract import OptimizerConfig
from harness.training.coverage import TRAINING_DIMENSIONS
from harness.training.problem import TrainingProblem
from harness.training.validate import validate_training_problem

HERE = Path(__file__).parent
CATCH_BUDGET_S = 60
SHRINK_BUDGET_S = 20

ISSUE_FAULTS = (
    DecaysEveryRow,
    EpsInsideSqrt,
    MeanNotDivided,
    IgnoresSampleWeights,
    DropsSecondFeature,
    AdagradStatePerRow,
    WrongTable,
    LearningRateTwice,
)
"""The issue's eight examples, first; then every other planted fault (`FAULTS`): all sixteen are
fuzzed in every run of the suite (about 70 s together on a loaded 2-core machine)."""
ALL_FAULTS = ISSUE_FAULTS + tuple(f for f in FAULTS if f not in ISSUE_FAULTS)

SMALL = {"steps": 1, "batches": 1, "tables": 1, "features": 1, "samples": 1, "ids": 2, "max_dim": 2}
"""The most a minimised training case may keep of what its bug does not need."""
NEEDS = {
    StateResetEachStep: {"steps": 2},
    WrongTable: {"tables": 2, "features": 2},
    DropsSecondFeature: {"features": 2},
    ColumnsInKeyOrder: {"features": 2},
}
"""Where a bug needs more than `SMALL`: what the minimised case must keep."""
KINDS = {
    EpsInsideSqrt: ("adagrad", "rowwise_adagrad"),
    AdagradStatePerRow: ("adagrad",),
    RowwiseSumNotMean: ("rowwise_adagrad",),
    RowwisePerElement: ("rowwise_adagrad",),
    StateResetEachStep: ("adagrad", "rowwise_adagrad"),
}
"""The optimizer kinds a bug needs; every other one must be minimised to sgd."""
DECAYS = (DecaysEveryRow, StateResetEachStep)
"""The bugs whose minimised case may keep weight decay (every other one must lose it)."""


def _expect_minimal(fault: type, failure) -> None:  # type: ignore[no-untyped-def]
    size = describe_training_size(failure.problem)
    needs = NEEDS.get(fault, {})
    for what, most in {**SMALL, **needs}.items():
        assert size[what] <= most, f"{fault.name}: {what} is {size[what]}, more than {most}: {size}"
    for what, exact in needs.items():
        assert size[what] == exact, f"{fault.name}: {what} is {size[what]}, the bug needs {exact}"
    optimizer = failure.problem.optimizer
    assert optimizer.kind in KINDS.get(fault, ("sgd",)), f"{fault.name}: {optimizer.describe()}"
    if fault not in DECAYS:
        assert not optimizer.decays, f"{fault.name}: {optimizer.describe()}"


def _caught_minimised_and_replayed(fault: type, tmp_path: Path) -> None:
    start = time.monotonic()
    report = fuzz_training(
        [fault()], time_budget=CATCH_BUDGET_S, seed=0, save_dir=tmp_path, shrink_budget=SHRINK_BUDGET_S
    )
    assert report.failed, f"{fault.name} was not caught in {CATCH_BUDGET_S} s: {report.stats[0].to_json()}"
    (failure,) = report.failures
    print(
        f"{fault.name}: caught after {failure.seconds_to_find:.1f} s ({failure.examples_to_find} examples), "
        f"minimised in {failure.minimised.seconds:.1f} s to {describe_training_size(failure.problem)} "
        f"({failure.problem.optimizer.describe()}); {time.monotonic() - start:.1f} s in all"
    )
    assert failure.seconds_to_find < CATCH_BUDGET_S
    assert failure.minimised.complete, "minimisation did not reach a fixed point within its budget"
    _expect_minimal(fault, failure)
    # What is saved is the minimised training problem; replaying it fails again, the reference agrees.
    saved = json.loads(failure.case_path.read_text())
    assert saved["mode"] == "train" and saved["kind"] == "regression" and saved["expect"] == "agree"
    assert saved["found"]["minimised"]["to"] == describe_training_size(failure.problem)
    case = load_training_case(failure.case_path)
    (again,) = replay_training([case], {case.backend: fault()})
    assert again.verdict.failed and not again.as_expected, again.verdict.detail
    (reference,) = replay_training([case], others=[load_backend("reference")])
    assert reference.verdict.outcome is Outcome.AGREE and reference.as_expected, reference.verdict.detail


@pytest.mark.parametrize("fault", ALL_FAULTS, ids=lambda c: c.name)
def test_planted_training_fault_is_caught_minimised_and_replayed(fault, tmp_path):
    _caught_minimised_and_replayed(fault, tmp_path)


def _minimal(steps: int = 1, optimizer: OptimizerConfig | None = None, features: int = 1) -> TrainingProblem:
    keys = tuple(f"f{i}" for i in range(features))
    tables = (TableConfig("t0", 1, 1, keys),)
    batch = JaggedBatch.from_bags({k: [[0]] for k in keys})
    optimizer = optimizer or OptimizerConfig("sgd", 0.5)
    pairs = [(batch, torch.ones(1, features))] * steps
    return TrainingProblem.of(tables, {"t0": torch.ones(1, 1)}, optimizer, pairs)


def test_expect_minimal_fails_a_case_bigger_than_its_bug_needs():
    """`_expect_minimal` itself rejects one step or feature too many, or a needless optimizer."""

    class Fake:
        def __init__(self, problem):
            self.problem = problem

    _expect_minimal(LearningRateTwice, Fake(_minimal()))
    _expect_minimal(StateResetEachStep, Fake(_minimal(2, OptimizerConfig("adagrad", 1.0))))
    for fault, too_big in (
        (LearningRateTwice, _minimal(steps=2)),
        (LearningRateTwice, _minimal(features=2)),
        (LearningRateTwice, _minimal(optimizer=OptimizerConfig("adagrad", 1.0))),
        (LearningRateTwice, _minimal(optimizer=OptimizerConfig("sgd", 1.0, 0, 0.5, "l2"))),
        (StateResetEachStep, _minimal(1, OptimizerConfig("adagrad", 1.0))),  # it needs two steps
        (AdagradStatePerRow, _minimal(1, OptimizerConfig("sgd", 1.0))),  # it needs adagrad
    ):
        with pytest.raises(AssertionError):
            _expect_minimal(fault, Fake(too_big))


def test_correct_trainers_pass_with_relations(tmp_path):
    backends = [Float32Trainer(), load_backend("reference")]
    report = fuzz_training(backends, max_examples=30, seed=5, save_dir=tmp_path, shrink_budget=5)
    assert not report.failed, [f.verdict.detail for f in report.failures]
    for s in report.stats:
        assert s.examples == 30 and s.agreed == 30 and s.metamorphic > 0, s.to_json()
        for name, _ in TRAINING_DIMENSIONS:
            assert sum(s.coverage[name].values()) == 30, name
    assert report.to_json()["settings"]["mode"] == "train"


class _WrongOnUnsortedBags(Float32Trainer):
    """Updates 1.5 times too far when some bag's ids are not in ascending order (a kernel that
    assumes sorted ids). A problem of sorted bags agrees; only permuting its ids shows the bug."""

    name = "wrong-on-unsorted-bags"

    def prepare_training(self, tables, weights, optimizer):
        step = super().prepare_training(tables, weights, optimizer)

        def wrong(batch, grad):
            before = {t.name: t for t in tables}
            result = step(batch, grad)
            offsets = batch.offsets.tolist()
            ids = batch.values.tolist()
            if any(ids[lo:hi] != sorted(ids[lo:hi]) for lo, hi in zip(offsets, offsets[1:], strict=False)):
                for name in before:
                    result.weights[name].mul_(1.5)
            return result

        return wrong


def _sorted_problem() -> TrainingProblem:
    tables = (TableConfig("t0", 8, 2, ("f0",)),)
    batch = JaggedBatch.from_bags({"f0": [[1, 3, 6], [0, 2]]})
    weights = {"t0": torch.arange(16, dtype=torch.float32).reshape(8, 2) / 4}
    grad = torch.tensor([[1.0, -1.0], [0.5, 2.0]])
    return TrainingProblem.of(tables, weights, OptimizerConfig("sgd", 0.5), [(batch, grad)])


def test_a_relation_finds_what_the_generated_problems_hide_and_its_case_replays(tmp_path, monkeypatch):
    from hypothesis import strategies as st

    import harness.fuzz.training as driver

    backend = _WrongOnUnsortedBags()
    problem = _sorted_problem()
    assert judge_training(backend, problem)[0].outcome is Outcome.AGREE
    found = fuzz_training(
        [backend], strategy=st.just(problem), max_examples=80, save_dir=tmp_path, shrink_budget=5
    )
    (failure,) = found.failures
    assert failure.found_by == "the metamorphic relation 'permute'" and failure.relation is None
    # The permuted problem fails the reference check: it is the counterexample, minimised.
    ids = failure.problem.steps[0].batch.values.tolist()
    assert len(ids) == 2 and ids[0] > ids[1], ids
    # Where the reference sees nothing on the transformed problems either, the broken relation is
    # the failure: minimised while it stays broken, and saved with the relation, which replay checks.
    monkeypatch.setattr(driver, "transformed_problems", lambda *a: [])
    found = fuzz_training(
        [backend], strategy=st.just(problem), max_examples=80, save_dir=tmp_path, shrink_budget=5
    )
    (failure,) = found.failures
    assert failure.relation is not None and failure.relation[0] == "permute"
    assert failure.verdict.detail.startswith("metamorphic relation 'permute' broken")
    saved = json.loads(failure.case_path.read_text())
    assert saved["relation"] == {"name": "permute", "seed": failure.relation[1]}
    case = load_training_case(failure.case_path)
    (again,) = replay_training([case], {case.backend: backend})
    assert again.verdict.outcome is Outcome.DISAGREE and not again.as_expected, again.verdict.detail
    (correct,) = replay_training([case], others=[Float32Trainer()])
    assert correct.as_expected and "holds" in correct.verdict.detail, correct.verdict.detail


# ---------------------------------------------------------------------------------------------
# The minimiser's training passes, on a predicate that needs no backend


TABLES = (TableConfig("t0", 6, 3, ("f0", "f1")), TableConfig("t1", 5, 2, ("f2",)))


def _problem(steps: int = 3, optimizer: OptimizerConfig | None = None) -> TrainingProblem:
    g = torch.Generator().manual_seed(0)
    batch = JaggedBatch.from_bags({"f0": [[1, 1], [3], [0]], "f1": [[2], [], [5]], "f2": [[0, 4], [4], [1]]})
    other = JaggedBatch.from_bags({"f0": [[2], [4], []], "f1": [[1, 0], [3], [3]], "f2": [[3], [], [2, 2]]})
    weights = {t.name: torch.randn(t.num_embeddings, t.embedding_dim, generator=g) for t in TABLES}
    optimizer = optimizer or OptimizerConfig("rowwise_adagrad", 0.1, 1e-8, 0.25, "l2")
    pairs = [(batch if i % 2 == 0 else other, torch.randn(3, 8, generator=g)) for i in range(steps)]
    return TrainingProblem.of(TABLES, weights, optimizer, pairs)


def _keep_features(p: TrainingProblem, keys: list[str]) -> TrainingProblem:
    view = ForwardView(p)
    from harness.fuzz.minimise import edits

    return view.split(edits.restrict(view.problem, keys=keys))


def _needs_a_later_f2_gradient_and_decay(p: TrainingProblem) -> TrainingVerdict | None:
    """ "Fails" when a step after the first has a non-zero grad_output for feature f2 on a sample
    whose f2 bag is not empty, and the optimizer decays: a stand-in for a state bug of f2's table."""
    validate_training_problem(p)
    if not p.optimizer.decays:
        return None
    for s in p.steps[1:]:
        b = s.batch
        if "f2" not in b.keys:
            return None
        cols = [c for _, f, first, dim in _columns(p) if f == "f2" for c in range(first, first + dim)]
        lengths = b.lengths.reshape(len(b.keys), b.batch_size)[b.keys.index("f2")]
        for sample in range(b.batch_size):
            if lengths[sample] > 0 and bool((s.grad_output[sample, cols] != 0).any()):
                return TrainingVerdict(
                    "fake", Outcome.DISAGREE, "step 1 of 2: table 't1' row 0, column 0: off"
                )
    return None


def _columns(p: TrainingProblem):  # type: ignore[no-untyped-def]
    from harness.model import output_columns

    return output_columns(p.tables)


def test_the_minimiser_keeps_only_what_the_failure_needs_in_every_step():
    p = _problem()
    verdict = _needs_a_later_f2_gradient_and_decay(p)
    assert verdict is not None
    result = minimise_training(p, verdict, _needs_a_later_f2_gradient_and_decay, budget=60)
    m = result.problem
    assert result.complete
    assert describe_training_size(m) == {
        "steps": 2, "batches": 1, "tables": 1, "features": 1, "samples": 1, "ids": 1,
        "longest_bag": 1, "max_dim": 1, "rows": 1,
    }  # fmt: skip
    assert m.steps[0].batch is m.steps[1].batch  # one batch, stored once
    assert m.optimizer == OptimizerConfig("sgd", 1.0, 1e-8, 1.0, "l2")
    assert torch.equal(m.steps[0].grad_output, torch.zeros(1, 1))
    assert torch.equal(m.steps[1].grad_output, torch.ones(1, 1))
    assert m.tables[0].feature_names == ("f2",)
    for name in ("drop-steps", "reuse-first-batch", "simpler-optimizer", "drop-samples", "fewer-columns"):
        assert result.steps_by_pass[name] > 0, (name, result.steps_by_pass)
    assert result.steps_by_pass["drop-tables"] + result.steps_by_pass["drop-features"] > 0


def test_the_forward_view_splits_back_to_the_same_problem():
    p = _problem()
    view = ForwardView(p)
    assert view.problem.batch.batch_size == 6  # two distinct batches of 3 samples, side by side
    back = view.split(view.problem)
    assert back.tables == p.tables and back.optimizer == p.optimizer
    for a, b in zip(back.steps, p.steps, strict=True):
        assert torch.equal(a.batch.values, b.batch.values) and torch.equal(a.batch.lengths, b.batch.lengths)
        assert torch.equal(a.grad_output, b.grad_output)
    assert back.steps[0].batch is back.steps[2].batch
    # Dropping feature f1 drops its columns of every step's grad_output, and nothing else.
    kept = _keep_features(p, ["f0", "f2"])
    for a, b in zip(kept.steps, p.steps, strict=True):
        assert torch.equal(a.grad_output, torch.cat([b.grad_output[:, 0:3], b.grad_output[:, 6:8]], dim=1))
    assert not training_smaller(p, p) and training_smaller(kept, p)


def test_every_training_pass_has_a_name_and_the_forward_ones_keep_theirs():
    names = [p.name for p in TRAINING_PASSES]
    assert len(names) == len(set(names))
    assert {"drop-tables", "compact-rows", "simplify-values", "drop-steps", "simpler-gradients"} <= set(names)


def test_failure_kinds_name_the_first_quantity():
    detail = (
        "step 0 of 2 (sgd lr=1): output sample 0, column 1 (feature 'f' of table 't', its column 0): got 1; "
        "table 't' row 3 does not occur in the batch but changed: column 0 was 1.0, now 0.0"
    )
    assert failure_categories(detail) == ["output", "untouched row"]
    assert training_failure_kind(TrainingVerdict("b", Outcome.DISAGREE, detail)) == ("disagree", "output")
    raised = TrainingVerdict("b", Outcome.RAISED, "step 1 of 2 raised IndexError: tuple index out of range")
    assert training_failure_kind(raised) == ("raised", "IndexError")


def test_a_known_training_discrepancy_is_known_not_failed_and_not_the_same_failure():
    torch_backend = load_backend("torch")
    from harness.training.cases import load_training_cases

    (case,) = [
        c for c in load_training_cases() if c.name == "torch-sgd-sparse-duplicates-applied-one-at-a-time"
    ]
    verdict, names = judge_training(torch_backend, case.problem, load_training_cases())
    assert verdict.outcome is Outcome.KNOWN and names == (case.name,), verdict.detail
    bare, _ = judge_training(torch_backend, case.problem, [])
    assert bare.failed
    assert same_training_failure(torch_backend, bare, load_training_cases())(case.problem) is None


# ---------------------------------------------------------------------------------------------
# The command line


def test_cli_fuzz_train_saves_a_case_that_replay_reruns(tmp_path, capsys):
    spec = f"{HERE / 'training_faulty_backends.py'}:LearningRateTwice"
    summary = tmp_path / "summary.json"
    args = ["fuzz", "--mode", "train", "--backend", spec, "--max-examples", "50", "--save-dir", str(tmp_path)]
    assert main([*args, "--shrink-budget", "10", "--quiet", "--json", str(summary)]) == 1
    out = capsys.readouterr().out
    assert "(training): disagree" in out and "grad_output:" in out and "optimizer: sgd" in out
    result = json.loads(summary.read_text())["result"]
    assert result["settings"]["mode"] == "train" and result["failed"]
    (failure,) = result["failures"]
    path = Path(failure["case_path"])
    assert failure["mode"] == "train" and failure["size"]["steps"] == 1
    saved = json.loads(path.read_text())
    assert saved["backend"] == spec and saved["mode"] == "train"
    assert main(["replay", str(path)]) == 1  # the bug is still there
    assert "| NO" in capsys.readouterr().out
    assert main(["replay", str(path), "--backend", "reference"]) == 0  # the reference agrees
    replayed = capsys.readouterr().out
    assert "| NO" not in replayed and "training case" in replayed


def test_cli_fuzz_train_picks_training_backends_and_refuses_others(capsys):
    from harness.fuzz.cli import _training_backends_with_labels

    backends, labels = _training_backends_with_labels(None)
    assert backends and "reference" not in labels and "torch" in labels
    assert all(callable(getattr(b, "prepare_training", None)) for b in backends)
    forward_only = f"{HERE / 'faulty_backends.py'}:LastBagDropped"
    assert main(["fuzz", "--mode", "train", "--backend", forward_only, "--max-examples", "1"]) == 2
    assert "does not train" in capsys.readouterr().err
    assert main(["fuzz", "--optimizer", "sgd", "--backend", "reference", "--max-examples", "1"]) == 2


def test_cli_fuzz_train_of_the_reference_agrees(tmp_path, capsys):
    args = ["fuzz", "--mode", "train", "--backend", "reference", "--optimizer", "rowwise_adagrad"]
    assert main([*args, "--max-examples", "15", "--save-dir", str(tmp_path), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "| reference" in out and "optimizer: rowwise_adagrad 100%" in out
