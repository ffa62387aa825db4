"""The rank side of the ``torchrec-sharded`` backends: shard an EBC, load weights, look up a slice.

One module, two ways to run it:

- As a pool worker (`serve`), started by `impls.torchrec_sharded` and driven over a pipe: it
  joins a gloo process group once, then answers ``setup`` (shard the problem's tables, load their
  weights into the shards and read them back), ``lookup`` (pool this rank's slice of the batch),
  ``train_setup`` / ``train_step`` (the training module and one step on this rank's slice, see
  `build_sharded_training`) and ``release`` messages until told to stop or its parent goes away.
- Under ``torchrun`` (`main`), on one or many machines (NCCL on GPUs, gloo on CPUs): every rank
  builds the same seeded problems, looks up its slice and rank 0 checks the gathered result
  against the reference. See docs/sharding.md.

Everything torchrec is imported inside functions, so importing this module needs only torch.
"""

from __future__ import annotations

import argparse
import os
import select
import signal
import sys
import threading
import traceback
from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import Any

import torch

from harness.expected_warnings import install as install_expected_warnings
from harness.model import JaggedBatch, TableConfig, is_quantized, output_columns

SHARDING_TYPES = ("table_wise", "row_wise", "column_wise", "table_column_wise", "data_parallel")
PG_TIMEOUT = timedelta(seconds=120)


def sample_ranges(batch_size: int, world_size: int) -> list[tuple[int, int]]:
    """Each rank's ``[start, stop)`` samples: contiguous, the first ``batch_size % world_size``
    ranks one sample longer (``torch.tensor_split``'s rule), possibly empty."""
    base, extra = divmod(batch_size, world_size)
    out, start = [], 0
    for r in range(world_size):
        stop = start + base + (1 if r < extra else 0)
        out.append((start, stop))
        start = stop
    return out


def column_split(dim: int, world_size: int) -> list[int]:
    """Columns per rank for the column-wise plans: as even as possible, the first ranks wider."""
    base, extra = divmod(dim, world_size)
    return [base + (1 if r < extra else 0) for r in range(world_size)]


def unsupported(
    sharding_type: str, world_size: int, tables: Sequence[TableConfig], batch: JaggedBatch
) -> str | None:
    """Why this plan cannot run the problem here, or ``None``."""
    quantized = [t.name for t in tables if is_quantized(t)]
    if quantized:
        return f"quantized tables {quantized}: the sharded EBC here holds float tables only"
    if batch.batch_size < world_size:
        return (
            f"batch of {batch.batch_size} samples over {world_size} ranks: a rank would get no "
            "samples, and torchrec rejects an empty KeyedJaggedTensor"
        )
    if sharding_type in ("column_wise", "table_column_wise"):
        narrow = sorted({t.embedding_dim for t in tables if t.embedding_dim < world_size})
        if narrow:
            return f"embedding_dim {narrow} below the world size {world_size}: a rank would get no column"
    if any(t.dtype == torch.bfloat16 for t in tables):
        return (
            "bfloat16 tables: the sharded EBC stores them as bfloat16 in FBGEMM's CPU TBE, whose "
            "forward (split_embedding_cpu_forward) is not implemented for BFloat16"
        )
    return None


TRAINING_SHARDING_TYPES = ("table_wise", "column_wise", "table_column_wise")
"""The plans that train with torchrec's fused kernel on the CPU (`training_unsupported`)."""
TBE_DIM_UNIT = 4
"""FBGEMM's TBE asserts every table's (and so every column shard's) dim is a multiple of 4."""


def training_column_widths(dim: int, world_size: int) -> list[int]:
    """A column-wise plan's shards for training: whole 4-column blocks over the ranks, as even as
    possible (`harness.training.known.column_shard_widths`, the column-shard model's rule)."""
    from harness.training.known import column_shard_widths

    return column_shard_widths(dim, world_size, TBE_DIM_UNIT)


