"""Running robustness cases in isolated child processes: the child's side and the scheduler.

A `Task` is one backend and the inputs to feed it (or ``None``: the *probe*, which loads the
backend and runs it on the valid base problems). Each task runs in a child process forked from a
forkserver that has imported torch, the harness, the backends' modules and their lazily imported
libraries once, so a child costs a fork instead of a fresh interpreter. The child calls
``backend.prepare(tables, weights)(batch)`` directly (no `harness.validate`), compares the bytes
of every input tensor before and after, and reports over a pipe:

- ``("start", input)`` and ``("done", input, what happened)`` around each input, one after
  another, then ``("end",)``;
- the probe: ``("available", name)`` or ``("unavailable", why)`` or ``("error", why)``, then
  ``("controls", {base: what happened})`` and ``("processes", [pids])``: the processes the backend
  started and kept (a rank pool, say), which decides how its inputs are run (`harness.robustness.matrix`).

The parent holds every case to its own time limit, from its ``start``. A child that dies during a
case is that case's crash, one still running at the limit is that case's hang (killed with its
whole process group, every process it started included); the inputs it had not reached go to a
fresh child. The child's output goes to a log, marked by case and by stage.
"""

from __future__ import annotations

import faulthandler
import gc
import multiprocessing
import multiprocessing.connection
import os
import signal
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from harness.backend import (
    BUILTIN_BACKENDS,
    BackendSpecError,
    BackendUnavailable,
    load_backend,
    undeclared_dtypes,
)
from harness.quantized import QuantizedTable
from harness.robustness.inputs import RawProblem, build_base, build_input, load_catalogue

_STAGE_MARK = "jagbench-robustness-stage:"
_CASE_MARK = "jagbench-robustness-case:"
# The libraries that built-in backends import lazily, by the start of the backend's name,
# preloaded into the forkserver when such a backend is asked for (each costs seconds per fresh import).
_TORCHREC = ("torchrec", "fbgemm_gpu.split_table_batched_embeddings_ops_training")
_LAZY_LIBRARIES = {"numba": ("numba",), "triton": ("triton",), "torchrec": _TORCHREC, "fbgemm": _TORCHREC}
# After its last report a child may take this long to exit by itself (its exit handlers unlink
# what it registered, e.g. numba's multiprocessing lock); then its process group is killed.
EXIT_GRACE_S = 2.0


@dataclass(frozen=True)
class Task:
    """One child's work: a backend spec and the inputs to feed it in order (``None``: the probe)."""

    spec: str
    inputs: tuple[str, ...] | None


@dataclass(frozen=True)
class Finished:
    """What the parent knows of one case (or of one probe) once it is over.

    ``messages`` is empty when the child died or hung before reporting; ``log`` is the part of
    the child's output that belongs to this case.
    """

    key: tuple[str, str | None]
    messages: list[Any]
    exit_code: int | None
    hung: bool
    seconds: float
    log: str

    @property
    def message(self) -> Any:
        return self.messages[-1] if self.messages else None


# --- the child -----------------------------------------------------------------------------------


def first_line(text: str) -> str:
    lines = [ln for ln in str(text).strip().splitlines() if ln.strip()]
    return lines[0].strip() if lines else ""


def _exception(e: BaseException) -> tuple[str, str]:
    kind = type(e)
    name = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
    return name, first_line(str(e))


def _input_tensors(p: RawProblem) -> list[tuple[str, torch.Tensor]]:
    out = []
    for name, w in p.weights.items():
        if isinstance(w, QuantizedTable):
            out += [(f"table {name!r} {part}", getattr(w, part)) for part in ("codes", "scale", "bias")]
        else:
            out.append((f"table {name!r} weights", w))
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


def _child_processes() -> list[int]:
    """The pids of this process's live children (``/proc``; else those `multiprocessing` knows)."""
    pids: set[int] = set()
    try:
        for tid in os.listdir("/proc/self/task"):
            pids.update(int(p) for p in Path(f"/proc/self/task/{tid}/children").read_text().split())
    except OSError:
        pids = {p.pid for p in multiprocessing.active_children() if p.pid is not None}
    return sorted(pids)


