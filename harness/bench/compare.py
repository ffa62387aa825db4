"""Comparing two runs case by case, with a verdict that accounts for noise.

Cases are matched by (mode, backend, workload): a training step (``--mode train``) is never
compared with a forward lookup of the same backend and workload. Per case the change is the ratio of medians
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

Runs made with interleaved rounds also say, per case, how it moved *relative to the baseline*:
within each run, the per-round ratio ``time / baseline's time in the same round``
(`harness.bench.paired`), and the change is the ratio of that median in the new run to the one
in the base run, with its bootstrap interval (pairs resampled within each run). That change
cancels what the machine did to both backends (a slower or busier machine, another CPU
frequency), so ``--relative`` judges regressions by it instead of by absolute times.

**Repeats.** The rounds of one run share that run's machine state, and on a shared machine that
state changes between runs: on the development machine two runs of the same code minutes apart gave
torch 8.85 and 12.96 ms on many-small, each with a bootstrap interval of a few per cent. An
interval from one run's rounds cannot cover that. When a run was made with ``--repeat N``, its
rounds are grouped by repeat and the bootstrap has two levels (a cluster bootstrap): each resample
draws the run's repeats with replacement, then rounds within each drawn repeat, the same number
from each, so the interval covers the spread between repeats as well. A run with one repeat is
resampled by rounds alone, and the comparison says so (`Comparison.single_repeat`).

Errors are never verdicts: a run without per-round data, or two runs with no case in common,
raise `CompareError`, which the command line turns into exit code 2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from harness.bench.paired import paired_times, resampled_medians, round_keys
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
    relative: float | None = None
    relative_low: float | None = None
    relative_high: float | None = None
    basis: str = "time"
    mode: str = "forward"

    @property
    def verdict(self) -> str:
        if self.basis == "baseline":
            return "baseline (--relative)"
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
    baseline: str | None = None
    relative: bool = False
    only_base: list[tuple[str, str]] = field(default_factory=list)
    only_new: list[tuple[str, str]] = field(default_factory=list)
    differences: list[str] = field(default_factory=list)
    single_repeat: bool = False
    """Some case of either run has one repeat: its interval covers that run's rounds, not reruns."""

    @property
    def regressions(self) -> list[CaseChange]:
        return [c for c in self.changes if c.regressed]

    @property
    def geometric_mean(self) -> float:
        return math.exp(sum(math.log(c.ratio) for c in self.changes) / len(self.changes))


def bootstrap_ratio(
    base: np.ndarray,
    new: np.ndarray,
    resamples: int = RESAMPLES,
    seed: int = SEED,
    *,
    base_groups: np.ndarray | None = None,
    new_groups: np.ndarray | None = None,
) -> tuple[float, float]:
    """95% bootstrap interval of ``median(new) / median(base)``; with groups (each entry's repeat),
    two-level resampling for a run of two or more repeats (the module docstring)."""
    rng = np.random.default_rng(seed)
    b = resampled_medians(base, base_groups, resamples, rng)
    n = resampled_medians(new, new_groups, resamples, rng)
    ratios = n / b
    return float(np.percentile(ratios, 2.5)), float(np.percentile(ratios, 97.5))


def _repeats(bench: dict[str, Any]) -> np.ndarray | None:
    """Each entry's repeat (`round_keys`), or ``None`` for a run without them."""
    keys = round_keys(bench)
    return None if keys is None else np.asarray([repeat for repeat, _ in keys])


def _repeat_count(groups: np.ndarray | None) -> int:
    return 1 if groups is None else int(np.unique(groups).size)


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


def _has_rounds(bench: dict[str, Any]) -> bool:
    return bool((bench.get("extra_info") or {}).get("rounds"))


def _per_round_vs_baseline(
    case: dict[str, Any], base: dict[str, Any] | None
) -> tuple[np.ndarray, np.ndarray] | None:
    """``(repeats, time / baseline's time)`` per shared round of one run, or ``None`` without pairs."""
    if base is None or base is case:
        return None
    pairs = paired_times(case, base)
    return None if pairs is None else (pairs[0], pairs[1] / pairs[2])


