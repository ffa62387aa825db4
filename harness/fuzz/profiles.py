"""Hypothesis settings profiles shared by ``jagbench fuzz`` and the test suite, and the bounded
fuzz budgets CI gives each built-in backend (`CI_FUZZ_BUDGETS`).

``ci``: 60 examples, derandomized, no deadline, no example database: the same run every time.
``dev``: quick. ``campaign``: as many examples as a time budget allows (the driver stops it).
Minimised cases are stored as data (`harness.cases`), never in ``.hypothesis/``: no profile has a
database.
"""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import HealthCheck, settings


@dataclass(frozen=True)
class FuzzBudget:
    """A bounded fuzz run: at most ``max_examples`` examples and ``seconds`` seconds (whichever
    ends first), and at least ``min_examples`` for the run to count as having fuzzed at all."""

    max_examples: int
    seconds: float
    min_examples: int


CI_FUZZ_BUDGET = FuzzBudget(max_examples=300, seconds=10.0, min_examples=10)
"""What CI gives a built-in backend on the default strategy (tests/test_fuzz_builtins.py), after
one warm-up lookup (kernels compiled, rank pools started)."""

CI_FUZZ_BUDGETS: dict[str, FuzzBudget] = {
    "numba": FuzzBudget(300, 12.0, 10),  # new specialisations compile (or load) kernels
    "triton": FuzzBudget(100, 25.0, 4),  # the interpreter runs each program in Python
    "torchrec-sharded-tw": FuzzBudget(200, 12.0, 5),  # every lookup crosses 2 gloo ranks
    "torchrec-sharded-rw": FuzzBudget(200, 12.0, 5),
    "torchrec-sharded-cw": FuzzBudget(200, 12.0, 5),
    "torchrec-sharded-twcw": FuzzBudget(200, 12.0, 5),
    "torchrec-sharded-dp": FuzzBudget(200, 12.0, 5),
}
"""Per-backend exceptions to `CI_FUZZ_BUDGET` (slow backends bounded by time)."""


def ci_fuzz_budget(backend: str) -> FuzzBudget:
    return CI_FUZZ_BUDGETS.get(backend, CI_FUZZ_BUDGET)


SUPPRESSED_HEALTH_CHECKS = [
    HealthCheck.too_slow,
    HealthCheck.data_too_large,
    HealthCheck.filter_too_much,
    HealthCheck.large_base_example,
]


def register_profiles() -> None:
    """Register the Hypothesis profiles ``ci``, ``dev`` and ``campaign`` (idempotent).

    ``ci``: 60 examples, derandomized, no deadline, no example database: the same run every time.
    ``campaign``: as many examples as a time budget allows (the driver stops it), no database.
    """
    common = {
        "deadline": None,
        "database": None,
        "print_blob": False,
        "suppress_health_check": SUPPRESSED_HEALTH_CHECKS,
    }
    settings.register_profile("ci", max_examples=60, derandomize=True, **common)
    settings.register_profile("dev", max_examples=20, **common)
    settings.register_profile("campaign", max_examples=10**9, **common)
