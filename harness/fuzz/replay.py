"""Replaying saved cases (``jagbench replay``): does each backend behave as the case expects?

A case names its backend and what it expects of it: ``agree`` for a regression (fixed bugs stay
fixed), ``disagree`` or ``raised`` for a third-party library's known discrepancy (still there).
A known discrepancy is as expected only when its backend still fails that way *and* the case's
own model explains the failure (`harness.known`): a library upgrade that changes the behaviour
shows up here. A case never reproduced (``reproduced: false``, written by analogy) is replayed
the same way; when its model explains what its backend did, the table says so, and the case may
then be marked reproduced. Another backend tried on the case (``--backend``) is held to the
contract: it must agree, and a backend that does not support the case, or whose own known
discrepancy explains the difference, is reported as such without counting against it. A case
whose own backend cannot run on this machine (no GPU, library missing) is listed as skipped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from harness.agreement import Oracle, Outcome, Verdict, check_problem, mark_known
from harness.backend import Backend, BackendUnavailable, load_backend
from harness.cases import Case, load_cases
from harness.fuzz.format import format_failure
from harness.fuzz.results import Failure
from harness.known import Explanation, Observation, explain
from harness.markdown import markdown_table


@dataclass(frozen=True)
class ReplayResult:
    """One backend on one case. ``explanation`` is the case's own model tried on its own backend's
    failure (``None`` for regressions and for other backends)."""

    case: Case
    verdict: Verdict
    expected: str
    skipped: bool = False
    explanation: Explanation | None = None

    @property
    def as_expected(self) -> bool:
        if self.skipped:
            return True
        if self.explanation is not None:
            return self.verdict.outcome.value == self.expected and self.explanation.explained
        if self.verdict.outcome.value == self.expected:
            return True
        if self.expected == "agree" and self.verdict.outcome is Outcome.KNOWN:
            return True
        return (
            self.expected == "agree"
            and self.verdict.outcome is Outcome.UNSUPPORTED
            and (self.verdict.backend != self.case.backend)
        )

    @property
    def newly_reproduced(self) -> bool:
        """A case written by analogy that its backend, here, did reproduce as its model says."""
        return (
            self.as_expected
            and not self.skipped
            and self.explanation is not None
            and not self.case.reproduced
        )


def replay_case(case: Case, backends: Sequence[object] | None = None) -> list:
    """Run the case's problem through its backend (or ``backends``); a list of verdicts."""
    chosen = list(backends) if backends is not None else [load_backend(case.backend)]
    return check_problem(chosen, case.problem, id_policy=case.problem.metadata.get("id_policy", "reject"))


def explain_own(case: Case, verdict: Verdict) -> Explanation:
    """Whether the case's model explains what its own backend did on the case's problem."""
    if case.model is None:
        return Explanation(
            False, f"case {case.name!r} has no model (format 1): nothing says what the library computes"
        )
    if verdict.outcome not in (Outcome.DISAGREE, Outcome.RAISED):
        return Explanation(False, f"the backend's outcome is {verdict.outcome.value}: {verdict.detail}")
    observed = verdict.observed or Observation()
    if not case.in_scope(case.backend, case.problem, observed.backend):
        return Explanation(False, f"the case's own problem is outside its scope {case.scope}")
    return explain([(case.name, case.model)], observed.problem or case.problem, observed, Oracle.of)


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
            own = verdict.backend == case.backend
            expected = case.expect if own else "agree"
            explanation = None
            if own and case.kind == "known-discrepancy":
                explanation = explain_own(case, verdict)
            elif expected == "agree":
                if known is None:
                    known = load_cases()
                verdict = mark_known([verdict], case.problem, known)[0]
            out.append(ReplayResult(case, verdict, expected, explanation=explanation))
    return out


def _model_cell(r: ReplayResult) -> str:
    if r.skipped:
        return "not run"
    if r.explanation is None:
        return "-"
    return "explains it" if r.explanation.explained else "does NOT explain it"


def format_replay(results: Sequence[ReplayResult]) -> str:
    """A Markdown table (case, backend, expected, got, model, as expected), then each surprise in full."""
    rows = [
        [
            r.case.name,
            r.verdict.backend,
            r.expected,
            "unavailable" if r.skipped else r.verdict.outcome.value,
            _model_cell(r) if r.case.kind == "known-discrepancy" else "-",
            "skipped" if r.skipped else "yes" if r.as_expected else "NO",
        ]
        for r in results
    ]
    text = markdown_table(["case", "backend", "expected", "got", "model", "as expected"], rows)
    for r in results:
        if r.newly_reproduced:
            text += (
                f"\n\n{r.case.name}: reproduced on {r.verdict.backend} as its model says; it was written "
                f'by analogy ("reproduced": false). Set "reproduced": true in {r.case.path} so that it '
                "explains disagreements."
            )
        if not r.as_expected:
            if (
                r.explanation is not None
                and not r.explanation.explained
                and r.verdict.outcome.value == r.expected
            ):
                model = r.case.model.describe() if r.case.model else "no model"
                text += (
                    f"\n\n{r.case.name}: {r.verdict.backend} still {r.expected}s, but not as the case's "
                    f"model says ({model}): {r.explanation.detail}"
                )
                continue
            failure = Failure(r.verdict.backend, r.case.problem, r.verdict, f"replaying {r.case.path}", 0.0)
            text += "\n\n" + format_failure(failure)
    return text
