"""Replaying saved cases (``jagbench replay``): does each backend behave as the case expects?

A case names its backend and what it expects of it: ``agree`` for a regression (fixed bugs stay
fixed), ``disagree`` or ``raised`` for a third-party library's known discrepancy (still there).
Another backend tried on the case (``--backend``) is held to the contract: it must agree, and a
backend that does not support the case, or whose own known discrepancy explains the difference,
is reported as such without counting against it. A case whose own backend cannot run on this
machine (no GPU, library missing) is listed as skipped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from harness.agreement import Outcome, Verdict, check_problem, mark_known
from harness.backend import Backend, BackendUnavailable, load_backend
from harness.cases import Case, load_cases
from harness.fuzz.format import format_failure
from harness.fuzz.results import Failure
from harness.markdown import markdown_table


@dataclass(frozen=True)
class ReplayResult:
    case: Case
    verdict: Verdict
    expected: str
    skipped: bool = False

    @property
    def as_expected(self) -> bool:
        if self.skipped:
            return True
        if self.verdict.outcome.value == self.expected:
            return True
        if self.expected == "agree" and self.verdict.outcome is Outcome.KNOWN:
            return True
        return (
            self.expected == "agree"
            and self.verdict.outcome is Outcome.UNSUPPORTED
            and (self.verdict.backend != self.case.backend)
        )


def replay_case(case: Case, backends: Sequence[object] | None = None) -> list:
    """Run the case's problem through its backend (or ``backends``); a list of verdicts."""
    chosen = list(backends) if backends is not None else [load_backend(case.backend)]
    return check_problem(chosen, case.problem, id_policy=case.problem.metadata.get("id_policy", "reject"))


def replay(
    cases: Sequence[Case], backends: Sequence[Backend] | None = None, known: Sequence[Case] | None = None
) -> list[ReplayResult]:
    """Each case on its own backend (loaded by name or spec) or on each of ``backends``.

    Another backend's disagreement that one of its own known discrepancies (``known``, default the
    cases under ``cases/``) explains counts as *known*, which is as good as agreeing here.
    """
    out = []
    for case in cases:
        try:
            chosen = list(backends) if backends else [load_backend(case.backend)]
        except BackendUnavailable as e:
            verdict = Verdict(case.backend, Outcome.UNSUPPORTED, f"not run here: {e}")
            out.append(ReplayResult(case, verdict, case.expect, skipped=True))
            continue
        for verdict in replay_case(case, chosen):
            expected = case.expect if verdict.backend == case.backend else "agree"
            if expected == "agree":
                if known is None:
                    known = load_cases()
                verdict = mark_known([verdict], case.problem, known)[0]
            out.append(ReplayResult(case, verdict, expected))
    return out


def format_replay(results: Sequence[ReplayResult]) -> str:
    """A Markdown table (case, backend, expected, got, as expected), then each surprise in full."""
    rows = [
        [
            r.case.name,
            r.verdict.backend,
            r.expected,
            "unavailable" if r.skipped else r.verdict.outcome.value,
            "skipped" if r.skipped else "yes" if r.as_expected else "NO",
        ]
        for r in results
    ]
    text = markdown_table(["case", "backend", "expected", "got", "as expected"], rows)
    for r in results:
        if not r.as_expected:
            failure = Failure(r.verdict.backend, r.case.problem, r.verdict, f"replaying {r.case.path}", 0.0)
            text += "\n\n" + format_failure(failure)
    return text
