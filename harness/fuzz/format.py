"""Printing fuzz results: problems, counterexamples and the per-backend table, as readable text."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from harness.fuzz.results import Failure, FuzzReport
from harness.markdown import markdown_table
from harness.model import Problem, dtype_name, output_columns


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
        format_problem(failure.problem),
    ]
    c = v.comparison
    if c is not None and c.worst_index is not None:
        lines.append(
            f"worst element: {describe_element(failure.problem, c.worst_index)}: got {c.worst_value!r}, "
            f"reference {c.worst_reference!r}, bound {c.worst_bound:.3g}, error/bound {c.worst_ratio:.3g}"
        )
    if failure.case_path is not None:
        lines.append(f"saved as {failure.case_path}; rerun with: jagbench replay {failure.case_path}")
    return "\n".join(lines)


def format_report(report: FuzzReport) -> str:
    """A Markdown table per backend, then every failure in full."""
    headers = [
        "backend",
        "examples",
        "agreed",
        "known",
        "unsupported",
        "failed",
        "worst error/bound",
        "examples/s",
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
        ]
        for s in report.stats
    ]
    text = markdown_table(headers, rows)
    for s in report.stats:
        for name, n in sorted(s.known_cases.items()):
            text += f"\n- {s.backend}: {n} examples explained by known discrepancy {name!r}"
    for f in report.failures:
        text += "\n\n" + format_failure(f)
    return text
