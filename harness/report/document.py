"""`jagbench report`: one or more runs -> ``report.md`` + PNG plots + a self-contained ``report.html``.

Cases are keyed by (mode, backend, workload): a run of ``jagbench bench --mode train`` (training
steps) and one of the forward lookup are shown side by side in sections of their own (summary,
plots, every case), each with its own byte model; the known discrepancies, forward and training,
close the report.

`write_report` takes ``extra_sections``: Markdown texts (each starting with its own ``## `` heading)
appended to both pages; the robustness matrix enters the report through it (``--robustness FILE``).
"""

from __future__ import annotations

import base64
import html
import io
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.bench.metrics import BYTE_MODEL
from harness.bench.paired import speedup
from harness.bench.runs import Run
from harness.bench.summary import (
    conditions_text,
    per_repeat_text,
    speedup_text,
    split_text,
    spread_pairs,
    spread_table,
)
from harness.bench.training import TRAIN_BYTE_MODEL
from harness.cases import CASES_DIR, load_cases
from harness.markdown import markdown_table


@dataclass(frozen=True)
class Row:
    """One timed case, with the figures the report shows."""

    backend: str
    workload: str
    median: float
    iqr: float
    rounds: int
    ids_per_s: float
    gbps: float
    fraction: float | None
    speedup: float | None
    known: str | None
    params: dict[str, Any]
    speedup_interval: tuple[float, float] | None = None
    by_repeat: tuple[float, ...] = ()
    spread: float | None = None
    mode: str = "forward"


MODE_TITLES = {"forward": "Forward lookup", "train": "Training step (`--mode train`)"}
MODE_SHORT = {"forward": "forward lookup", "train": "training step"}
MODE_BYTE_MODELS = {"forward": BYTE_MODEL, "train": TRAIN_BYTE_MODEL}


def _mode(b: dict[str, Any]) -> str:
    return b["extra_info"].get("mode", "forward")


def _rows(runs: Sequence[Run], baseline: str | None) -> list[Row]:
    seen: dict[tuple[str, str, str], int] = {}
    for run in runs:
        for b in run.benchmarks:
            key = (_mode(b), b["extra_info"]["backend"], b["extra_info"]["workload"])
            seen[key] = seen.get(key, 0) + 1
    rows = []
    for run in runs:
        base = baseline or run.baseline
        ref = {
            (_mode(b), b["extra_info"]["workload"]): b
            for b in run.benchmarks
            if b["extra_info"]["backend"] == base
        }
        for b in run.benchmarks:
            info, stats = b["extra_info"], b["stats"]
            median = stats["median"]
            clash = seen[(_mode(b), info["backend"], info["workload"])] > 1
            label = f"{info['backend']} [{run.path.stem}]" if clash else info["backend"]
            gbps = info["bytes"] / median / 1e9
            bw = run.bandwidth_gbps
            r = ref.get((_mode(b), info["workload"]))
            s = speedup(b, r) if r is not None else None  # paired rounds when the run has them
            rows.append(
                Row(
                    backend=label,
                    workload=info["workload"],
                    median=median,
                    iqr=stats.get("iqr", 0.0),
                    rounds=stats.get("rounds", len(stats.get("data") or [])),
                    ids_per_s=info["ids"] / median,
                    gbps=gbps,
                    fraction=gbps / bw if bw else None,
                    speedup=s.speedup if s else None,
                    known=info.get("known_discrepancy"),
                    params=info.get("parameters", {}),
                    speedup_interval=(s.low, s.high) if s and s.low is not None else None,
                    by_repeat=s.by_repeat if s else (),
                    spread=s.spread if s else None,
                    mode=_mode(b),
                )
            )
    return rows


def modes_of(rows: Sequence[Row]) -> list[str]:
    """The modes present, forward first."""
    present = {r.mode for r in rows}
    return [m for m in MODE_TITLES if m in present] + sorted(present - set(MODE_TITLES))


