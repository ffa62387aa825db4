"""What a benchmark case counts: the byte model, this machine's copy bandwidth, the environment.

Byte model (as FBGEMM's TBE benchmarks count it): every id reads one row of its table,
``D * bytes per element`` (a quantized table's row: its packed codes plus the fp16 scale and
bias, ``ceil(D * bits / 8) + 4``, with no library's alignment padding); every (sample, feature)
writes its pooled float32 output, ``B * total_dim * 4``. Index bytes (the int64 ids and the
offsets) are *not* counted: they are the same for every backend and small next to the rows for
D >= 16; they are recorded separately as ``index_bytes`` so a reader can add them. Reused rows
count every time (no cache model).
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Sequence
from importlib import metadata
from typing import Any

import torch

from harness.model import JaggedBatch, TableConfig, stored_row_bytes, total_dim

BYTE_MODEL = (
    "bytes = rows read (each id: D x bytes per element of its table; a quantized row: packed codes "
    "+ 4 bytes of fp16 scale and bias) + output written "
    "(B x total_dim x 4, float32); index bytes (ids, offsets) not counted, recorded as index_bytes"
)
VERSIONED = (
    "torch",
    "numpy",
    "numba",
    "triton",
    "torchrec",
    "fbgemm-gpu-cpu",
    "fbgemm-gpu",
    "pytest-benchmark",
)


def byte_model(tables: Sequence[TableConfig], batch: JaggedBatch) -> dict[str, int]:
    """``rows_read_bytes``, ``output_bytes``, their sum ``bytes``, plus ``ids`` and ``index_bytes``."""
    table_of = {f: t for t in tables for f in t.feature_names}
    per_feature = batch.lengths.reshape(len(batch.keys), -1).sum(dim=1).tolist() if batch.keys else []
    rows_read = 0
    for key, ids in zip(batch.keys, per_feature, strict=True):
        t = table_of[key]
        rows_read += int(ids) * stored_row_bytes(t)
    output = batch.batch_size * total_dim(tables) * 4
    index = batch.values.numel() * batch.values.element_size() + (batch.lengths.numel() + 1) * 8
    return {
        "ids": int(batch.values.numel()),
        "rows_read_bytes": rows_read,
        "output_bytes": output,
        "bytes": rows_read + output,
        "index_bytes": index,
    }


def measure_copy_bandwidth(size_bytes: int = 1 << 30, repeats: int = 5) -> dict[str, Any]:
    """Median bandwidth of copying a ``size_bytes`` float32 buffer into another (read + write bytes)."""
    n = max(1, size_bytes // 4)
    src = torch.ones(n, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.copy_(src)  # touch every page before timing
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    moved = 2 * n * 4
    return {
        "method": "torch copy_ of a float32 buffer into another, median of repeats; bytes = read + write",
        "buffer_bytes": n * 4,
        "repeats": repeats,
        "seconds": times,
        "gbps": moved / median / 1e9,
        "threads": torch.get_num_threads(),
    }


def library_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    out["torch.version.cuda"] = torch.version.cuda
    return out


def thread_counts() -> dict[str, Any]:
    out: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
    }
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        out[var] = os.environ.get(var)
    try:
        import numba

        out["numba_threads"] = numba.config.NUMBA_NUM_THREADS
    except ImportError:
        out["numba_threads"] = None
    return out


def environment() -> dict[str, Any]:
    """Versions, threads and devices: added to pytest-benchmark's ``machine_info`` as ``jagbench``."""
    devices = []
    if torch.cuda.is_available():
        devices = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {
        "versions": library_versions(),
        "threads": thread_counts(),
        "cuda_devices": devices,
        "platform": platform.platform(),
    }
