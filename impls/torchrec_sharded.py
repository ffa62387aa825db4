"""torchrec's sharded ``EmbeddingBagCollection`` over ``torch.distributed``, as N local ranks.

``TorchrecSharded(sharding_type, world_size=2)`` shards the problem's tables with an explicit
plan (see `impls.torchrec_sharded_worker`), loads the same weights into the shards through the
sharded module's ``state_dict()`` (each rank copies its ShardedTensor local shards, then reads them
back), feeds each rank its contiguous slice of the batch's samples and concatenates the ranks'
pooled outputs in rank order: the contract's ``[B, total_dim]`` float32.

The ranks are spawned once per world size (`RankPool`, lazily at the first ``prepare``, outside
any timing) and kept for every later problem and lookup: a new problem's tables are re-sharded in
the same processes. They run gloo on the CPU. Shutdown is explicit (`shutdown_pools`), at
interpreter exit (``weakref.finalize``), on a rank's failure, and on Ctrl-C while waiting; a rank
also exits by itself when its parent dies. Every wait has a timeout.

Batch slicing: rank ``r`` gets samples ``sample_ranges(B, N)[r]`` (the first ``B % N`` ranks one
more). A rank with no samples would hand torchrec an empty KeyedJaggedTensor, which it rejects
(cases/known/torchrec-kjt-batch-size-0-raises.json), so ``supports`` declines batches smaller than
the world size, batch 0 included.
"""

from __future__ import annotations

import importlib.util
import itertools
import multiprocessing as mp
import multiprocessing.connection as mpc
import os
import tempfile
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from harness.backend import BackendUnavailable, Lookup
from harness.model import JaggedBatch, TableConfig, total_dim
from impls import torchrec_sharded_worker as worker

START_TIMEOUT_S = 180.0
CALL_TIMEOUT_S = 300.0
STOP_GRACE_S = 5.0
AFTER_ERROR_S = 20.0

SHORT_NAMES = {
    "tw": "table_wise",
    "rw": "row_wise",
    "cw": "column_wise",
    "twcw": "table_column_wise",
    "dp": "data_parallel",
}


