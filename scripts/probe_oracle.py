"""Probe of the harness's share of a fuzz example: validation, oracle and comparison against a
user backend that calls ``F.embedding_bag`` per feature (torch on one thread).

Not the benchmark suite (that is ``jagbench bench``): a quick side-by-side, interleaved medians in
one process, for tuning `harness.reference` and `harness.tolerance`. Run it on a quiet machine:

    .venv/bin/python scripts/probe_oracle.py --reps 9
    .venv/bin/python scripts/probe_oracle.py --loop      # also the loop reference at 100 000 ids
    .venv/bin/python scripts/probe_oracle.py --cpu-time  # CPU time: less noisy on a busy machine

Prints one Markdown row per problem size: the median time of each step, the harness's steps
together, and their share of (harness + backend).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from harness.agreement import Oracle
from harness.model import JaggedBatch, Pooling, TableConfig
from harness.reference.forward import pool, pool_loop
from harness.tolerance import compare
from harness.validate import validate_problem
from impls.torch_embedding_bag import TorchEmbeddingBag

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Size:
    name: str
    ids: int
    features: int
    tables: int
    dims: tuple[int, int]
    batch: int
    weighted: bool = False


SIZES = (
    Size("tiny", 20, 3, 2, (4, 16), 4),
    Size("small", 500, 8, 4, (16, 64), 32),
    Size("medium", 5_000, 16, 8, (16, 256), 128, weighted=True),
    Size("long bags", 100_000, 8, 4, (64, 128), 16),
    Size("large, 64 features", 100_000, 64, 16, (16, 1024), 256),
    Size("large, 256 features", 100_000, 256, 64, (16, 1024), 64, weighted=True),
)


def make_problem(size: Size, seed: int = 0):
    rng = np.random.default_rng(seed)
    per_table = np.array_split(np.arange(size.features), size.tables)
    tables = []
    for i, features in enumerate(per_table):
        dim = int(rng.integers(size.dims[0], size.dims[1] + 1))
        pooling = Pooling.SUM if size.weighted else (Pooling.SUM, Pooling.MEAN)[i % 2]
        tables.append(
            TableConfig(f"t{i}", 10_000, dim, tuple(f"f{j}" for j in features), pooling, DTYPES[i % 3])
        )
    weights = {t.name: torch.randn(t.num_embeddings, t.embedding_dim).to(t.dtype) for t in tables}
    bags = size.features * size.batch
    lengths = rng.multinomial(size.ids, np.ones(bags) / bags)
    values = torch.from_numpy(rng.integers(0, 10_000, size.ids))
    keys = tuple(f for t in tables for f in t.feature_names)
    per_sample = torch.randn(size.ids) if size.weighted else None
    batch = JaggedBatch(keys, values, torch.from_numpy(lengths), per_sample)
    return tables, weights, batch


CLOCK = time.perf_counter


def median_time(fn: Callable[[], object], reps: int) -> float:
    times = []
    for _ in range(reps):
        start = CLOCK()
        fn()
        times.append(CLOCK() - start)
    return statistics.median(times)


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3g}"


def step_times(backend: TorchEmbeddingBag, tables, weights, batch, reps: int) -> dict[str, float]:
    """Median seconds of each step of one fuzz example, interleaved (load changes hit all alike)."""
    result = backend.prepare(tables, weights)(batch)
    oracle = Oracle.of(tables, weights, batch)  # compiles (or loads the cache) once
    steps = {
        "backend": lambda: backend.prepare(tables, weights)(batch),
        "validate": lambda: validate_problem(tables, batch, weights),
        "oracle": lambda: Oracle.of(tables, weights, batch),
        "compare": lambda: compare(result, oracle.reference.value, oracle.tolerance),
    }
    rounds: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(reps):
        for name, fn in steps.items():
            rounds[name].append(median_time(fn, 1))
    times = {name: statistics.median(r) for name, r in rounds.items()}
    times["elements"] = float(result.numel())
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--loop", action="store_true", help="time the loop reference at 100 000 ids too")
    p.add_argument(
        "--cpu-time",
        action="store_true",
        help="this process's CPU time instead of wall time (a busy machine)",
    )
    args = p.parse_args()
    global CLOCK
    CLOCK = time.process_time if args.cpu_time else time.perf_counter
    torch.set_num_threads(1)
    backend = TorchEmbeddingBag()
    print(
        "| problem | ids | output elements | backend ms | validate ms | oracle ms | compare ms "
        "| harness ms | harness share |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for size in SIZES:
        t = step_times(backend, *make_problem(size), args.reps)
        harness = t["validate"] + t["oracle"] + t["compare"]
        share = harness / (harness + t["backend"])
        print(
            f"| {size.name} | {size.ids} | {int(t['elements'])} | {ms(t['backend'])} | {ms(t['validate'])} "
            f"| {ms(t['oracle'])} | {ms(t['compare'])} | {ms(harness)} | {share:.0%} |"
        )
    if args.loop:
        size = Size("loop", 100_000, 8, 4, (16, 32), 64)
        tables, weights, batch = make_problem(size)
        fast = median_time(lambda: pool(tables, weights, batch), args.reps)
        slow = median_time(lambda: pool_loop(tables, weights, batch), 1)
        print(
            f"\nreference at 100 000 ids (8 features, dims 16-32, batch 64): loop {slow:.2f} s, "
            f"fast {fast * 1e3:.3g} ms, {slow / fast:.0f}x"
        )


if __name__ == "__main__":
    main()