def training_unsupported(
    sharding_type: str, world_size: int, tables: Sequence[TableConfig], batch: JaggedBatch
) -> str | None:
    """Why this plan cannot train the problem here, or ``None``."""
    if sharding_type == "row_wise":
        return (
            "row_wise: torchrec's planner offers no row-wise plan with the fused (training) kernel on the "
            "CPU, and forced by an explicit plan its backward fails here (a GPU-only op, 'weights[0] must "
            "be a GPU or MTIA tensor'; gloo allgather size mismatches when the ranks' slices differ)"
        )
    if sharding_type == "data_parallel":
        return (
            "data_parallel: torchrec replicates such tables with the dense kernel only (trained by DDP and a "
            "dense optimizer), no fused optimizer"
        )
    if batch.weights is not None:
        return (
            "per-sample weights: torchrec's sharded EBC moves them to the shards' ranks in its input "
            "all-to-all, outside autograd, so their gradient is never computed"
        )
    odd = sorted({t.embedding_dim for t in tables if t.embedding_dim % TBE_DIM_UNIT})
    if odd:
        return f"embedding_dim {odd}: FBGEMM's TBE under the fused kernel asserts embedding_dim % 4 == 0"
    # The forward plans' checks of the batch (a rank needs samples) and of bfloat16; not their
    # narrow-dim check: a training column-wise plan keeps a table narrower than 8 columns whole.
    return unsupported("table_wise", world_size, tables, batch)


def pack_batch(batch: JaggedBatch) -> dict[str, Any]:
    """A batch as plain numpy arrays, for the pipe."""
    return {
        "keys": batch.keys,
        "values": batch.values.numpy(),
        "lengths": batch.lengths.numpy(),
        "weights": None if batch.weights is None else batch.weights.numpy(),
    }


def unpack_batch(d: Mapping[str, Any]) -> JaggedBatch:
    return JaggedBatch(
        keys=tuple(d["keys"]),
        values=torch.from_numpy(d["values"]),
        lengths=torch.from_numpy(d["lengths"]),
        weights=None if d["weights"] is None else torch.from_numpy(d["weights"]),
    )


def _parameter_shardings(
    sharding_type: str,
    tables: Sequence[TableConfig],
    module: torch.nn.Module,
    world_size: int,
    device: str,
    sharder: Any = None,
    widths: Any = column_split,
    compute_kernel: str | None = None,
) -> dict[str, Any]:
    """The explicit per-table plan (torchrec's planner is not asked: it refuses some plans on CPU).

    table-wise puts table ``i`` on rank ``i % world_size``; row-wise splits every table's rows over
    all ranks; column-wise splits every table's columns over all ranks (`column_split`: uneven
    when the dim is not divisible by the world size); table-column-wise
    splits them the same way but as TABLE_COLUMN_WISE shards; data-parallel replicates every table.
    """
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.sharding_plan import (
        column_wise,
        construct_module_sharding_plan,
        data_parallel,
        row_wise,
        table_wise,
    )
    from torchrec.distributed.types import ShardingType

    def generator(i: int) -> Any:
        if sharding_type == "table_wise":
            return table_wise(rank=i % world_size, compute_kernel=compute_kernel)
        if sharding_type == "row_wise":
            return row_wise(compute_kernel=compute_kernel)
        if sharding_type in ("column_wise", "table_column_wise"):
            size = widths(tables[i].embedding_dim, world_size)
            return column_wise(size_per_rank=size, compute_kernel=compute_kernel)
        return data_parallel()

    plan = construct_module_sharding_plan(
        module,
        {t.name: generator(i) for i, t in enumerate(tables)},
        sharder=sharder or EmbeddingBagCollectionSharder(),
        local_size=world_size,
        world_size=world_size,
        device_type=device,
    )
    if sharding_type == "table_column_wise":
        for ps in plan.values():
            ps.sharding_type = ShardingType.TABLE_COLUMN_WISE.value
    return dict(plan)


def build_sharded(
    tables: Sequence[TableConfig],
    sharding_type: str,
    *,
    is_weighted: bool,
    world_size: int,
    device: torch.device,
    pg: Any,
) -> torch.nn.Module:
    """torchrec's ``ShardedEmbeddingBagCollection`` for ``tables`` under the explicit plan."""
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.types import ShardingEnv
    from torchrec.modules.embedding_modules import EmbeddingBagCollection

    from impls.torchrec_ebc import embedding_bag_configs

    ebc = EmbeddingBagCollection(
        embedding_bag_configs(tables), is_weighted=is_weighted, device=torch.device("meta")
    )
    params = _parameter_shardings(sharding_type, tables, ebc, world_size, device.type)
    return EmbeddingBagCollectionSharder().shard(
        ebc, params, ShardingEnv.from_process_group(pg), device=device
    )


