"""The conditions a run is measured under: cold or warm caches, and background load.

`CacheFlush` evicts the caches before every timed call, as FBGEMM's benchmark does on GPUs
(``benchmark_torch_function`` writes a ``flush_gpu_cache_size_mb`` buffer before each call) and
Triton's ``do_bench`` (``cache.zero_()``): here a preallocated int32 buffer of the given size is
read and written (``add_(1)``) on torch's threads. A read-modify-write, not a fill: a large
``memset`` may use non-temporal stores that bypass the caches and evict nothing.

`background_load` runs N processes that spin on the CPU while the timing runs, so a measurement on
a busy machine can be repeated. Each is a child Python process that also exits by itself once its
parent is gone (it polls its parent's pid), so nothing keeps spinning after a crash or a kill.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import torch

# A child that spins until its parent (whose pid it is given) is gone.
_SPIN = """
import os, sys, time
parent = int(sys.argv[1])
deadline = time.monotonic()
while True:
    for _ in range(100_000):
        pass
    if time.monotonic() > deadline:
        if os.getppid() != parent:
            sys.exit(0)
        deadline = time.monotonic() + 0.2
"""


class CacheFlush:
    """Calling it reads and writes a ``mib`` MiB buffer, evicting what the caches held."""

    def __init__(self, mib: int) -> None:
        if mib <= 0:
            raise ValueError(f"the flush buffer must be > 0 MiB, got {mib}")
        self.mib = mib
        self.buffer = torch.zeros((mib << 20) // 4, dtype=torch.int32)
        self.calls = 0

    def __call__(self) -> None:
        self.buffer.add_(1)
        self.calls += 1


def cache_state(flush_mib: int | None) -> dict[str, object]:
    """What the JSON and the report say about the caches."""
    if flush_mib:
        return {
            "caches": "cold",
            "flush_mib": flush_mib,
            "how": f"a {flush_mib} MiB buffer read and written before every timed call; one call per span",
        }
    return {
        "caches": "warm",
        "flush_mib": None,
        "how": "no flush: one untimed call of the same case just before each timed span",
    }


@contextmanager
def background_load(processes: int) -> Iterator[list[int]]:
    """Run ``processes`` spinning children for the duration of the block; yields their pids.

    They are stopped when the block ends, by an error or Ctrl-C too.
    """
    children: list[subprocess.Popen[bytes]] = []
    try:
        for _ in range(processes):
            children.append(
                subprocess.Popen(
                    [sys.executable, "-c", _SPIN, str(os.getpid())],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        yield [c.pid for c in children]
    finally:
        for c in children:
            c.terminate()
        for c in children:
            try:
                c.wait(timeout=5)
            except subprocess.TimeoutExpired:
                c.kill()
                c.wait()
