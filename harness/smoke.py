"""The quick agreement check: every chosen backend on a few seeded problems, as one table."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from harness.agreement import Outcome, Verdict, check_problem, mark_known
from harness.backend import Backend
from harness.cases import load_cases
from harness.generate import random_problem
from harness.markdown import markdown_table
from harness.progress import Progress


@dataclass
class SmokeSummary:
    """Per backend: how many problems ended in each outcome, and the first failures' details."""

    counts: dict[str, Counter] = field(default_factory=dict)
    failures: list[tuple[int, Verdict]] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return bool(self.failures)

    def to_json(self) -> dict[str, Any]:
        """Per backend the count of each outcome; the failures with their problem seeds."""
        return {
            "counts": {name: {o.value: c[o] for o in Outcome} for name, c in self.counts.items()},
            "failures": [
                {"backend": v.backend, "seed": seed, "outcome": v.outcome.value, "detail": v.detail}
                for seed, v in self.failures
            ],
        }


def smoke_check(
    backends: Sequence[Backend],
    seeds: Sequence[int],
    progress: Progress | None = None,
) -> SmokeSummary:
    summary = SmokeSummary({b.name: Counter() for b in backends})
    known = load_cases()
    progress = progress or Progress()
    progress.start("check", total=len(seeds), unit="problems")
    for i, seed in enumerate(seeds):
        problem = random_problem(seed)
        for verdict in mark_known(check_problem(backends, problem), problem, known):
            summary.counts[verdict.backend][verdict.outcome] += 1
            if verdict.failed:
                summary.failures.append((seed, verdict))
        progress.update(i + 1, failed=len(summary.failures))
    progress.finish()
    return summary


def format_smoke(summary: SmokeSummary) -> str:
    headers = ["backend"] + [o.value for o in Outcome]
    rows = [[name] + [c[o] for o in Outcome] for name, c in summary.counts.items()]
    text = markdown_table(headers, rows)
    for seed, v in summary.failures[:10]:
        text += f"\n- {v.backend}, problem seed {seed}: {v.outcome.value}: {v.detail}"
    return text
