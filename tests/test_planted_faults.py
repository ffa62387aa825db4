"""Bugs that live at scale or in the structure are caught by `jagbench fuzz` within 60 s, and the
case each saves is minimal: at most 3 tables, 4 samples and 8 ids per bag, unless the bug needs
size, and then that size and no more (a 257-id bag for a 256-id buffer)."""

from __future__ import annotations

import json
import time

import pytest
from faulty_backends import (
    SCALE_FAULTS,
    BagGrid65535,
    BagTruncatedAt256,
    DimTile128TailDropped,
    FeatureSlotsMod16,
    FeaturesPast8Zero,
    GroupedByDim,
    GroupedByPoolingDtype,
    Offsets16Bit,
    OffsetsUint16,
    SampleBlocksCapped,
    VectorPool,
    WarpTailDropped,
)

from harness.cases import load_case
from harness.fuzz.driver import fuzz
from harness.fuzz.format import format_report
from harness.fuzz.minimise import describe_size
from harness.fuzz.replay import replay

CATCH_BUDGET_S = 60
SHRINK_BUDGET_S = 30

SMALL = {"tables": 3, "samples": 4, "longest_bag": 8}
"""The most a minimised case may keep of what its bug does not need."""

NEEDS: dict[type[VectorPool], dict[str, int]] = {
    BagTruncatedAt256: {"longest_bag": 257},
    WarpTailDropped: {"longest_bag": 33},
    DimTile128TailDropped: {"max_dim": 129},
    SampleBlocksCapped: {"samples": 4097},
    Offsets16Bit: {"longest_bag": 2**15},
    OffsetsUint16: {"longest_bag": 2**16},
    FeaturesPast8Zero: {"features": 9},
    FeatureSlotsMod16: {"features": 17},
    GroupedByPoolingDtype: {"tables": 2},
    GroupedByDim: {"tables": 2},
}
"""The exact size each bug needs, where it needs one (the minimised case must have exactly that)."""


@pytest.fixture(scope="module")
def known():
    from harness.cases import load_cases

    return load_cases()


def _expect_minimal(fault: type[VectorPool], size: dict[str, int]) -> None:
    needs = NEEDS.get(fault, {})
    for what, exact in needs.items():
        assert size[what] == exact, f"{fault.name}: {what} is {size[what]}, the bug needs exactly {exact}"
    if fault is BagGrid65535:
        # It needs 65 536 bags, however they split into features x samples, and one id in the last.
        assert size["features"] * size["samples"] <= 65_536 + size["samples"], size
        needs = {"samples": 0}
    for what, most in SMALL.items():
        if what not in needs:
            assert size[what] <= most, f"{fault.name}: {what} is {size[what]}, more than {most}"
    if "samples" in needs:
        assert size["ids"] <= SMALL["longest_bag"], f"{fault.name}: {size['ids']} ids in all"
    if "max_dim" not in needs:
        assert size["max_dim"] <= 2, f"{fault.name}: dim {size['max_dim']}"


@pytest.mark.parametrize("fault", SCALE_FAULTS, ids=lambda c: c.name)
def test_scale_fault_is_caught_and_minimised(fault, tmp_path, known):
    start = time.monotonic()
    report = fuzz(
        [fault()],
        time_budget=CATCH_BUDGET_S,
        seed=0,
        save_dir=tmp_path,
        known=known,
        shrink_budget=SHRINK_BUDGET_S,
    )
    assert report.failed, f"{fault.name} was not caught in {CATCH_BUDGET_S} s:\n{format_report(report)}"
    (failure,) = report.failures
    size = describe_size(failure.problem)
    print(
        f"{fault.name}: caught after {failure.seconds_to_find:.1f} s ({failure.examples_to_find} examples), "
        f"minimised in {failure.minimised.seconds:.1f} s / {failure.minimised.steps} steps to {size}; "
        f"{time.monotonic() - start:.1f} s in all"
    )
    assert failure.seconds_to_find < CATCH_BUDGET_S
    assert failure.minimised.complete, "minimisation did not reach a fixed point within its budget"
    _expect_minimal(fault, size)
    # What is saved is the minimised problem, and it says so; replaying it fails again.
    saved = json.loads(failure.case_path.read_text())
    assert saved["found"]["minimised"]["to"] == size
    assert saved["found"]["minimised"]["steps"] == failure.minimised.steps > 0
    (result,) = replay([load_case(failure.case_path)], [fault()], known=known)
    assert result.verdict.failed, result.verdict.detail


def test_the_minimiser_keeps_no_more_size_than_a_bug_needs():
    """`_expect_minimal` itself fails a case one bigger than the bug needs, or one too big elsewhere."""
    just = {"tables": 1, "features": 1, "samples": 1, "ids": 257, "longest_bag": 257, "max_dim": 1, "rows": 3}
    _expect_minimal(BagTruncatedAt256, just)
    for too_big in ({"longest_bag": 258, "ids": 258}, {"samples": 5}, {"tables": 4}, {"max_dim": 3}):
        with pytest.raises(AssertionError):
            _expect_minimal(BagTruncatedAt256, {**just, **too_big})
