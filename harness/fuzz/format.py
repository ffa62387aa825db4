"""Printing fuzz results: problems, counterexamples and the per-backend table, as readable text."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from harness.fuzz.minimise import describe_size
from harness.fuzz.results import BackendStats, Failure, FuzzReport
from harness.markdown import markdown_table
from harness.model import Problem, dtype_name, output_columns
from harness.quantized import QuantizedTable, dequantize

REGRESSIONS_DIR_NAME = "cases/regressions/"


def _floats(xs: Sequence[float], limit: int = 8) -> str:
    shown = ", ".join(f"{x:.6g}" for x in xs[:limit])
    return f"[{shown}{', ...' if len(xs) > limit else ''}]"


def format_problem(problem: Problem, *, max_ids: int = 16, max_rows: int = 8) -> str:
    """Tables, bags (with per-sample weights) and the rows the bags touch, as readable lines."""
    batch = problem.batch
    lines = ["tables (in output column order):"]
    for t in problem.tables:
        lines.append(
            f"  {t.name}: {t.num_embeddings} rows x dim {t.embedding_dim}, {dtype_name(t.dtype)}, "
            f"{t.pooling.value.upper()}, features {list(t.feature_names)}"
        )
    weighted = "with per-sample weights" if batch.weights is not None else "no per-sample weights"
    lines.append(
        f"batch: keys {list(batch.keys)}, batch size {batch.batch_size}, "
        f"ids {dtype_name(batch.values.dtype)}, {weighted}"
    )
    b = batch.batch_size
    offsets = batch.offsets.tolist()
    ids = batch.values.tolist()
    ws = batch.weights.tolist() if batch.weights is not None else None
    touched: dict[str, set[int]] = {}
    table_of = {f: t.name for t in problem.tables for f in t.feature_names}
    for f, key in enumerate(batch.keys):
        for s in range(b):
            lo, hi = offsets[f * b + s], offsets[f * b + s + 1]
            bag = ids[lo:hi]
            touched.setdefault(table_of[key], set()).update(bag)
            text = f"  {key}[{s}] = {bag[:max_ids]}{' ...' if len(bag) > max_ids else ''} ({len(bag)} ids)"
            if ws is not None and bag:
                text += f" weights {_floats(ws[lo:hi], max_ids)}"
            lines.append(text)
    lines.append("table rows used:")
    for t in problem.tables:
        rows = sorted(touched.get(t.name, ()))
        w = problem.weights[t.name]
        for r in rows[:max_rows]:
            if isinstance(w, QuantizedTable):  # the stored row, then what it stands for
                lines.append(
                    f"  {t.name}[{r}] = codes {w.codes[r].tolist()[:16]}{' ...' if w.dim > 16 else ''}, "
                    f"scale {float(w.scale[r]):.6g}, bias {float(w.bias[r]):.6g}: "
                    f"{_floats(dequantize(w.select_rows(slice(r, r + 1)))[0].tolist())}"
                )
                continue
            lines.append(f"  {t.name}[{r}] = {_floats(w[r].to(torch.float64).tolist())}")
        if len(rows) > max_rows:
            lines.append(f"  ... {len(rows) - max_rows} more rows of {t.name}")
    return "\n".join(lines)


def describe_element(problem: Problem, index: tuple[int, ...]) -> str:
    """``sample s, column c = feature f (table t), element j of its dim`` for an output index."""
    sample, col = index
    for table, feature, first, dim in output_columns(problem.tables):
        if first <= col < first + dim:
            where = f"feature {feature!r} (table {table!r}), element {col - first}"
            return f"sample {sample}, column {col} = {where}"
    return f"sample {sample}, column {col}"


def format_failure(failure: Failure) -> str:
    v = failure.verdict
    lines = [
        f"## {failure.backend}: {v.outcome.value}, found by {failure.found_by} "
        f"after {failure.seconds_to_find:.1f} s",
        f"{v.detail}",
    ]
    m = failure.minimised
    if m is not None and failure.original_size is not None:
        lines.append(
            f"minimised in {m.steps} steps ({m.attempts} tries, {m.seconds:.1f} s"
            + ("" if m.complete else ", budget spent before a fixed point")
            + f") from {_size_text(failure.original_size)} to {_size_text(describe_size(failure.problem))}"
        )
    lines.append(format_problem(failure.problem))
    c = v.comparison
    if c is not None and c.worst_index is not None:
        lines.append(
            f"worst element: {describe_element(failure.problem, c.worst_index)}: got {c.worst_value!r}, "
            f"reference {c.worst_reference!r}, bound {c.worst_bound:.3g}, error/bound {c.worst_ratio:.3g}"
        )
    if failure.case_path is not None:
        lines.append(f"saved as {failure.case_path}; rerun with: jagbench replay {failure.case_path}")
        if REGRESSIONS_DIR_NAME not in str(failure.case_path):
            lines.append(
                f"to keep it as a regression test, copy it to {REGRESSIONS_DIR_NAME} and commit it "
                "with the fix (the test suite replays every case there)"
            )
    return "\n".join(lines)


def _size_text(size: dict[str, int]) -> str:
    def n(count: int, what: str) -> str:
        return f"{count} {what}" if count == 1 else f"{count} {what}s"

    return (
        f"{n(size['tables'], 'table')}, {n(size['features'], 'feature')}, {n(size['samples'], 'sample')}, "
        f"{n(size['ids'], 'id')} (longest bag {size['longest_bag']}), dim <= {size['max_dim']}"
    )


def format_coverage(stats: BackendStats, *, width: int = 100) -> str:
    """What one backend's run exercised, one line per dimension, like Hypothesis's event
    statistics: each non-empty bucket with its share of the examples the backend ran."""
    ran = stats.checked
    n = stats.examples
    head = (
        f"coverage of {stats.backend}: {n} examples, {_share(stats.unsupported, n)} unsupported, "
        f"{_share(stats.known, n)} known"
    )
    if ran == 0:
        return head + "; none ran"
    lines = [head + f"; buckets of the {ran} that ran:"]
    for name, counts in stats.coverage.items():
        parts = [f"{label} {_share(n, ran)}" for label, n in counts.items() if n]
        line = f"  {name}: " + ", ".join(parts)
        lines.append(line if len(line) <= width else line[: width - 3] + "...")
    return "\n".join(lines)


def _share(n: int, of: int) -> str:
    if of == 0 or n == 0:
        return "0%"
    pct = 100 * n / of
    return f"{pct:.0f}%" if pct >= 1 else "<1%"


def format_report(report: FuzzReport, *, coverage: bool = True) -> str:
    """A Markdown table per backend, what each exercised (``coverage``), then every failure in full."""
    headers = [
        "backend",
        "examples",
        "agreed",
        "known",
        "unsupported",
        "failed",
        "worst error/bound",
        "examples/s",
        "harness share",
    ]
    rows = [
        [
            s.backend,
            s.examples,
            s.agreed,
            s.known,
            s.unsupported,
            s.failed,
            f"{s.worst_ratio:.3g}",
            f"{s.examples_per_second:.1f}",
            f"{100 * s.harness_share:.0f}%",
        ]
        for s in report.stats
    ]
    text = markdown_table(headers, rows)
    for s in report.stats:
        for name, n in sorted(s.known_cases.items()):
            text += f"\n- {s.backend}: {n} examples explained by known discrepancy {name!r}"
    if coverage:
        for s in report.stats:
            text += "\n\n" + format_coverage(s)
    for f in report.failures:
        text += "\n\n" + format_failure(f)
    return text
