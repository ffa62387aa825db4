"""Tuning probe for the numba backend: interleaved medians of numba and torch in one process.

Not the benchmark suite (that is ``jagbench bench``): a quick side-by-side for tuning the kernel.
The workloads are the four of the numba issue (fp32, uniform ids). Large ones allocate up to
4 GiB: run under the shared lock, e.g.

    flock /tmp/jagbench-heavy.lock .venv/bin/python scripts/probe_numba.py --reps 15

Prints, per workload and backend, the median time, the ratio to numba, and GB/s of rows read
(ids x dim x bytes per element), next to the machine's memory-copy bandwidth (read + write).
``--bench-workload sweep-D-8`` probes a workload of cases/workloads/ instead (no GB/s).
Numba variants for tuning: ``--backends "numba;numba:chunk=32,ahead=8;torch"``; ``huge=0`` reads
large tables where the caller holds them instead of from a copy on huge pages (`impls.huge_pages`);
``outputs=0`` allocates every output with ``torch.empty`` instead of reusing released ones
(`impls.output_buffers`);
``bagdim`` and ``width`` set where bag-by-bag pooling starts and its block width. Each round calls
the backends in a fresh random order (a fixed order slows whichever comes first); ``--warm`` makes
one untimed call of the same backend before each timed one, as ``jagbench bench`` does;
``--calls`` prints every timed call, to see outliers a median hides.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from dataclasses import dataclass

import torch

import impls.huge_pages as huge_pages
import impls.numba_fused as numba_fused
import impls.output_buffers as output_buffers
from harness.backend import load_backend
from harness.bench.workloads import get_workloads
from harness.model import JaggedBatch, TableConfig


@dataclass(frozen=True)
class Workload:
    name: str
    tables: int
    rows: int
    dim: int
    batch: int
    max_bag: int


WORKLOADS = (
    Workload("dlrm", 8, 1_000_000, 64, 2048, 40),
    Workload("wide", 2, 2_000_000, 256, 1024, 100),
    Workload("many-small", 64, 10_000, 16, 4096, 4),
    Workload("cache-resident", 4, 1_000, 32, 512, 20),
)


def build(w: Workload, seed: int = 0) -> tuple[list[TableConfig], dict[str, torch.Tensor], JaggedBatch]:
    gen = torch.Generator().manual_seed(seed)
    tables = [TableConfig(f"t{i}", w.rows, w.dim, (f"f{i}",)) for i in range(w.tables)]
    weights = {t.name: torch.rand(w.rows, w.dim, generator=gen) for t in tables}
    lengths = torch.randint(0, w.max_bag + 1, (w.tables * w.batch,), generator=gen)
    values = torch.randint(0, w.rows, (int(lengths.sum()),), generator=gen)
    return tables, weights, JaggedBatch(tuple(f"f{i}" for i in range(w.tables)), values, lengths)


def copy_bandwidth(nbytes: int = 1 << 30, reps: int = 5) -> float:
    """GB/s of a large array copy, counting the bytes read and written."""
    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    return 2 * nbytes / statistics.median(times) / 1e9


def numba_settings(name: str) -> None:
    """``numba:chunk=32,ahead=8`` tunes the numba lookup's module settings for the next call."""
    given = dict(kv.split("=") for kv in name.partition(":")[2].split(",") if kv)
    numba_fused.CHUNK = int(given.get("chunk", CHUNK))
    numba_fused.CHUNKS_PER_THREAD = int(given.get("per", PER))
    numba_fused.PREFETCH_DISTANCE = int(given.get("ahead", AHEAD))
    numba_fused.SERIAL_WORK = int(given.get("serial", SERIAL))
    numba_fused.BAG_MAJOR_DIM = int(given.get("bagdim", BAG_DIM))
    numba_fused.BAG_MAJOR_WIDTH = int(given.get("width", BAG_WIDTH))
    huge_pages.MIN_TABLE_BYTES = HUGE if int(given.get("huge", 1)) else 1 << 62
    output_buffers.MIN_BYTES = OUTPUT_BYTES if int(given.get("outputs", 1)) else 1 << 62


