"""Every saved case under cases/ replays as it says: regressions agree, known discrepancies persist
and are still what their models say (so a library upgrade that changes them fails here)."""

import pytest

from harness.cases import case_files, load_case, problem_from_json, problem_to_json
from harness.generate import random_problem


@pytest.mark.parametrize("path", case_files(), ids=lambda p: p.stem)
def test_saved_case_replays_as_expected(path):
    from harness.fuzz.replay import replay

    case = load_case(path)
    (result,) = replay([case])
    if result.skipped:
        pytest.skip(result.verdict.detail)
    assert result.as_expected, (
        f"{case.name} ({case.kind}) expected {case.expect}, got {result.verdict.outcome.value}: "
        f"{result.verdict.detail}" + (f"; model: {result.explanation.detail}" if result.explanation else "")
    )
    if case.kind == "known-discrepancy":
        assert result.explanation is not None and result.explanation.explained, "its own model explains it"
        assert case.in_scope(case.backend, case.problem, result.verdict.observed.backend), (
            "own problem in scope"
        )


def test_every_known_case_has_a_model_and_says_whether_it_was_reproduced():
    for path in case_files():
        case = load_case(path)
        if case.kind == "known-discrepancy":
            assert case.model is not None, f"{case.name}: no model"
            assert case.reproduced or "not reproduced" in case.found.get("status", ""), case.name


def test_problems_round_trip_through_json_exactly():
    import torch

    for seed in range(10):
        p = random_problem(seed)
        q = problem_from_json(problem_to_json(p))
        assert q.tables == p.tables
        for name in p.weights:
            assert (
                torch.equal(q.weights[name], p.weights[name])
                and q.weights[name].dtype == p.weights[name].dtype
            )
        assert torch.equal(q.batch.values, p.batch.values) and torch.equal(q.batch.lengths, p.batch.lengths)


# Training cases (`"mode": "train"`): known training discrepancies under cases/known/training/ and
# training regressions under cases/regressions/training/, replayed as `jagbench replay` does.

_TRAINING_BACKENDS: dict[str, object] = {}
"""One backend object per name for the whole module: a sharded backend starts its rank pool once."""


def _training_backend(name: str) -> object:
    from harness.backend import load_backend

    if name not in _TRAINING_BACKENDS:
        _TRAINING_BACKENDS[name] = load_backend(name)
    return _TRAINING_BACKENDS[name]


def _training_case_files():
    from harness.training.cases import every_training_case_file

    return every_training_case_file()


@pytest.mark.parametrize("path", _training_case_files(), ids=lambda p: f"{p.parent.parent.name}/{p.stem}")
def test_saved_training_case_replays_as_expected(path):
    import json

    from harness.backend import BackendUnavailable
    from harness.training.cases import is_training_case, load_training_case, replay_training

    assert is_training_case(json.loads(path.read_text())), "a training case says mode: train"
    case = load_training_case(path)
    assert case.kind == ("regression" if path.parent.parent.name == "regressions" else "known-discrepancy")
    try:
        backend = _training_backend(case.backend)
    except BackendUnavailable as e:
        pytest.skip(str(e))
    (result,) = replay_training([case], {case.backend: backend})
    assert result.as_expected, (
        f"{case.name} ({case.kind}) expected {case.expect}, got {result.verdict.outcome.value}: "
        f"{result.verdict.detail}" + (f"; model: {result.explanation.detail}" if result.explanation else "")
    )


def test_a_training_case_is_not_read_as_a_forward_one():
    """The forward loader refuses a training case by name (it would silently drop its steps)."""
    from harness.cases import CaseError, load_case

    paths = _training_case_files()
    assert paths, "no training case to read"
    with pytest.raises(CaseError, match="training case"):
        load_case(paths[0])
