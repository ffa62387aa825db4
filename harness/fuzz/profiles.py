"""Hypothesis settings profiles shared by ``jagbench fuzz`` and the test suite.

``ci``: 60 examples, derandomized, no deadline, no example database: the same run every time.
``dev``: quick. ``campaign``: as many examples as a time budget allows (the driver stops it).
Shrunk cases are stored as data (`harness.cases`), never in ``.hypothesis/``: no profile has a
database.
"""

from __future__ import annotations

from hypothesis import HealthCheck, settings

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