def build_sharded_training(
    tables: Sequence[TableConfig],
    sharding_type: str,
    optimizer: Any,
    *,
    is_weighted: bool,
    world_size: int,
    device: torch.device,
    pg: Any,
) -> torch.nn.Module:
    """The sharded EBC for training: ``EmbeddingBagCollectionSharder(fused_params=...)`` with
    FBGEMM's fused optimizer (`impls.fbgemm_tbe.fbgemm_optimizer_kwargs`: the EXACT_* optimizer,
    learning rate, eps, weight decay and mode, no stochastic rounding) and the ``fused`` compute
    kernel (the explicit plan's default on the CPU is ``dense``, which leaves the update to a
    separate optimizer), under the explicit plan (column shards of whole 4-column blocks,
    `training_column_widths`).

    torchrec divides the pooled embeddings' gradient by the world size in the backward all-to-all
    (``comm_ops.GRADIENT_DIVISION``, on by default, to match DDP's averaging of a per-rank mean
    loss). Here grad_output is the gradient of the *whole* batch's loss, already a sum over the
    samples of every rank, so nothing is owed to averaging: the division is turned off
    (``set_gradient_division(False)``) in this rank's process.
    """
    from torchrec.distributed import comm_ops
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.types import ShardingEnv
    from torchrec.modules.embedding_modules import EmbeddingBagCollection

    from impls.fbgemm_tbe import fbgemm_optimizer_kwargs
    from impls.torchrec_ebc import embedding_bag_configs

    comm_ops.set_gradient_division(False)
    sharder = EmbeddingBagCollectionSharder(fused_params=fbgemm_optimizer_kwargs(optimizer))
    ebc = EmbeddingBagCollection(
        embedding_bag_configs(tables), is_weighted=is_weighted, device=torch.device("meta")
    )
    params = _parameter_shardings(
        sharding_type, tables, ebc, world_size, device.type, sharder=sharder, widths=training_column_widths,
        compute_kernel="fused",
    )  # fmt: skip
    return sharder.shard(ebc, params, ShardingEnv.from_process_group(pg), device=device)


def local_train_step(
    module: torch.nn.Module, tables: Sequence[TableConfig], batch: JaggedBatch, grad_output: torch.Tensor
) -> dict[str, Any]:
    """One training step on this rank's slice of the batch and of grad_output (the forward, the
    backward with its all-to-all and the fused update happen across all ranks together).

    Returns this rank's pooled ``output`` (contract column order, rebuilt by key) and its shards
    after the update: ``[(table, row offset, column offset, values), ...]``. Per-sample weights go
    in as they are: torchrec computes no gradient for them (`training_unsupported`).
    """
    from torchrec.distributed.types import Awaitable

    out = module(batch.to_kjt())
    if isinstance(out, Awaitable):
        out = out.wait()
    by_key = out.to_dict()
    output = torch.cat([by_key[feature] for _, feature, _, _ in output_columns(tables)], dim=1)
    output.backward(grad_output)
    shards = []
    with torch.no_grad():
        for name, entry in _weight_entries(module).items():
            for local, (r0, c0), _ in _local_pieces(entry):
                shards.append((name, r0, c0, local.detach().cpu().clone().numpy()))
    return {"output": output.detach().to(torch.float32).numpy(), "shards": shards}


def _weight_entries(module: torch.nn.Module) -> dict[str, Any]:
    """``{table: ShardedTensor or tensor}`` from the module's state_dict."""
    out = {}
    for key, value in module.state_dict().items():
        if key.startswith("embedding_bags.") and key.endswith(".weight"):
            out[key.removeprefix("embedding_bags.").removesuffix(".weight")] = value
    return out


