"""Quick interleaved-median probe: torchrec / FBGEMM backends beside torch on the four CPU workloads.

Not the benchmark suite (that is ``jagbench bench``): a side-by-side look to size the backends. Each
group holds torch and one or two of ours (so at most two extra copies of the tables live at once);
within a group the backends run in turn, ``--reps`` rounds, and each reports the median of its
rounds and its CPU time / wall time (about how many of the cores it kept busy).
``--threads`` sets ``torch.set_num_threads`` (torch's intra-op pool; FBGEMM's CPU TBE forward ran on
one thread whatever it was). Needs several GiB, so run it only under the shared lock::

    flock /tmp/jagbench-heavy.lock .venv/bin/python scripts/probe_torchrec_speed.py
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from collections.abc import Callable

import torch

from harness.backend import load_backend
from harness.model import JaggedBatch, TableConfig
from harness.weights import make_weights
from impls.fbgemm_tbe import FbgemmTBE, tbe_lookup

# name: (tables, rows, dim, batch size, max bag length); bag lengths uniform in 0..max.
WORKLOADS = {
    "dlrm-like": (8, 1_000_000, 64, 2048, 40),
    "wide": (2, 2_000_000, 256, 1024, 100),
    "many-small": (64, 10_000, 16, 4096, 4),
    "cache-resident": (4, 1_000, 32, 512, 20),
}


def workload(name: str, seed: int = 0) -> tuple[list[TableConfig], dict[str, torch.Tensor], JaggedBatch]:
    n_tables, rows, dim, batch, max_len = WORKLOADS[name]
    tables = [TableConfig(f"t{i}", rows, dim, (f"f{i}",)) for i in range(n_tables)]
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, max_len + 1, (n_tables * batch,), generator=gen)
    values = torch.randint(0, rows, (int(lengths.sum()),), generator=gen)
    return (
        tables,
        make_weights(tables, seed),
        JaggedBatch(tuple(t.feature_names[0] for t in tables), values, lengths),
    )


def groups(tables, weights) -> list[dict[str, Callable[[], Callable]]]:
    """Lazily built lookups, a group at a time; torch in every group as the yardstick."""

    def backend(name: str) -> Callable[[], Callable]:
        return lambda: load_backend(name).prepare(tables, weights)

    def tbe_pair() -> dict[str, Callable]:
        module = FbgemmTBE().build(tables, weights)
        return {
            "fbgemm-tbe": tbe_lookup(module, tables),
            "fbgemm-tbe-int32": tbe_lookup(module, tables, torch.int32),
        }

    return [
        {"torch": backend("torch"), "torchrec": backend("torchrec")},
        {"torch": backend("torch"), "torchrec-fused": backend("torchrec-fused")},
        {"torch": backend("torch"), "fbgemm-tbe+int32": tbe_pair},
        {"torch": backend("torch"), "fbgemm-tbe-none": lambda: FbgemmTBE("NONE").prepare(tables, weights)},
    ]


def run_group(group, batch: JaggedBatch, reps: int) -> dict[str, tuple[float, float]]:
    lookups: dict[str, Callable] = {}
    for name, make in group.items():
        made = make()
        lookups.update(made if isinstance(made, dict) else {name: made})
    times: dict[str, list[float]] = {n: [] for n in lookups}
    cpu: dict[str, float] = {n: 0.0 for n in lookups}
    for fn in lookups.values():
        fn(batch)
    for _ in range(reps):
        for name, fn in lookups.items():
            c0, t0 = time.process_time(), time.perf_counter()
            fn(batch)
            t1, c1 = time.perf_counter(), time.process_time()
            times[name].append(t1 - t0)
            cpu[name] += c1 - c0
    return {n: (statistics.median(times[n]), cpu[n] / sum(times[n])) for n in lookups}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--workload", action="append", choices=sorted(WORKLOADS))
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's own)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, torch.get_num_threads() = {torch.get_num_threads()}")
    print("| workload | group | backend | median ms | ratio to torch | CPU/wall |")
    print("|---|---|---|---|---|---|")
    for wl in args.workload or list(WORKLOADS):
        tables, weights, batch = workload(wl)
        for g, group in enumerate(groups(tables, weights)):
            res = run_group(group, batch, args.reps)
            base = res["torch"][0]
            for name, (med, busy) in res.items():
                print(
                    f"| {wl} | {g} | {name} | {med * 1e3:.3f} | {med / base:.2f} | {busy:.2f} |", flush=True
                )
            gc.collect()
        del tables, weights, batch
        gc.collect()


if __name__ == "__main__":
    main()
