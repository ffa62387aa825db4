"""The ``jagbench`` command line: one parser, one function per command, heavy imports inside.

Each capability registers its own commands (``harness/<capability>/cli.py``, argument parsing
only); what they share is `harness.command_line`. Exit codes (DESIGN.md): 0 success / all agree,
1 a disagreement or regression was found, 2 a usage or setup error.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from harness.bench.cli import add_commands as add_bench_commands
from harness.command_line import (
    EXIT_FOUND,
    EXIT_OK,
    EXIT_USAGE,
    UsageError,
    add_backend_option,
    load_backends,
    progress_line,
)
from harness.fuzz.cli import add_commands as add_fuzz_commands
from harness.report.cli import add_commands as add_report_commands
from harness.robustness.cli import add_commands as add_robustness_commands

__all__ = ["EXIT_FOUND", "EXIT_OK", "EXIT_USAGE", "UsageError", "build_parser", "main"]


def cmd_backends(args: argparse.Namespace) -> int:
    from harness.backend import backend_statuses
    from harness.markdown import markdown_table

    rows = [
        [s.name, "yes" if s.available else "no", s.summary if s.available else s.reason]
        for s in backend_statuses()
    ]
    print(markdown_table(["backend", "available", "what it is / why not"], rows))
    return EXIT_OK


def cmd_check(args: argparse.Namespace) -> int:
    from harness.smoke import format_smoke, smoke_check

    backends = load_backends(args.backend)
    summary = smoke_check(backends, range(args.seed, args.seed + args.problems), progress=progress_line)
    print(file=sys.stderr)
    print(format_smoke(summary))
    return EXIT_FOUND if summary.failed else EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jagbench",
        description="Verify and benchmark pooled jagged embedding lookup backends.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("backends", help="list every backend, available or not, with the reason")
    p.set_defaults(func=cmd_backends)

    p = sub.add_parser("check", help="agreement check of backends on a few seeded problems")
    add_backend_option(p, "all available")
    p.add_argument("--problems", type=int, default=20, help="how many problems (default 20)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first problem (default 0)")
    p.set_defaults(func=cmd_check)

    add_bench_commands(sub)
    add_report_commands(sub)
    add_fuzz_commands(sub)
    add_robustness_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UsageError as e:
        print(f"jagbench {args.command}: {e}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
