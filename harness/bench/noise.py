"""The noise monitor: a fixed reference kernel timed before every round, and what its times say.

The kernel (`ReferenceKernel`) sums a fixed 8 MiB float32 buffer with torch on all its threads:
about as long as one call of a small workload, memory-bound like the lookups, and split statically
between threads like numba's kernel, so it slows down when a co-tenant takes a core or the memory
bus. Its work never changes, so its time tracks the machine, not the code.

Per timing window (one workload in one repeat), `window_noise` compares the probe's times with
that workload's reference level: the median probe of its quietest window over the repeats. Only
windows of the same workload are compared because the probe's time depends on what the rounds
around it left in the caches: after a round of a large workload its 8 MiB buffer has been evicted
and the sum runs up to 7x slower than after a cache-resident one (measured: 0.052 ms hot, 0.374 ms
after a 256 MiB read), so a level taken across workloads reported every large workload as a busy
machine. The figures:

- ``level``: the window's median probe over its workload's reference (>= 1): above 1 the machine
  was slower in this repeat than in the workload's quietest one (absolute times and GB/s are then
  low; paired ratios much less so, though a backend that suffers more from a busy core loses
  ground). With one repeat it is 1 by construction: only the drift can warn;
- ``drift``: the slowest over the fastest median of consecutive blocks of rounds within the window:
  the machine changed speed while the workload was timed;
- ``noisy_rounds``: rounds whose probe exceeded the reference by more than the threshold;
- ``cases_level``: the geometric mean, over the window's cases, of the case's median time per call
  over its smallest median in any repeat (>= 1; 1 with one repeat). The probe reads the machine
  through its own caches and threads, and can disagree with the cases: in one ``--repeat 3`` run it
  put repeat 1 of cache-resident at 1.25x its level while all three backends ran fastest in that
  repeat. The cases' own level says how much slower the measured code itself ran.

A window whose level, drift or cases' level exceeds 1 + threshold gets a warning that names its
cases.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from pytest_benchmark.timers import default_timer

from harness.bench.timing import Timer

PROBE_BYTES = 8 << 20
PROBE_DESCRIPTION = "torch sum of a fixed 8 MiB float32 buffer on torch's threads, timed before every round"
DEFAULT_THRESHOLD = 0.10
BLOCKS = 5
MIN_BLOCK = 5


class ReferenceKernel:
    """Calling it runs the fixed kernel once and returns its seconds."""

    def __init__(self, size_bytes: int = PROBE_BYTES, timer: Timer = default_timer) -> None:
        self.buffer = torch.ones(max(1, size_bytes // 4), dtype=torch.float32)
        self.timer = timer
        self.buffer.sum()  # touch the pages before the first timed run

    def __call__(self) -> float:
        start = self.timer()
        self.buffer.sum()
        return self.timer() - start


@dataclass(frozen=True)
class WindowNoise:
    """What the probe said about one timing window (see the module docstring)."""

    workload: str
    repeat: int
    level: float
    drift: float
    noisy_rounds: int
    rounds: int
    cases: tuple[str, ...]
    cases_level: float | None = None


def block_medians(probe: Sequence[float]) -> list[float]:
    """Medians of up to `BLOCKS` consecutive blocks of at least `MIN_BLOCK` rounds (one block if fewer)."""
    n = len(probe)
    blocks = max(1, min(BLOCKS, n // MIN_BLOCK))
    edges = [round(i * n / blocks) for i in range(blocks + 1)]
    return [statistics.median(probe[a:b]) for a, b in zip(edges, edges[1:], strict=False) if b > a]


def case_medians(window: dict[str, Any]) -> dict[str, float]:
    """Each timed case's median seconds per call in one window record, by backend."""
    out = {}
    for c in window.get("cases", []):
        seconds = c.get("seconds") or []
        if seconds:
            out[c["backend"]] = statistics.median(seconds) / max(1, int(c.get("iterations", 1)))
    return out


