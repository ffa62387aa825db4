"""The ``fuzz`` and ``replay`` commands; `harness.cli` registers them with `add_commands`.

``fuzz --mode train`` fuzzes training steps (`harness.fuzz.training`) instead of the lookup, by
default on every available backend that trains; ``replay`` reads forward and training cases
alike (a training case has ``"mode": "train"``).

Exit codes (DESIGN.md): ``fuzz`` 0 when every backend agreed (known discrepancies included),
1 when a failure was found (printed and saved), 2 on a usage or setup error. ``replay`` 0 when
every case behaves as its ``expect`` says, 1 when one does not (a regression that disagrees again,
or a known discrepancy that has gone away: either way the case file needs attention), 2 when a
case cannot be read or its backend cannot be loaded.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from harness.command_line import (
    EXIT_FOUND,
    EXIT_OK,
    UsageError,
    add_backend_option,
    add_output_options,
    load_backends,
    positive,
    progress_of,
    set_result,
)


def _backends_with_labels(specs: list[str] | None) -> tuple[list, list[str]]:
    """Backends and the names saved cases use for them: the spec as given, or the built-in name."""
    backends = load_backends(specs)
    labels = list(specs) if specs else [b.name for b in backends]
    return backends, labels


def _training_backends_with_labels(specs: list[str] | None) -> tuple[list, list[str]]:
    """The training backends named (each must train), or every available one that trains."""
    from harness.backend import can_train

    backends, labels = _backends_with_labels(specs)
    if specs:
        for backend, label in zip(backends, labels, strict=True):
            if not can_train(backend):
                raise UsageError(
                    f"backend {label!r} does not train (no supports_training / prepare_training); "
                    "--mode train needs a training backend"
                )
        return backends, labels
    chosen = [(b, label) for b, label in zip(backends, labels, strict=True) if can_train(b)]
    return [b for b, _ in chosen], [label for _, label in chosen]


def cmd_fuzz_train(args: argparse.Namespace) -> int:
    from harness.cases import CaseError
    from harness.fuzz.training import format_training_report, fuzz_training
    from harness.training.cases import load_training_cases
    from harness.training.strategies import training_problems

    backends, labels = _training_backends_with_labels(args.backend)
    if not backends:
        raise UsageError("no training backend to fuzz (every available backend that trains is the default)")
    try:
        known = load_training_cases()
    except CaseError as e:
        raise UsageError(f"cannot read the known training cases: {e}") from e
    max_examples = args.max_examples
    if max_examples is None and args.time_budget is None:
        max_examples = 200
    strategy = training_problems(kinds=args.optimizer) if args.optimizer else None
    report = fuzz_training(
        backends,
        labels=labels,
        max_examples=max_examples,
        time_budget=args.time_budget,
        seed=args.seed,
        save_dir=Path(args.save_dir) if args.save_dir else None,
        known=known,
        strategy=strategy,
        shrink_budget=args.shrink_budget,
        threads=None if args.threads == 0 else args.threads,
        progress=progress_of(args),
    )
    set_result(args, report.to_json())
    print(format_training_report(report))
    return EXIT_FOUND if report.failed else EXIT_OK


def cmd_fuzz(args: argparse.Namespace) -> int:
    from harness.cases import CaseError, load_cases

    if args.mode == "train":
        return cmd_fuzz_train(args)
    if args.optimizer:
        raise UsageError("--optimizer is for --mode train")
    from harness.fuzz.driver import fuzz
    from harness.fuzz.format import format_report

    backends, labels = _backends_with_labels(args.backend)
    if not backends:
        raise UsageError("no backend to fuzz (every available backend except the reference is the default)")
    try:
        known = load_cases()
    except CaseError as e:
        raise UsageError(f"cannot read the known cases: {e}") from e
    max_examples = args.max_examples
    if max_examples is None and args.time_budget is None:
        max_examples = 500
    report = fuzz(
        backends,
        labels=labels,
        max_examples=max_examples,
        time_budget=args.time_budget,
        seed=args.seed,
        save_dir=Path(args.save_dir) if args.save_dir else None,
        known=known,
        shrink_budget=args.shrink_budget,
        threads=None if args.threads == 0 else args.threads,
        progress=progress_of(args),
    )
    set_result(args, report.to_json())
    print(format_report(report))
    return EXIT_FOUND if report.failed else EXIT_OK


def _is_training_case_file(path: str) -> bool:
    import json

    from harness.cases import CaseError
    from harness.training.cases import is_training_case

    try:
        data = json.loads(Path(path).read_text())
    except OSError as e:
        raise CaseError(f"cannot read case {path!r}: {e.strerror}") from e
    except json.JSONDecodeError as e:
        raise CaseError(f"{path}: not JSON: {e}") from e
    return isinstance(data, dict) and is_training_case(data)


def cmd_replay(args: argparse.Namespace) -> int:
    from harness.backend import BackendSpecError, BackendUnavailable
    from harness.cases import CaseError, load_case
    from harness.fuzz.replay import format_replay, replay

    try:
        training = [p for p in args.cases if _is_training_case_file(p)]
        cases = [load_case(p) for p in args.cases if p not in training]
        if training:
            from harness.training.cases import load_training_case

            training_cases = [load_training_case(p) for p in training]
    except CaseError as e:
        raise UsageError(str(e)) from e
    backends = load_backends(args.backend) if args.backend else None
    try:
        results = replay(cases, backends) if cases else []
        trained = []
        if training:
            from harness.training.cases import replay_training

            trained = replay_training(training_cases, others=backends)
    except (BackendUnavailable, BackendSpecError) as e:
        raise UsageError(str(e)) from e
    rows = [
        {
            "case": str(r.case.path or r.case.name),
            "backend": r.verdict.backend,
            "mode": "forward",
            "expected": r.expected,
            "got": "unavailable" if r.skipped else r.verdict.outcome.value,
            "as_expected": r.as_expected,
            "detail": r.verdict.detail,
        }
        for r in results
    ]
    rows += [
        {
            "case": str(r.case.path or r.case.name),
            "backend": r.verdict.backend,
            "mode": "train",
            "expected": r.expectation,
            "got": "unavailable" if r.skipped else r.verdict.outcome.value,
            "as_expected": r.as_expected,
            "detail": r.verdict.detail,
        }
        for r in trained
    ]
    set_result(args, {"cases": rows})
    texts = []
    if results:
        texts.append(format_replay(results))
    if trained:
        from harness.fuzz.training import format_training_replay

        texts.append(format_training_replay(trained))
    print("\n\n".join(texts))
    return EXIT_OK if all(r["as_expected"] for r in rows) else EXIT_FOUND


def add_commands(sub: argparse._SubParsersAction) -> None:
    from harness.fuzz.driver import DEFAULT_SAVE_DIR

    p = sub.add_parser(
        "fuzz",
        help="differential fuzzing against the reference (Hypothesis); minimises and saves failures",
        description="Fuzz backends against the reference. Exit 0: all agree; 1: a failure was found "
        "(minimised, printed, saved under --save-dir); 2: usage or setup error.",
    )
    add_backend_option(
        p, "every available backend except the reference; with --mode train, every one that trains"
    )
    p.add_argument(
        "--mode",
        choices=("forward", "train"),
        default="forward",
        help="what is fuzzed: forward (the lookup; default) or train (training steps: forward, backward "
        "and the optimizer update, judged step by step against the float64 reference)",
    )
    p.add_argument(
        "--optimizer",
        action="append",
        choices=("sgd", "adagrad", "rowwise_adagrad"),
        metavar="KIND",
        help="with --mode train: only these optimizer kinds (repeatable; default all: sgd, adagrad, "
        "rowwise_adagrad)",
    )
    stop = p.add_mutually_exclusive_group()
    stop.add_argument(
        "--time-budget",
        type=positive(float),
        metavar="SECONDS",
        help="total seconds of generation, split evenly between the backends",
    )
    stop.add_argument(
        "--max-examples",
        type=positive(int),
        metavar="N",
        help="examples per backend (default 500, or 200 with --mode train, when no time budget is given)",
    )
    p.add_argument("--seed", type=int, default=0, help="Hypothesis seed (default 0): same seed, same run")
    p.add_argument(
        "--save-dir",
        default=str(DEFAULT_SAVE_DIR),
        metavar="DIR",
        help=f"where minimised failures are saved as case files (default {DEFAULT_SAVE_DIR}, ignored "
        "by git; copy a case to cases/regressions/ to keep it as a regression test)",
    )
    p.add_argument(
        "--shrink-budget",
        type=positive(float),
        default=60.0,
        metavar="SECONDS",
        help="at most this long minimising a failure (default 60); the smallest failing problem so far "
        "is kept",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        metavar="N",
        help="torch intra-op threads while fuzzing (default 1: fuzz problems are small); 0 leaves "
        "torch's setting alone",
    )
    add_output_options(p)
    p.set_defaults(func=cmd_fuzz)

    p = sub.add_parser(
        "replay",
        help="rerun saved case files; exit 0 when each behaves as its 'expect' says",
        description="Rerun saved cases. Each case's own backend is held to the case's 'expect'; a "
        "backend named with --backend is held to agreement. Exit 0 when all behave as expected, "
        "1 otherwise, 2 when a case or backend cannot be loaded.",
    )
    p.add_argument("cases", nargs="+", metavar="CASE", help="case files (JSON)")
    add_backend_option(p, "", help="run these backends on the cases instead of each case's own (repeatable)")
    add_output_options(p)
    p.set_defaults(func=cmd_replay)