def _local_pieces(entry: Any) -> list[tuple[torch.Tensor, tuple[int, int], tuple[int, int]]]:
    """``(local tensor, (row, col) offset, (rows, cols))`` of each shard this rank holds."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    if isinstance(entry, ShardedTensor):
        return [
            (s.tensor, tuple(s.metadata.shard_offsets), tuple(s.metadata.shard_sizes))  # type: ignore[misc]
            for s in entry.local_shards()
        ]
    return [(entry, (0, 0), tuple(entry.shape))]  # type: ignore[list-item]


def _same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal element by element, NaN equal to NaN: a table may hold NaN (it is a value, and
    propagates), and ``torch.equal`` would call such a shard different from itself."""
    nan = torch.isnan(a)
    return torch.equal(nan, torch.isnan(b)) and torch.equal(a[~nan], b[~nan])


@torch.no_grad()
def load_and_verify(module: torch.nn.Module, weights: Mapping[str, torch.Tensor]) -> dict[str, list[Any]]:
    """Copy each table's rows/columns into this rank's shards, then read them back.

    Returns ``{table: [(row offset, column offset, rows, columns, storage dtype), ...]}`` for the
    shards this rank holds. Raises ``RuntimeError`` if a shard read back from a fresh
    ``state_dict()`` differs from the weights cast to its storage dtype.
    """
    for name, entry in _weight_entries(module).items():
        full = weights[name]
        for local, (r0, c0), (nr, nc) in _local_pieces(entry):
            local.copy_(full[r0 : r0 + nr, c0 : c0 + nc])
    held: dict[str, list[Any]] = {}
    for name, entry in _weight_entries(module).items():
        full = weights[name]
        for local, (r0, c0), (nr, nc) in _local_pieces(entry):
            want = full[r0 : r0 + nr, c0 : c0 + nc].to(local.dtype)
            if not _same_values(local.cpu(), want):
                raise RuntimeError(
                    f"table {name!r}: the shard at rows {r0}..{r0 + nr}, columns {c0}..{c0 + nc} "
                    "does not hold the loaded weights when read back from state_dict()"
                )
            held.setdefault(name, []).append((r0, c0, nr, nc, str(local.dtype).removeprefix("torch.")))
    return held


@torch.no_grad()
def local_lookup(module: torch.nn.Module, tables: Sequence[TableConfig], batch: JaggedBatch) -> torch.Tensor:
    """This rank's pooled ``[local batch, total_dim]`` float32, columns in the contract's order.

    torchrec returns a ``KeyedTensor``; its columns are taken by key (``to_dict``), so a sharded
    module that labels its keys right but orders them differently still maps to the contract.
    """
    from torchrec.distributed.types import Awaitable

    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    kjt = batch.to_kjt().to(device)
    out = module(kjt)
    if isinstance(out, Awaitable):
        out = out.wait()
    by_key = out.to_dict()
    cols = [by_key[feature] for _, feature, _, _ in output_columns(tables)]
    return torch.cat(cols, dim=1).to(torch.float32).cpu()


def _watch_parent(parent_pid: int) -> None:
    """Exit this rank as soon as the process that started the pool is gone (SIGKILL included).

    The rank's own parent is the forkserver it was forked from, which exits when that process
    does: ``PR_SET_PDEATHSIG`` turns the forkserver's exit into SIGKILL here; a thread waiting on
    a pidfd of ``parent_pid`` (polling it where there is no pidfd) covers the rest.
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass

    def watch() -> None:
        try:
            fd = os.pidfd_open(parent_pid)
        except (AttributeError, OSError):
            fd = None
        if fd is not None:
            select.select([fd], [], [])  # readable once the process has exited
            os._exit(3)
        while True:
            try:
                os.kill(parent_pid, 0)
            except ProcessLookupError:
                os._exit(3)
            except PermissionError:
                pass
            threading.Event().wait(0.5)

    threading.Thread(target=watch, name="jagbench-parent-watch", daemon=True).start()


def _quiet() -> None:
    """torchrec and torch log advice on every sharding: the expected kinds are counted for the
    command's summary (`harness.expected_warnings`), not printed; anything else still shows."""
    install_expected_warnings()