def _order(items: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(items))


def _fmt(x: float | None, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def summary_matrix(rows: Sequence[Row]) -> str:
    """Workloads (rows) x backends (columns): GB/s and speedup against the baseline."""
    backends = _order([r.backend for r in rows])
    workloads = _order([r.workload for r in rows])
    cell = {(r.backend, r.workload): r for r in rows}
    lines = []
    for w in workloads:
        line = [w]
        for b in backends:
            r = cell.get((b, w))
            line.append(
                "-" if r is None else f"{r.gbps:.3g} (x{_fmt(r.speedup, '.2f')})" + (" K" if r.known else "")
            )
        lines.append(line)
    return markdown_table(["workload \\ backend: GB/s (speedup)", *backends], lines)


def detail_table(rows: Sequence[Row], baseline: str) -> str:
    """One line per case with every figure, fastest first within a workload."""
    workloads = _order([r.workload for r in rows])
    repeats = any(r.spread is not None for r in rows)
    head = [
        "workload",
        "backend",
        "median ms",
        "IQR ms",
        "rounds",
        "Mids/s",
        "GB/s",
        "of bandwidth",
        f"speedup vs {baseline} [95% CI]",
    ]
    if repeats:
        head.append("per repeat (max/min)")
    head.append("note")
    lines = []
    for r in sorted(rows, key=lambda r: (workloads.index(r.workload), -r.gbps)):
        line = [
            r.workload,
            r.backend,
            f"{r.median * 1e3:.4g}",
            f"{r.iqr * 1e3:.3g}",
            r.rounds,
            f"{r.ids_per_s / 1e6:.3g}",
            f"{r.gbps:.3g}",
            _fmt(r.fraction and r.fraction * 100, ".2g") + "%",
            speedup_text(r.speedup, r.speedup_interval),
        ]
        if repeats:
            line.append(per_repeat_text(r.by_repeat, r.spread))
        line.append("known discrepancy" if r.known else "")
        lines.append(line)
    return markdown_table(head, lines)


def method_section(runs: Sequence[Run]) -> str:
    """Per run: how it was timed (interleaved, repeats), cold or warm, load, and the noise monitor."""
    out = []
    for run in runs:
        section = run.jagbench
        out.append(f"### {run.path.name}")
        if not section.get("method"):
            out += ["- timed one case after another (a run made before interleaving): no paired rounds", ""]
            continue
        m = section["method"]
        optimizer = (section.get("case_options") or {}).get("optimizer")
        if section.get("mode") == "train" and optimizer:
            out.append(
                f"- training steps (`--mode train`): {_optimizer_text(optimizer)}; each round continues the "
                "backend's weights and optimizer state (prepared once); one sampled step checked by "
                "`check_training` before timing"
            )
        out.append(
            f"- {conditions_text(section)} Rounds per workload: from {m.get('min_rounds')} to "
            f"{m.get('max_rounds')}, {m.get('warmup_rounds')} warm-up round(s) first; a backend's span in a "
            f"round lasts at least {m.get('min_round_s', 0) * 1e3:g} ms."
        )
        noise = section.get("noise") or {}
        if noise.get("reference_s"):
            threshold = noise.get("threshold", 0.1)
            out.append(
                f"- noise monitor: {noise.get('kernel')}; quietest median "
                f"{noise['reference_s'] * 1e3:.3g} ms. A workload is flagged when the probe's median in a "
                f"repeat was off its median in the workload's quietest repeat, or drifted between blocks "
                f"of rounds, or when its cases' own medians were off their quickest repeat's (geometric "
                f"mean), by more than {threshold:.0%}."
            )
            warnings = noise.get("warnings") or []
            out += [f"- **NOISE WARNING**: {w}" for w in warnings] or [
                "- no workload flagged: the machine was steady"
            ]
        out.append("")
        pairs = spread_pairs(section.get("pairs") or [], section.get("backends") or [], run.baseline)
        if pairs:
            worst = max(pairs, key=lambda p: p["spread"])
            out += [
                f"Spread of each paired speedup over {m.get('repeat')} repeats (largest "
                f"{worst['spread']:.3f}: {worst['backend']} over {worst['over']} on {worst['workload']}):",
                "",
                spread_table(pairs),
                "",
            ]
            if (split := split_text(pairs)) is not None:
                out += [split, ""]
    return "\n".join(out)


def _optimizer_text(o: dict[str, Any]) -> str:
    text = f"{o.get('kind')} lr={o.get('learning_rate')}"
    if o.get("kind") != "sgd":
        text += f" eps={o.get('eps')}"
    if o.get("weight_decay_mode", "none") != "none":
        text += f" {o['weight_decay_mode']} weight_decay={o.get('weight_decay')}"
    return text


def _palette(n: int) -> Any:
    """Distinct colours for ``n`` backends: tab10, or tab20 beyond ten (no colour used twice up to 20)."""
    import matplotlib.pyplot as plt

    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20")
    return lambda i: cmap(i % cmap.N)


def _figure_png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return buf.getvalue()


def _bars(rows: Sequence[Row], value: str, xlabel: str, title: str, ceiling: float | None = None) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    backends = _order([r.backend for r in rows])
    workloads = _order([r.workload for r in rows])
    cell = {(r.backend, r.workload): getattr(r, value) for r in rows}
    height = 0.8 / max(1, len(backends))
    fig, ax = plt.subplots(figsize=(9, 0.6 + 0.32 * len(workloads) * max(2, len(backends)) / 2))
    colors = _palette(len(backends))
    for i, b in enumerate(backends):
        ys = [w_i + i * height for w_i, w in enumerate(workloads) if cell.get((b, w)) is not None]
        xs = [cell[(b, w)] for w in workloads if cell.get((b, w)) is not None]
        ax.barh(ys, xs, height=height, label=b, color=colors(i))
    ax.set_yticks([w_i + 0.4 - height / 2 for w_i in range(len(workloads))], workloads)
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    if ceiling is not None:
        ax.axvline(ceiling, color="black", linestyle="--", linewidth=1, label="copy bandwidth")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    png = _figure_png(fig)
    plt.close(fig)
    return png


def _scaling(rows: Sequence[Row]) -> bytes | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = _order([r.params["family"] for r in rows if r.params.get("family")])
    if not families:
        return None
    fig, axes = plt.subplots(1, len(families), figsize=(4.2 * len(families), 3.6), squeeze=False)
    backends = _order([r.backend for r in rows])
    colors = _palette(len(backends))
    for ax, family in zip(axes[0], families, strict=True):
        members = [r for r in rows if r.params.get("family") == family]
        param = members[0].params["sweep"]["param"]
        for i, b in enumerate(backends):
            pts = sorted((r.params["sweep"]["value"], r.gbps) for r in members if r.backend == b)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=b, color=colors(i))
        if param in ("B", "L", "D"):
            ax.set_xscale("log", base=2)
        ax.set_xlabel(param)
        ax.set_ylabel("GB/s (byte model)")
        ax.set_title(family)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    png = _figure_png(fig)
    plt.close(fig)
    return png


