"""Every saved case under cases/ replays as it says: regressions agree, known discrepancies persist."""

import pytest

from harness.agreement import Outcome
from harness.backend import BackendUnavailable
from harness.cases import case_files, load_case, problem_from_json, problem_to_json
from harness.generate import random_problem

EXPECTED = {"agree": Outcome.AGREE, "disagree": Outcome.DISAGREE, "raised": Outcome.RAISED}


@pytest.mark.parametrize("path", case_files(), ids=lambda p: p.stem)
def test_saved_case_replays_as_expected(path):
    from harness.fuzz.replay import replay_case

    case = load_case(path)
    try:
        (verdict,) = replay_case(case)
    except BackendUnavailable as e:
        pytest.skip(str(e))
    assert verdict.outcome is EXPECTED[case.expect], (
        f"{case.name} ({case.kind}) expected {case.expect}, got {verdict.outcome.value}: {verdict.detail}"
    )
    if case.kind == "known-discrepancy":
        assert case.in_scope(case.backend, case.problem), "a known discrepancy's own problem is in its scope"


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
