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
    add_output_options,
    load_backends,
    progress_of,
    set_result,
    write_summary,
)
from harness.expected_warnings import capture_expected_warnings
from harness.fuzz.cli import add_commands as add_fuzz_commands
from harness.report.cli import add_commands as add_report_commands
from harness.robustness.cli import add_commands as add_robustness_commands

__all__ = ["EXIT_FOUND", "EXIT_OK", "EXIT_USAGE", "UsageError", "build_parser", "main"]


def cmd_backends(args: argparse.Namespace) -> int:
    from harness.backend import backend_statuses
    from harness.markdown import markdown_table

    statuses = backend_statuses()
    rows = [
        [s.name, "yes" if s.available else "no", s.summary if s.available else s.reason] for s in statuses
    ]
    print(markdown_table(["backend", "available", "what it is / why not"], rows))
    set_result(
        args,
        {"backends": [{"name": s.name, "available": s.available, "reason": s.reason} for s in statuses]},
    )
    return EXIT_OK


def cmd_check(args: argparse.Namespace) -> int:
    from harness.smoke import format_smoke, smoke_check

    backends = load_backends(args.backend)
    summary = smoke_check(backends, range(args.seed, args.seed + args.problems), progress=progress_of(args))
    print(format_smoke(summary))
    set_result(args, summary.to_json())
    return EXIT_FOUND if summary.failed else EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jagbench",
        description="Verify and benchmark pooled jagged embedding lookup backends.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("backends", help="list every backend, available or not, with the reason")
    add_output_options(p)
    p.set_defaults(func=cmd_backends)

    p = sub.add_parser("check", help="agreement check of backends on a few seeded problems")
    add_backend_option(p, "all available")
    p.add_argument("--problems", type=int, default=20, help="how many problems (default 20)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first problem (default 0)")
    add_output_options(p)
    p.set_defaults(func=cmd_check)

    add_bench_commands(sub)
    add_report_commands(sub)
    add_fuzz_commands(sub)
    add_robustness_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command. Expected third-party warnings (`harness.expected_warnings`) are counted,
    not printed, and summarised at the end (unless ``--quiet``); ``--json PATH`` gets the summary."""
    parser = build_parser()
    args = parser.parse_args(argv)
    error = None
    with capture_expected_warnings() as tally:
        try:
            code = args.func(args)
        except UsageError as e:
            error = str(e)
            print(f"jagbench {args.command}: {e}", file=sys.stderr)
            code = EXIT_USAGE
    if not getattr(args, "quiet", False):
        for line in tally.summary_lines():
            print(f"not shown: {line}", file=sys.stderr)
    if getattr(args, "summary_json", None):
        write_summary(
            args.summary_json,
            command=args.command,
            exit_code=code,
            result=getattr(args, "result", None),
            expected_warnings=tally.to_json(),
            error=error,
        )
    return code


if __name__ == "__main__":
    sys.exit(main())