def cases_level(
    workload: str, medians: dict[str, float], quickest: dict[tuple[str, str], float]
) -> float | None:
    """The geometric mean of one window's case ``medians`` (`case_medians`) over their quickest
    repeat's, or ``None``."""
    ratios = [m / q for backend, m in medians.items() if (q := quickest.get((workload, backend), 0.0)) > 0]
    return math.exp(sum(map(math.log, ratios)) / len(ratios)) if ratios else None


def window_noise(
    window: dict[str, Any],
    reference: float,
    threshold: float = DEFAULT_THRESHOLD,
    quickest: dict[tuple[str, str], float] | None = None,
    medians: dict[str, float] | None = None,
) -> WindowNoise | None:
    """The noise figures of one window record (`harness.bench.runner`) against its workload's
    ``reference`` level and each case's ``quickest`` median over the repeats (``medians``: the
    window's `case_medians`, when already computed), or ``None`` without a probe."""
    probe = window.get("probe") or []
    if not probe or reference <= 0:
        return None
    blocks = block_medians(probe)
    return WindowNoise(
        workload=window["workload"],
        repeat=int(window.get("repeat", 0)),
        level=statistics.median(probe) / reference,
        drift=max(blocks) / min(blocks) if min(blocks) > 0 else float("inf"),
        noisy_rounds=sum(p > reference * (1 + threshold) for p in probe),
        rounds=len(probe),
        cases=tuple(c["backend"] for c in window.get("cases", [])),
        cases_level=cases_level(
            window["workload"], case_medians(window) if medians is None else medians, quickest or {}
        ),
    )


def noise_summary(windows: Sequence[dict[str, Any]], threshold: float = DEFAULT_THRESHOLD) -> dict[str, Any]:
    """The JSON's ``jagbench.noise``: each workload's reference level (its quietest window's median
    probe), the run's quietest of those, every window's figures and the warnings."""
    by_workload: dict[str, float] = {}
    for w in windows:
        if w.get("probe"):
            median = statistics.median(w["probe"])
            by_workload[w["workload"]] = min(median, by_workload.get(w["workload"], median))
    if not by_workload:
        return {
            "kernel": PROBE_DESCRIPTION,
            "threshold": threshold,
            "reference_s": None,
            "reference_by_workload_s": {},
            "windows": [],
            "warnings": [],
        }
    medians = [case_medians(w) for w in windows]
    quickest: dict[tuple[str, str], float] = {}
    for w, by_backend in zip(windows, medians, strict=True):
        for backend, m in by_backend.items():
            key = (w["workload"], backend)
            quickest[key] = min(m, quickest.get(key, m))
    figures = [
        n
        for w, m in zip(windows, medians, strict=True)
        if (n := window_noise(w, by_workload.get(w["workload"], 0.0), threshold, quickest, m)) is not None
    ]
    return {
        "kernel": PROBE_DESCRIPTION,
        "threshold": threshold,
        "reference_s": min(by_workload.values()),
        "reference_by_workload_s": by_workload,
        "windows": [asdict(n) for n in figures],
        "warnings": noise_warnings(figures, threshold),
    }


def noise_warnings(figures: Sequence[WindowNoise], threshold: float) -> list[str]:
    """One line per window where the machine was off its workload's level or drifted, or the cases
    ran slower than in their quickest repeat, naming the cases."""
    out = []
    for n in figures:
        why = []
        if n.level > 1 + threshold:
            why.append(
                f"the reference kernel ran at {n.level:.2f}x its level in this workload's quietest repeat"
            )
        if n.drift > 1 + threshold:
            why.append(f"it drifted by {n.drift:.2f}x (slowest / fastest block of rounds)")
        if n.cases_level is not None and n.cases_level > 1 + threshold:
            why.append(
                f"the cases themselves ran at {n.cases_level:.2f}x their quickest repeat (geometric mean)"
            )
        if why:
            cases = ", ".join(f"{b} x {n.workload}" for b in n.cases)
            out.append(
                f"{n.workload} (repeat {n.repeat + 1}): {' and '.join(why)}; "
                f"{n.noisy_rounds} of {n.rounds} rounds beyond +{threshold:.0%}. Cases affected: {cases}"
            )
    return out
