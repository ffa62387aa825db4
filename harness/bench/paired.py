"""Speedups from paired rounds: the median of per-round ratios, with a bootstrap interval.

Two cases timed in the same interleaved round (`harness.bench.timing`) saw the same machine, so
the ratio of their two times in that round cancels what the machine did to both. A speedup is the
median over rounds of ``time of the other / time of this one`` (> 1: this one is faster), and its
95% interval comes from resampling the rounds (pairs kept together) with replacement, seeded,
2,000 times. With ``--repeat``, each repeat's speedup is the median over its own rounds, the
spread is the largest over the smallest of them, and the interval resamples the repeats first,
then rounds within each drawn repeat (`resampled_medians`): one run's rounds share its machine
state, so an interval from them alone does not cover a rerun (docs/benchmarks.md).

A benchmark of pytest-benchmark's JSON keeps, beside ``stats.data``, which round each time came
from (``extra_info.rounds``: repeat, round and position in the round, parallel to the data); a
run made without them (an older jagbench) has no pairs, and its speedup falls back to the ratio of
medians.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

RESAMPLES = 2000
SEED = 20240601


def round_keys(bench: dict[str, Any]) -> list[tuple[int, int]] | None:
    """``(repeat, round)`` of each entry of ``stats.data``, or ``None`` for a run without them."""
    rounds = (bench.get("extra_info") or {}).get("rounds")
    data = bench["stats"].get("data")
    if not rounds or not data or len(rounds.get("round", [])) != len(data):
        return None
    return list(zip(rounds["repeat"], rounds["round"], strict=True))


def paired_times(a: dict[str, Any], b: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """``(repeats, times of a, times of b)`` over the rounds both were timed in, or ``None``."""
    ka, kb = round_keys(a), round_keys(b)
    if ka is None or kb is None:
        return None
    tb = dict(zip(kb, b["stats"]["data"], strict=True))
    rows = [(k[0], t, tb[k]) for k, t in zip(ka, a["stats"]["data"], strict=True) if k in tb]
    if not rows:
        return None
    arr = np.asarray(rows, dtype=np.float64)
    return arr[:, 0].astype(int), arr[:, 1], arr[:, 2]


def resampled_medians(
    values: np.ndarray, groups: np.ndarray | None, resamples: int, rng: np.random.Generator
) -> np.ndarray:
    """``resamples`` bootstrap medians of ``values``: by entry, or, with ``groups`` (a label per
    entry) holding two or more labels, by group then by entry within each drawn group (as many
    from each group as the groups hold on average)."""
    labels = np.unique(groups) if groups is not None else np.zeros(0)
    if labels.size < 2:
        return np.median(rng.choice(values, size=(resamples, values.size), replace=True), axis=1)
    members = [values[groups == g] for g in labels]
    per_group = max(1, round(values.size / labels.size))
    sizes = np.array([m.size for m in members])
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    flat = np.concatenate(members)
    out = np.empty(resamples)
    chunk = max(1, 4_000_000 // (labels.size * per_group))  # bounded memory per batch of resamples
    for lo in range(0, resamples, chunk):
        n = min(chunk, resamples - lo)
        drawn = rng.integers(0, labels.size, size=(n, labels.size, 1))
        within = (rng.random((n, labels.size, per_group)) * sizes[drawn]).astype(np.int64)
        out[lo : lo + n] = np.median(flat[(starts[drawn] + within).reshape(n, -1)], axis=1)
    return out


def median_interval(
    values: np.ndarray,
    resamples: int = RESAMPLES,
    seed: int = SEED,
    groups: np.ndarray | None = None,
) -> tuple[float, float, float]:
    """``(median, 2.5th, 97.5th percentile of the bootstrapped median)`` of ``values``; with
    ``groups`` (each value's repeat), resampled by repeat then within (`resampled_medians`)."""
    rng = np.random.default_rng(seed)
    boot = resampled_medians(values, groups, resamples, rng)
    return float(np.median(values)), float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))


def faster_in(by_repeat: Sequence[float]) -> int:
    """Repeats in which the faster one was faster (a speedup above 1): fewer than all of them is a
    split verdict, the two within the machine's run-to-run spread of each other."""
    return sum(x > 1 for x in by_repeat)


@dataclass(frozen=True)
class Speedup:
    """How much faster ``fast`` is than ``slow`` on one workload: ``time of slow / time of fast``."""

    workload: str
    fast: str
    slow: str
    speedup: float
    low: float | None
    high: float | None
    pairs: int
    by_repeat: tuple[float, ...]
    paired: bool

    @property
    def spread(self) -> float | None:
        """Largest over smallest per-repeat speedup (``None`` with fewer than two repeats)."""
        if len(self.by_repeat) < 2:
            return None
        return max(self.by_repeat) / min(self.by_repeat)

    @property
    def faster_in(self) -> int:
        return faster_in(self.by_repeat)

    def as_dict(self) -> dict[str, Any]:
        return {
            "workload": self.workload,
            "backend": self.fast,
            "over": self.slow,
            "speedup": self.speedup,
            "low": self.low,
            "high": self.high,
            "pairs": self.pairs,
            "by_repeat": list(self.by_repeat),
            "spread": self.spread,
            "faster_in": self.faster_in,
            "paired": self.paired,
        }


def speedup(this: dict[str, Any], other: dict[str, Any]) -> Speedup:
    """``this``'s speedup over ``other`` (two benchmarks of one workload), paired when they can be."""
    info = this["extra_info"]
    pairs = paired_times(this, other)
    if pairs is None:
        ratio = other["stats"]["median"] / this["stats"]["median"]
        return Speedup(
            info["workload"], info["backend"], other["extra_info"]["backend"], ratio, None, None, 0, (), False
        )
    repeats, t_this, t_other = pairs
    ratios = t_other / t_this
    mid, low, high = median_interval(ratios, groups=repeats)
    by_repeat = tuple(float(np.median(ratios[repeats == r])) for r in sorted(set(repeats.tolist())))
    return Speedup(
        info["workload"],
        info["backend"],
        other["extra_info"]["backend"],
        mid,
        low,
        high,
        ratios.size,
        by_repeat,
        True,
    )


def all_pairs(benchmarks: Sequence[dict[str, Any]]) -> list[Speedup]:
    """For every workload, every pair of its backends (in the run's order): the faster one's
    speedup over the other."""
    by_workload: dict[str, list[dict[str, Any]]] = {}
    for b in benchmarks:
        by_workload.setdefault(b["extra_info"]["workload"], []).append(b)
    out = []
    for members in by_workload.values():
        for a, b in itertools.combinations(members, 2):
            s = speedup(a, b)
            out.append(s if s.speedup >= 1 else speedup(b, a))
    return out
