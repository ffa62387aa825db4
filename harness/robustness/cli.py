"""The ``robustness`` command; `harness.cli` registers it with `add_commands`.

Exit codes: 0 when the matrix ran (it describes the backends, it is not a verdict), 1 when one of
our own backends (``numba``, ``triton``) was not clean on some input, 2 on a usage or setup error.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from harness.command_line import (
    EXIT_FOUND,
    EXIT_OK,
    UsageError,
    add_backend_option,
    add_output_options,
    positive,
    progress_of,
)

DEFAULT_JSON = Path("reports/runs/robustness.json")


def cmd_robustness(args: argparse.Namespace) -> int:
    from harness.backend import BackendSpecError, builtin_names
    from harness.robustness.inputs import CatalogueError, load_catalogue
    from harness.robustness.matrix import OWN_BACKENDS, run_matrix, unclean_own
    from harness.robustness.render import render_markdown, render_summary

    try:
        catalogue = load_catalogue()
        catalogue.select(args.input)
    except CatalogueError as e:
        raise UsageError(str(e)) from e
    specs = args.backend or builtin_names()
    json_path = Path(args.json)
    # SIGTERM (e.g. from `timeout`) unwinds like Ctrl-C, so the running cases are killed too.
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        doc = run_matrix(
            specs,
            args.input,
            catalogue=catalogue,
            timeout=args.timeout,
            jobs=args.jobs,
            json_path=json_path,
            progress=progress_of(args),
            process_per_case=args.process_per_case,
        )
    except BackendSpecError as e:
        raise UsageError(str(e)) from e
    finally:
        signal.signal(signal.SIGTERM, previous)
    md_path = Path(args.markdown) if args.markdown else json_path.with_suffix(".md")
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text(render_markdown(doc))
    print(render_summary(doc))
    if not args.quiet:
        print(
            f"the whole matrix: {md_path} and {json_path} (jagbench report --robustness {json_path})",
            file=sys.stderr,
        )
    missing = [b for b in doc["backends"] if not b["available"]]
    if args.backend and missing:
        raise UsageError("not available: " + "; ".join(f"{b['spec']}: {b['reason']}" for b in missing))
    unclean = unclean_own(doc)
    if unclean:
        print(
            f"not clean ({', '.join(OWN_BACKENDS)} must raise a clear error on every malformed input): "
            + ", ".join(f"{r.backend} on {r.input} ({r.outcome})" for r in unclean),
            file=sys.stderr,
        )
        return EXIT_FOUND
    return EXIT_OK


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "robustness",
        help="feed every backend malformed input directly (no validation), in isolated processes",
        description=(
            "The robustness matrix: each backend gets each malformed input of "
            "cases/robustness/inputs.json directly (harness.validate bypassed), in a child process "
            "with a time limit per case (one per case; one per backend for a backend that keeps "
            "worker processes, replaced after a crash or hang), and is classified: raised / "
            "returned silently (which reading) / crashed / hung / mutated its inputs. The terminal "
            "gets a summary per backend and the cases that were not clean; the whole matrix goes to "
            "--json and --markdown. Exit 0 when the matrix ran, 1 when numba or triton was not clean, "
            "2 on a usage error."
        ),
    )
    add_backend_option(p, "every built-in, unavailable ones listed with the reason")
    p.add_argument(
        "--input",
        action="append",
        metavar="NAME",
        help="an input of cases/robustness/inputs.json (repeatable; default: all)",
    )
    p.add_argument(
        "--json",
        default=str(DEFAULT_JSON),
        metavar="PATH",
        help=f"where to write the results (JSON, jagbench-robustness/1, with a per-backend summary), "
        f"rewritten after every case (default {DEFAULT_JSON})",
    )
    p.add_argument(
        "--markdown",
        default=None,
        metavar="PATH",
        help="where to write the whole matrix as Markdown, the section for `jagbench report --robustness` "
        "(default: the JSON path with .md)",
    )
    p.add_argument(
        "--timeout",
        type=positive(float),
        default=20.0,
        metavar="S",
        help="time limit of one case in seconds; past it the case is recorded as hung (default 20)",
    )
    p.add_argument("--jobs", type=positive(int), default=2, metavar="N", help="cases run at once (default 2)")
    p.add_argument(
        "--process-per-case",
        action="store_true",
        help="a fresh process for every case, also for a backend that keeps worker processes "
        "(by default such a backend, e.g. torchrec-sharded-*, runs all its inputs in one process "
        "that restarts after a crash or hang)",
    )
    add_output_options(p, summary_json=False)
    p.set_defaults(func=cmd_robustness)
