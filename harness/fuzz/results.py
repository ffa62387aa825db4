"""What a fuzz run produces: per-backend statistics, failures, the report of a whole run."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from harness.agreement import Verdict
from harness.model import Problem


@dataclass
class BackendStats:
    """What one backend's fuzz run saw (examples up to the first failure; shrinking not counted)."""

    backend: str
    examples: int = 0
    agreed: int = 0
    known: int = 0
    unsupported: int = 0
    failed: int = 0
    metamorphic: int = 0
    worst_ratio: float = 0.0
    seconds: float = 0.0
    known_cases: Counter = field(default_factory=Counter)

    @property
    def examples_per_second(self) -> float:
        return self.examples / self.seconds if self.seconds > 0 else 0.0


@dataclass
class Failure:
    """A shrunk failure: the problem, the verdict on it, how it was found, where it was saved."""

    backend: str
    problem: Problem
    verdict: Verdict
    found_by: str
    seconds_to_find: float
    case_path: Path | None = None


@dataclass
class FuzzReport:
    stats: list[BackendStats]
    failures: list[Failure]

    @property
    def failed(self) -> bool:
        return bool(self.failures)
