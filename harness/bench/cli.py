"""The ``bench`` and ``compare`` commands; `harness.cli` registers them with `add_commands`.

Each command turns its options into typed values here and calls one function of ``harness``.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from pathlib import Path

from harness.command_line import (
    EXIT_FOUND,
    EXIT_OK,
    UsageError,
    add_backend_option,
    add_output_options,
    load_backends,
    positive,
    set_result,
)

EXIT_INTERRUPTED = 130
"""Ctrl-C during `jagbench bench` (the shell's code for SIGINT); the sidecar keeps what finished."""


def _default_baseline(mode: str, names: list[str]) -> str:
    """What speedups are against unless ``--baseline`` says: torch for the lookup, FBGEMM's TBE
    for a training step (torch.optim has no rowwise_adagrad, the default optimizer); the first
    backend run when the preferred one is not among them."""
    preferred = "fbgemm-tbe" if mode == "train" else "torch"
    return preferred if preferred in names or not names else names[0]


def _percent(text: str) -> float:
    """``"10%"`` or ``"10"`` -> 0.10."""
    try:
        value = float(text.strip().removesuffix("%")) / 100
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected a percentage like 10%, got {text!r}") from e
    if value < 0:
        raise argparse.ArgumentTypeError("the threshold must be >= 0%")
    return value


def _optimizer(args: argparse.Namespace):
    """The ``--mode train`` optimizer from the options (rowwise_adagrad, lr 0.01 by default)."""
    from harness.bench.training import DEFAULT_OPTIMIZER
    from harness.training.contract import OptimizerConfig
    from harness.training.validate import validate_optimizer
    from harness.validate import ProblemError

    d = DEFAULT_OPTIMIZER
    optimizer = OptimizerConfig(
        kind=args.optimizer or d.kind,
        learning_rate=d.learning_rate if args.learning_rate is None else args.learning_rate,
        eps=args.eps,
        weight_decay=args.weight_decay,
        weight_decay_mode=args.weight_decay_mode or ("l2" if args.weight_decay else "none"),
    )
    try:
        validate_optimizer(optimizer)
    except ProblemError as e:
        raise UsageError(f"bad optimizer: {e}") from e
    return optimizer


def cmd_bench(args: argparse.Namespace) -> int:
    from harness.bench.runner import CASE_KINDS, BenchConfig, run_bench
    from harness.bench.summary import format_summary
    from harness.bench.workloads import WorkloadError, check_fits, get_workloads, load_workloads
    from harness.progress import progress_for

    if args.list_workloads:
        from harness.markdown import markdown_table

        rows = [
            [w.name, ", ".join(w.tags), w.weights_bytes // 2**20, w.description[:90]]
            for w in load_workloads().values()
        ]
        print(markdown_table(["workload", "tags", "weights MiB", "description"], rows))
        return EXIT_OK
    if args.mode not in CASE_KINDS:
        raise UsageError(f"unknown --mode {args.mode!r}; known: {', '.join(CASE_KINDS)}")
    for flag, value in (("--load", args.load), ("--warmup-rounds", args.warmup_rounds)):
        if value < 0:
            raise UsageError(f"{flag} must be >= 0, got {value}")
    if args.min_rounds > args.max_rounds:
        raise UsageError(f"--min-rounds {args.min_rounds} is more than --max-rounds {args.max_rounds}")
    try:
        workloads = get_workloads(args.workload or ["tiny"])
        for w in workloads:
            check_fits(w, copies=args.copies)
    except WorkloadError as e:
        raise UsageError(str(e)) from e
    backends = load_backends(args.backend)
    case_options = {}
    if args.mode == "train":
        case_options["optimizer"] = _optimizer(args)
        if not args.backend:
            from harness.backend import can_train

            backends = [b for b in backends if can_train(b)]
    elif any(v is not None for v in (args.optimizer, args.learning_rate, args.weight_decay_mode)):
        raise UsageError("--optimizer, --learning-rate and --weight-decay-mode are for --mode train")
    if not backends:
        raise UsageError("no backend to run")
    config = BenchConfig(
        backends=backends,
        workloads=workloads,
        json_path=Path(args.json),
        baseline=args.baseline or _default_baseline(args.mode, [getattr(b, "name", "") for b in backends]),
        mode=args.mode,
        max_time=args.max_time,
        min_rounds=args.min_rounds,
        max_rounds=args.max_rounds,
        warmup_rounds=args.warmup_rounds,
        min_round_s=args.min_round_s,
        max_call_s=args.max_call_s,
        check_samples=args.check_samples,
        bandwidth_bytes=args.bandwidth_mib << 20,
        repeat=args.repeat,
        seed=args.seed,
        flush_mib=args.flush_cache,
        load=args.load,
        noise_threshold=args.noise_threshold,
        case_options=case_options,
    )
    progress = progress_for(quiet=args.quiet)
    progress.note(
        f"bench: {len(backends)} backend(s) x {len(workloads)} workload(s) x {args.repeat} -> {args.json}"
    )
    try:
        result = run_bench(config, progress)
    except KeyboardInterrupt:
        print(
            f"\ninterrupted; the finished workloads are in {args.json}.partial.jsonl "
            "(`jagbench report` and `compare` read it)",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    if not args.quiet:
        print(format_summary(result.output))
    for k in result.known:
        print(
            f"known discrepancy, not timed: {k['backend']} x {k['workload']}: case {k['case']}",
            file=sys.stderr,
        )
    if result.failed:
        print(f"\n{len(result.failed)} case(s) failed the reference check (not timed):", file=sys.stderr)
        for f in result.failed:
            print(f"- {f['backend']} x {f['workload']}: {f['outcome']}: {f['detail']}", file=sys.stderr)
        return EXIT_FOUND
    if not args.quiet:
        print(f"wrote {args.json}", file=sys.stderr)
    return EXIT_OK


def cmd_compare(args: argparse.Namespace) -> int:
    from harness.bench.compare import CompareError, compare_runs, format_comparison
    from harness.bench.runs import RunError, load_run

    try:
        result = compare_runs(
            load_run(args.base),
            load_run(args.new),
            threshold=args.threshold,
            relative=args.relative,
            baseline=args.baseline,
        )
    except (RunError, CompareError) as e:
        raise UsageError(str(e)) from e
    set_result(args, {"threshold": result.threshold, "changes": [asdict(c) for c in result.changes]})
    if not args.quiet:
        print(format_comparison(result))
    elif result.regressions:
        for c in result.regressions:
            print(f"REGRESSED: {c.backend} x {c.workload}: {c.ratio:.3f}x the base time", file=sys.stderr)
    return EXIT_FOUND if result.regressions else EXIT_OK


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register ``bench`` and ``compare`` on the ``jagbench`` parser."""
    p = sub.add_parser("bench", help="time backends on workloads, interleaved; pytest-benchmark JSON")
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
        help="the run's JSON (default reports/runs/bench.json): pytest-benchmark's own format with "
        "jagbench's records, also this command's machine-readable summary (unlike other commands' --json)",
    )
    p.add_argument(
        "--baseline",
        default=None,
        metavar="NAME",
        help="backend speedups are against (default torch; with --mode train fbgemm-tbe, since "
        "torch.optim has no rowwise_adagrad; either only when it is among the backends run, "
        "else the first of them)",
    )
    p.add_argument(
        "--max-time",
        type=float,
        default=1.0,
        metavar="S",
        help="timing budget per case in seconds (default 1.0)",
    )
    p.add_argument(
        "--min-rounds", type=positive(int), default=20, help="at least this many timed rounds (20)"
    )
    p.add_argument(
        "--max-rounds", type=positive(int), default=1000, help="at most this many timed rounds (1000)"
    )
    p.add_argument(
        "--warmup-rounds",
        type=int,
        default=3,
        metavar="N",
        help="interleaved rounds run first, not recorded (3)",
    )
    p.add_argument(
        "--min-round-s",
        type=positive(float),
        default=0.002,
        metavar="S",
        help="a backend's span in a round lasts at least this long: fast calls repeat (0.002)",
    )
    p.add_argument(
        "--repeat",
        type=positive(int),
        default=1,
        metavar="N",
        help="rerun the whole set N times and report the spread of each speedup (1)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of each round's random order (0)")
    p.add_argument(
        "--flush-cache",
        type=positive(int),
        default=None,
        metavar="MIB",
        help="read and write a MIB buffer before every timed call: cold caches (default: warm)",
    )
    p.add_argument(
        "--load",
        type=int,
        default=0,
        metavar="N",
        help="run N spinning processes while timing, to measure a busy machine (0)",
    )
    p.add_argument(
        "--noise-threshold",
        type=_percent,
        default=0.10,
        metavar="PCT",
        help="warn when the noise probe is off its run median or drifts by more (10%%)",
    )
    p.add_argument(
        "--mode",
        default="forward",
        help="what is timed: forward (the lookup; default) or train (one training step: forward, backward "
        "of a fixed grad_output and the optimizer update, the state continued from round to round; "
        "default backends: every available one that trains)",
    )
    p.add_argument(
        "--optimizer",
        choices=("sgd", "adagrad", "rowwise_adagrad"),
        default=None,
        help="--mode train: the optimizer (default rowwise_adagrad: FBGEMM's EXACT_ROWWISE_ADAGRAD)",
    )
    p.add_argument(
        "--learning-rate", type=float, default=None, metavar="LR", help="--mode train: learning rate (0.01)"
    )
    p.add_argument("--eps", type=float, default=1e-8, help="--mode train: the adagrad kinds' eps (1e-8)")
    p.add_argument(
        "--weight-decay", type=float, default=0.0, metavar="WD", help="--mode train: weight decay (0)"
    )
    p.add_argument(
        "--weight-decay-mode",
        choices=("none", "l2", "decoupled"),
        default=None,
        help="--mode train: how weight decay applies (l2 when --weight-decay is given, else none)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress and no summary; errors still shown")
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
    p.add_argument(
        "--relative",
        action="store_true",
        help="judge each case by its per-round time relative to the baseline's (interleaved runs)",
    )
    p.add_argument(
        "--baseline", default=None, metavar="NAME", help="baseline for --relative (the base run's)"
    )
    p.add_argument("--quiet", action="store_true", help="print only regressions (stderr); the exit code says")
    add_output_options(p, quiet=False)
    p.set_defaults(func=cmd_compare)
