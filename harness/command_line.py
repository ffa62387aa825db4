"""What every ``jagbench`` command shares: exit codes, `UsageError`, argument helpers (positive
numbers, ``--backend``, ``--quiet`` and ``--json``), turning backend specs into backends, the
progress of a command and its machine-readable summary.

Every command module (``harness/*/cli.py``) imports this one; it imports none of them, nor the
top-level parser (`harness.cli`), so there is no circle through the command line.

Exit codes (DESIGN.md): 0 success / all agree, 1 a disagreement or regression was found,
2 a usage or setup error.
"""

from __future__ import annotations

import argparse
import json
import platform
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from harness.progress import Progress, progress_for

if TYPE_CHECKING:  # the parser is built without importing torch
    from harness.backend import Backend

N = TypeVar("N", int, float)

EXIT_OK = 0
EXIT_FOUND = 1
EXIT_USAGE = 2


class UsageError(Exception):
    """A command-line or setup problem: printed without a traceback, exit code 2."""


SUMMARY_FORMAT = "jagbench-summary/1"


def add_output_options(
    parser: argparse.ArgumentParser, *, summary_json: bool = True, quiet: bool = True
) -> None:
    """``--quiet`` and, unless the command's ``--json`` means its own document, ``--json PATH``
    (``quiet=False`` for a command that defines its own ``--quiet``).

    The summary's path lands in ``args.summary_json``; a command puts what it found in
    ``args.result`` (`set_result`) and `harness.cli.main` writes the summary (`write_summary`).
    """
    if quiet:
        parser.add_argument(
            "--quiet",
            action="store_true",
            help="no progress and no notes on stderr; results, errors and unexpected warnings still print",
        )
    if summary_json:
        parser.add_argument(
            "--json",
            dest="summary_json",
            metavar="PATH",
            help=f"also write a machine-readable summary of the outcome (JSON, {SUMMARY_FORMAT}) to PATH",
        )


def progress_of(args: argparse.Namespace) -> Progress:
    """The command's progress display: a bar, plain lines, or nothing with ``--quiet``."""
    return progress_for(quiet=bool(getattr(args, "quiet", False)))


def set_result(args: argparse.Namespace, result: Mapping[str, Any]) -> None:
    """What the command found, for its ``--json`` summary (plain JSON values)."""
    args.result = dict(result)


def write_summary(
    path: str | Path,
    *,
    command: str,
    exit_code: int,
    result: Mapping[str, Any] | None,
    expected_warnings: Mapping[str, int],
    error: str | None = None,
) -> None:
    """The ``--json`` summary: command, exit code, error, expected warnings counted, the result."""
    doc = {
        "format": SUMMARY_FORMAT,
        "command": command,
        "exit_code": exit_code,
        "error": error,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"node": platform.node(), "platform": platform.platform()},
        "expected_warnings": dict(expected_warnings),
        "result": dict(result) if result is not None else None,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1, default=str) + "\n")


BACKEND_HELP = "a built-in name, module:ATTR or file.py:ATTR (repeatable; default: {default})"


def positive(kind: Callable[[str], N]) -> Callable[[str], N]:
    """An argparse ``type``: ``kind(text)`` (``int`` or ``float``), which must be > 0."""
    what = "a positive integer" if kind is int else "a positive number"

    def parse(text: str) -> N:
        try:
            value = kind(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from e
        if not value > 0:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    parse.__name__ = f"positive_{getattr(kind, '__name__', 'number')}"
    return parse


def add_backend_option(parser: argparse.ArgumentParser, default: str, help: str | None = None) -> None:
    """The repeatable ``--backend NAME_OR_SPEC`` option; ``default`` says what none means."""
    parser.add_argument(
        "--backend",
        action="append",
        metavar="NAME_OR_SPEC",
        help=help or BACKEND_HELP.format(default=default),
    )


def load_backends(specs: Sequence[str] | None, *, with_reference: bool = False) -> list[Backend]:
    """The backends named by ``specs``, or every available one (the reference only when asked).

    Raises `UsageError` naming the spec that is unknown or unavailable.
    """
    from harness.backend import BackendSpecError, BackendUnavailable, available_backends, load_backend

    if not specs:
        return [b for b in available_backends() if with_reference or b.name != "reference"]
    out = []
    for spec in specs:
        try:
            out.append(load_backend(spec))
        except (BackendUnavailable, BackendSpecError) as e:
            raise UsageError(str(e)) from e
    return out
