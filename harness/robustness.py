"""The robustness matrix: each backend fed each malformed input, with nothing to protect it.

Every (backend, input) runs in its own child process, forked from a forkserver that has torch,
the harness and the backends' modules imported already, so a case costs a fork instead of a
fresh interpreter. The child builds the input from the catalogue (`harness.robustness_inputs`),
calls ``backend.prepare(tables, weights)(batch)`` directly (no `harness.validate`), compares the
bytes of every input tensor before and after, and sends back what happened. The parent enforces
the time limit and classifies:

- ``raised``: the exception's type and the first line of its message;
- ``returned``: which of the input's sensible readings the result equals (none: garbage);
- ``crashed``: the child died, by a signal (its name) or an exit status, with its last log line;
- ``hung``: still running at the time limit, then killed;
- ``unsupported``: ``supports()`` declined even the input's valid base problem;
- ``error``: the harness could not set the case up (a bug here, not the backend's).

Independently, ``mutated`` lists the inputs the backend changed. A case is *clean* when the
backend raised, or returned the IEEE result where the catalogue says that is right (NaN and inf
are values, not errors), and mutated nothing. Results stream to a JSON document as they come.
"""

from __future__ import annotations

import faulthandler
import importlib.metadata
import json
import multiprocessing
import multiprocessing.connection
import os
import platform
import signal
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from harness.backend import BUILTIN_BACKENDS, BackendSpecError, BackendUnavailable, load_backend
from harness.model import total_dim
from harness.robustness_inputs import (
    Catalogue,
    MalformedInput,
    RawProblem,
    ReadingResult,
    build_base,
    build_input,
    load_catalogue,
    matching_readings,
    reading_results,
)

FORMAT = "jagbench-robustness/1"
OWN_BACKENDS = ("numba", "triton")
DEFAULT_TIMEOUT_S = 20.0
DEFAULT_JOBS = 2
OUTCOMES = ("raised", "returned", "crashed", "hung", "unsupported", "error")
_STAGE_MARK = "jagbench-robustness-stage:"
# The libraries that built-in backends import lazily, preloaded into the forkserver when a
# built-in backend other than the light ones is asked for (each costs seconds per fresh import).
_LAZY_LIBRARIES = ("numba", "triton", "torchrec", "fbgemm_gpu.split_table_batched_embeddings_ops_training")
_LIGHT_BUILTINS = ("reference", "torch", "torch-cuda")
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


# --- the child -----------------------------------------------------------------------------------


def _first_line(text: str) -> str:
    lines = [ln for ln in str(text).strip().splitlines() if ln.strip()]
    return lines[0].strip() if lines else ""


def _exception(e: BaseException) -> tuple[str, str]:
    kind = type(e)
    name = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
    return name, _first_line(str(e))


def _input_tensors(p: RawProblem) -> list[tuple[str, torch.Tensor]]:
    out = [(f"table {name!r} weights", w) for name, w in p.weights.items()]
    out += [("batch values", p.batch.values), ("batch lengths", p.batch.lengths)]
    if p.batch.weights is not None:
        out.append(("batch per-sample weights", p.batch.weights))
    return out


def _fingerprint(t: torch.Tensor) -> tuple[Any, ...]:
    """Shape, dtype, strides and the raw bytes (NaN-safe) of a CPU tensor."""
    raw = t.detach().contiguous().view(torch.uint8) if t.numel() else t.detach()
    return (tuple(t.shape), t.dtype, t.stride(), raw.numpy().tobytes())


def _changed(
    before: Sequence[tuple[str, torch.Tensor, tuple[Any, ...]]], stage: str, already: Sequence[str] = ()
) -> list[str]:
    """``"what (in stage)"`` for each tensor whose fingerprint changed, unless reported already."""
    seen = {m.partition(" (in ")[0] for m in already}
    return [f"{what} (in {stage})" for what, t, fp in before if what not in seen and _fingerprint(t) != fp]


def _mark(stage: str) -> None:
    print(f"{_STAGE_MARK}{stage}", flush=True)


