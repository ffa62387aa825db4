"""Output memory for the ``numba`` lookup that is reused once the caller lets go of it.

Why: a fresh large output costs a page fault per 4 KiB page on its first write. DLRM-v2's output
(2048 x 26 x 128 float32, 27 MB) is 6,656 faults; on this machine they took 16-24 ms alone and
35-60 ms while other backends churned the heap, against a 15 ms lookup (probe in docs/numba.md,
"Output memory"). glibc returns a freed block that large to the kernel or keeps it, depending on
what else the process allocated, so the same call was 15 ms or 60 ms by turns. CUDA's caching
allocator exists for the same reason; the CPU allocator keeps nothing.

`OutputBuffers.empty` hands out a float32 tensor on huge pages (`impls.huge_pages`: 14 faults
instead of 6,656 when it is new) and takes its memory back when the tensor, and every view of it,
is gone (a finalizer on the array the tensor keeps alive). A tensor still held is never handed out
again, so outputs never alias. Outputs under `MIN_BYTES` come from ``torch.empty``: they fault too
few pages to matter. The contents of a reused buffer are the previous output's: the kernel writes
every element of its output.
"""

from __future__ import annotations

import threading
import weakref

import numpy as np
import torch

from impls.huge_pages import HUGE_PAGE_BYTES, advised_bytes

MIN_BYTES = HUGE_PAGE_BYTES
# Free buffers kept per size: one for the output being built while the caller holds the last.
KEEP_PER_SIZE = 2


class OutputBuffers:
    """A pool of released output buffers, by size in bytes (at most `KEEP_PER_SIZE` of each)."""

    def __init__(self) -> None:
        self._free: dict[int, list[np.ndarray]] = {}
        self._lock = threading.Lock()

    def empty(self, rows: int, cols: int) -> torch.Tensor:
        """An uninitialised float32 ``[rows, cols]`` tensor, in released memory where there is some."""
        n_bytes = rows * cols * 4
        if n_bytes < MIN_BYTES:
            return torch.empty(rows, cols, dtype=torch.float32)
        with self._lock:
            free = self._free.get(n_bytes)
            memory = free.pop() if free else None
        if memory is None:
            memory = advised_bytes(n_bytes)
        view = memory.view(np.float32).reshape(rows, cols)
        release = weakref.finalize(view, self._release, n_bytes, memory)
        release.atexit = False  # nothing to give back when the process ends
        return torch.from_numpy(view)

    def _release(self, n_bytes: int, memory: np.ndarray) -> None:
        with self._lock:
            free = self._free.setdefault(n_bytes, [])
            if len(free) < KEEP_PER_SIZE:
                free.append(memory)

    def free_bytes(self) -> int:
        """Bytes held for reuse (none of it is any live output's)."""
        with self._lock:
            return sum(n * len(free) for n, free in self._free.items())
