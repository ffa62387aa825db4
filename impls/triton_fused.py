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
from harness.model import TABLE_DTYPES, JaggedBatch, Pooling, TableConfig, output_columns, total_dim
from harness.quantized import QUANTIZED_STORAGE, QuantizedTable, pack_codes
from harness.training.contract import OptimizerConfig, TrainStep
from harness.validate import check_batch_lengths, check_lookup_batch, validate_tables, validate_weights

# Under the interpreter, (ids in the batch) x (widest dim) above this is reported unsupported:
# the interpreter pools about half a million such elements a second, and a fuzz or check run should
# not stall on a benchmark-sized problem that a CPU backend does in milliseconds.
INTERPRETER_MAX_WORK = 1 << 20
# The interpreter runs the grid's programs one after another and each program's loop over its
# bags' ids step by step (tens of milliseconds a step on a busy 2-core machine): above these, the
# problem is reported unsupported too. Steps: each feature's longest bag, summed over features (a
# lower bound on the loop iterations of all programs); programs: features x blocks of samples.
INTERPRETER_MAX_STEPS = 512
INTERPRETER_MAX_PROGRAMS = 512

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
# Bytes per element counted for a quantized table's tile (codes are read as bytes, pooled in float32).
QUANTIZED_TILE_ITEMSIZE = 2
# A quantized table's codes start at a multiple of this many bytes in the codes buffer, so the
# kernel's alignment hint on a table's base (a multiple of ``vec``, at most 8) holds for them too.
QUANTIZED_BASE_ALIGN = 16