CHUNK, AHEAD, SERIAL = numba_fused.CHUNK, numba_fused.PREFETCH_DISTANCE, numba_fused.SERIAL_WORK
PER = numba_fused.CHUNKS_PER_THREAD
BAG_DIM, BAG_WIDTH = numba_fused.BAG_MAJOR_DIM, numba_fused.BAG_MAJOR_WIDTH
HUGE = huge_pages.MIN_TABLE_BYTES
OUTPUT_BYTES = output_buffers.MIN_BYTES


def probe(w: Workload, backends: list[str], reps: int, warm: bool, calls: bool) -> None:
    tables, weights, batch = build(w)
    probe_problem(w.name, tables, weights, batch, backends, reps, len(batch.values) * w.dim * 4, warm, calls)


def probe_problem(
    label: str,
    tables: list[TableConfig],
    weights: dict[str, torch.Tensor],
    batch: JaggedBatch,
    backends: list[str],
    reps: int,
    bytes_read: int | None,
    warm: bool = False,
    calls: bool = False,
) -> None:
    """Interleaved medians of ``backends`` on one problem (GB/s of rows read when ``bytes_read``)."""
    lookups = {}
    for name in backends:
        numba_settings(name)
        t0 = time.perf_counter()
        lookups[name] = load_backend(name.partition(":")[0]).prepare(tables, weights)
        prepare_s = time.perf_counter() - t0
        for _ in range(3):
            lookups[name](batch)
        print(f"  {name}: prepare {prepare_s:.3f} s")
    times: dict[str, list[float]] = {n: [] for n in backends}
    # A fresh order each round: the first call of a round is slower (it follows the previous
    # round's last backend, whose rows filled the cache), and a fixed order gives that to one backend.
    order = random.Random(0)
    names = list(lookups)
    for _ in range(reps):
        order.shuffle(names)
        for name in names:
            f = lookups[name]
            numba_settings(name)
            if warm:
                f(batch)
            t0 = time.perf_counter()
            f(batch)
            times[name].append(time.perf_counter() - t0)
    base = statistics.median(times[backends[0]])
    for backend in backends:
        m = statistics.median(times[backend])
        rate = f"  {bytes_read / m / 1e9:6.1f} GB/s" if bytes_read else ""
        print(
            f"{label:15s} {backend:24s} median {m * 1e3:8.3f} ms  {base / m:5.2f}x vs {backends[0]}"
            f"  speedup of {backends[0]}: {m / base:5.2f}x{rate}"
        )
        if calls:
            print(
                "    every call, ms, fastest first:",
                " ".join(f"{t * 1e3:.1f}" for t in sorted(times[backend])),
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", action="append", choices=[w.name for w in WORKLOADS])
    parser.add_argument(
        "--backends",
        default="numba,torch",
        help=(
            "comma-separated; numba:chunk=32,ahead=8,serial=0,per=2,huge=0,outputs=0,bagdim=128,width=32 "
            "overrides the numba settings"
        ),
    )
    parser.add_argument(
        "--bench-workload",
        action="append",
        default=[],
        help="a workload of cases/workloads/ (e.g. sweep-D-8), built as jagbench bench builds it",
    )
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument(
        "--warm",
        action="store_true",
        help="one untimed call of the same backend before each timed one (as jagbench bench warms)",
    )
    parser.add_argument(
        "--calls", action="store_true", help="print every timed call, fastest first (to see outliers)"
    )
    args = parser.parse_args()
    backends = args.backends.split(";") if ";" in args.backends else args.backends.split(",")
    chosen = [w for w in WORKLOADS if not args.workload or w.name in args.workload]
    if args.bench_workload and not args.workload:
        chosen = []
    print(f"threads: torch {torch.get_num_threads()}; memory copy {copy_bandwidth():.1f} GB/s (read+write)")
    for w in chosen:
        probe(w, backends, args.reps, args.warm, args.calls)
    for workload in get_workloads(args.bench_workload) if args.bench_workload else []:
        p = workload.problem()
        probe_problem(
            workload.name,
            list(p.tables),
            dict(p.weights),
            p.batch,
            backends,
            args.reps,
            None,
            args.warm,
            args.calls,
        )


if __name__ == "__main__":
    main()
