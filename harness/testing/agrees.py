"""`assert_agrees`: one problem's reference check as an assertion, with ``jagbench fuzz``'s text.

Inside a Hypothesis test the case is saved once, for the minimal failing example (Hypothesis's
final replay), not for every step of its shrinking.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

import torch

from harness.backend import Backend, load_backend
from harness.cases import Case, load_cases, problem_to_json, save_case
from harness.fuzz.driver import judge
from harness.fuzz.format import format_failure
from harness.fuzz.results import Failure
from harness.model import Problem
from harness.testing.plugin import SAVE_DIR_ENV, spec_of

DEFAULT_SAVE_DIR = Path("jagbench-cases")
"""Where failing cases go unless told (``save_dir``, ``--jagbench-save-dir`` or the environment
variable ``JAGBENCH_SAVE_DIR``): relative to the working directory."""


def _final_example() -> bool:
    """Outside Hypothesis, or Hypothesis's final replay of the minimal failing example."""
    from hypothesis.control import current_build_context, currently_in_test_context

    return not currently_in_test_context() or current_build_context().is_final


def default_save_dir() -> Path:
    return Path(os.environ.get(SAVE_DIR_ENV) or DEFAULT_SAVE_DIR)


def failure_case(failure: Failure) -> Case:
    """The failing problem as a regression case (named like ``jagbench fuzz``'s: backend-digest)."""
    problem_json = problem_to_json(failure.problem)
    digest = hashlib.sha1(json.dumps(problem_json, sort_keys=True).encode()).hexdigest()[:10]
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", failure.backend).strip("-") or "backend"
    return Case(
        name=f"{safe}-{digest}",
        kind="regression",
        backend=failure.backend,
        summary=f"{failure.verdict.outcome.value}: {failure.verdict.detail}",
        expect="agree",
        problem=failure.problem,
        problem_json=problem_json,
        found={
            "by": "harness.testing.assert_agrees",
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
            "torch": torch.__version__,
        },
    )


def assert_agrees(
    backend: Backend | str,
    problem: Problem,
    *,
    save_dir: Path | str | None = None,
    known: Sequence[Case] | None = None,
    label: str | None = None,
) -> None:
    """Raise `AssertionError` unless ``backend`` agrees with the float64 reference on ``problem``.

    ``backend`` is a backend object or a spec (``"numba"``, ``"my_kernels.py:Backend"``). The
    problem is validated first (a malformed one raises `harness.ProblemError`). A known
    discrepancy of a third-party library (``cases/known/``, or ``known``) and a problem the backend
    declines (``supports()``) pass. On a failure the message is ``jagbench fuzz``'s failure text
    (problem, worst element, bound) and the problem is saved as a case file under ``save_dir``
    (default `default_save_dir`), replayable with ``jagbench replay``. The case names the backend
    by ``label``: by default the spec it was loaded from (here or by the ``jagbench_backend``
    fixture), else its ``name``.
    """
    __tracebackhide__ = True  # pytest shows the caller's line, then this message
    if isinstance(backend, str):
        label = label or backend
        backend = load_backend(backend)
    label = label or spec_of(backend) or getattr(backend, "name", type(backend).__name__)
    verdict, _ = judge(backend, problem, load_cases() if known is None else known)
    if not verdict.failed:
        return
    failure = Failure(label, problem, verdict, "assert_agrees", 0.0)
    if _final_example():
        where = Path(save_dir) if save_dir is not None else default_save_dir()
        failure.case_path = save_case(failure_case(failure), where)
    raise AssertionError(format_failure(failure))