def _command(argv: Sequence[str]) -> str:
    return " ".join(Path(a).name if i == 0 else a for i, a in enumerate(argv))


def _completeness(run: Run) -> list[str]:
    total, finished = run.jagbench.get("cases_total"), run.jagbench.get("cases_finished")
    if total is None or finished is None or finished >= total:
        return []
    return [f"- **incomplete run**: {finished} of {total} cases finished (interrupted)"]


def environment_section(runs: Sequence[Run]) -> str:
    lines = []
    for run in runs:
        m = run.machine_info
        env = m.get("jagbench", {})
        c = run.commit_info
        cpu = m.get("cpu") or {}
        versions = ", ".join(f"{k} {v}" for k, v in (env.get("versions") or {}).items() if v)
        threads = ", ".join(f"{k}={v}" for k, v in (env.get("threads") or {}).items() if v is not None)
        bw = run.jagbench.get("bandwidth") or {}
        lines += [
            f"### {run.path.name}" + (" (interrupted run: partial)" if run.partial else ""),
            *_completeness(run),
            f"- date: {run.datetime or 'n/a'}; machine: {m.get('node')} "
            f"({cpu.get('brand_raw', m.get('processor'))}, {cpu.get('count', '?')} CPUs, "
            f"{m.get('system')} {m.get('release')}); Python {m.get('python_version')}",
            f"- commit: {c.get('id', c.get('error', 'n/a'))}{' (dirty)' if c.get('dirty') else ''} "
            f"on {c.get('branch')}",
            f"- command: `{_command(run.jagbench.get('argv') or [])}`",
            f"- versions: {versions}",
            f"- threads: {threads}",
            f"- CUDA devices: {', '.join(env.get('cuda_devices') or []) or 'none'}",
            f"- memory bandwidth (copy of a {bw.get('buffer_bytes', 0) / 2**20:.0f} MiB float32 buffer, "
            f"read + write): {_fmt(run.bandwidth_gbps, '.1f')} GB/s",
            "",
        ]
    return "\n".join(lines)


