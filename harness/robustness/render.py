"""The robustness matrix as Markdown, from its JSON document alone (`harness.robustness.matrix`)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from harness.markdown import markdown_table
from harness.robustness.matrix import SUMMARY_COLUMNS, CaseResult, load_document, summarise

LEGEND = (
    "Cells: `raises` = a Python exception (type and message below); `silent: R` = returned a result "
    "equal to reading R of the input (`(+N)`: N more readings coincide, named below), "
    "`silent: GARBAGE` = equal to none; `returns: as-given` = returned the right result where "
    "there is one (the valid controls; NaN and inf, which are values and propagate as IEEE "
    "says); `CRASH SIG` = the process died; "
    "`HANG` = still running at the time limit; `+MUTATES` = changed an input tensor; `n/a` = "
    "`supports()` declines even the valid base problem. ✗ = not clean (clean: raised with a "
    "message, or returned the right result where there is one, and mutated nothing). † = "
    "`supports()` declined or raised on this input (the harness would not have called `prepare`)."
)


def _escape(text: str) -> str:
    """One table cell: no newline, and no pipe (the report's HTML renderer splits rows on it)."""
    return text.replace("|", "/").replace("\n", " ")


def cell(r: CaseResult) -> str:
    """The matrix cell of one case: a few words, bold when not clean."""
    if r.outcome == "raised":
        text = "raises"
    elif r.outcome == "returned":
        verb = "returns" if r.clean else "silent"
        more = f" (+{len(r.readings) - 1})" if r.readings and len(r.readings) > 1 else ""
        text = f"{verb}: " + (r.readings[0] + more if r.readings else "GARBAGE")
    elif r.outcome == "crashed":
        text = f"CRASH {r.signal}" if r.signal else f"CRASH exit {r.exit_code}"
    elif r.outcome == "hung":
        text = "HANG"
    elif r.outcome == "unsupported":
        text = "n/a"
    else:
        text = "harness error"
    if r.mutated:
        text += " +MUTATES"
    if r.clean is False:
        text = f"✗ {text}"
    if r.supports and r.outcome != "unsupported":
        text += " †"
    return text


def detail(r: CaseResult) -> str:
    """What exactly happened: the exception and message, the signal, the readings, the mutation."""
    parts = []
    if r.outcome == "raised":
        parts.append(f"{r.exception} in {r.stage}: {r.message}")
    elif r.outcome == "returned":
        parts.append("equals " + (", ".join(r.readings) if r.readings else "no sensible reading"))
        if r.result_note:
            parts.append(r.result_note)
    elif r.outcome == "crashed":
        how = r.signal or f"exit status {r.exit_code}"
        parts.append(f"{how} in {r.stage}" + (f"; last output: {r.log_tail}" if r.log_tail else ""))
    elif r.outcome == "hung":
        parts.append(f"killed after {r.seconds:.0f} s in {r.stage}")
    elif r.outcome in ("unsupported", "error"):
        parts.append(str(r.message))
    if r.mutated:
        parts.append("mutated " + ", ".join(r.mutated))
    if r.warning:
        parts.append(f"warned {r.warning}")
    if r.supports:
        parts.append(f"supports() {r.supports}")
    return _escape("; ".join(parts))[:400]


def _isolation(doc: Mapping[str, Any]) -> str:
    """How the cases were spread over processes (documents before that choice: one per case)."""
    shared = [f"`{b['name']}`" for b in doc["backends"] if b["available"] and b.get("keeps_processes")]
    if doc.get("process_per_case", True) or not shared:
        return "Each (backend, input) in its own process"
    return (
        "Each (backend, input) in its own process, except for the backends that keep worker "
        f"processes ({', '.join(shared)}): one process runs all the inputs of each, one after another, "
        "and a fresh one takes over after a crash or hang"
    )


def render_markdown(doc: Mapping[str, Any], *, heading: str = "##") -> str:
    """The matrix (inputs x backends), a clean count per backend, then every case's details."""
    results = [CaseResult.from_json(r) for r in doc["results"]]
    inputs = [i["name"] for i in doc["inputs"]]
    backends = [b["name"] for b in doc["backends"] if b["available"]]
    by_case = {(r.input, r.backend): r for r in results}
    versions = ", ".join(f"{k} {v}" for k, v in doc.get("versions", {}).items())
    lines = [
        f"{heading} Robustness: malformed input fed to each backend directly",
        "",
        f"{_isolation(doc)}, {doc['timeout_s']:g} s limit per case, "
        f"{doc['jobs']} processes at a time; {len(results)} cases"
        + (f" in {doc['wall_s']:g} s" if doc.get("wall_s") is not None else "")
        + f", {doc['created']} on {doc['machine']['platform']} ({doc['machine']['cpu_count']} CPUs). "
        + (f"Versions: {versions}." if versions else ""),
    ]
    if not doc.get("complete"):
        lines += ["", "**Incomplete run**: the matrix below holds the cases finished before it stopped."]
    lines += ["", LEGEND, ""]
    rows = [
        [name] + [cell(by_case[(name, b)]) if (name, b) in by_case else "" for b in backends]
        for name in inputs
    ]
    clean_row = ["clean"]
    for b in backends:
        judged = [r for r in results if r.backend == b and r.clean is not None]
        clean_row.append(f"{sum(bool(r.clean) for r in judged)}/{len(judged)}")
    lines.append(markdown_table(["input"] + backends, rows + [clean_row]))
    skipped = [b for b in doc["backends"] if not b["available"]]
    if skipped:
        lines += [""] + [f"Not run: `{b['spec']}`: {b['reason']}" for b in skipped]
    lines += ["", f"{heading}# Inputs", ""]
    lines += [f"- `{i['name']}`: {i['description']} (clean: {i['clean']})" for i in doc["inputs"]]
    lines += ["", f"{heading}# Every case", ""]
    detail_rows = [
        [name, b, by_case[(name, b)].outcome, detail(by_case[(name, b)])]
        for name in inputs
        for b in backends
        if (name, b) in by_case
    ]
    lines.append(markdown_table(["input", "backend", "outcome", "what happened"], detail_rows))
    return "\n".join(lines) + "\n"


def render_summary(doc: Mapping[str, Any]) -> str:
    """What the terminal shows: per backend the count of each outcome, then its cases that were
    not clean, by input name (the full matrix is `render_markdown`'s)."""
    counts = doc.get("summary") or summarise(doc)
    columns = [c for c in SUMMARY_COLUMNS if c != "unsupported" or any(s[c] for s in counts.values())]
    rows = [
        [name, f"{s['clean']}/{s['cases'] - s['unsupported']}"] + [s[c] for c in columns[1:]]
        for name, s in counts.items()
    ]
    wall = f" in {doc['wall_s']:g} s" if doc.get("wall_s") is not None else ""
    controls = sum(i["clean"] == "result" for i in doc["inputs"])
    lines = [
        f"Robustness: {len(doc['results'])} cases ({len(counts)} backends x {len(doc['inputs'])} "
        f"inputs, {controls} of them valid controls){wall}{'' if doc.get('complete') else ', INCOMPLETE'}.",
        "",
        markdown_table(["backend", *columns], rows),
    ]
    by_case = {(r["backend"], r["input"]): CaseResult.from_json(r) for r in doc["results"]}
    unclean = [(name, s["not_clean"]) for name, s in counts.items() if s["not_clean"]]
    if unclean:
        lines += ["", "Not clean:"]
        for name, inputs in unclean:
            cells = [
                f"{i} ({cell(by_case[(name, i)]).removeprefix('✗ ').removesuffix(' †')})" for i in inputs
            ]
            lines.append(f"- {name}: " + ", ".join(cells))
    skipped = [b for b in doc["backends"] if not b["available"]]
    if skipped:
        lines += [""] + [f"Not run: {b['spec']}: {b['reason']}" for b in skipped]
    return "\n".join(lines)


def robustness_section(path: str | Path) -> str:
    """The report section for a robustness JSON file (``jagbench robustness --json PATH``)."""
    return render_markdown(load_document(Path(path)))
