"""The robustness matrix: each backend fed each malformed input, with nothing to protect it.

Each (backend, input) runs in a child process (`harness.robustness.runner`): the child builds the
input from the catalogue (`harness.robustness.inputs`), calls ``backend.prepare(tables,
weights)(batch)`` directly (no `harness.validate`), compares the bytes of every input tensor
before and after, and sends back what happened. The parent enforces each case's time limit and
classifies:

- ``raised``: the exception's type and the first line of its message;
- ``returned``: which of the input's sensible readings the result equals (none: garbage);
- ``crashed``: the child died, by a signal (its name) or an exit status, with its last log line;
- ``hung``: still running at the time limit, then killed;
- ``unsupported``: ``supports()`` declined even the input's valid base problem;
- ``error``: the harness could not set the case up (a bug here, not the backend's).

Independently, ``mutated`` lists the inputs the backend changed. A case is *clean* when the
backend raised, or returned the IEEE result where the catalogue says that is right (NaN and inf
are values, not errors), and mutated nothing. Results stream to a JSON document as they come.

How the cases are spread over children: a backend that runs in this process alone gets a fresh
child per case (a fork: cheap). A backend that starts processes of its own and keeps them (the
probe sees them: torchrec's sharded rank pools) gets one child for all its inputs, one after
another, so its workers are started once, as they are in production, and restarted only when a
case broke them; a crash or hang still costs only that case, and the inputs after it go to a
fresh child. ``process_per_case=True`` gives every case its own child whatever the backend.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import signal
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from harness.backend import BackendSpecError
from harness.model import total_dim
from harness.progress import Progress
from harness.robustness.inputs import (
    Catalogue,
    MalformedInput,
    ReadingResult,
    build_base,
    build_input,
    load_catalogue,
    matching_readings,
    reading_results,
)
from harness.robustness.runner import Finished, Task, log_summary, run_isolated

FORMAT = "jagbench-robustness/1"
OWN_BACKENDS = ("numba", "triton")
DEFAULT_TIMEOUT_S = 20.0
DEFAULT_JOBS = 2
OUTCOMES = ("raised", "returned", "crashed", "hung", "unsupported", "error")
_VERSIONED = ("torch", "numpy", "numba", "triton", "torchrec", "fbgemm-gpu-cpu", "fbgemm-gpu")


@dataclass
class CaseResult:
    """What one backend did with one malformed input (the JSON ``results`` entries)."""

    backend: str
    input: str
    outcome: str
    stage: str | None = None
    exception: str | None = None
    message: str | None = None
    signal: str | None = None
    exit_code: int | None = None
    readings: list[str] | None = None
    result_note: str | None = None
    mutated: list[str] = field(default_factory=list)
    warning: str | None = None
    supports: str | None = None
    log_tail: str | None = None
    seconds: float = 0.0
    clean: bool | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> CaseResult:
        return cls(**dict(d))


# --- classification ------------------------------------------------------------------------------


def _signal_name(code: int) -> str:
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"


def classify(
    backend: str,
    item: MalformedInput,
    finished: Finished,
    readings: Sequence[ReadingResult],
    expected_shape: tuple[int, int] | None = None,
) -> CaseResult:
    """Turn what the child sent (or did not send) into a `CaseResult`."""
    msg = finished.message
    stage, last_line = log_summary(finished.log)
    res = CaseResult(backend, item.name, "error", seconds=round(finished.seconds, 3))
    if finished.hung:
        res.outcome, res.stage, res.log_tail = "hung", stage, last_line
    elif msg is None:
        code = finished.exit_code
        res.outcome, res.stage, res.log_tail, res.exit_code = "crashed", stage, last_line, code
        if code is not None and code < 0:
            res.signal = _signal_name(code)
    else:
        res.outcome = msg["outcome"]
        res.stage = msg.get("stage", stage)
        res.exception = msg.get("exception")
        res.message = msg.get("message")
        res.mutated = list(msg.get("mutated", []))
        res.warning = msg.get("warning")
        res.supports = msg.get("supports")
        if res.outcome == "error":
            res.log_tail = last_line
        if res.outcome == "returned":
            _judge_result(res, msg, readings, expected_shape)
    res.clean = is_clean(res, item)
    return res


def _judge_result(
    res: CaseResult,
    msg: Mapping[str, Any],
    readings: Sequence[ReadingResult],
    expected_shape: tuple[int, int] | None,
) -> None:
    if "result" not in msg:
        res.readings, res.result_note = [], f"returned a {msg.get('result_type')}, not a tensor"
        return
    result = torch.from_numpy(np.asarray(msg["result"]))
    notes = []
    if msg.get("dtype") != "float32":
        notes.append(f"dtype {msg.get('dtype')}")
    if expected_shape is not None and tuple(result.shape) != expected_shape:
        notes.append(f"shape {tuple(result.shape)}, expected {expected_shape}")
    res.readings = []
    if result.is_floating_point():
        res.readings, nearest = matching_readings(result, readings)
        if nearest is not None:
            notes.append(nearest)
    res.result_note = "; ".join(notes) or None


def is_clean(res: CaseResult, item: MalformedInput) -> bool | None:
    """Raised (with a message), or returned the IEEE result where that is right; mutated nothing.

    A control input (``clean == "result"``) must return its reference result.

    ``None`` where the question does not arise (the backend does not support the base problem).
    """
    if res.outcome == "unsupported":
        return None
    if res.mutated:
        return False
    if res.outcome == "raised":
        return item.clean != "result" and bool(res.message)
    if res.outcome == "returned":
        return item.clean in ("as-given", "result") and "as-given" in (res.readings or [])
    return False


# --- the matrix and its JSON document ------------------------------------------------------------


@dataclass
class BackendEntry:
    spec: str
    name: str | None
    available: bool
    reason: str | None
    keeps_processes: bool = False
    """It started processes of its own in the probe and still had them after its lookups."""


def control_inputs(catalogue: Catalogue) -> list[MalformedInput]:
    """Each valid base problem as a control row: a backend must return its reference result."""
    return [
        MalformedInput(
            f"valid-{name}",
            f"the valid base problem {name!r}, unchanged (control: must return the reference result)",
            name,
            (),
            ("as-given",),
            "result",
        )
        for name in catalogue.bases
    ]


def probe_backends(
    specs: Sequence[str],
    catalogue: Catalogue,
    *,
    timeout: float = 180.0,
    jobs: int = DEFAULT_JOBS,
    progress: Progress | None = None,
) -> tuple[list[BackendEntry], dict[str, list[Finished]]]:
    """Load each backend in an isolated child and run it on the valid base problems.

    Returns whether each is available (with its name, or why not) and, per available spec, the
    control runs (one `Finished` per base, in `control_inputs` order). Running the controls first
    also fills JIT caches (numba's disk cache) once, before the short-limit cases. The parent
    never imports a backend's library, so a library that crashes on import cannot take the run down.
    """
    entries: dict[str, BackendEntry] = {}
    controls: dict[str, list[Finished]] = {}
    bases = list(catalogue.bases)
    progress = progress or Progress()

    def done(f: Finished) -> None:
        spec = f.key[0]
        progress.update(len(entries) + 1, last=spec)
        said = {m[0]: m[1] for m in f.messages}
        if "unavailable" in said:
            entries[spec] = BackendEntry(
                spec, None, False, str(said["unavailable"]).removeprefix(f"{spec}: ")
            )
            return
        if "error" in said:
            raise BackendSpecError(str(said["error"]))
        if "available" not in said:
            what = "hung" if f.hung else f"died (exit code {f.exit_code})"
            entries[spec] = BackendEntry(spec, None, False, f"loading it {what}: {log_summary(f.log)[1]}")
            return
        entries[spec] = BackendEntry(spec, said["available"], True, None, bool(said.get("processes")))
        per_base = said.get("controls")
        controls[spec] = [
            Finished(f.key, [per_base[b]] if per_base else [], f.exit_code, f.hung, f.seconds, f.log)
            for b in bases
        ]

    run_isolated(
        [Task(s, None) for s in specs],
        catalogue_path=catalogue.path,
        timeout=timeout,
        jobs=jobs,
        on_finished=done,
    )
    return [entries[s] for s in specs], controls


def _versions() -> dict[str, str]:
    out = {}
    for dist in _VERSIONED:
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def new_document(
    catalogue: Catalogue,
    inputs: Sequence[MalformedInput],
    backends: Sequence[BackendEntry],
    timeout: float,
    jobs: int,
    process_per_case: bool = False,
) -> dict[str, Any]:
    """The JSON envelope: machine, versions, settings, inputs, backends; results fill in as they come."""
    return {
        "format": FORMAT,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "node": platform.node(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
        },
        "versions": _versions(),
        "timeout_s": timeout,
        "jobs": jobs,
        "process_per_case": process_per_case,
        "catalogue": str(catalogue.path),
        "inputs": [{"name": i.name, "description": i.description, "clean": i.clean} for i in inputs],
        "backends": [asdict(b) for b in backends],
        "results": [],
        "complete": False,
        "wall_s": None,
    }


def write_document(doc: Mapping[str, Any], path: Path) -> None:
    """Write atomically (temp file, then rename), so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(doc, f, indent=1, allow_nan=False)
        f.write("\n")
    os.replace(tmp, path)


def load_document(path: Path) -> dict[str, Any]:
    doc = json.loads(Path(path).read_text())
    if doc.get("format") != FORMAT:
        raise ValueError(f"{path}: format {doc.get('format')!r}, expected {FORMAT!r}")
    return doc


def run_matrix(
    specs: Sequence[str],
    input_names: Sequence[str] | None = None,
    *,
    catalogue: Catalogue | None = None,
    timeout: float = DEFAULT_TIMEOUT_S,
    jobs: int = DEFAULT_JOBS,
    json_path: Path | None = None,
    progress: Progress | None = None,
    process_per_case: bool = False,
) -> dict[str, Any]:
    """Every available backend of ``specs`` on the controls and every named input; the JSON document.

    With ``json_path`` the document is rewritten after each case, so an interrupted run keeps the
    results so far (``"complete": false``). Unavailable backends are listed with their reason.
    A backend that keeps processes of its own runs all its inputs in one child (module docstring)
    unless ``process_per_case``; those children start first, being the longest.
    """
    started = time.monotonic()
    progress = progress or Progress()
    catalogue = catalogue or load_catalogue()
    controls = control_inputs(catalogue)
    inputs = catalogue.select(input_names)
    items = {i.name: i for i in controls + inputs}
    readings: dict[str, list[ReadingResult]] = {}
    shapes: dict[str, tuple[int, int]] = {}
    for i in items.values():
        base = build_base(catalogue, i.base)
        readings[i.name] = reading_results(build_input(catalogue, i), i.readings)
        shapes[i.name] = (base.batch.batch_size, total_dim(base.tables))
    progress.start("robustness: loading the backends", total=len(specs), unit="backends")
    backends, control_runs = probe_backends(specs, catalogue, jobs=jobs, progress=progress)
    doc = new_document(catalogue, controls + inputs, backends, timeout, jobs, process_per_case)
    name_of = {b.spec: str(b.name) for b in backends}
    unsupported = {
        (spec, item.base): f
        for spec, runs in control_runs.items()
        for item, f in zip(controls, runs, strict=True)
        if f.message is not None and f.message.get("outcome") == "unsupported"
    }
    todo = {b.spec: [i.name for i in inputs] for b in backends if b.available}
    total = sum(len(names) for names in todo.values()) + len(controls) * len(control_runs)
    progress.start("robustness", total=total, unit="cases")
    not_clean = 0

    def record(spec: str, name: str, f: Finished) -> None:
        nonlocal not_clean
        res = classify(name_of[spec], items[name], f, readings[name], shapes[name])
        doc["results"].append(res.to_json())
        not_clean += res.clean is False
        if json_path is not None:
            write_document(doc, json_path)
        progress.update(len(doc["results"]), not_clean=not_clean, last=f"{res.backend} on {res.input}")

    for spec, runs in control_runs.items():
        for item, f in zip(controls, runs, strict=True):
            record(spec, item.name, f)
    for spec, names in todo.items():
        for name in list(names):
            declined = unsupported.get((spec, items[name].base))
            if declined is not None:
                names.remove(name)
                record(spec, name, declined)
    if json_path is not None:
        write_document(doc, json_path)
    shared = {b.spec for b in backends if b.keeps_processes and not process_per_case}
    tasks = [Task(spec, tuple(names)) for spec, names in todo.items() if spec in shared and names]
    tasks += [Task(spec, (name,)) for spec, names in todo.items() if spec not in shared for name in names]
    run_isolated(
        tasks,
        catalogue_path=catalogue.path,
        timeout=timeout,
        jobs=jobs,
        on_finished=lambda f: record(f.key[0], str(f.key[1]), f),
    )
    order = {name: n for n, name in enumerate(items)}
    backend_order = {name_of[b.spec]: n for n, b in enumerate(backends) if b.available}
    doc["results"].sort(key=lambda r: (order[r["input"]], backend_order[r["backend"]]))
    doc["complete"] = True
    doc["wall_s"] = round(time.monotonic() - started, 1)
    doc["summary"] = summarise(doc)
    if json_path is not None:
        write_document(doc, json_path)
    progress.finish()
    return doc


SUMMARY_COLUMNS = ("clean", "raised", "silent", "crashed", "hung", "mutated", "unsupported")


def summarise(doc: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Per backend: cases, clean, raised, silent (returned, not clean), crashed, hung, mutated,
    unsupported, and the inputs it was not clean on (the ``summary`` of a complete document)."""
    out: dict[str, dict[str, Any]] = {}
    for b in doc["backends"]:
        if b["available"]:
            out[b["name"]] = {"cases": 0, **dict.fromkeys(SUMMARY_COLUMNS, 0), "not_clean": []}
    for r in doc["results"]:
        s = out[r["backend"]]
        s["cases"] += 1
        s["clean"] += r["clean"] is True
        s["raised"] += r["outcome"] == "raised"
        s["silent"] += r["outcome"] == "returned" and r["clean"] is False
        s["crashed"] += r["outcome"] == "crashed"
        s["hung"] += r["outcome"] == "hung"
        s["mutated"] += bool(r["mutated"])
        s["unsupported"] += r["outcome"] == "unsupported"
        if r["clean"] is False:
            s["not_clean"].append(r["input"])
    return out


def unclean_own(doc: Mapping[str, Any], own: Sequence[str] = OWN_BACKENDS) -> list[CaseResult]:
    """The cases where one of our own backends was not clean."""
    results = [CaseResult.from_json(r) for r in doc["results"]]
    return [r for r in results if r.backend in own and r.clean is False]
