"""The ``report`` command; `harness.cli` registers it with `add_commands`."""

from __future__ import annotations

import argparse
from pathlib import Path

from harness.command_line import EXIT_OK, UsageError, add_output_options, set_result


def cmd_report(args: argparse.Namespace) -> int:
    from harness.bench.runs import RunError, load_run
    from harness.report.document import write_report

    try:
        runs = [load_run(p) for p in args.runs]
        extra = []
        for path in args.robustness or []:
            try:
                if path.endswith(".json"):  # a `jagbench robustness --json` document
                    from harness.robustness.render import robustness_section

                    extra.append(robustness_section(path))
                else:
                    extra.append(Path(path).read_text())
            except (OSError, ValueError, KeyError) as e:
                raise UsageError(f"cannot read robustness section {path}: {e}") from e
    except RunError as e:
        raise UsageError(str(e)) from e
    written = write_report(runs, Path(args.out), extra_sections=extra, baseline=args.baseline)
    for p in written:
        print(p)
    set_result(args, {"runs": list(args.runs), "written": [str(p) for p in written]})
    return EXIT_OK


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register ``report`` on the ``jagbench`` parser."""
    p = sub.add_parser("report", help="Markdown + HTML report (with plots) of one or more runs")
    p.add_argument("runs", nargs="+", metavar="RUN.json", help="bench JSON files (or .partial.jsonl)")
    p.add_argument("--out", default="reports/latest", metavar="DIR", help="output folder (reports/latest)")
    p.add_argument("--baseline", default=None, metavar="NAME", help="speedup baseline (default: the run's)")
    p.add_argument(
        "--robustness",
        action="append",
        metavar="FILE",
        help="a section to include: Markdown, or the JSON of `jagbench robustness --json`; repeatable",
    )
    add_output_options(p)
    p.set_defaults(func=cmd_report)
