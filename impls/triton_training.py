"""The ``triton`` backend's training step: our forward kernel, then our backward-and-optimizer kernel.

`TritonTrainStep` holds its own copy of the tables (the forward lookup's device buffers, one per
storage dtype: `impls.triton_fused.TritonLookup`) and the optimizer state (float32, on the same
device: adagrad one value per element, rowwise_adagrad one per row, sgd none). One call
``step(batch, grad_output)``:

1. the forward lookup (`impls.triton_kernels`, with bfloat16 rows widened by their bits) on the
   weights before the update; an id outside its table raises there, before anything changes;
2. the grouping, with torch on the device: each position's bag (``repeat_interleave`` of the
   lengths), its global row key (its table's first key + id: features that share a table share
   keys), a *stable* sort of the keys (so each row's occurrences stay in batch order) and
   ``unique_consecutive`` (each unique row's segment);
3. one launch of `impls.triton_training_kernels` per storage dtype present: one program per block
   of unique rows sums each row's occurrences and applies the optimizer (module docstring there).
   Keys are laid out dtype by dtype, so each dtype's unique rows are one contiguous range.

The step returns views of its buffers (the harness copies what it keeps); the next step changes
them. Under Triton's interpreter (no CUDA device) it is slow: `interpreter_limit` declines
problems above `INTERPRETER_MAX_UPDATE_PROGRAMS` / `INTERPRETER_MAX_UPDATE_STEPS` besides the
forward's own limits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from harness.model import SUPPORTED_DTYPES, JaggedBatch, Pooling, TableConfig, dtype_name, output_columns
from harness.training.contract import OPTIMIZER_KINDS, WEIGHT_DECAY_MODES, OptimizerConfig, TrainResult
from harness.training.validate import validate_grad_output

# A unique row is one tile row of BLOCK_D columns (the widest dim of its dtype rounded up to a
# power of two): wider tables are declined (no embedding table in use is near this).
MAX_TRAINING_DIM = 4096
MIN_BLOCK_D = 16
# Elements of a program's [rows, columns] tile per thread (so rows per program = threads x this
# / BLOCK_D, at most MAX_BLOCK_R; 4 warps, more for wide rows). adagrad holds a state per element
# and divides per element: half as many keep it within the registers (sm_90, Triton 3.9: 152
# registers at [8, 128] with weights and l2, 255 and spills at [16, 128]; the other kinds at
# [16, 128]: 96 to 182).
ELEMENTS_PER_THREAD = {"sgd": 16, "adagrad": 8, "rowwise_adagrad": 16}
MIN_THREADS = 128
MAX_THREADS = 512
MAX_BLOCK_R = 64
UNROLL = 2
# Under the interpreter: the update kernel's programs (each a Python-run block) and its loop
# steps summed over programs (each program loops to its rows' largest occurrence count); above
# either the problem is declined, as the forward declines its own (impls.triton_fused).
INTERPRETER_MAX_UPDATE_PROGRAMS = 256
INTERPRETER_MAX_UPDATE_STEPS = 1024

_STORE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


@dataclass(frozen=True)
class _Group:
    """The tables of one storage dtype: their keys ``[first_key, end_key)`` and launch shape."""

    dtype: torch.dtype
    first_key: int
    end_key: int
    block_r: int
    block_d: int
    num_warps: int


def _groups(tables: Sequence[TableConfig], kind: str) -> tuple[list[int], list[int], list[_Group]]:
    """The tables' order in key space (by storage dtype, then as given), each one's first key, and
    one `_Group` per dtype present, with its tile for optimizer ``kind``."""
    per_thread = ELEMENTS_PER_THREAD[kind]
    order = sorted(range(len(tables)), key=lambda i: (_STORE[tables[i].dtype], i))
    key0, groups, key = [0] * len(tables), [], 0
    for dtype in _STORE:
        members = [i for i in order if tables[i].dtype == dtype]
        if not members:
            continue
        first = key
        for i in members:
            key0[i] = key
            key += tables[i].num_embeddings
        block_d = max(MIN_BLOCK_D, _next_pow2(max(tables[i].embedding_dim for i in members)))
        threads = min(MAX_THREADS, max(MIN_THREADS, block_d // per_thread))
        block_r = max(1, min(MAX_BLOCK_R, threads * per_thread // block_d))
        groups.append(_Group(dtype, first, key, block_r, block_d, threads // 32))
    return order, key0, groups


def _keys(tables: Sequence[TableConfig], key0: Sequence[int], batch: JaggedBatch, device) -> tuple:
    """Each position's bag and global row key (int64, on ``device``)."""
    index = {f: i for i, t in enumerate(tables) for f in t.feature_names}
    feat_key0 = torch.tensor([key0[index[f]] for f in batch.keys], dtype=torch.int64, device=device)
    lengths = batch.lengths.to(device=device, dtype=torch.int64)
    n = len(batch.values)
    bags = torch.repeat_interleave(torch.arange(len(lengths), device=device), lengths, output_size=n)
    b = batch.batch_size
    keys = feat_key0[bags // b] + batch.values.to(device=device, dtype=torch.int64)
    return bags, keys


def training_limit(tables: Sequence[TableConfig], optimizer: OptimizerConfig) -> str | None:
    """What the training kernel cannot do with these tables and this optimizer, on any device."""
    if optimizer.kind not in OPTIMIZER_KINDS:
        return f"unknown optimizer kind {optimizer.kind!r}"
    if optimizer.weight_decay_mode not in WEIGHT_DECAY_MODES:
        return f"unknown weight_decay_mode {optimizer.weight_decay_mode!r}"
    for t in tables:
        if t.dtype not in SUPPORTED_DTYPES:
            return f"table {t.name!r} is stored as {dtype_name(t.dtype)}: only float tables are trained"
        if t.embedding_dim > MAX_TRAINING_DIM:
            return (
                f"table {t.name!r} has dim {t.embedding_dim}: the training kernel holds a row in one "
                f"tile, up to dim {MAX_TRAINING_DIM}"
            )
    return None


def interpreter_limit(
    tables: Sequence[TableConfig], batch: JaggedBatch, optimizer: OptimizerConfig
) -> str | None:
    """Why the update kernel would be too slow under the interpreter for this batch, or None:
    its programs and loop steps, counted from the batch's unique rows exactly (on the CPU)."""
    if len(batch.values) == 0 or batch.batch_size == 0:
        return None
    _, key0, groups = _groups(tables, optimizer.kind)
    _, keys = _keys(tables, key0, batch, "cpu")
    unique, counts = torch.unique(keys, return_counts=True)
    programs = steps = 0
    for g in groups:
        inside = (unique >= g.first_key) & (unique < g.end_key)
        c = counts[inside]
        if len(c) == 0:
            continue
        pad = -len(c) % g.block_r
        blocks = torch.cat([c, c.new_zeros(pad)]).reshape(-1, g.block_r)
        programs += len(blocks)
        steps += int(blocks.max(dim=1).values.sum())
    if programs > INTERPRETER_MAX_UPDATE_PROGRAMS or steps > INTERPRETER_MAX_UPDATE_STEPS:
        return (
            f"no CUDA device, and under Triton's interpreter the training update's {programs} programs "
            f"or {steps} loop steps (the largest occurrence count of each program's rows, summed) "
            f"exceed its limits of {INTERPRETER_MAX_UPDATE_PROGRAMS} and {INTERPRETER_MAX_UPDATE_STEPS} "
            "(the interpreter checks logic, not speed)"
        )
    return None


class TritonTrainStep:
    """One prepared training step (module docstring): call it with ``(batch, grad_output)``."""

    def __init__(
        self, tables: Sequence[TableConfig], lookup, optimizer: OptimizerConfig, interpret: bool
    ) -> None:
        """``lookup``: the forward `impls.triton_fused.TritonLookup` of these tables, made with
        ``exact_bfloat16=True``; its buffers are the weights this step trains."""
        from impls import triton_training_kernels as k

        self.tables = tuple(tables)
        self.lookup = lookup
        self.device = device = lookup.device
        self.kernel = k.kernel(interpret)
        self.kind = k.OPTIMIZER_KIND[optimizer.kind]
        self.decay = k.DECAY_MODE[optimizer.weight_decay_mode]
        self.hyper = torch.tensor(
            [optimizer.learning_rate, optimizer.eps, optimizer.weight_decay],
            dtype=torch.float32,
            device=device,
        )
        order, self.key0, self.groups = _groups(self.tables, optimizer.kind)
        self.index = {f: i for i, t in enumerate(self.tables) for f in t.feature_names}
        self.column = {f: c for _, f, c, _ in output_columns(self.tables)}
        self.width = sum(t.embedding_dim * len(t.feature_names) for t in self.tables)
        self.has_mean = any(t.pooling is Pooling.MEAN for t in self.tables)
        self.vec = self.lookup.vec
        self.buffer = {
            torch.float32: self.lookup.w_a,
            torch.float16: self.lookup.w_b,
            torch.bfloat16: self.lookup.w_c,
        }
        if len({t.dtype for t in self.tables}) == 1:
            self.buffer = {self.tables[0].dtype: self.lookup.w_a}

        # Per table, in key order (the kernel's tab_* arrays): first element in its buffer, dim,
        # first key, first state element (adagrad), MEAN flag.
        state0, elements = {}, 0
        for i in order:
            state0[i] = elements
            elements += self.tables[i].num_embeddings * self.tables[i].embedding_dim

        def column(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.int64, device=device)

        ts = [self.tables[i] for i in order]
        self.tab_base = column([self.lookup.table_base[t.name] for t in ts])
        self.tab_dim = column([t.embedding_dim for t in ts])
        self.tab_key0 = column([self.key0[i] for i in order])
        self.tab_state = column([state0[i] for i in order])
        self.group_keys = column([g.first_key for g in self.groups])
        if optimizer.kind == "adagrad":
            self.moments = torch.zeros(max(1, elements), dtype=torch.float32, device=device)
        elif optimizer.kind == "rowwise_adagrad":
            self.moments = torch.zeros(
                max(1, sum(t.num_embeddings for t in ts)), dtype=torch.float32, device=device
            )
        else:
            self.moments = torch.zeros(1, dtype=torch.float32, device=device)
        self.views = {
            t.name: self.buffer[t.dtype][
                self.lookup.table_base[t.name] : self.lookup.table_base[t.name]
                + t.num_embeddings * t.embedding_dim
            ].view(t.num_embeddings, t.embedding_dim)
            for t in self.tables
        }
        self._feat_col: dict[tuple[str, ...], torch.Tensor] = {}
        self._dummy = torch.zeros(1, dtype=torch.float32, device=device)
        # Compiled: FMAs allowed (one rounding where the analysis counts two), and said so, which
        # also keeps Triton 3.9 from warning about its changing default.
        self._launch = {} if interpret else {"enable_fp_fusion": True}

    def _columns(self, keys: tuple[str, ...]) -> torch.Tensor:
        """Per batch key, its first column in grad_output (on the device; cached per key order)."""
        cols = self._feat_col.get(keys)
        if cols is None:
            cols = torch.tensor([self.column[f] for f in keys], dtype=torch.int64, device=self.device)
            self._feat_col[keys] = cols
        return cols

    def _mean_bags(self, keys: tuple[str, ...], batch_size: int) -> torch.Tensor:
        """Per bag (on the host), whether its table pools by MEAN."""
        mean = torch.tensor([self.tables[self.index[f]].pooling is Pooling.MEAN for f in keys])
        return mean.repeat_interleave(batch_size)

    def __call__(self, batch: JaggedBatch, grad_output: torch.Tensor) -> TrainResult:
        validate_grad_output(self.tables, batch, grad_output)
        device = self.device
        weighted = batch.weights is not None
        on_device = JaggedBatch(
            batch.keys,
            batch.values.to(device),
            batch.lengths,
            batch.weights.to(device).contiguous() if weighted else None,
        )
        # The forward (before the update) also checks the batch and every id: a bad one raises here.
        output = self.lookup(on_device)
        n = len(batch.values)
        psw = torch.empty(n, dtype=torch.float32, device=device) if weighted else None
        if n == 0:
            return TrainResult(output, self.views, psw)
        bags, keys = _keys(self.tables, self.key0, on_device, device)
        sorted_keys, order = torch.sort(keys, stable=True)
        unique, counts = torch.unique_consecutive(sorted_keys, return_counts=True)
        starts = torch.cumsum(counts, 0) - counts
        seg_table = torch.searchsorted(self.tab_key0, unique, right=True) - 1
        bounds = torch.searchsorted(unique, self.group_keys).tolist() + [len(unique)]
        # Per occurrence, in the sorted order: where its grad_output slice starts, and the factor of
        # its term: its per-sample weight, or fl(1 / length) of a MEAN bag (IEEE, on the host; a
        # batch with per-sample weights has no MEAN table), so the kernel reads each with one load.
        b = batch.batch_size
        feature = bags // b
        occ_grad = ((bags - feature * b) * self.width + self._columns(batch.keys)[feature])[order]
        if weighted:
            occ_scale = on_device.weights[order]
        elif self.has_mean:
            mean = self._mean_bags(batch.keys, b)
            inverse = torch.where(mean, 1.0 / batch.lengths.to(torch.float32), 1.0)
            occ_scale = inverse.to(device)[bags][order]
        grad = grad_output.to(device).contiguous()
        for g, lo, hi in zip(self.groups, bounds, bounds[1:], strict=False):
            if hi <= lo:
                continue
            launch = dict(self._launch)
            if launch:
                launch["num_warps"] = g.num_warps
            grid = (-(-(hi - lo) // g.block_r),)
            self.kernel[grid](
                order,
                occ_grad,
                occ_scale if weighted or self.has_mean else self._dummy,
                starts,
                counts,
                unique,
                seg_table,
                grad,
                self.buffer[g.dtype],
                self.moments,
                psw if weighted else self._dummy,
                self.hyper,
                self.tab_base,
                self.tab_dim,
                self.tab_key0,
                self.tab_state,
                lo,
                hi,
                KIND=self.kind,
                DECAY=self.decay,
                STORE=_STORE[g.dtype],
                HAS_WEIGHTS=weighted,
                HAS_SCALE=weighted or self.has_mean,
                BLOCK_R=g.block_r,
                BLOCK_D=g.block_d,
                VEC=self.vec,
                UNROLL=UNROLL,
                **launch,
            )
        return TrainResult(output, self.views, psw)