class RankPool:
    """``world_size`` spawned ranks in one gloo process group, driven over pipes."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        ctx = mp.get_context("spawn")
        import torch.distributed as dist

        # The rendezvous store lives in this process (a free port picked by the OS): no file to
        # leave behind, no port to guess; it goes away with the pool or with this process.
        self._store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
        store_port = self._store.port
        self._conns: list[Any] = []
        self._procs: list[Any] = []
        self._finalizer = weakref.finalize(self, _stop, self._procs, self._conns)
        self._keys = itertools.count()
        self._released: list[int] = []
        try:
            for rank in range(world_size):
                parent_end, child_end = ctx.Pipe()
                self._conns.append(parent_end)
                proc = ctx.Process(
                    target=worker.serve,
                    args=(rank, world_size, store_port, child_end, os.getpid()),
                    name=f"jagbench-sharded-rank{rank}",
                    daemon=True,
                )
                proc.start()
                child_end.close()
                self._procs.append(proc)
        except BaseException as e:
            self.close()
            if isinstance(e, AssertionError):  # multiprocessing's "daemonic processes are not allowed..."
                raise RuntimeError(f"torchrec-sharded cannot start its ranks from this process: {e}") from e
            raise
        self.pids = [r["pid"] for r in self._gather("starting", START_TIMEOUT_S)]

    @property
    def alive(self) -> bool:
        return self._finalizer.alive and all(p.is_alive() for p in self._procs)

    def close(self) -> None:
        """Stop every rank (a polite ``stop``, then terminate, then kill) and wait for them."""
        self._finalizer()

    def call(
        self, what: str, messages: Sequence[tuple[Any, ...]], timeout: float = CALL_TIMEOUT_S
    ) -> list[Any]:
        """Send ``messages[r]`` to rank ``r`` and return every rank's reply.

        A rank that reports an error or dies, a timeout, or an interrupt (Ctrl-C) while waiting
        stops the whole pool; the error names the rank and carries its traceback.
        """
        if not self._finalizer.alive:
            raise RuntimeError("the torchrec-sharded rank pool was shut down")
        if self._released:
            released, self._released = self._released, []
            self._send([("release", released)] * self.world_size)
            self._gather("releasing models", timeout)
        self._send(messages)
        return self._gather(what, timeout)

    def new_key(self) -> int:
        return next(self._keys)

    def release_later(self, key: int) -> None:
        """Forget model ``key`` on every rank with the next call (safe from a finalizer)."""
        self._released.append(key)

    def _send(self, messages: Sequence[tuple[Any, ...]]) -> None:
        try:
            for conn, msg in zip(self._conns, messages, strict=True):
                conn.send(msg)
        except BaseException as e:
            self.close()
            if isinstance(e, (BrokenPipeError, EOFError, OSError)):
                raise RuntimeError(f"torchrec-sharded: a rank is gone ({e}); the pool was stopped") from e
            raise

    def _gather(self, what: str, timeout: float) -> list[Any]:
        """Every rank's reply. A rank's error waits (briefly) for the others' answers: if all answer,
        the pool stays up; a rank that dies, hangs or is interrupted stops the whole pool."""
        replies: dict[int, Any] = {}
        errors: list[str] = []
        broken: list[str] = []
        try:
            pending = {conn: rank for rank, conn in enumerate(self._conns)}
            sentinels = {p.sentinel: rank for rank, p in enumerate(self._procs)}
            while pending and not broken:
                wait_s = min(timeout, AFTER_ERROR_S) if errors else timeout
                ready = mpc.wait(list(pending) + list(sentinels), wait_s)
                if not ready:
                    broken.append(f"ranks {sorted(pending.values())} did not answer within {wait_s:.0f} s")
                for obj in ready:
                    if obj in pending:
                        rank = pending[obj]
                        try:
                            status, payload = obj.recv()
                        except (EOFError, OSError):
                            continue
                        del pending[obj]
                        if status == "ok":
                            replies[rank] = payload
                        else:
                            errors.append(f"rank {rank} raised:\n{payload}")
                    elif obj in sentinels and sentinels[obj] in pending.values():
                        rank = sentinels[obj]
                        proc = self._procs[rank]
                        proc.join(STOP_GRACE_S)
                        broken.append(f"rank {rank} (pid {proc.pid}) exited with code {proc.exitcode}")
        except BaseException:
            self.close()
            raise
        if broken:
            self.close()
            raise RuntimeError(
                f"torchrec-sharded ({self.world_size} ranks) failed while {what}; the rank pool was "
                "stopped and restarts with the next prepare.\n" + "\n".join(broken + errors)
            )
        if errors:
            raise RuntimeError(
                f"torchrec-sharded ({self.world_size} ranks) failed while {what}.\n" + errors[0]
            )
        return [replies[r] for r in range(self.world_size)]


def _shm_dir() -> str | None:
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


def _stop(procs: Sequence[Any], conns: Sequence[Any]) -> None:
    for conn in conns:
        try:
            conn.send(("stop",))
        except (OSError, ValueError):
            pass
    for proc in procs:
        proc.join(STOP_GRACE_S)
    for proc in procs:
        if proc.is_alive():
            proc.terminate()
            proc.join(STOP_GRACE_S)
        if proc.is_alive():
            proc.kill()
            proc.join(STOP_GRACE_S)
    for conn in conns:
        conn.close()


_POOLS: dict[int, RankPool] = {}


def get_pool(world_size: int) -> RankPool:
    """The live pool of ``world_size`` ranks, started (seconds) if there is none."""
    pool = _POOLS.get(world_size)
    if pool is None or not pool.alive:
        if pool is not None:
            pool.close()
        pool = _POOLS[world_size] = RankPool(world_size)
    return pool


def shutdown_pools() -> None:
    """Stop every rank pool now (they are also stopped at interpreter exit)."""
    while _POOLS:
        _POOLS.popitem()[1].close()


class TorchrecSharded:
    """torchrec ``ShardedEmbeddingBagCollection``, ``sharding_type`` plan, ``world_size`` local gloo ranks."""

    def __init__(self, sharding_type: str = "row_wise", world_size: int = 2, name: str | None = None) -> None:
        sharding_type = SHORT_NAMES.get(sharding_type, sharding_type)
        if sharding_type not in worker.SHARDING_TYPES:
            raise ValueError(
                f"sharding_type {sharding_type!r} is not one of {worker.SHARDING_TYPES} "
                f"(or {tuple(SHORT_NAMES)})"
            )
        if world_size < 1:
            raise ValueError(f"world_size must be at least 1, got {world_size}")
        short = {v: k for k, v in SHORT_NAMES.items()}[sharding_type]
        self.name = name or f"torchrec-sharded-{short}" + ("" if world_size == 2 else f"-x{world_size}")
        self.sharding_type = sharding_type
        self.world_size = world_size
        self.last_shards: list[dict[str, list[Any]]] = []
        """What the last ``prepare`` loaded, per rank: ``{table: [(row, col, rows, cols, dtype)]}``."""
        import torch.distributed as dist

        if importlib.util.find_spec("torchrec") is None or importlib.util.find_spec("fbgemm_gpu") is None:
            raise BackendUnavailable(f"{self.name}: torchrec (with fbgemm-gpu) is not installed")
        if not dist.is_available() or not dist.is_gloo_available():
            raise BackendUnavailable(f"{self.name}: torch {torch.__version__} has no gloo backend")

    def supports(self, tables: Sequence[TableConfig], batch: JaggedBatch) -> str | None:
        return worker.unsupported(self.sharding_type, self.world_size, tables, batch)

    def prepare(self, tables: Sequence[TableConfig], weights: Mapping[str, torch.Tensor]) -> Lookup:
        pool = get_pool(self.world_size)
        key = pool.new_key()
        tables = tuple(tables)
        fd, path = tempfile.mkstemp(prefix="weights-", suffix=".pt", dir=_shm_dir())
        os.close(fd)
        try:
            torch.save({t.name: weights[t.name].contiguous() for t in tables}, path)
            msg = ("setup", key, tables, self.sharding_type, path)
            self.last_shards = pool.call("sharding the tables", [msg] * self.world_size)
        finally:
            os.unlink(path)
        width = total_dim(tables)
        world = self.world_size

        def lookup(batch: JaggedBatch) -> torch.Tensor:
            ranges = worker.sample_ranges(batch.batch_size, world)
            msgs = [("lookup", key, worker.pack_batch(worker.slice_batch(batch, a, b))) for a, b in ranges]
            parts = pool.call("looking up", msgs)
            return torch.from_numpy(np.concatenate(parts, axis=0)).reshape(batch.batch_size, width)

        weakref.finalize(lookup, pool.release_later, key)
        return lookup


def _factory(short: str) -> Any:
    def make(world_size: int = 2) -> TorchrecSharded:
        return TorchrecSharded(short, world_size)

    make.__name__ = f"sharded_{short}"
    make.__doc__ = f"`TorchrecSharded` with the {SHORT_NAMES[short]} plan over ``world_size`` ranks."
    return make


sharded_tw = _factory("tw")
sharded_rw = _factory("rw")
sharded_cw = _factory("cw")
sharded_twcw = _factory("twcw")
sharded_dp = _factory("dp")