def _child(
    conn: Any,
    spec: str,
    inputs: tuple[str, ...] | None,
    catalogue_path: str,
    log_path: str,
    timeout: float,
) -> None:
    """Run a task in this (forked) process, reporting each step over ``conn`` (module docstring).

    Its output goes to ``log_path``; shortly before each case's time limit every thread's stack
    is dumped there, so a hang says where it hangs.
    """
    os.setpgid(0, 0)  # its own process group: a hang is killed with every process it started
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.dup2(log, 1)
    os.dup2(log, 2)
    faulthandler.dump_traceback_later(max(0.5, timeout - 1.0), exit=False)
    _mark("load")
    failed: tuple[str, str] | None = None
    try:
        backend = load_backend(spec)
        catalogue = load_catalogue(Path(catalogue_path))
    except BackendUnavailable as e:
        failed = ("unavailable", str(e))
    except BackendSpecError as e:
        failed = ("error", str(e))
    except Exception as e:  # noqa: BLE001 - reported as a harness error, with the traceback logged
        traceback.print_exc()
        failed = ("error", "{}: {}".format(*_exception(e)))
    if failed is not None:
        for name in inputs or ():
            conn.send(("done", name, {"outcome": "error", "stage": "load", "message": failed[1]}))
        if inputs is None:
            conn.send(failed)
        conn.send(("end",))
        return
    if inputs is None:
        _probe(conn, backend, spec, catalogue)
    else:
        faulthandler.cancel_dump_traceback_later()
        for name in inputs:
            conn.send(("start", name))
            print(f"{_CASE_MARK}{name}", flush=True)
            faulthandler.dump_traceback_later(max(0.5, timeout - 1.0), exit=False)
            msg = _run_input(backend, catalogue, name)
            gc.collect()  # the case's lookup goes now, with what the backend kept for it: its crash
            faulthandler.cancel_dump_traceback_later()
            conn.send(("done", name, msg))
    conn.send(("end",))


def _probe(conn: Any, backend: Any, spec: str, catalogue: Any) -> None:
    conn.send(("available", str(getattr(backend, "name", spec))))
    try:
        bases = {name: build_base(catalogue, name) for name in catalogue.bases}
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        conn.send(("error", "{}: {}".format(*_exception(e))))
        return
    conn.send(("controls", {name: _run_case(backend, b, b) for name, b in bases.items()}))
    gc.collect()
    conn.send(("processes", _child_processes()))


def _run_input(backend: Any, catalogue: Any, name: str) -> dict[str, Any]:
    try:
        item = catalogue.input(name)
        base = build_base(catalogue, item.base)
        problem = build_input(catalogue, item)
    except Exception as e:  # noqa: BLE001 - reported as a harness error, with the traceback logged
        traceback.print_exc()
        return {"outcome": "error", "stage": "setup", "message": "{}: {}".format(*_exception(e))}
    return _run_case(backend, base, problem)


def _run_case(backend: Any, base: RawProblem, problem: RawProblem) -> dict[str, Any]:
    msg: dict[str, Any] = {"mutated": []}
    undeclared = undeclared_dtypes(backend, base.tables)
    if undeclared is not None:
        return {"outcome": "unsupported", "message": undeclared}
    _mark("supports")
    try:
        reason = backend.supports(base.tables, base.batch)
    except Exception as e:  # noqa: BLE001 - a backend's exception is the finding
        reason = "supports() raised {}: {}".format(*_exception(e))
    if reason is not None:
        return {"outcome": "unsupported", "message": first_line(reason)}
    try:
        said = backend.supports(problem.tables, problem.batch)
        msg["supports"] = None if said is None else f"declined: {first_line(said)}"
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
            msg["warning"] = f"{caught[0].category.__name__}: {first_line(str(caught[0].message))}"
    _mark("done")
    return msg


# --- the parent: isolation and scheduling --------------------------------------------------------


def preload_modules(specs: Sequence[str]) -> list[str]:
    """Modules the forkserver imports once: torch, the harness and each named backend's module.

    Built-in backends import their optional library lazily (so that they can report it missing),
    so those libraries are named here too when such a backend is asked for; the forkserver skips
    any that is not installed.
    """
    modules = ["torch", "numpy", "harness.robustness.runner", "impls.reference"]
    targets = {b.name: b.target for b in BUILTIN_BACKENDS}
    for spec in specs:
        target = targets.get(spec, spec)
        module = target.partition(":")[0]
        if ":" in target and not module.endswith(".py") and "/" not in module:
            modules.append(module)
        if spec in targets:
            modules += [
                m for prefix, libs in _LAZY_LIBRARIES.items() if spec.startswith(prefix) for m in libs
            ]
    return list(dict.fromkeys(modules))


@dataclass
class _Running:
    task: Task
    process: Any
    reader: Any
    log_path: str
    timeout: float
    since: float
    """When the time limit now running started: the child's start, its case's, or its last report."""
    started: float
    todo: list[str]
    current: str | None = None
    messages: list[Any] = field(default_factory=list)
    ended: bool = False
    eof: bool = False


# How long `kill_group` waits for the killed group's processes to be gone.
KILL_WAIT_S = 5.0