def _child(
    conn: Any, spec: str, input_name: str | None, catalogue_path: str, log_path: str, timeout: float
) -> None:
    """Run one case in this (forked) process and send a dict describing what happened.

    Its output goes to ``log_path``; shortly before the time limit every thread's stack is
    dumped there, so a hang says where it hangs.
    """
    os.setpgid(0, 0)  # its own process group: a hang is killed with every process it started
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.dup2(log, 1)
    os.dup2(log, 2)
    faulthandler.dump_traceback_later(max(0.5, timeout - 1.0), exit=False)
    _mark("load")
    try:
        backend = load_backend(spec)
    except BackendUnavailable as e:
        conn.send({"outcome": "unavailable", "message": str(e)})
        return
    except BackendSpecError as e:
        conn.send({"outcome": "error", "stage": "load", "message": str(e)})
        return
    if input_name is None:
        conn.send({"outcome": "available", "name": str(getattr(backend, "name", spec))})
    try:
        catalogue = load_catalogue(Path(catalogue_path))
        if input_name is None:
            bases = {name: build_base(catalogue, name) for name in catalogue.bases}
        else:
            item = catalogue.input(input_name)
            base = build_base(catalogue, item.base)
            problem = build_input(catalogue, item)
    except Exception as e:  # noqa: BLE001 - reported as a harness error, with the traceback logged
        traceback.print_exc()
        conn.send({"outcome": "error", "stage": "setup", "message": "{}: {}".format(*_exception(e))})
        return
    if input_name is None:
        conn.send({name: _run_case(backend, b, b) for name, b in bases.items()})
    else:
        conn.send(_run_case(backend, base, problem))


def _run_case(backend: Any, base: RawProblem, problem: RawProblem) -> dict[str, Any]:
    msg: dict[str, Any] = {"mutated": []}
    _mark("supports")
    try:
        reason = backend.supports(base.tables, base.batch)
    except Exception as e:  # noqa: BLE001 - a backend's exception is the finding
        reason = "supports() raised {}: {}".format(*_exception(e))
    if reason is not None:
        return {"outcome": "unsupported", "message": _first_line(reason)}
    try:
        said = backend.supports(problem.tables, problem.batch)
        msg["supports"] = None if said is None else f"declined: {_first_line(said)}"
    except Exception as e:  # noqa: BLE001
        msg["supports"] = "raised {}: {}".format(*_exception(e))
    before = [(what, t, _fingerprint(t)) for what, t in _input_tensors(problem)]
    stage = "prepare"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            _mark(stage)
            lookup = backend.prepare(problem.tables, problem.weights)
            msg["mutated"] += _changed(before, stage)
            stage = "lookup"
            _mark(stage)
            result = lookup(problem.batch)
            msg["outcome"] = "returned"
            if isinstance(result, torch.Tensor):
                r = result.detach().to("cpu")
                msg["dtype"] = str(r.dtype).removeprefix("torch.")
                msg["result"] = r.to(torch.float64).numpy() if r.is_floating_point() else r.numpy()
            else:
                msg["result_type"] = type(result).__name__
        except Exception as e:  # noqa: BLE001 - a backend's exception is the finding
            msg["outcome"] = "raised"
            msg["exception"], msg["message"] = _exception(e)
        msg["stage"] = stage
        msg["mutated"] += _changed(before, stage, msg["mutated"])
        if caught:
            msg["warning"] = f"{caught[0].category.__name__}: {_first_line(str(caught[0].message))}"
    _mark("done")
    return msg


# --- the parent: isolation and scheduling --------------------------------------------------------


def _preload_modules(specs: Sequence[str]) -> list[str]:
    """Modules the forkserver imports once: torch, the harness and each named backend's module.

    Built-in backends import their optional library lazily (so that they can report it missing),
    so those libraries are named here too when such a backend is asked for; the forkserver skips
    any that is not installed.
    """
    modules = ["torch", "numpy", "harness.robustness", "impls.reference"]
    targets = {b.name: b.target for b in BUILTIN_BACKENDS}
    for spec in specs:
        target = targets.get(spec, spec)
        module = target.partition(":")[0]
        if ":" in target and not module.endswith(".py") and "/" not in module:
            modules.append(module)
        if spec in targets and spec not in _LIGHT_BUILTINS:
            modules += _LAZY_LIBRARIES
    return list(dict.fromkeys(modules))