def _cell(text: str) -> str:
    return text.replace("|", "/").replace("\n", " ")


def known_training_section(directory: Path = CASES_DIR) -> str:
    """The known training discrepancies (``cases/known/training/``), one line each."""
    from harness.training.cases import load_training_cases

    cases = [
        c for c in load_training_cases(directory / "known" / "training") if c.kind == "known-discrepancy"
    ]
    if not cases:
        return "None recorded."
    return markdown_table(
        ["case", "backend", "summary", "model (what is checked)", "status"],
        [
            [
                c.name,
                c.backend,
                _cell(c.summary),
                _cell(c.model.describe()),
                "reproduced" if c.reproduced else "never reproduced: explains nothing",
            ]
            for c in cases
        ],
    )


def known_section(directory: Path = CASES_DIR) -> str:
    cases = [c for c in load_cases(directory) if c.kind == "known-discrepancy"]
    if not cases:
        return "None recorded."
    cell = _cell

    return markdown_table(
        ["case", "backend", "summary", "model (what is checked)", "status"],
        [
            [
                c.name,
                c.backend,
                cell(c.summary),
                cell(c.model.describe()) if c.model else "none (format 1): explains nothing",
                "reproduced" if c.reproduced else "never reproduced: explains nothing",
            ]
            for c in cases
        ],
    )


def problems_section(runs: Sequence[Run]) -> str:
    out = []
    for run in runs:
        mode = run.jagbench.get("mode", "forward")
        tag = "" if mode == "forward" else f"[{MODE_SHORT.get(mode, mode)}] "
        for k in run.jagbench.get("known", []):
            out.append(
                f"- {tag}known discrepancy, not timed: {k['backend']} x {k['workload']}: "
                f"case `{k.get('case')}`: {k.get('detail', '')}"
            )
        for f in run.jagbench.get("failed", []):
            out.append(
                f"- {tag}FAILED the reference check (not timed): {f['backend']} x {f['workload']}: "
                f"{f['outcome']}: {f['detail']}"
            )
        for u in run.jagbench.get("unsupported", []):
            out.append(f"- {tag}not run: {u['backend']} x {u['workload']}: {u['reason']}")
    return "\n".join(out) or "Every case ran and agreed with the reference."


def _mode_heading(mode: str, modes: Sequence[str]) -> list[str]:
    """A ``###`` heading per mode when the report has several (or only training)."""
    if modes == ["forward"]:
        return []
    return [f"### {MODE_TITLES.get(mode, mode)}", ""]