def compare_runs(
    base: Run, new: Run, threshold: float = 0.10, *, relative: bool = False, baseline: str | None = None
) -> Comparison:
    """Match cases by (mode, backend, workload) and judge each change (see the module docstring).

    With ``relative``, a case's verdict comes from its change relative to ``baseline`` (default:
    the base run's) where both runs have paired rounds; other cases are judged by time.
    """
    key = lambda b: (b["extra_info"]["backend"], b["extra_info"]["workload"], _mode(b))  # noqa: E731
    base_cases = {key(b): b for b in base.benchmarks}
    new_cases = {key(b): b for b in new.benchmarks}
    common = [k for k in base_cases if k in new_cases]
    if not common:
        raise CompareError(f"{base.path} and {new.path} have no (mode, backend, workload) case in common")
    reference = baseline or base.baseline
    changes = []
    single_repeat = False
    for k in common:
        a, b = _rounds(base, base_cases[k]), _rounds(new, new_cases[k])
        groups_a, groups_b = _repeats(base_cases[k]), _repeats(new_cases[k])
        single_repeat |= min(_repeat_count(groups_a), _repeat_count(groups_b)) < 2
        ratio = float(np.median(b) / np.median(a))
        low, high = bootstrap_ratio(a, b, base_groups=groups_a, new_groups=groups_b)
        rel_a = _per_round_vs_baseline(base_cases[k], base_cases.get((reference, k[1], k[2])))
        rel_b = _per_round_vs_baseline(new_cases[k], new_cases.get((reference, k[1], k[2])))
        rel = rel_low = rel_high = None
        if rel_a is not None and rel_b is not None:
            rel = float(np.median(rel_b[1]) / np.median(rel_a[1]))
            rel_low, rel_high = bootstrap_ratio(rel_a[1], rel_b[1], base_groups=rel_a[0], new_groups=rel_b[0])
        basis = "vs baseline" if relative and rel is not None else "time"
        judged, j_low, j_high = (rel, rel_low, rel_high) if basis == "vs baseline" else (ratio, low, high)
        if relative and k[0] == reference and _has_rounds(base_cases[k]) and _has_rounds(new_cases[k]):
            basis, judged, j_low, j_high = "baseline", 1.0, 1.0, 1.0  # the yardstick is not judged
        significant = j_low > 1 or j_high < 1
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
                regressed=significant and judged > 1 + threshold,
                improved=significant and judged < 1 / (1 + threshold),
                relative=rel,
                relative_low=rel_low,
                relative_high=rel_high,
                basis=basis,
                mode=k[2],
            )
        )
    changes.sort(key=lambda c: c.ratio, reverse=True)
    return Comparison(
        changes,
        threshold,
        baseline=reference,
        relative=relative,
        only_base=[_labelled(k) for k in base_cases if k not in new_cases],
        only_new=[_labelled(k) for k in new_cases if k not in base_cases],
        differences=_differences(base, new),
        single_repeat=single_repeat,
    )


def _mode(bench: dict[str, Any]) -> str:
    return (bench.get("extra_info") or {}).get("mode", "forward")


def _labelled(key: tuple[str, str, str]) -> tuple[str, str]:
    """``(backend, workload)``, the workload marked with its mode unless forward."""
    backend, workload, mode = key
    return backend, workload if mode == "forward" else f"{workload} ({mode})"


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.4g}"


def format_comparison(result: Comparison) -> str:
    """A Markdown table sorted by change (worst first), the geometric mean and any warnings."""
    with_relative = any(c.relative is not None for c in result.changes)
    modes = any(c.mode != "forward" for c in result.changes)
    head = ["backend", "workload", *(["mode"] if modes else []), "base median ms", "new median ms"]
    head += ["new/base", "95% CI"]
    if with_relative:
        head += [f"vs {result.baseline}: new/base", "95% CI "]
    head.append("verdict")
    rows = []
    for c in result.changes:
        row = [
            c.backend,
            c.workload,
            *([c.mode] if modes else []),
            _ms(c.base_median),
            _ms(c.new_median),
            f"{c.ratio:.3f}",
            f"{c.low:.3f}..{c.high:.3f}",
        ]
        if with_relative:
            if c.basis == "baseline":
                row += ["1 (baseline)", "-"]
            elif c.relative is None:
                row += ["-", "-"]
            else:
                row += [f"{c.relative:.3f}", f"{c.relative_low:.3f}..{c.relative_high:.3f}"]
        row.append(c.verdict if c.significant or c.basis == "baseline" else f"~ {c.verdict}")
        rows.append(row)
    text = markdown_table(head, rows)
    text += (
        f"\n\nGeometric mean of new/base over {len(result.changes)} case(s): {result.geometric_mean:.3f} "
        f"(< 1 is faster). Threshold {result.threshold:.0%}; `~` marks changes that are not significant."
    )
    if with_relative:
        judged = "relative to the baseline (--relative)" if result.relative else "by time"
        text += (
            f"\n`vs {result.baseline}`: the change of each case's per-round time over {result.baseline}'s "
            f"in the same round (cancels machine drift between the runs). Verdicts are judged {judged}."
        )
    if result.single_repeat:
        text += (
            "\nIntervals resample rounds within each run, so they do not cover how much a rerun of the "
            "same code differs on a shared machine; compare runs made with `--repeat 3`, whose repeats "
            "are resampled too."
        )
    else:
        text += "\nIntervals resample each run's repeats, then rounds within them (a two-level bootstrap)."
    for what, keys in (("only in base", result.only_base), ("only in new", result.only_new)):
        if keys:
            text += f"\n{what}: " + ", ".join(f"{b} x {w}" for b, w in keys)
    if result.differences:
        text += "\n\nWARNING: the runs differ in machine, versions or threads; ratios may reflect that:\n"
        text += "\n".join(f"- {d}" for d in result.differences)
    n = len(result.regressions)
    text += f"\n\n{n} regression(s) beyond {result.threshold:.0%}." if n else "\n\nNo regression."
    return text