@dataclass
class _Running:
    key: tuple[str, str | None]
    process: Any
    reader: Any
    log_path: str
    started: float
    timeout: float
    messages: list[Any] = field(default_factory=list)
    eof: bool = False

    def drain(self) -> None:
        """Receive whatever the child has sent so far (it may send more than one message)."""
        while not self.eof and self.reader.poll():
            try:
                self.messages.append(self.reader.recv())
            except (EOFError, OSError):
                self.eof = True


@dataclass(frozen=True)
class _Finished:
    key: tuple[str, str | None]
    messages: list[Any]
    exit_code: int | None
    hung: bool
    seconds: float
    log: str

    @property
    def message(self) -> dict[str, Any] | None:
        return self.messages[-1] if self.messages else None


def _kill_group(pid: int) -> None:
    """SIGKILL the process group the child made for itself (``pid`` is its leader)."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _read_log(path: str) -> str:
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return ""


def _run_isolated(
    tasks: Sequence[tuple[str, str | None]],
    *,
    catalogue_path: Path,
    timeout: float,
    jobs: int,
    on_finished: Callable[[_Finished], None],
) -> None:
    """Run ``_child`` for each (spec, input) task, ``jobs`` at a time, each under ``timeout``."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(_preload_modules([spec for spec, _ in tasks]))
    queue = list(tasks)
    running: list[_Running] = []
    with tempfile.TemporaryDirectory(prefix="jagbench-robustness-") as logs:
        try:
            _schedule(ctx, queue, running, logs, catalogue_path, timeout, jobs, on_finished)
        finally:
            for r in running:  # interrupted: leave nothing behind
                _kill_group(r.process.pid)
                r.process.join()


def _schedule(
    ctx: Any,
    queue: list[tuple[str, str | None]],
    running: list[_Running],
    logs: str,
    catalogue_path: Path,
    timeout: float,
    jobs: int,
    on_finished: Callable[[_Finished], None],
) -> None:
    serial = 0
    while queue or running:
        while queue and len(running) < jobs:
            spec, name = queue.pop(0)
            serial += 1
            log_path = os.path.join(logs, f"{serial}.log")
            reader, writer = ctx.Pipe(duplex=False)
            proc = ctx.Process(
                target=_child,
                args=(writer, spec, name, str(catalogue_path), log_path, timeout),
                daemon=False,  # a backend may start processes of its own (torchrec's sharded ranks)
            )
            proc.start()
            writer.close()
            running.append(_Running((spec, name), proc, reader, log_path, time.monotonic(), timeout))
        nearest = min(r.started + r.timeout for r in running) - time.monotonic()
        waitables = [r.process.sentinel for r in running] + [r.reader for r in running if not r.eof]
        multiprocessing.connection.wait(waitables, timeout=max(0.0, nearest))
        for r in list(running):
            r.drain()
            hung = r.process.is_alive() and time.monotonic() - r.started > r.timeout
            if r.process.is_alive() and not hung:
                continue
            if hung:
                _kill_group(r.process.pid)
            r.process.join()
            _kill_group(r.process.pid)  # whatever the case left running
            r.drain()
            r.reader.close()
            running.remove(r)
            seconds = time.monotonic() - r.started
            log = _read_log(r.log_path)
            on_finished(_Finished(r.key, r.messages, r.process.exitcode, hung, seconds, log))


# --- classification ------------------------------------------------------------------------------


def _log_summary(log: str) -> tuple[str | None, str | None]:
    """The last stage the child marked, and the last line it wrote otherwise."""
    stage = None
    lines = []
    for line in log.splitlines():
        if line.startswith(_STAGE_MARK):
            stage = line.removeprefix(_STAGE_MARK)
        elif line.strip():
            lines.append(line.strip())
    return stage, (lines[-1][:300] if lines else None)


def _signal_name(code: int) -> str:
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"


