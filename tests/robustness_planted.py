"""Planted backends for tests/test_robustness.py: each behaves like the reference on valid ids and
misbehaves in one known way when an id is outside its table (loaded by file spec in a child)."""

import os
import signal
import subprocess
import time

import torch

from harness.model import SUPPORTED_DTYPES, JaggedBatch
from impls.reference import ReferenceBackend


def _rows_of_each_id(tables, batch: JaggedBatch) -> torch.Tensor:
    rows = {f: t.num_embeddings for t in tables for f in t.feature_names}
    per_bag = [rows[k] for k in batch.keys for _ in range(batch.batch_size)]
    return torch.repeat_interleave(torch.tensor(per_bag, dtype=torch.int64), batch.lengths.to(torch.int64))


class _Planted(ReferenceBackend):
    table_dtypes = SUPPORTED_DTYPES  # float tables only: the quantized controls are unsupported

    def misbehave(self, lookup, batch: JaggedBatch, rows: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def prepare(self, tables, weights):
        lookup = super().prepare(tables, weights)

        def planted(batch: JaggedBatch) -> torch.Tensor:
            rows = _rows_of_each_id(tables, batch)
            if bool(((batch.values < 0) | (batch.values >= rows)).any()):
                return self.misbehave(lookup, batch, rows)
            return lookup(batch)

        return planted


class Crashes(_Planted):
    name = "planted-crash"

    def misbehave(self, lookup, batch, rows):
        os.kill(os.getpid(), signal.SIGSEGV)


class Hangs(_Planted):
    name = "planted-hang"

    def misbehave(self, lookup, batch, rows):
        time.sleep(600)


class Raises(_Planted):
    name = "planted-raise"

    def misbehave(self, lookup, batch, rows):
        raise ValueError("planted: an id is outside its table")


class Clamps(_Planted):
    name = "planted-clamp"

    def misbehave(self, lookup, batch, rows):
        values = torch.minimum(batch.values.clamp(min=0), rows - 1)
        return lookup(JaggedBatch(batch.keys, values, batch.lengths, batch.weights))


class ClampsInPlace(_Planted):
    """Clamps the caller's ids in place: returns the clamped reading, and mutates its input."""

    name = "planted-mutate"

    def misbehave(self, lookup, batch, rows):
        torch.minimum(batch.values.clamp_(min=0), rows - 1, out=batch.values)
        return lookup(batch)


class ClampsNamedNumba(Clamps):
    """A silently clamping backend that calls itself numba: the command must exit 1."""

    name = "numba"


class ZeroesNaNInPrepare(ReferenceBackend):
    """Replaces NaN in the caller's table weights with 0, in place, in ``prepare``."""

    table_dtypes = SUPPORTED_DTYPES
    name = "planted-nan-to-zero"

    def prepare(self, tables, weights):
        for w in weights.values():
            w.nan_to_num_(0.0)
        return super().prepare(tables, weights)


_WORKER: list = []
_CASES: list = []


class KeepsAWorker(ReferenceBackend):
    """Starts a helper process at its first ``prepare`` and keeps it, like a rank pool. On a
    non-finite weight it names how many problems this process has prepared and the helper's pid
    (raises); an id past its table crashes it, a negative id hangs it."""

    table_dtypes = SUPPORTED_DTYPES
    name = "planted-worker"

    def prepare(self, tables, weights):
        if not _WORKER:
            _WORKER.append(subprocess.Popen(["sleep", "600"]))
        _CASES.append(None)
        lookup = super().prepare(tables, weights)
        finite = all(bool(w.isfinite().all()) for w in weights.values())

        def planted(batch: JaggedBatch) -> torch.Tensor:
            rows = _rows_of_each_id(tables, batch)
            if bool((batch.values >= rows).any()):
                os.kill(os.getpid(), signal.SIGSEGV)
            if bool((batch.values < 0).any()):
                time.sleep(600)
            if not finite or (batch.weights is not None and not bool(batch.weights.isfinite().all())):
                raise ValueError(f"planted: problem {len(_CASES)} of this process, helper {_WORKER[0].pid}")
            return lookup(batch)

        return planted
