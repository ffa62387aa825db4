"""What a fuzz run produces: per-backend statistics and coverage, minimised failures, the report
of a whole run, and its JSON form (``jagbench fuzz --json``, the report's fuzz section)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.agreement import Outcome, Verdict
from harness.fuzz.coverage import DIMENSIONS
from harness.model import Problem

if TYPE_CHECKING:
    from harness.fuzz.minimise import Minimised


def _empty_coverage() -> dict[str, dict[str, int]]:
    return {name: dict.fromkeys(labels, 0) for name, labels in DIMENSIONS}


@dataclass
class BackendStats:
    """What one backend's fuzz run saw: examples up to the first failure (minimisation not
    counted), their outcomes, the coverage buckets of the examples it ran, and where the time went."""

    backend: str
    examples: int = 0
    agreed: int = 0
    known: int = 0
    unsupported: int = 0
    failed: int = 0
    metamorphic: int = 0
    worst_ratio: float = 0.0
    seconds: float = 0.0
    backend_seconds: float = 0.0
    """Time inside the backend: its ``supports``, ``prepare`` and lookup calls."""
    known_cases: Counter = field(default_factory=Counter)
    coverage: dict[str, dict[str, int]] = field(default_factory=_empty_coverage)
    """``{dimension: {bucket: examples}}`` over the examples the backend ran (not unsupported)."""

    @property
    def examples_per_second(self) -> float:
        return self.examples / self.seconds if self.seconds > 0 else 0.0

    @property
    def harness_share(self) -> float:
        """The share of the run's time spent outside the backend: generating problems, validating
        them, the reference and bound, the checks (0 when nothing ran)."""
        return max(0.0, 1.0 - self.backend_seconds / self.seconds) if self.seconds > 0 else 0.0

    @property
    def checked(self) -> int:
        """Examples the backend ran (every example but the unsupported ones)."""
        return self.examples - self.unsupported

    def count(self, verdict: Verdict, metamorphic: bool, buckets: Mapping[str, str]) -> None:
        """Count one example: its outcome and, when the backend ran it, its coverage buckets."""
        self.examples += 1
        if verdict.outcome is Outcome.UNSUPPORTED:
            self.unsupported += 1
            return
        for name, label in buckets.items():
            self.coverage[name][label] = self.coverage[name].get(label, 0) + 1
        if verdict.outcome is Outcome.AGREE:
            self.agreed += 1
            self.metamorphic += metamorphic
            if verdict.comparison is not None:
                self.worst_ratio = max(self.worst_ratio, verdict.comparison.worst_ratio)
        elif verdict.outcome is Outcome.KNOWN:
            self.known += 1
            for name in verdict.known_cases or ("(unnamed)",):
                self.known_cases[name] += 1
        else:
            self.failed += 1

    def to_json(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "examples": self.examples,
            "agreed": self.agreed,
            "known": self.known,
            "unsupported": self.unsupported,
            "failed": self.failed,
            "metamorphic": self.metamorphic,
            "worst_error_over_bound": self.worst_ratio,
            "seconds": round(self.seconds, 3),
            "backend_seconds": round(self.backend_seconds, 3),
            "examples_per_second": round(self.examples_per_second, 2),
            "harness_share": round(self.harness_share, 4),
            "known_cases": dict(sorted(self.known_cases.items())),
            "coverage": {name: dict(counts) for name, counts in self.coverage.items()},
        }


@dataclass
class Failure:
    """A failure: the (minimised) problem, the verdict on it, how it was found, where it was saved."""

    backend: str
    problem: Problem
    verdict: Verdict
    found_by: str
    seconds_to_find: float
    case_path: Path | None = None
    examples_to_find: int = 0
    original_size: dict[str, int] | None = None
    """The sizes of the problem as generated, before minimisation."""
    minimised: Minimised | None = None
    spec: dict[str, Any] | None = None
    """The generating spec of the original problem, when the strategy recorded one."""

    def to_json(self) -> dict[str, Any]:
        from harness.fuzz.minimise import describe_size

        m = self.minimised
        return {
            "backend": self.backend,
            "outcome": self.verdict.outcome.value,
            "detail": self.verdict.detail,
            "found_by": self.found_by,
            "seconds_to_find": round(self.seconds_to_find, 3),
            "examples_to_find": self.examples_to_find,
            "case_path": None if self.case_path is None else str(self.case_path),
            "original_size": self.original_size,
            "size": describe_size(self.problem),
            "minimised": None
            if m is None
            else {
                "steps": m.steps,
                "attempts": m.attempts,
                "seconds": round(m.seconds, 3),
                "fixed_point": m.complete,
                "steps_by_pass": dict(m.steps_by_pass),
            },
        }


@dataclass
class FuzzReport:
    stats: list[BackendStats]
    failures: list[Failure]
    settings: Mapping[str, object] = field(default_factory=dict)
    """How the run was made: seed, example or time budget, shrink budget."""

    @property
    def failed(self) -> bool:
        return bool(self.failures)

    def to_json(self) -> dict[str, Any]:
        """Statistics, coverage, failures with their case paths, and timing, as JSON-able data."""
        seconds = sum(s.seconds for s in self.stats)
        backend = sum(s.backend_seconds for s in self.stats)
        examples = sum(s.examples for s in self.stats)
        return {
            "format": "jagbench-fuzz/1",
            "settings": dict(self.settings),
            "failed": self.failed,
            "backends": [s.to_json() for s in self.stats],
            "failures": [f.to_json() for f in self.failures],
            "timing": {
                "seconds": round(seconds, 3),
                "backend_seconds": round(backend, 3),
                "harness_share": round(max(0.0, 1 - backend / seconds), 4) if seconds > 0 else 0.0,
                "examples": examples,
                "examples_per_second": round(examples / seconds, 2) if seconds > 0 else 0.0,
                "minimise_seconds": round(
                    sum(f.minimised.seconds for f in self.failures if f.minimised is not None), 3
                ),
            },
        }
