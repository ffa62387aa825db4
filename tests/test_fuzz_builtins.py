"""CI fuzzes every available built-in backend on the default strategy, with a bounded budget
(`harness.fuzz.profiles.CI_FUZZ_BUDGETS`): each must raise no failure that its known cases do not
explain, and must really have been fuzzed (enough examples, some of them compared)."""

from __future__ import annotations

import pytest

from harness.agreement import check_problem
from harness.backend import BUILTIN_BACKENDS, BackendUnavailable, load_backend
from harness.cases import load_cases
from harness.fuzz.driver import fuzz_backend
from harness.fuzz.format import format_coverage, format_failure
from harness.fuzz.profiles import ci_fuzz_budget

BUILTINS = [b.name for b in BUILTIN_BACKENDS if b.name != "reference"]


@pytest.fixture(scope="module")
def known():
    return load_cases()


@pytest.mark.parametrize("name", BUILTINS)
def test_builtin_backend_survives_the_default_strategy(name: str, tmp_path, known) -> None:
    try:
        backend = load_backend(name)
    except BackendUnavailable as e:
        pytest.skip(str(e))
    check_problem([backend], _tiny())  # compiling kernels, starting rank pools: not fuzzing time
    budget = ci_fuzz_budget(name)
    stats, failure = fuzz_backend(
        backend,
        max_examples=budget.max_examples,
        time_budget=budget.seconds,
        seed=0,
        save_dir=tmp_path,
        known=known,
        shrink_budget=30,
    )
    print(f"{name}: {stats.examples} examples in {stats.seconds:.1f} s\n{format_coverage(stats)}")
    assert failure is None, format_failure(failure)
    assert stats.examples >= budget.min_examples, f"only {stats.examples} examples in {budget.seconds} s"
    assert stats.agreed >= 1, f"nothing compared: {stats.unsupported} unsupported, {stats.known} known"


def _tiny():
    from harness.model import JaggedBatch, Problem, TableConfig
    from harness.weights import make_weights

    tables = (TableConfig("t", 4, 2, ("f",)),)
    return Problem(tables, make_weights(tables), JaggedBatch.from_bags({"f": [[0, 3], []]}))