def classify(
    backend: str,
    item: MalformedInput,
    finished: _Finished,
    readings: Sequence[ReadingResult],
    expected_shape: tuple[int, int] | None = None,
) -> CaseResult:
    """Turn what the child sent (or did not send) into a `CaseResult`."""
    msg = finished.message
    stage, last_line = _log_summary(finished.log)
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
    specs: Sequence[str], catalogue: Catalogue, *, timeout: float = 180.0, jobs: int = DEFAULT_JOBS
) -> tuple[list[BackendEntry], dict[str, list[_Finished]]]:
    """Load each backend in an isolated child and run it on the valid base problems.

    Returns whether each is available (with its name, or why not) and, per available spec, the
    control runs (one `_Finished` per base, in `control_inputs` order). Running the controls first
    also fills JIT caches (numba's disk cache) once, before the short-limit cases. The parent
    never imports a backend's library, so a library that crashes on import cannot take the run down.
    """
    entries: dict[str, BackendEntry] = {}
    controls: dict[str, list[_Finished]] = {}
    bases = list(catalogue.bases)

    def done(f: _Finished) -> None:
        spec = f.key[0]
        first = f.messages[0] if f.messages else {}
        if first.get("outcome") == "unavailable":
            entries[spec] = BackendEntry(
                spec, None, False, str(first.get("message")).removeprefix(f"{spec}: ")
            )
            return
        if first.get("outcome") == "error":
            raise BackendSpecError(str(first.get("message")))
        if first.get("outcome") != "available":
            what = "hung" if f.hung else f"died (exit code {f.exit_code})"
            entries[spec] = BackendEntry(spec, None, False, f"loading it {what}: {_log_summary(f.log)[1]}")
            return
        entries[spec] = BackendEntry(spec, first["name"], True, None)
        per_base = f.messages[1] if len(f.messages) > 1 else None
        controls[spec] = [
            _Finished(f.key, [per_base[b]] if per_base else [], f.exit_code, f.hung, f.seconds, f.log)
            for b in bases
        ]

    _run_isolated(
        [(s, None) for s in specs],
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
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Every available backend of ``specs`` on the controls and every named input; the JSON document.

    With ``json_path`` the document is rewritten after each case, so an interrupted run keeps the
    results so far (``"complete": false``). Unavailable backends are listed with their reason.
    """
    started = time.monotonic()
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
    if progress is not None:
        progress(f"robustness: loading {len(specs)} backends and running them on the valid base problems")
    backends, control_runs = probe_backends(specs, catalogue, jobs=jobs)
    doc = new_document(catalogue, controls + inputs, backends, timeout, jobs)
    name_of = {b.spec: str(b.name) for b in backends}
    unsupported = {
        (spec, item.base): f
        for spec, runs in control_runs.items()
        for item, f in zip(controls, runs, strict=True)
        if f.message is not None and f.message.get("outcome") == "unsupported"
    }
    tasks = [(b.spec, i.name) for b in backends if b.available for i in inputs]
    total = len(tasks) + len(controls) * len(control_runs)

    def record(spec: str, name: str, f: _Finished) -> None:
        res = classify(name_of[spec], items[name], f, readings[name], shapes[name])
        doc["results"].append(res.to_json())
        if json_path is not None:
            write_document(doc, json_path)
        if progress is not None:
            progress(f"robustness {len(doc['results'])}/{total}: {res.backend} on {res.input}: {res.outcome}")

    for spec, runs in control_runs.items():
        for item, f in zip(controls, runs, strict=True):
            record(spec, item.name, f)
    for spec, name in list(tasks):
        declined = unsupported.get((spec, items[name].base))
        if declined is not None:
            tasks.remove((spec, name))
            record(spec, name, declined)
    if json_path is not None:
        write_document(doc, json_path)
    _run_isolated(
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
    if json_path is not None:
        write_document(doc, json_path)
    return doc


def unclean_own(doc: Mapping[str, Any], own: Sequence[str] = OWN_BACKENDS) -> list[CaseResult]:
    """The cases where one of our own backends was not clean."""
    results = [CaseResult.from_json(r) for r in doc["results"]]
    return [r for r in results if r.backend in own and r.clean is False]