def _baselines(runs: Sequence[Run], baseline: str | None) -> str:
    """What the speedups are against: one backend, or each run's own when they differ."""
    if baseline is not None:
        return f"`{baseline}`"
    names = {r.baseline for r in runs}
    if len(names) == 1:
        return f"`{runs[0].baseline}`"
    return "each run's baseline (" + ", ".join(f"{r.path.name}: `{r.baseline}`" for r in runs) + ")"


def build_markdown(
    runs: Sequence[Run], baseline: str | None, images: dict[str, str], extra_sections: Sequence[str]
) -> str:
    rows = _rows(runs, baseline)
    modes = modes_of(rows) or ["forward"]
    parts = [
        "# jagbench benchmark report",
        "",
        f"Runs: {', '.join(r.path.name for r in runs)}. "
        f"Speedups are against {_baselines(runs, baseline)} (x2.00 = twice as fast). "
        "Each speedup is the median of per-round paired ratios (the backends of a workload are timed in "
        "interleaved rounds, in a random order each round), with its 95% bootstrap interval in brackets "
        "(a run made before interleaving has no pairs: the ratio of medians, without an interval). "
        'GB/s follows the byte model below; "of bandwidth" divides it by the copy bandwidth measured in the '
        "same run. K = a known discrepancy of that backend applies to this workload: timed, but its result "
        "differs from the contract (see the last section).",
        "",
        "## Summary",
        "",
    ]
    for mode in modes:
        mine = [r for r in rows if r.mode == mode]
        plain = [r for r in mine if not r.params.get("family")]
        swept = [r for r in mine if r.params.get("family")]
        parts += _mode_heading(mode, modes)
        if plain:
            parts += [summary_matrix(plain), ""]
        if swept:
            parts += ["Sweeps:", "", summary_matrix(swept), ""]
        which = f" ({mode})" if len(modes) > 1 else ""
        parts += [
            f"Byte model{which}: {MODE_BYTE_MODELS.get(mode, 'see the run')}. "
            "Latency is the median of the timed rounds; IQR is their interquartile range.",
            "",
        ]
    parts += [
        "## Method, conditions and noise",
        "",
        method_section(runs),
        "## Plots",
        "",
    ]
    parts += [f"![{title}]({name})\n" for title, name in images.items()]
    parts += ["## Problems", "", problems_section(runs), "", "## Every case", ""]
    for mode in modes:
        parts += _mode_heading(mode, modes)
        one = len({r.baseline for r in runs}) == 1
        label = baseline or (runs[0].baseline if one else "its run's baseline")
        parts += [detail_table([r for r in rows if r.mode == mode], label), ""]
    parts += [
        "## Environment",
        "",
        environment_section(runs),
        "## Known discrepancies (found by fuzzing, `cases/known/`)",
        "",
        known_section(),
        "",
        "### Training (`cases/known/training/`)",
        "",
        known_training_section(),
        "",
    ]
    for section in extra_sections:
        parts += [section.strip(), ""]
    return "\n".join(parts)


_IMAGE = re.compile(r"!\[([^\]]*)\]\(([^)]+)\)")


def _inline(text: str) -> str:
    text = html.escape(text)
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", text)


