"""What `jagbench bench` prints when it is done: Markdown tables of the run and its warnings.

The same figures as the report (`harness.report.document`), shorter: per case its median, IQR,
rounds, GB/s and paired speedup against the baseline with its 95% interval; with ``--repeat``,
every pair's speedup per repeat, its spread (max / min) and whether its order held in every
repeat; the conditions; the noise warnings.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from harness.bench.paired import faster_in
from harness.markdown import markdown_table

SPREAD_PAIRS_LIMIT = 5
"""Up to this many backends every pair is listed in the spread table; beyond, pairs with the baseline."""


def ratio_text(x: float) -> str:
    """Two decimals; two significant digits below 0.1 (so a 100x slower backend is not ``0.00``)."""
    return f"{x:.2f}" if x >= 0.095 else f"{x:.2g}"


def speedup_text(value: float | None, interval: Sequence[float | None] | None) -> str:
    """``1.23 [1.20, 1.27]``; the interval left out when there is none (an unpaired run)."""
    if value is None:
        return "n/a"
    if interval and interval[0] is not None and interval[1] is not None:
        return f"{ratio_text(value)} [{ratio_text(interval[0])}, {ratio_text(interval[1])}]"
    return ratio_text(value)


def per_repeat_text(by_repeat: Sequence[float], spread: float | None) -> str:
    """``1.21 / 1.19 / 1.24 (1.042)``: each repeat's speedup and their max / min."""
    return " / ".join(ratio_text(x) for x in by_repeat) + (f" ({spread:.3f})" if spread is not None else "")


def cases_table(benchmarks: Sequence[dict[str, Any]], baseline: str, repeats: int) -> str:
    head = ["workload", "backend", "median ms", "IQR ms", "rounds", "GB/s", f"speedup vs {baseline} [95% CI]"]
    if repeats > 1:
        head.append("per repeat (max/min)")
    rows = []
    for b in benchmarks:
        info, stats = b["extra_info"], b["stats"]
        row = [
            info["workload"],
            info["backend"],
            f"{stats['median'] * 1e3:.4g}",
            f"{stats['iqr'] * 1e3:.3g}",
            stats["rounds"],
            f"{info['gbps']:.3g}" if info.get("gbps") else "n/a",
            speedup_text(info.get("speedup_vs_baseline"), info.get("speedup_interval")),
        ]
        if repeats > 1:
            row.append(per_repeat_text(info.get("speedup_by_repeat") or [], info.get("speedup_spread")))
        rows.append(row)
    return markdown_table(head, rows)


def spread_pairs(
    pairs: Sequence[dict[str, Any]], backends: Sequence[str], baseline: str
) -> list[dict[str, Any]]:
    """Every pair with per-repeat values, or only those with the baseline when there are many backends."""
    shown = [p for p in pairs if len(p.get("by_repeat") or []) > 1]
    if len(backends) > SPREAD_PAIRS_LIMIT:
        shown = [p for p in shown if baseline in (p["backend"], p["over"])]
    return shown


def repeats_faster(pair: dict[str, Any]) -> int:
    """Repeats in which the pair's faster one was faster (derived for a JSON before ``faster_in``)."""
    return pair.get("faster_in", faster_in(pair["by_repeat"]))


def is_split(pair: dict[str, Any]) -> bool:
    """The pair's order changed between repeats."""
    return repeats_faster(pair) < len(pair["by_repeat"])


def verdict_text(pair: dict[str, Any]) -> str:
    """``faster in 3 of 3``, or ``split: faster in 2 of 3`` when the order changed between repeats."""
    text = f"faster in {repeats_faster(pair)} of {len(pair['by_repeat'])}"
    return f"split: {text}" if is_split(pair) else text


def spread_table(pairs: Sequence[dict[str, Any]]) -> str:
    """Per workload and pair: the speedup in each repeat, their max / min and whether the faster
    one was faster in every repeat."""
    return markdown_table(
        ["workload", "pair", "speedup per repeat", "max/min", "verdict"],
        [
            [
                p["workload"],
                f"{p['backend']} over {p['over']}",
                " / ".join(f"{x:.3f}" for x in p["by_repeat"]),
                f"{p['spread']:.3f}",
                verdict_text(p),
            ]
            for p in pairs
        ],
    )


def split_text(pairs: Sequence[dict[str, Any]]) -> str | None:
    """One sentence naming the pairs whose order changed between repeats, or ``None``."""
    split = [p for p in pairs if is_split(p)]
    if not split:
        return None
    names = "; ".join(f"{p['backend']} and {p['over']} on {p['workload']}" for p in split)
    return (
        f"No stable verdict for {len(split)} pair(s), faster and slower in different repeats "
        f"(within this machine's run-to-run spread of each other): {names}."
    )


def conditions_text(section: dict[str, Any]) -> str:
    c = section.get("conditions") or {}
    m = section.get("method") or {}
    load = (c.get("load") or {}).get("processes", 0)
    caches = c.get("caches", "warm")
    flush = f" (flush {c.get('flush_mib')} MiB before every timed call)" if caches == "cold" else ""
    return (
        f"Caches {caches}{flush}; background load: {load} spinning process(es); "
        f"interleaved rounds, seed {m.get('seed', 0)}, {m.get('repeat', 1)} repeat(s)."
    )


def format_summary(output: dict[str, Any]) -> str:
    """The run as Markdown: cases, the spread over repeats, conditions and noise warnings."""
    section = output.get("jagbench", {})
    baseline = section.get("baseline", "torch")
    repeats = int((section.get("method") or {}).get("repeat", 1))
    parts = [cases_table(output["benchmarks"], baseline, repeats)]
    pairs = spread_pairs(section.get("pairs") or [], section.get("backends") or [], baseline)
    if pairs:
        worst = max(pairs, key=lambda p: p["spread"])
        parts += [
            "",
            f"Spread of each speedup over {repeats} repeats:",
            "",
            spread_table(pairs),
            "",
            f"Largest spread: {worst['spread']:.3f} "
            f"({worst['backend']} over {worst['over']} on {worst['workload']}).",
        ]
        if (split := split_text(pairs)) is not None:
            parts += ["", split]
    parts += ["", conditions_text(section)]
    warnings = (section.get("noise") or {}).get("warnings") or []
    threshold = (section.get("noise") or {}).get("threshold")
    if warnings:
        parts += ["", f"NOISE: the machine was not steady (threshold {threshold:.0%}):"]
        parts += [f"- {w}" for w in warnings]
    return "\n".join(parts)
