"""Tuning probe for numba's training step: interleaved medians of one step, side by side.

Not the benchmark suite (that is ``jagbench bench --mode train``): a quick comparison for tuning
the kernel. Each round calls every trainer's step once, in turn, on the same batch and
grad_output (the weights move on; the work per step does not change). The workloads are the
standard ones (``cases/workloads``), fp32, with one optimizer (default rowwise_adagrad, lr 0.01).
Large ones allocate several copies of their tables: run under the shared lock, e.g.

    flock /tmp/jagbench-heavy.lock .venv/bin/python scripts/probe_numba_training.py --reps 15

Trainers: any training backend by name (``numba``, ``fbgemm-tbe``, ``torchrec-fused``, ``torch``),
``numba:fuse=0,ahead=8`` (numba with its module settings changed), and ``torch-rowwise``: torch's
``F.embedding_bag(sparse=True)`` per feature, autograd, then the coalesced sparse gradient applied
by hand with the rowwise Adagrad formula (torch.optim has no rowwise Adagrad).

Prints per workload and trainer the median step time, the ratio to the first trainer, and GB/s
by the byte model (per distinct row: the row read and written and its state read and written,
rowwise 4 bytes each way; per id: the forward row read), next to the memory-copy bandwidth.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

import torch
import torch.nn.functional as F

import impls.numba_fused as numba_fused
from harness.backend import load_backend
from harness.bench.workloads import STANDARD, get_workloads
from harness.model import JaggedBatch, TableConfig, output_columns
from harness.training.contract import OptimizerConfig, TrainResult


def copy_bandwidth(nbytes: int = 1 << 29, reps: int = 5) -> float:
    """GB/s of a large array copy, counting the bytes read and written."""
    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    return 2 * nbytes / statistics.median(times) / 1e9


def torch_rowwise(tables: tuple[TableConfig, ...], weights, optimizer: OptimizerConfig):
    """torch autograd on sparse embedding_bag gradients, then the exact rowwise Adagrad update of
    the coalesced rows (float32 state per row)."""
    params = {t.name: weights[t.name].to(torch.float32, copy=True).requires_grad_(True) for t in tables}
    state = {t.name: torch.zeros(t.num_embeddings) for t in tables}
    columns = output_columns(tables)
    lr, eps = optimizer.learning_rate, optimizer.eps
    modes = {t.name: t.pooling.value for t in tables}

    def step(batch: JaggedBatch, grad_output: torch.Tensor) -> TrainResult:
        b = batch.batch_size
        offsets = batch.offsets
        pooled = []
        for table, feature, _, _ in columns:
            f = batch.keys.index(feature)
            lo, hi = int(offsets[f * b]), int(offsets[(f + 1) * b])
            pooled.append(
                F.embedding_bag(
                    batch.values[lo:hi],
                    params[table],
                    offsets[f * b : (f + 1) * b] - lo,
                    mode=modes[table],
                    sparse=True,
                )
            )
        output = torch.cat(pooled, dim=1)
        output.backward(grad_output)
        with torch.no_grad():
            for name, p in params.items():
                g = p.grad.coalesce()
                rows, grad = g.indices()[0], g.values()
                m = state[name].index_add_(0, rows, (grad * grad).mean(dim=1))[rows]
                p.index_add_(0, rows, -(lr / (m.sqrt() + eps)).unsqueeze(1) * grad)
                p.grad = None
        return TrainResult(output.detach(), {n: p.detach() for n, p in params.items()}, None)

    return step


SETTINGS = {"fuse": "FUSE_FORWARD", "ahead": "TRAIN_PREFETCH_DISTANCE", "serial": "SERIAL_WORK"}
DEFAULTS = {key: getattr(numba_fused, attr) for key, attr in SETTINGS.items()}


def numba_settings(name: str) -> None:
    """``numba:fuse=0,ahead=8`` sets the numba module's training settings for the next call."""
    given = dict(kv.split("=") for kv in name.partition(":")[2].split(",") if kv)
    for key, attr in SETTINGS.items():
        value = int(given.get(key, DEFAULTS[key]))
        setattr(numba_fused, attr, bool(value) if key == "fuse" else value)


def trainer(name: str, tables, weights, optimizer):
    if name == "torch-rowwise":
        return torch_rowwise(tables, weights, optimizer)
    return load_backend(name.partition(":")[0]).prepare_training(tables, weights, optimizer)


def probe(workload, names: list[str], reps: int, optimizer: OptimizerConfig) -> None:
    problem = workload.problem()
    tables, weights, batch = tuple(problem.tables), problem.weights, problem.batch
    gen = torch.Generator().manual_seed(1)
    grad_output = torch.randn(
        batch.batch_size, sum(t.embedding_dim * len(t.feature_names) for t in tables), generator=gen
    )
    steps = {}
    for name in names:
        t0 = time.perf_counter()
        steps[name] = trainer(name, tables, weights, optimizer)
        numba_settings(name)
        for _ in range(2):
            steps[name](batch, grad_output)
        print(f"  {workload.name}: {name} prepared in {time.perf_counter() - t0:.2f} s", flush=True)
    times: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(reps):
        for name, step in steps.items():
            numba_settings(name)
            t0 = time.perf_counter()
            step(batch, grad_output)
            times[name].append(time.perf_counter() - t0)
    numba_settings("numba")
    distinct = 0
    for t in tables:
        ids = torch.cat(
            [batch.values[batch.offsets[f * batch.batch_size] : batch.offsets[(f + 1) * batch.batch_size]]
             for f, key in enumerate(batch.keys) if key in t.feature_names]
        )  # fmt: skip
        distinct += len(torch.unique(ids)) * (t.embedding_dim * 4 * 2 + 8)
    forward = sum(
        t.embedding_dim * 4 * int(batch.lengths.view(len(batch.keys), -1)[batch.keys.index(f)].sum())
        for t in tables
        for f in t.feature_names
    )
    model_bytes = distinct + forward
    base = statistics.median(times[names[0]])
    for name in names:
        m = statistics.median(times[name])
        print(
            f"{workload.name:15s} {name:22s} median {m * 1e3:8.3f} ms (min {min(times[name]) * 1e3:8.3f})"
            f"  {name if m == base else names[0]} {max(m, base) / min(m, base):5.2f}x faster"
            f"  {model_bytes / m / 1e9:6.1f} GB/s",
            flush=True,
        )
    del steps
    gc.collect()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", action="append", choices=STANDARD)
    parser.add_argument("--trainers", default="numba,fbgemm-tbe,torch-rowwise,torchrec-fused")
    parser.add_argument("--optimizer", default="rowwise_adagrad")
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--reps", type=int, default=15)
    args = parser.parse_args()
    optimizer = OptimizerConfig(args.optimizer, args.lr)
    names = args.trainers.split(",")
    print(f"threads: torch {torch.get_num_threads()}; memory copy {copy_bandwidth():.1f} GB/s (read+write)")
    for w in get_workloads(args.workload or list(STANDARD)):
        probe(w, names, args.reps, optimizer)


if __name__ == "__main__":
    main()
