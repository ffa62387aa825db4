"""The ``bench`` and ``compare`` commands; `harness.cli` registers them with `add_commands`.

Each command turns its options into typed values here and calls one function of ``harness``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from harness.command_line import (
    EXIT_FOUND,
    EXIT_OK,
    EXIT_USAGE,
    UsageError,
    add_backend_option,
    load_backends,
    progress_line,
)


def _percent(text: str) -> float:
    """``"10%"`` or ``"10"`` -> 0.10."""
    try:
        value = float(text.strip().removesuffix("%")) / 100
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected a percentage like 10%, got {text!r}") from e
    if value < 0:
        raise argparse.ArgumentTypeError("the threshold must be >= 0%")
    return value


def cmd_bench(args: argparse.Namespace) -> int:
    from harness.bench.runner import BenchConfig, run_bench
    from harness.bench.workloads import WorkloadError, check_fits, get_workloads, load_workloads

    if args.list_workloads:
        from harness.markdown import markdown_table

        rows = [
            [w.name, ", ".join(w.tags), w.weights_bytes // 2**20, w.description[:90]]
            for w in load_workloads().values()
        ]
        print(markdown_table(["workload", "tags", "weights MiB", "description"], rows))
        return EXIT_OK
    try:
        workloads = get_workloads(args.workload or ["tiny"])
        for w in workloads:
            check_fits(w, copies=args.copies)
    except WorkloadError as e:
        raise UsageError(str(e)) from e
    backends = load_backends(args.backend)
    if not backends:
        raise UsageError("no backend to run")
    config = BenchConfig(
        backends=backends,
        workloads=workloads,
        json_path=Path(args.json),
        baseline=args.baseline,
        max_time=args.max_time,
        min_rounds=args.min_rounds,
        max_rounds=args.max_rounds,
        max_call_s=args.max_call_s,
        check_samples=args.check_samples,
        bandwidth_bytes=args.bandwidth_mib << 20,
        progress=lambda m: print(m, file=sys.stderr, flush=True),
    )
    progress_line(f"bench: {len(backends)} backend(s) x {len(workloads)} workload(s) -> {args.json}")
    code, plugin = run_bench(config, args.pytest_args or [])
    if plugin.failed:
        print(f"\n{len(plugin.failed)} case(s) failed the reference check (not timed):", file=sys.stderr)
        for f in plugin.failed:
            print(f"- {f['backend']} x {f['workload']}: {f['outcome']}: {f['detail']}", file=sys.stderr)
        return EXIT_FOUND
    if code not in (0, 5):
        return EXIT_USAGE
    print(f"wrote {args.json}", file=sys.stderr)
    return EXIT_OK


def cmd_compare(args: argparse.Namespace) -> int:
    from harness.bench.compare import CompareError, compare_runs, format_comparison
    from harness.bench.runs import RunError, load_run

    try:
        result = compare_runs(load_run(args.base), load_run(args.new), threshold=args.threshold)
    except (RunError, CompareError) as e:
        raise UsageError(str(e)) from e
    print(format_comparison(result))
    return EXIT_FOUND if result.regressions else EXIT_OK


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register ``bench`` and ``compare`` on the ``jagbench`` parser."""
    p = sub.add_parser("bench", help="the pytest-benchmark suite over backends and workloads")
    add_backend_option(p, "all available")
    p.add_argument(
        "--workload",
        action="append",
        metavar="NAME",
        help="a workload, family (sweep-B) or tag (standard, sweep, model) (repeatable; default tiny)",
    )
    p.add_argument(
        "--json",
        default="reports/runs/bench.json",
        metavar="PATH",
        help="pytest-benchmark JSON to write (default reports/runs/bench.json)",
    )
    p.add_argument("--baseline", default="torch", metavar="NAME", help="backend speedups are against (torch)")
    p.add_argument(
        "--max-time",
        type=float,
        default=1.0,
        metavar="S",
        help="timing budget per case in seconds (default 1.0)",
    )
    p.add_argument("--min-rounds", type=int, default=5, help="at least this many timed rounds (5)")
    p.add_argument("--max-rounds", type=int, default=500, help="at most this many timed rounds (500)")
    p.add_argument(
        "--max-call-s",
        type=float,
        default=10.0,
        metavar="S",
        help="skip (as too slow, recorded) a backend whose one call takes longer (10 s)",
    )
    p.add_argument(
        "--check-samples",
        type=int,
        default=256,
        metavar="N",
        help="samples of each batch checked against the reference before timing (256)",
    )
    p.add_argument(
        "--bandwidth-mib",
        type=int,
        default=1024,
        metavar="MIB",
        help="buffer size of the copy-bandwidth measurement (1024 MiB)",
    )
    p.add_argument(
        "--copies",
        type=int,
        default=3,
        help="copies of the weights assumed when refusing workloads too large for memory (3)",
    )
    p.add_argument("--list-workloads", action="store_true", help="list the workloads and exit")
    p.add_argument("pytest_args", nargs="*", help="extra pytest arguments after --, e.g. -- -x")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("compare", help="compare two runs case by case; exit 1 on a regression")
    p.add_argument("base", metavar="BASE.json")
    p.add_argument("new", metavar="NEW.json")
    p.add_argument(
        "--threshold",
        type=_percent,
        default=0.10,
        metavar="PCT",
        help="a slowdown beyond this (and significant) is a regression (default 10%%)",
    )
    p.set_defaults(func=cmd_compare)