def serve(rank: int, world_size: int, store_port: int, conn: Any, parent_pid: int) -> None:
    """The pool worker's loop: one gloo process group, then messages from the parent until ``stop``.

    Replies ``("ok", payload)`` or ``("error", traceback text)``; SIGINT is ignored (the parent
    handles Ctrl-C and stops the ranks).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _watch_parent(parent_pid)
    _quiet()
    torch.set_num_threads(1)
    try:
        import torch.distributed as dist

        store = dist.TCPStore("127.0.0.1", store_port, is_master=False, timeout=PG_TIMEOUT)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size, timeout=PG_TIMEOUT)
        pg = dist.group.WORLD
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises it
        conn.send(("error", traceback.format_exc()))
        return
    conn.send(("ok", {"pid": os.getpid()}))
    models: dict[int, tuple[Sequence[TableConfig], dict[bool, torch.nn.Module]]] = {}
    device = torch.device("cpu")
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            break
        op = msg[0]
        if op == "stop":
            break
        try:
            if op == "setup":
                _, key, tables, sharding_type, weights_path = msg
                weights = torch.load(weights_path, mmap=True, weights_only=True)
                built = {
                    w: build_sharded(
                        tables, sharding_type, is_weighted=w, world_size=world_size, device=device, pg=pg
                    )
                    for w in (False, True)
                }
                reply: Any = load_and_verify(built[False], weights)
                load_and_verify(built[True], weights)
                models[key] = (tables, built)
            elif op == "lookup":
                _, key, packed = msg
                tables, built = models[key]
                batch = unpack_batch(packed)
                reply = local_lookup(built[batch.weights is not None], tables, batch).numpy()
            elif op == "train_setup":
                _, key, tables, sharding_type, weights_path, optimizer, is_weighted = msg
                weights = torch.load(weights_path, mmap=True, weights_only=True)
                module = build_sharded_training(
                    tables, sharding_type, optimizer, is_weighted=is_weighted, world_size=world_size,
                    device=device, pg=pg,
                )  # fmt: skip
                reply = load_and_verify(module, weights)
                models[key] = (tables, {is_weighted: module})
            elif op == "train_step":
                _, key, packed, grad = msg
                tables, built = models[key]
                batch = unpack_batch(packed)
                weighted = batch.weights is not None
                if weighted not in built:
                    raise ValueError(
                        f"the training module was built for {'un' if weighted else ''}weighted batches "
                        "(torchrec fixes is_weighted at construction); this step's batch is not"
                    )
                reply = local_train_step(built[weighted], tables, batch, torch.from_numpy(grad))
            elif op == "release":
                for key in msg[1]:
                    models.pop(key, None)
                reply = None
            else:
                raise ValueError(f"unknown message {op!r}")
        except BaseException:  # noqa: BLE001 - reported to the parent, which raises it
            conn.send(("error", traceback.format_exc()))
            continue
        conn.send(("ok", reply))
    try:
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - leaving anyway
        pass


def main(argv: Sequence[str] | None = None) -> int:
    """Check seeded problems sharded over a ``torchrun`` job; rank 0 prints one line per problem."""
    import torch.distributed as dist

    from harness.agreement import Oracle
    from harness.generate import random_problem
    from harness.tolerance import compare
    from harness.validate import validate_problem

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--sharding", choices=SHARDING_TYPES, default="row_wise")
    p.add_argument("--seeds", type=int, default=20, help="problems random_problem(0..N-1)")
    args = p.parse_args(argv)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", timeout=PG_TIMEOUT)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", timeout=PG_TIMEOUT)
    failures = 0
    for seed in range(args.seeds):
        problem = random_problem(seed)
        tables, weights = problem.tables, problem.weights
        batch = validate_problem(tables, problem.batch, weights)
        if unsupported(args.sharding, world, tables, batch) is not None:
            continue
        module = build_sharded(
            tables,
            args.sharding,
            is_weighted=batch.weights is not None,
            world_size=world,
            device=device,
            pg=dist.group.WORLD,
        )
        load_and_verify(module, weights)
        start, stop = sample_ranges(batch.batch_size, world)[rank]
        local = local_lookup(module, tables, batch.select_samples(start, stop))
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, local)
        if rank == 0:
            oracle = Oracle.of(tables, weights, batch)
            c = compare(torch.cat(gathered), oracle.reference.value, oracle.tolerance)
            failures += not c.agree
            print(f"seed {seed}: {args.sharding} x{world}: {c.describe()}", flush=True)
    dist.destroy_process_group()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
