"""The ``triton`` backend: our Triton kernel (`impls.triton_kernels`), one launch per batch.

Where it runs is decided once, in the constructor, and kept in its ``interpret`` and ``device``:

- on a machine where torch sees a CUDA device, the kernel is compiled by ``triton.jit`` and runs
  on ``cuda``; the tables are copied there in ``prepare``, the batch (ids, offsets, per-sample
  weights) on every call, inside the timed lookup, as the ``torch-cuda`` backend does;
- otherwise it runs under Triton's interpreter on CPU tensors: the same kernel, numpy for a
  device, for checking the kernel's logic on any machine (slow: see `INTERPRETER_MAX_WORK`).

``TritonFused(interpret=True)`` (or the spec ``impls.triton_fused:triton_interpreted``) forces
the interpreter. No environment variable is read or set (see `impls.triton_kernels`).

``prepare`` concatenates the tables into one buffer per storage dtype; the lookup checks the
batch's structure in Python (O(keys) plus one pass over ``lengths``), and the kernel checks every
id against its table, skips one that is outside and raises a flag, after which the lookup raises
a `ValueError` naming feature, sample, position, id and table: never an out-of-bounds read. That
flag is read back after the launch, so the lookup returns when the kernel has finished.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from harness.backend import BackendUnavailable, Lookup
from harness.model import JaggedBatch, Pooling, TableConfig, output_columns, total_dim
from harness.validate import check_batch_lengths, check_lookup_batch, validate_tables, validate_weights

# Under the interpreter, (ids in the batch) x (widest dim) above this is reported unsupported:
# the interpreter pools about half a million such elements a second, and a fuzz or check run should
# not stall on a benchmark-sized problem that a CPU backend does in milliseconds.
INTERPRETER_MAX_WORK = 1 << 20

# Columns of one program's tile: the widest dim rounded up to a power of two, within these bounds.
MIN_BLOCK_D = 16
MAX_BLOCK_D = 256
# Bytes of one program's [bags, columns] tile of rows: bags per program = TILE_BYTES // (BLOCK_D x
# the widest table's element size), at most MAX_BLOCK_B: 16 bags at dim 128 fp32, 32 at fp16.
TILE_BYTES = 8192
MAX_BLOCK_B = 64
NUM_WARPS = 4
# Loop steps unrolled per iteration (more row loads in flight per program).
UNROLL = 2


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


@dataclass(frozen=True)
class Tuning:
    """Launch parameters: bags per program (``None``: from ``TILE_BYTES``), unrolled steps, warps."""

    block_b: int | None = None
    unroll: int = UNROLL
    num_warps: int = NUM_WARPS

    def __post_init__(self) -> None:
        for name in ("block_b", "unroll", "num_warps"):
            v = getattr(self, name)
            if v is not None and (v < 1 or v & (v - 1)):
                raise ValueError(f"Tuning.{name} must be a power of two >= 1, got {v}")


@dataclass(frozen=True)
class _KeyLayout:
    """Per batch key, in the batch's key order, on the lookup's device (int64 tensors)."""

    base: torch.Tensor
    dim: torch.Tensor
    col: torch.Tensor
    mean: torch.Tensor
    kind: torch.Tensor
    rows: torch.Tensor


class TritonLookup:
    """The prepared lookup: call it with a `JaggedBatch`; returns float32 ``[batch, total_dim]``."""

    def __init__(
        self,
        tables: Sequence[TableConfig],
        weights: Mapping[str, torch.Tensor],
        device: torch.device,
        interpret: bool,
        tuning: Tuning,
    ) -> None:
        from impls import triton_kernels as k

        self.kernel = k.kernel(interpret)
        self.device = device
        self.tables = tuple(tables)
        self.width = total_dim(self.tables)
        self.has_mean = any(t.pooling is Pooling.MEAN for t in self.tables)
        kind_of = {
            torch.float32: k.KIND_F32.value,
            torch.float16: k.KIND_F16.value,
            torch.bfloat16: k.KIND_BF16.value,
        }

        # One buffer per storage dtype, tables back to back, filled table by table (no second
        # host copy). A table's first element in its buffer is its base (int64: may pass 2**31).
        sizes: dict[torch.dtype, int] = {}
        self.table_base: dict[str, int] = {}
        for t in self.tables:
            self.table_base[t.name] = sizes.get(t.dtype, 0)
            sizes[t.dtype] = sizes.get(t.dtype, 0) + t.num_embeddings * t.embedding_dim
        buffers = {d: torch.empty(n, dtype=d, device=device) for d, n in sizes.items()}
        for t in self.tables:
            base = self.table_base[t.name]
            n = t.num_embeddings * t.embedding_dim
            buffers[t.dtype][base : base + n].copy_(weights[t.name].detach().reshape(-1))
        if len(buffers) == 1:
            (only,) = buffers.items()
            self.only_kind = kind_of[only[0]]
            self.w_a = self.w_b = self.w_c = only[1]
        else:
            # Mixed storage dtypes: one launch still, each program reads through the pointer of
            # its feature's dtype (the other two are 1-element placeholders when absent).
            self.only_kind = k.MIXED.value
            slots = [
                buffers.get(d, torch.zeros(1, dtype=d, device=device))
                for d in (torch.float32, torch.float16, torch.bfloat16)
            ]
            self.w_a, self.w_b, self.w_c = slots

        self.table_of = {f: t for t in self.tables for f in t.feature_names}
        self.column = {f: col for _, f, col, _ in output_columns(self.tables)}
        self.kind_of = kind_of
        max_dim = max(t.embedding_dim for t in self.tables)
        self.block_d = min(max(_next_pow2(max_dim), MIN_BLOCK_D), MAX_BLOCK_D)
        itemsize = max(t.dtype.itemsize for t in self.tables)
        self.block_b = tuning.block_b or max(1, min(MAX_BLOCK_B, TILE_BYTES // (self.block_d * itemsize)))
        self.unroll = tuning.unroll
        self.dim_blocks = -(-max_dim // self.block_d)
        # The largest power of two (at most 8) dividing every dim: then every table base, column
        # and the output's row stride are multiples of it too, and the kernel says so to the
        # compiler, which then moves each row in 16-byte vectors.
        self.vec = 8
        while any(t.embedding_dim % self.vec for t in self.tables):
            self.vec //= 2
        self._layouts: dict[tuple[str, ...], _KeyLayout] = {}
        self._no_weights = torch.zeros(1, dtype=torch.float32, device=device)
        self._launch_options = {} if interpret else {"num_warps": tuning.num_warps}

    def with_tuning(self, tuning: Tuning) -> TritonLookup:
        """The same prepared tables (shared, not copied) launched with other parameters."""
        other = copy.copy(self)
        other.block_b = tuning.block_b or self.block_b
        other.unroll = tuning.unroll
        other._launch_options = {} if not self._launch_options else {"num_warps": tuning.num_warps}
        return other

    def _layout(self, keys: tuple[str, ...]) -> _KeyLayout:
        layout = self._layouts.get(keys)
        if layout is None:
            if len(keys) != len(self.table_of) or set(keys) != set(self.table_of):
                missing = sorted(set(self.table_of) - set(keys))
                extra = sorted(set(keys) - set(self.table_of))
                dup = sorted({x for x in keys if keys.count(x) > 1})
                raise ValueError(
                    f"batch keys {list(keys)} do not match the tables' features {sorted(self.table_of)}: "
                    f"missing {missing}, not a feature {extra}, repeated {dup}"
                )

            def column(values: list[int]) -> torch.Tensor:
                return torch.tensor(values, dtype=torch.int64, device=self.device)

            tables = [self.table_of[f] for f in keys]
            layout = _KeyLayout(
                base=column([self.table_base[t.name] for t in tables]),
                dim=column([t.embedding_dim for t in tables]),
                col=column([self.column[f] for f in keys]),
                mean=column([int(t.pooling is Pooling.MEAN) for t in tables]),
                kind=column([self.kind_of[t.dtype] for t in tables]),
                rows=column([t.num_embeddings for t in tables]),
            )
            self._layouts[keys] = layout
        return layout

    def _check(self, batch: JaggedBatch) -> None:
        """Structure and lengths, on any device (the batch is moved to ours); the kernel checks ids."""
        check_lookup_batch(batch, self.tables, device=None, has_mean=self.has_mean)
        check_batch_lengths(batch)

    def __call__(self, batch: JaggedBatch) -> torch.Tensor:
        self._check(batch)
        layout = self._layout(batch.keys)
        b = batch.batch_size
        if b == 0:
            return torch.zeros(0, self.width, dtype=torch.float32, device=self.device)
        device = self.device
        # The batch's host-to-device copy is part of the lookup (see docs/triton.md).
        values = batch.values.to(device).contiguous()
        offsets = batch.offsets.to(device)
        has_weights = batch.weights is not None
        per_sample = batch.weights.to(device).contiguous() if has_weights else self._no_weights
        out = torch.empty(b, self.width, dtype=torch.float32, device=device)
        error = torch.zeros(1, dtype=torch.int64, device=device)
        grid = (len(batch.keys) * (-(-b // self.block_b)), self.dim_blocks)
        self.kernel[grid](
            values,
            offsets,
            per_sample,
            self.w_a,
            self.w_b,
            self.w_c,
            layout.base,
            layout.dim,
            layout.col,
            layout.mean,
            layout.kind,
            layout.rows,
            error,
            out,
            b,
            self.width,
            BLOCK_B=self.block_b,
            BLOCK_D=self.block_d,
            HAS_WEIGHTS=has_weights,
            HAS_MEAN=self.has_mean,
            ONLY_KIND=self.only_kind,
            VEC=self.vec,
            UNROLL=self.unroll,
            **self._launch_options,
        )
        if int(error.item()) != 0:
            self._raise_bad_id(batch)
        return out

    def _raise_bad_id(self, batch: JaggedBatch) -> None:
        """Find and name the first id outside its table (the kernel only flagged that one exists)."""
        b = batch.batch_size
        offsets = batch.offsets
        values = batch.values.cpu()
        for f, key in enumerate(batch.keys):
            table = self.table_of[key]
            lo, hi = int(offsets[f * b]), int(offsets[(f + 1) * b])
            ids = values[lo:hi]
            bad = ((ids < 0) | (ids >= table.num_embeddings)).nonzero()
            if len(bad) == 0:
                continue
            pos = lo + int(bad[0])
            bag = int(torch.searchsorted(offsets, pos, right=True)) - 1
            value = int(values[pos])
            what = "negative id" if value < 0 else "id out of range"
            raise ValueError(
                f"{what}: feature {key!r}, sample {bag % b}, position {pos - int(offsets[bag])} in its bag "
                f"(values[{pos}]) has id {value}; table {table.name!r} has num_embeddings "
                f"{table.num_embeddings} (valid ids 0..{table.num_embeddings - 1})"
            )
        raise RuntimeError("the Triton kernel flagged an id outside its table, but none is")


class TritonFused:
    """Every table and feature of a batch in one Triton kernel launch (CUDA, or the interpreter)."""

    def __init__(self, interpret: bool | None = None, tuning: Tuning | None = None) -> None:
        try:
            import triton
        except ImportError as e:
            raise BackendUnavailable(f"triton: Triton is not installed ({e})") from e
        cuda = torch.cuda.is_available()
        if interpret is None:
            interpret = not cuda
        if not interpret and not cuda:
            raise BackendUnavailable(f"triton: torch {torch.__version__} sees no CUDA device")
        self.interpret = interpret
        self.device = torch.device("cpu" if interpret else "cuda")
        self.name = "triton"
        self.tuning = Tuning() if tuning is None else tuning
        self.triton_version = triton.__version__

    def supports(self, tables: Sequence[TableConfig], batch: JaggedBatch) -> str | None:
        if self.interpret:
            work = len(batch.values) * max(t.embedding_dim for t in tables)
            if work > INTERPRETER_MAX_WORK:
                return (
                    f"no CUDA device, and under Triton's interpreter {len(batch.values)} ids x dim "
                    f"{max(t.embedding_dim for t in tables)} exceed its limit of {INTERPRETER_MAX_WORK} "
                    "(the interpreter checks logic, not speed)"
                )
        return None

    def prepare(self, tables: Sequence[TableConfig], weights: Mapping[str, torch.Tensor]) -> Lookup:
        validate_tables(tables)
        validate_weights(tables, weights)
        return TritonLookup(tables, weights, self.device, self.interpret, self.tuning)


def triton_interpreted() -> TritonFused:
    """The backend under Triton's interpreter on CPU tensors, even where a CUDA device exists."""
    return TritonFused(interpret=True)