def _quantized_buffers(
    tables: Sequence[TableConfig],
    weights: Mapping[str, QuantizedTable],
    device: torch.device,
    base: dict[str, int],
) -> tuple[torch.Tensor, torch.Tensor, dict[str, int]]:
    """The quantized tables' packed codes (uint8, tables back to back, each from a multiple of
    `QUANTIZED_BASE_ALIGN`; its byte offset goes into ``base``) and their rows' fp16 scale and bias
    (interleaved, tables back to back; each table's first row returned). 1-element placeholders
    when there are none."""
    if not tables:
        return (
            torch.zeros(1, dtype=torch.uint8, device=device),
            torch.zeros(1, dtype=torch.float16, device=device),
            {},
        )
    packed = {t.name: pack_codes(weights[t.name].codes, t.dtype) for t in tables}
    size, first_row, rows = 0, {}, 0
    for t in tables:
        base[t.name] = size
        size += -(-packed[t.name].numel() // QUANTIZED_BASE_ALIGN) * QUANTIZED_BASE_ALIGN
        first_row[t.name] = rows
        rows += t.num_embeddings
    codes = torch.zeros(size, dtype=torch.uint8, device=device)
    qparams = torch.empty(2 * rows, dtype=torch.float16, device=device)
    for t in tables:
        q = weights[t.name]
        codes[base[t.name] : base[t.name] + packed[t.name].numel()].copy_(packed[t.name].reshape(-1))
        r = first_row[t.name]
        qparams[2 * r : 2 * (r + t.num_embeddings)].copy_(torch.stack([q.scale, q.bias], dim=1).reshape(-1))
    return codes, qparams, first_row


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
    qrow: torch.Tensor


class TritonLookup:
    """The prepared lookup: call it with a `JaggedBatch`; returns float32 ``[batch, total_dim]``."""

    def __init__(
        self,
        tables: Sequence[TableConfig],
        weights: Mapping[str, torch.Tensor],
        device: torch.device,
        interpret: bool,
        tuning: Tuning,
        *,
        exact_bfloat16: bool = False,
    ) -> None:
        from impls import triton_kernels as k

        self.kernel = k.kernel(interpret)
        self.device = device
        # bfloat16 rows widened by their bits (exact under the interpreter too; the training step's).
        self.exact_bfloat16 = exact_bfloat16
        self.tables = tuple(tables)
        self.width = total_dim(self.tables)
        self.has_mean = any(t.pooling is Pooling.MEAN for t in self.tables)
        kind_of = {
            torch.float32: k.KIND_F32.value,
            torch.float16: k.KIND_F16.value,
            torch.bfloat16: k.KIND_BF16.value,
            "int8": k.KIND_I8.value,
            "int4": k.KIND_I4.value,
            "int2": k.KIND_I2.value,
        }
        floats = [t for t in self.tables if t.dtype not in QUANTIZED_STORAGE]
        quantized = [t for t in self.tables if t.dtype in QUANTIZED_STORAGE]

        # One buffer per float storage dtype, tables back to back, filled table by table (no second
        # host copy). A table's first element in its buffer is its base (int64: may pass 2**31).
        sizes: dict[torch.dtype, int] = {}
        self.table_base: dict[str, int] = {}
        for t in floats:
            self.table_base[t.name] = sizes.get(t.dtype, 0)
            sizes[t.dtype] = sizes.get(t.dtype, 0) + t.num_embeddings * t.embedding_dim
        buffers = {d: torch.empty(n, dtype=d, device=device) for d, n in sizes.items()}
        for t in floats:
            base = self.table_base[t.name]
            n = t.num_embeddings * t.embedding_dim
            buffers[t.dtype][base : base + n].copy_(weights[t.name].detach().reshape(-1))
        self.w_q, self.w_s, self.table_qrow = _quantized_buffers(quantized, weights, device, self.table_base)
        kinds = {kind_of[t.dtype] for t in self.tables}
        self.only_kind = kinds.pop() if len(kinds) == 1 else k.MIXED.value
        if len(buffers) == 1 and not quantized:
            self.w_a = self.w_b = self.w_c = next(iter(buffers.values()))
        else:
            # Mixed storage dtypes: one launch still, each program reads through the pointer of
            # its feature's dtype (the others are 1-element placeholders when absent).
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
        itemsize = max(
            QUANTIZED_TILE_ITEMSIZE if t.dtype in QUANTIZED_STORAGE else t.dtype.itemsize for t in self.tables
        )
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
                qrow=column([self.table_qrow.get(t.name, 0) for t in tables]),
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
            self.w_q,
            self.w_s,
            layout.base,
            layout.dim,
            layout.col,
            layout.mean,
            layout.kind,
            layout.rows,
            layout.qrow,
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
            EXACT_BF16=self.exact_bfloat16,
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
        self.table_dtypes = TABLE_DTYPES
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
            n, b = len(batch.keys), batch.batch_size
            if n and b:
                steps = int(batch.lengths.reshape(n, b).max(dim=1).values.sum())
                programs = n * -(-b // MAX_BLOCK_B)
                if steps > INTERPRETER_MAX_STEPS or programs > INTERPRETER_MAX_PROGRAMS:
                    return (
                        f"no CUDA device, and under Triton's interpreter {steps} serial steps (each "
                        f"feature's longest bag, summed) or {programs} programs exceed its limits of "
                        f"{INTERPRETER_MAX_STEPS} and {INTERPRETER_MAX_PROGRAMS} (the interpreter "
                        "checks logic, not speed)"
                    )
        return None

    def prepare(self, tables: Sequence[TableConfig], weights: Mapping[str, torch.Tensor]) -> Lookup:
        validate_tables(tables)
        validate_weights(tables, weights)
        return TritonLookup(tables, weights, self.device, self.interpret, self.tuning)

    def supports_training(
        self, tables: Sequence[TableConfig], batch: JaggedBatch, optimizer: OptimizerConfig
    ) -> str | None:
        """The training kernel's limits (`impls.triton_training`), and under the interpreter the
        forward's and the update's."""
        from impls.triton_training import interpreter_limit, training_limit

        reason = training_limit(tables, optimizer)
        if reason is None and self.interpret:
            reason = self.supports(tables, batch) or interpreter_limit(tables, batch, optimizer)
        return reason

    def prepare_training(
        self, tables: Sequence[TableConfig], weights: Mapping[str, torch.Tensor], optimizer: OptimizerConfig
    ) -> TrainStep:
        """Our own copy of the tables on the device, trained by `impls.triton_training.TritonTrainStep`."""
        from impls.triton_training import TritonTrainStep

        validate_tables(tables)
        validate_weights(tables, weights)
        lookup = TritonLookup(tables, weights, self.device, self.interpret, self.tuning, exact_bfloat16=True)
        return TritonTrainStep(tables, lookup, optimizer, self.interpret)


def triton_interpreted() -> TritonFused:
    """The backend under Triton's interpreter on CPU tensors, even where a CUDA device exists."""
    return TritonFused(interpret=True)
