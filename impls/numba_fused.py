"""The ``numba`` backend: our fused parallel kernel (`impls.numba_kernels.pool`), one call per batch.

``prepare`` checks the tables and weights, records each table's address, shape and dtype (the
kernel reads a table through its address: no stacking, no grouping by dim or dtype; a small float
table is read in place, a quantized one is packed once into FBGEMM's row layout, `quantized_rows`,
and a table of 16 MiB or more is read from a copy on huge pages, `impls.huge_pages`) and compiles
the kernel's one specialisation, which serves int32 and int64 ids alike (or loads it from numba's
disk cache: ``impls/__pycache__``, or numba's user cache dir / ``NUMBA_CACHE_DIR`` when that
directory is not writable). The lookup checks the batch's structure in Python (keys,
dtypes, sizes: O(keys)), lets the kernel check lengths and ids while it runs, and raises a
`ValueError` naming feature, sample, position, value and limit instead of reading out of bounds.
It runs on ``NUMBA_NUM_THREADS`` threads (numba's default: every core).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numba
import numpy as np
import torch

from harness.backend import Lookup
from harness.model import TABLE_DTYPES, JaggedBatch, Pooling, TableConfig, output_columns, total_dim
from harness.quantized import QUANTIZED_STORAGE, QuantizedTable, pack_codes, scale_bias_bytes
from harness.training.contract import OptimizerConfig, TrainResult, TrainStep
from harness.training.validate import check_float_tables, validate_optimizer
from harness.validate import check_lookup_batch, validate_tables, validate_weights
from impls import numba_kernels as k
from impls import numba_training as kt
from impls.huge_pages import huge_page_copy, worth_huge_pages
from impls.output_buffers import OutputBuffers

# Samples per parallel work item; 0: the batch split into CHUNKS_PER_THREAD items per thread, of at
# least MIN_CHUNK samples. Long chunks pay twice: each feature's ids are read in long runs, and
# the prefetch runs `PREFETCH_DISTANCE` ids ahead within a (feature, chunk) run, so the first ids
# of every run are not prefetched. numba's prange splits its range statically between threads,
# so more items than threads buys no balance.
CHUNK = 0
CHUNKS_PER_THREAD = 1
MIN_CHUNK = 64

# Ids ahead whose row is prefetched: far enough that the row arrives before it is summed.
PREFETCH_DISTANCE = 12

# Tables of this dim or more are pooled bag by bag (`impls.numba_kernels.pool`). Measured on the
# wide workload (2 x 2M rows of 256 float32, scripts/probe_numba.py): 21.6 ms run by run in
# blocks of 256 columns, 12.0 ms bag by bag in blocks of 64 (32: 15.7, 128: 16.3), torch 11.7.
# Dim 128 is faster run by run in one block of 128 (sweep-D-128: 3.53 ms, bag by bag 4.89, torch
# 5.98; interleaved medians of 21 calls with huge pages, 2026-12-01), hence 256, not 128.
BAG_MAJOR_DIM = 256
# The widest column block of a table pooled bag by bag (a power of two).
BAG_MAJOR_WIDTH = 64

# Below this many elements read (ids x widest dim), a batch is pooled on the calling thread:
# entering the parallel region (about 25 us) costs more than the second thread saves. Above it,
# the parallel path won on a quiet machine and with one spinning process alike (sweep-D-8 at 2^19
# elements: 0.327 -> 0.245 ms quiet, 1.35 -> 0.80 ms under load 1), and lost only under heavy load
# (4 spinning processes: 12 -> 24 ms, a scheduler quantum per thread); scripts/probe_numba.py.
SERIAL_WORK = 1 << 17

_KIND = {
    torch.float32: k.KIND_F32,
    torch.float16: k.KIND_F16,
    torch.bfloat16: k.KIND_BF16,
    "int8": k.KIND_I8,
    "int4": k.KIND_I4,
    "int2": k.KIND_I2,
}


def quantized_rows(table: QuantizedTable) -> torch.Tensor:
    """The kernel's quantized row layout (`impls.numba_codegen.QUANTIZED_ROW_LAYOUT`, FBGEMM's TBE
    layout): uint8 ``[rows, 4 + packed bytes]``, each row its fp16 scale and bias, then its codes
    packed LSB-first."""
    return torch.cat([scale_bias_bytes(table), pack_codes(table.codes, table.storage)], dim=1).contiguous()


def _stored(table: TableConfig, weights: torch.Tensor | QuantizedTable, huge_pages: bool) -> torch.Tensor:
    """What the kernel reads for ``table``: a float table in place (contiguous), a quantized one
    packed; with ``huge_pages``, a table of `huge_pages.MIN_TABLE_BYTES` or more is read from a
    copy on huge pages instead (`impls.huge_pages`: a random row's page walk is the cost there)."""
    stored = quantized_rows(weights) if table.dtype in QUANTIZED_STORAGE else weights.detach().contiguous()
    return huge_page_copy(stored) if huge_pages and worth_huge_pages(stored) else stored


def _trained_copy(weights: torch.Tensor) -> torch.Tensor:
    """The trainer's own copy of a table: on huge pages when it is large (`impls.huge_pages`)."""
    if worth_huge_pages(weights):
        return huge_page_copy(weights)
    return weights.detach().to("cpu", copy=True).contiguous()


@dataclass(frozen=True)
class _KeyLayout:
    """Per batch key (in the batch's key order): its table index and first output column."""

    feature_table: np.ndarray
    feature_col: np.ndarray


class NumbaLookup:
    """The prepared lookup: call it with a `JaggedBatch`; returns float32 ``[batch, total_dim]``."""

    def __init__(
        self, tables: Sequence[TableConfig], weights: Mapping[str, torch.Tensor], huge_pages: bool = True
    ) -> None:
        self.tables = tuple(tables)
        self.width = total_dim(self.tables)
        self.has_mean = any(t.pooling is Pooling.MEAN for t in self.tables)
        # The kernel reads each table through its address: any dim and dtype, one call.
        # self.storage keeps those tensors alive (the caller's own where they are contiguous and
        # small; copies where they were not contiguous or are large, and quantized tables packed
        # into the kernel's row layout). ``huge_pages=False`` reads float tables in place always.
        self.storage = tuple(_stored(t, weights[t.name], huge_pages) for t in self.tables)
        self.table_address = np.array([w.data_ptr() for w in self.storage], np.uint64).view(np.int64)
        self.table_rows = np.array([t.num_embeddings for t in self.tables], np.int64)
        self.table_dim = np.array([t.embedding_dim for t in self.tables], np.int64)
        self.table_row_bytes = np.array([w.stride(0) * w.element_size() for w in self.storage], np.int64)
        self.table_kind = np.array([_KIND[t.dtype] for t in self.tables], np.int64)
        self.table_mean = np.array([t.pooling is Pooling.MEAN for t in self.tables], np.bool_)
        self.max_dim = int(self.table_dim.max())
        self.table_index = {}
        self.column = {}
        for i, t in enumerate(self.tables):
            for f in t.feature_names:
                self.table_index[f] = i
        for _, f, col, _ in output_columns(self.tables):
            self.column[f] = col
        self.features = frozenset(self.table_index)
        self._layouts: dict[tuple[str, ...], _KeyLayout] = {}
        # Without per-sample weights the kernel multiplies by this 1.0 (exact) instead.
        self._no_weights = np.ones(1, np.float32)
        # Large outputs reuse the memory of released ones (`impls.output_buffers`: page faults).
        self._outputs = OutputBuffers()

    def compile(self) -> None:
        """Compile the kernel, or load it from the disk cache: one specialisation serves every batch."""
        keys = tuple(self.table_index)
        self(JaggedBatch(keys, torch.empty(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)))

    def _layout(self, keys: tuple[str, ...]) -> _KeyLayout:
        layout = self._layouts.get(keys)
        if layout is None:
            if len(keys) != len(self.features) or set(keys) != self.features:
                missing = sorted(self.features - set(keys))
                extra = sorted(set(keys) - self.features)
                dup = sorted({x for x in keys if keys.count(x) > 1})
                raise ValueError(
                    f"batch keys {list(keys)} do not match the tables' features {sorted(self.features)}: "
                    f"missing {missing}, not a feature {extra}, repeated {dup}"
                )
            layout = _KeyLayout(
                np.array([self.table_index[f] for f in keys], np.int64),
                np.array([self.column[f] for f in keys], np.int64),
            )
            self._layouts[keys] = layout
        return layout

    def _check(self, batch: JaggedBatch) -> None:
        """Structure, CPU tensors (read in place); the kernel checks lengths and ids, `_layout` keys."""
        check_lookup_batch(batch, self.tables, device="cpu", has_mean=self.has_mean)

    def __call__(self, batch: JaggedBatch) -> torch.Tensor:
        self._check(batch)
        layout = self._layout(batch.keys)
        b = len(batch.lengths) // len(batch.keys)
        # int32 ids are widened once here: a per-id dtype branch in the kernel cost 7-15% (probe).
        values = batch.values.contiguous().to(torch.int64)
        lengths = batch.lengths.contiguous().to(torch.int64).numpy()
        has_weights = batch.weights is not None
        per_sample = batch.weights.contiguous().numpy() if has_weights else self._no_weights
        out = self._outputs.empty(b, self.width)
        err = np.zeros(4, np.int64)
        parallel = len(values) * self.max_dim >= SERIAL_WORK
        if parallel:
            chunk = CHUNK or max(MIN_CHUNK, -(-b // (CHUNKS_PER_THREAD * numba.get_num_threads())))
        else:
            chunk = max(b, 1)
        self._pool(values, lengths, has_weights, per_sample, layout, out, err, chunk, parallel)
        if err[0] != k.OK:
            self._raise(batch, err, b)
        return out

    def _pool(self, values, lengths, has_weights, per_sample, layout, out, err, chunk, parallel) -> None:
        k.pool(
            np.int64(values.data_ptr()),
            len(values),
            lengths,
            per_sample,
            has_weights,
            layout.feature_table,
            layout.feature_col,
            self.table_address,
            self.table_rows,
            self.table_dim,
            self.table_row_bytes,
            self.table_kind,
            self.table_mean,
            chunk,
            PREFETCH_DISTANCE,
            BAG_MAJOR_DIM,
            BAG_MAJOR_WIDTH,
            parallel,
            out.numpy(),
            err,
        )

    def _raise(self, batch: JaggedBatch, err: np.ndarray, b: int) -> None:
        code, pos, value, limit = (int(x) for x in err)
        if code == k.BAD_LENGTH:
            what = "negative length" if value < 0 else f"length larger than the {limit} ids of the batch:"
            raise ValueError(
                f"{what} {value} for feature {batch.keys[pos // b]!r}, sample {pos % b} (lengths[{pos}])"
            )
        if code == k.NO_LOOP:
            raise RuntimeError(
                f"numba kernel bug: no generated loop for storage kind {value}, column block {limit}"
            )
        if code == k.LENGTHS_MISMATCH:
            raise ValueError(f"sum(lengths) = {value} but values has {limit} ids")
        ends = torch.cumsum(batch.lengths.to(torch.int64), 0)
        bag = int(torch.searchsorted(ends, pos, right=True))
        start = int(ends[bag - 1]) if bag > 0 else 0
        key = batch.keys[bag // b]
        table = self.tables[self.table_index[key]]
        what = "negative id" if value < 0 else "id out of range"
        raise ValueError(
            f"{what}: feature {key!r}, sample {bag % b}, position {pos - start} in its bag "
            f"(values[{pos}]) has id {value}; table {table.name!r} has num_embeddings "
            f"{table.num_embeddings} (valid ids 0..{table.num_embeddings - 1})"
        )


# Training (`NumbaTrainer`): ids ahead in a table's sorted keys whose row (and state) is prefetched.
TRAIN_PREFETCH_DISTANCE = 16
# Whether the training step computes the forward output in its update pass (each distinct row
# read once) rather than with the lookup kernel first (`impls.numba_training`).
FUSE_FORWARD = True
# Positions and rows are packed into 32 bits each in the sort keys.
_MAX_IDS = 1 << 31
_HIST_SIZE = 3 << kt.MAX_DIGIT_BITS


class NumbaTrainer:
    """The prepared training step (`impls.numba_training.train_step`): call it with a batch and
    grad_output; it trains its own copy of the weights and returns a `TrainResult`.

    The copies keep the tables' dtypes; the optimizer state is float32 (per element for adagrad,
    per row for rowwise_adagrad), zero at first. Scratch buffers (sort keys, stage) are kept and
    grown between steps. Bad batches raise the lookup's errors (`NumbaLookup`), before any weight
    or state changes.
    """

    def __init__(
        self, tables: Sequence[TableConfig], weights: Mapping[str, torch.Tensor], optimizer: OptimizerConfig
    ) -> None:
        self.tables = tuple(tables)
        self.optimizer = optimizer
        self.weights = {t.name: _trained_copy(weights[t.name]) for t in tables}
        # The kernel updates the tables the lookup reads: the lookup must read these copies in place.
        self.lookup = NumbaLookup(self.tables, self.weights, huge_pages=False)
        per_row = {"sgd": 0, "adagrad": None, "rowwise_adagrad": 1}[optimizer.kind]
        sizes = [t.num_embeddings * (t.embedding_dim if per_row is None else per_row) for t in self.tables]
        self.state = np.zeros(max(1, sum(sizes)), np.float32)
        self.state_offset = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        self.optimizer_code = kt.OPTIMIZER_CODES[optimizer.kind]
        self.decay_code = kt.DECAY_CODES[optimizer.weight_decay_mode] if optimizer.decays else kt.DECAY_NONE
        self.hyper = [np.float32(x) for x in (optimizer.learning_rate, optimizer.eps, optimizer.weight_decay)]
        self._buffers: dict[str, np.ndarray] = {}
        self._no_weights = np.ones(1, np.float32)

    def compile(self) -> None:
        """Compile the kernel (or load it from the disk cache) on an empty batch: changes nothing."""
        keys = tuple(self.lookup.table_index)
        empty = JaggedBatch(keys, torch.empty(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64))
        self(empty, torch.zeros(0, self.lookup.width))

    def _buffer(self, name: str, size: int, dtype) -> np.ndarray:
        """A kept scratch array of at least ``size`` elements (grown, never shrunk)."""
        buf = self._buffers.get(name)
        if buf is None or buf.size < size:
            buf = np.empty(max(size, 1), dtype)
            self._buffers[name] = buf
        return buf

    def _scratch(self, name: str, groups: int, size: int, dtype) -> np.ndarray:
        """A kept ``[groups, size]`` per-thread scratch array."""
        return self._buffer(name, groups * size, dtype)[: groups * size].reshape(groups, size)

    def _check_grad_output(self, batch: JaggedBatch, grad_output: torch.Tensor, b: int) -> np.ndarray:
        if not isinstance(grad_output, torch.Tensor):
            raise TypeError(f"grad_output is a {type(grad_output).__name__}, not a tensor")
        shape = (b, self.lookup.width)
        if tuple(grad_output.shape) != shape or grad_output.dtype != torch.float32:
            raise ValueError(
                f"grad_output must be float32 of shape {shape} ([batch_size, total_dim]), got "
                f"{grad_output.dtype} of shape {tuple(grad_output.shape)}"
            )
        if grad_output.device.type != "cpu":
            raise ValueError(f"grad_output is on {grad_output.device}; the numba backend runs on the CPU")
        return grad_output.detach().contiguous().numpy()

    def __call__(self, batch: JaggedBatch, grad_output: torch.Tensor) -> TrainResult:
        lookup = self.lookup
        lookup._check(batch)
        layout = lookup._layout(batch.keys)
        b = len(batch.lengths) // len(batch.keys)
        go = self._check_grad_output(batch, grad_output, b)
        values = batch.values.contiguous().to(torch.int64)
        n = len(values)
        if n >= _MAX_IDS:
            raise ValueError(f"the numba training kernel takes fewer than 2^31 ids per batch, got {n}")
        lengths = batch.lengths.contiguous().to(torch.int64).numpy()
        has_weights = batch.weights is not None
        per_sample = batch.weights.contiguous().numpy() if has_weights else self._no_weights
        need_scale = has_weights or lookup.has_mean
        counts = np.bincount(layout.feature_table, minlength=len(self.tables))
        stage = int((counts * lookup.table_dim).max()) * b
        threads = numba.get_num_threads()
        serial = n * lookup.max_dim < SERIAL_WORK
        groups = 1 if serial else threads
        fuse = FUSE_FORWARD
        out = lookup._outputs.empty(b, lookup.width) if fuse else None
        psw_grad = torch.empty(n if has_weights else 0, dtype=torch.float32)
        err = np.zeros(4, np.int64)
        if serial:
            numba.set_num_threads(1)
        try:
            if not fuse:
                out = lookup(batch)
            kt.train_step(
                values.numpy(),
                lengths,
                per_sample,
                has_weights,
                layout.feature_table,
                layout.feature_col,
                lookup.table_address,
                lookup.table_rows,
                lookup.table_dim,
                lookup.table_row_bytes,
                lookup.table_kind,
                lookup.table_mean,
                self.state,
                self.state_offset,
                self.optimizer_code,
                self.decay_code,
                *self.hyper,
                go,
                out.numpy(),
                psw_grad.numpy(),
                self._buffer("keys", n, np.int64),
                self._buffer("spare", n, np.int64),
                self._buffer("slot", n, np.int32),
                self._buffer("scale", n if need_scale else 1, np.float32),
                self._scratch("stage", groups, 2 * max(stage, 1), np.float32),
                self._scratch("hist", groups, _HIST_SIZE, np.int64),
                groups,
                TRAIN_PREFETCH_DISTANCE,
                fuse,
                err,
            )
        finally:
            if serial:
                numba.set_num_threads(threads)
        if err[0] != k.OK:
            lookup._raise(batch, err, b)
        return TrainResult(out, dict(self.weights), psw_grad if has_weights else None)


class NumbaFused:
    """Every table and feature of a batch in one parallel numba kernel call, on the CPU; trains
    with our fused forward, backward and optimizer kernel (`NumbaTrainer`)."""

    name = "numba"
    table_dtypes = TABLE_DTYPES

    def supports(self, tables: Sequence[TableConfig], batch: JaggedBatch) -> str | None:
        return None

    def prepare(self, tables: Sequence[TableConfig], weights: Mapping[str, torch.Tensor]) -> Lookup:
        validate_tables(tables)
        validate_weights(tables, weights)
        lookup = NumbaLookup(tables, weights)
        lookup.compile()
        return lookup

    def supports_training(
        self, tables: Sequence[TableConfig], batch: JaggedBatch, optimizer: OptimizerConfig
    ) -> str | None:
        if any(t.dtype in QUANTIZED_STORAGE for t in tables):
            return "quantized tables: a lookup-only format (training updates float tables)"
        if any(t.num_embeddings >= _MAX_IDS for t in tables):
            return "tables of 2^31 rows or more (the sort keys pack a row into 32 bits)"
        return None

    def prepare_training(
        self, tables: Sequence[TableConfig], weights: Mapping[str, torch.Tensor], optimizer: OptimizerConfig
    ) -> TrainStep:
        validate_optimizer(optimizer)
        validate_tables(tables)
        check_float_tables(tables)
        validate_weights(tables, weights)
        trainer = NumbaTrainer(tables, weights, optimizer)
        trainer.compile()
        return trainer