def markdown_to_html(md: str, images: dict[str, bytes]) -> str:
    """The subset of Markdown the report writes: headings, pipe tables, lists, images, paragraphs."""
    out: list[str] = []
    lines = md.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            out.append(f"<h{level}>{_inline(line[level:].strip())}</h{level}>")
        elif line.startswith("|"):
            block = []
            while i < len(lines) and lines[i].startswith("|"):
                block.append([c.strip() for c in lines[i].strip().strip("|").split("|")])
                i += 1
            head, body = block[0], [r for r in block[1:] if not all(set(c) <= set("-: ") for c in r)]
            out.append("<table><tr>" + "".join(f"<th>{_inline(c)}</th>" for c in head) + "</tr>")
            out += ["<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in body]
            out.append("</table>")
            continue
        elif line.startswith("- "):
            out.append("<ul>")
            while i < len(lines) and lines[i].startswith("- "):
                out.append(f"<li>{_inline(lines[i][2:])}</li>")
                i += 1
            out.append("</ul>")
            continue
        elif _IMAGE.fullmatch(line.strip()):
            title, name = _IMAGE.fullmatch(line.strip()).groups()
            data = base64.b64encode(images[name]).decode() if name in images else ""
            out.append(
                f'<figure><img alt="{html.escape(title)}" src="data:image/png;base64,{data}">'
                f"<figcaption>{html.escape(title)}</figcaption></figure>"
            )
        elif line.strip():
            out.append(f"<p>{_inline(line)}</p>")
        i += 1
    style = (
        "body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1300px;color:#222}"
        "table{border-collapse:collapse;margin:1em 0;font-size:13px}"
        "th,td{border:1px solid #ccc;padding:3px 8px;text-align:left}th{background:#f0f0f0}"
        "tr:nth-child(even) td{background:#fafafa}img{max-width:100%}code{background:#f4f4f4;padding:0 3px}"
        "figure{margin:1em 0}figcaption{color:#666;font-size:13px}"
    )
    return (
        '<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>jagbench benchmark report</title>'
        f"<style>{style}</style></head><body>\n" + "\n".join(out) + "\n</body></html>\n"
    )


def write_report(
    runs: Sequence[Run],
    out_dir: Path,
    extra_sections: Sequence[str] | None = None,
    baseline: str | None = None,
) -> list[Path]:
    """Write ``report.md``, ``report.html`` and the plots' PNGs under ``out_dir``; returns the paths.

    ``extra_sections``: Markdown texts appended to the report (e.g. the robustness matrix).
    """
    if not runs:
        raise ValueError("write_report needs at least one run")
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = _rows(runs, baseline)
    bandwidth = runs[0].bandwidth_gbps
    pngs: dict[str, bytes] = {}
    titles: dict[str, str] = {}
    modes = modes_of(rows)
    for mode in modes:
        mine = [r for r in rows if r.mode == mode]
        plain = [r for r in mine if not r.params.get("family")] or mine
        suffix = "" if mode == "forward" else f"-{mode}"
        what = "" if modes == ["forward"] else f" ({MODE_SHORT.get(mode, mode)})"
        pngs[f"throughput{suffix}.png"] = _bars(
            plain,
            "gbps",
            "GB/s (byte model)",
            f"Throughput per backend and workload{what}",
            ceiling=bandwidth,
        )
        titles[f"Throughput per backend and workload{what} (GB/s; dashed: copy bandwidth)"] = (
            f"throughput{suffix}.png"
        )
        if bandwidth:
            pngs[f"bandwidth-fraction{suffix}.png"] = _bars(
                [r for r in plain if r.fraction is not None],
                "fraction",
                "fraction of measured copy bandwidth",
                f"Fraction of the bandwidth ceiling{what}",
                ceiling=None,
            )
            titles[f"Fraction of the measured copy bandwidth{what}"] = f"bandwidth-fraction{suffix}.png"
        scaling = _scaling(mine)
        if scaling is not None:
            pngs[f"scaling{suffix}.png"] = scaling
            titles[f"Scaling with B, L, D and id skew (sweeps){what}"] = f"scaling{suffix}.png"
    md = build_markdown(runs, baseline, titles, list(extra_sections or []))
    written = []
    for name, data in pngs.items():
        (out_dir / name).write_bytes(data)
        written.append(out_dir / name)
    (out_dir / "report.md").write_text(md)
    (out_dir / "report.html").write_text(markdown_to_html(md, pngs))
    return [out_dir / "report.md", out_dir / "report.html", *written]