def kill_group(pid: int) -> None:
    """SIGKILL the process group the child made for itself (``pid`` is its leader), and wait (up to
    `KILL_WAIT_S`) until none of its processes is still running: a SIGKILL takes effect when its
    target is next scheduled, which on a busy machine came after the matrix had returned (a
    process it started, such as a backend's helper, was then still alive)."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        return
    deadline = time.monotonic() + KILL_WAIT_S
    while _group_running(pid) and time.monotonic() < deadline:
        time.sleep(0.005)


def _group_running(pgid: int) -> bool:
    """Whether a process of group ``pgid`` runs still (a zombie has ended: it only awaits its
    parent's wait). Where there is no ``/proc`` this cannot be told, and it says no."""
    try:
        entries = os.listdir("/proc")
    except OSError:
        return False
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # ended while we looked
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def _read_log(path: str) -> str:
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return ""


def _case_log(log: str, name: str | None) -> str:
    """The part of a child's log from input ``name``'s mark on (all of it for the probe)."""
    if name is None:
        return log
    mark = f"{_CASE_MARK}{name}\n"
    at = log.rfind(mark)
    return log[at + len(mark) :] if at >= 0 else log


def log_summary(log: str) -> tuple[str | None, str | None]:
    """The last stage the child marked, and the last line it wrote otherwise."""
    stage = None
    lines = []
    for line in log.splitlines():
        if line.startswith(_STAGE_MARK):
            stage = line.removeprefix(_STAGE_MARK)
        elif line.strip() and not line.startswith(_CASE_MARK):
            lines.append(line.strip())
    return stage, (lines[-1][:300] if lines else None)


def run_isolated(
    tasks: Sequence[Task],
    *,
    catalogue_path: Path,
    timeout: float,
    jobs: int,
    on_finished: Callable[[Finished], None],
) -> None:
    """Run each task in its own child, ``jobs`` children at a time, each case under ``timeout``.

    ``on_finished`` gets each case as soon as it is over (and each probe when its child is),
    keyed ``(spec, input)`` (``(spec, None)`` for a probe). Tasks start in the order given.
    """
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(preload_modules([t.spec for t in tasks]))
    queue = list(tasks)
    running: list[_Running] = []
    with tempfile.TemporaryDirectory(prefix="jagbench-robustness-") as logs:
        try:
            _schedule(ctx, queue, running, logs, catalogue_path, timeout, jobs, on_finished)
        finally:
            for r in running:  # interrupted: leave nothing behind
                kill_group(r.process.pid)
                r.process.join()


def _schedule(
    ctx: Any,
    queue: list[Task],
    running: list[_Running],
    logs: str,
    catalogue_path: Path,
    timeout: float,
    jobs: int,
    on_finished: Callable[[Finished], None],
) -> None:
    serial = 0
    while queue or running:
        while queue and len(running) < jobs:
            task = queue.pop(0)
            serial += 1
            log_path = os.path.join(logs, f"{serial}.log")
            reader, writer = ctx.Pipe(duplex=False)
            proc = ctx.Process(
                target=_child,
                args=(writer, task.spec, task.inputs, str(catalogue_path), log_path, timeout),
                daemon=False,  # a backend may start processes of its own (torchrec's sharded ranks)
            )
            proc.start()
            writer.close()
            now = time.monotonic()
            running.append(_Running(task, proc, reader, log_path, timeout, now, now, list(task.inputs or ())))
        nearest = min(r.since + r.timeout for r in running) - time.monotonic()
        waitables = [r.process.sentinel for r in running] + [r.reader for r in running if not r.eof]
        multiprocessing.connection.wait(waitables, timeout=max(0.0, nearest))
        for r in list(running):
            _drain(r, on_finished)
            overdue = r.process.is_alive() and time.monotonic() - r.since > r.timeout
            if r.process.is_alive() and not overdue:
                continue
            hung = overdue and not r.ended
            kill_group(r.process.pid)  # hung, or slow to exit, or gone: whatever it started goes too
            r.process.join()
            _drain(r, on_finished)
            r.reader.close()
            running.remove(r)
            queue[:0] = _finish(r, hung, on_finished)


def _drain(r: _Running, on_finished: Callable[[Finished], None]) -> None:
    """Receive what the child has sent so far and pass on every case it finished."""
    while not r.eof and r.reader.poll():
        try:
            msg = r.reader.recv()
        except (EOFError, OSError):
            r.eof = True
            break
        now = time.monotonic()
        kind = msg[0]
        if kind == "start":
            r.current, r.since = msg[1], now
        elif kind == "done":
            name = msg[1]
            seconds = now - r.since
            r.todo.remove(name)
            r.current, r.since = None, now
            log = _case_log(_read_log(r.log_path), name)
            on_finished(Finished((r.task.spec, name), [msg[2]], None, False, seconds, log))
        elif kind == "end":
            r.ended, r.since, r.timeout = True, now, EXIT_GRACE_S
        else:
            r.messages.append(msg)


def _finish(r: _Running, hung: bool, on_finished: Callable[[Finished], None]) -> list[Task]:
    """Record what a child that is gone left unreported; return the task of the inputs it left."""
    code = r.process.exitcode
    now = time.monotonic()
    log = _read_log(r.log_path)
    spec = r.task.spec
    if r.task.inputs is None:
        on_finished(Finished((spec, None), r.messages, code, hung, now - r.started, log))
        return []
    if r.current is not None:
        case = r.current
        on_finished(Finished((spec, case), [], code, hung, now - r.since, _case_log(log, case)))
        rest = tuple(n for n in r.todo if n != case)
        return [Task(spec, rest)] if rest else []
    what = "hung" if hung else f"died (exit status {code})"
    for name in r.todo:  # it stopped between two cases: none of them is to blame
        message = f"the child running {spec!r} {what} before this input started: {log_summary(log)[1]}"
        on_finished(Finished((spec, name), [{"outcome": "error", "message": message}], code, hung, 0.0, log))
    return []
