"""Comparing two runs case by case, with a verdict that accounts for noise.

Cases are matched by (backend, workload). Per case the change is the ratio of medians
``new / base`` (> 1 is slower). Whether it is real is judged from the per-round data by a
bootstrap: both runs' rounds are resampled with replacement (seeded, 2,000 times) and the 2.5th and
97.5th percentiles of the resampled median ratio form a 95% interval. The change is *significant*
when that interval excludes 1, and a *regression* when it is significant and the ratio exceeds
``1 + threshold``.

Why a bootstrap and not a t-test (pyperf) or Mann-Whitney U: latencies are skewed and
heavy-tailed on a shared machine, so a test on means misleads; a rank test says "the
distributions differ" but not by how much, while the bootstrap gives an interval for the very
number the table shows (the median ratio). It needs only numpy, adds no dependency, and is
deterministic with a fixed seed. With very few rounds (under 5) the interval is wide and honest:
fewer changes come out significant.

Errors are never verdicts: a run without per-round data, or two runs with no case in common,
raise `CompareError`, which the command line turns into exit code 2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from harness.bench.runs import Run
from harness.markdown import markdown_table

RESAMPLES = 2000
SEED = 20240601


class CompareError(ValueError):
    """Two runs that cannot be compared; says which file and case."""


@dataclass(frozen=True)
class CaseChange:
    backend: str
    workload: str
    base_median: float
    new_median: float
    ratio: float
    low: float
    high: float
    significant: bool
    regressed: bool
    improved: bool

    @property
    def verdict(self) -> str:
        if self.regressed:
            return "REGRESSED"
        if self.improved:
            return "improved"
        if not self.significant:
            return "not significant"
        return "slower, within threshold" if self.ratio > 1 else "faster, within threshold"


@dataclass
class Comparison:
    changes: list[CaseChange]
    threshold: float
    only_base: list[tuple[str, str]] = field(default_factory=list)
    only_new: list[tuple[str, str]] = field(default_factory=list)
    differences: list[str] = field(default_factory=list)

    @property
    def regressions(self) -> list[CaseChange]:
        return [c for c in self.changes if c.regressed]

    @property
    def geometric_mean(self) -> float:
        return math.exp(sum(math.log(c.ratio) for c in self.changes) / len(self.changes))


def bootstrap_ratio(
    base: np.ndarray, new: np.ndarray, resamples: int = RESAMPLES, seed: int = SEED
) -> tuple[float, float]:
    """95% bootstrap interval of ``median(new) / median(base)``."""
    rng = np.random.default_rng(seed)
    b = np.median(rng.choice(base, size=(resamples, base.size), replace=True), axis=1)
    n = np.median(rng.choice(new, size=(resamples, new.size), replace=True), axis=1)
    ratios = n / b
    return float(np.percentile(ratios, 2.5)), float(np.percentile(ratios, 97.5))


def _rounds(run: Run, bench: dict[str, Any]) -> np.ndarray:
    data = bench["stats"].get("data")
    if not data:
        info = bench["extra_info"]
        raise CompareError(
            f"{run.path}: case {info['backend']} x {info['workload']} has no per-round data "
            "(stats.data); rerun with `jagbench bench`, which keeps it"
        )
    return np.asarray(data, dtype=np.float64)


def _differences(base: Run, new: Run) -> list[str]:
    """Machine, library versions and thread counts that differ between the runs."""
    out = []

    def flat(run: Run) -> dict[str, Any]:
        m = run.machine_info
        env = m.get("jagbench", {})
        d = {
            "node": m.get("node"),
            "cpu": (m.get("cpu") or {}).get("brand_raw"),
            "python": m.get("python_version"),
            "system": f"{m.get('system')} {m.get('release')}",
        }
        d.update({f"version {k}": v for k, v in (env.get("versions") or {}).items()})
        d.update({f"threads {k}": v for k, v in (env.get("threads") or {}).items()})
        return d

    a, b = flat(base), flat(new)
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            out.append(f"{key}: {a.get(key)} -> {b.get(key)}")
    bw_a, bw_b = base.bandwidth_gbps, new.bandwidth_gbps
    if bw_a and bw_b and abs(bw_b / bw_a - 1) > 0.2:
        out.append(f"measured copy bandwidth: {bw_a:.1f} -> {bw_b:.1f} GB/s (a busy or different machine?)")
    return out


def compare_runs(base: Run, new: Run, threshold: float = 0.10) -> Comparison:
    """Match cases by (backend, workload) and judge each change (see the module docstring)."""
    key = lambda b: (b["extra_info"]["backend"], b["extra_info"]["workload"])  # noqa: E731
    base_cases = {key(b): b for b in base.benchmarks}
    new_cases = {key(b): b for b in new.benchmarks}
    common = [k for k in base_cases if k in new_cases]
    if not common:
        raise CompareError(f"{base.path} and {new.path} have no (backend, workload) case in common")
    changes = []
    for k in common:
        a, b = _rounds(base, base_cases[k]), _rounds(new, new_cases[k])
        ratio = float(np.median(b) / np.median(a))
        low, high = bootstrap_ratio(a, b)
        significant = low > 1 or high < 1
        changes.append(
            CaseChange(
                backend=k[0],
                workload=k[1],
                base_median=float(np.median(a)),
                new_median=float(np.median(b)),
                ratio=ratio,
                low=low,
                high=high,
                significant=significant,
                regressed=significant and ratio > 1 + threshold,
                improved=significant and ratio < 1 / (1 + threshold),
            )
        )
    changes.sort(key=lambda c: c.ratio, reverse=True)
    return Comparison(
        changes,
        threshold,
        only_base=[k for k in base_cases if k not in new_cases],
        only_new=[k for k in new_cases if k not in base_cases],
        differences=_differences(base, new),
    )


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.4g}"


def format_comparison(result: Comparison) -> str:
    """A Markdown table sorted by change (worst first), the geometric mean and any warnings."""
    rows = [
        [
            c.backend,
            c.workload,
            _ms(c.base_median),
            _ms(c.new_median),
            f"{c.ratio:.3f}",
            f"{c.low:.3f}..{c.high:.3f}",
            c.verdict if c.significant else f"~ {c.verdict}",
        ]
        for c in result.changes
    ]
    text = markdown_table(
        ["backend", "workload", "base median ms", "new median ms", "new/base", "95% CI", "verdict"], rows
    )
    text += (
        f"\n\nGeometric mean of new/base over {len(result.changes)} case(s): {result.geometric_mean:.3f} "
        f"(< 1 is faster). Threshold {result.threshold:.0%}; `~` marks changes that are not significant."
    )
    for what, keys in (("only in base", result.only_base), ("only in new", result.only_new)):
        if keys:
            text += f"\n{what}: " + ", ".join(f"{b} x {w}" for b, w in keys)
    if result.differences:
        text += "\n\nWARNING: the runs differ in machine, versions or threads; ratios may reflect that:\n"
        text += "\n".join(f"- {d}" for d in result.differences)
    n = len(result.regressions)
    text += f"\n\n{n} regression(s) beyond {result.threshold:.0%}." if n else "\n\nNo regression."
    return text
