"""What every ``jagbench`` command shares: exit codes, `UsageError`, argument helpers (positive
numbers, ``--backend``), turning backend specs into backends, and the progress line.

Every command module (``harness/*/cli.py``) imports this one; it imports none of them, nor the
top-level parser (`harness.cli`), so there is no circle through the command line.

Exit codes (DESIGN.md): 0 success / all agree, 1 a disagreement or regression was found,
2 a usage or setup error.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:  # the parser is built without importing torch
    from harness.backend import Backend

N = TypeVar("N", int, float)

EXIT_OK = 0
EXIT_FOUND = 1
EXIT_USAGE = 2


class UsageError(Exception):
    """A command-line or setup problem: printed without a traceback, exit code 2."""


def progress_line(message: str) -> None:
    """One updating line on a terminal; plain lines in a log."""
    if sys.stderr.isatty():
        print(f"\r{message}", end="", file=sys.stderr, flush=True)
    else:
        print(message, file=sys.stderr, flush=True)


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
