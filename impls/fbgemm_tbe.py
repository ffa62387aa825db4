"""FBGEMM's table-batched embedding bag (``SplitTableBatchedEmbeddingBagsCodegen``) called directly.

One module holds every table on the host (``EmbeddingLocation.HOST``, ``ComputeDevice.CPU``);
features map to tables through ``feature_table_map`` in the result's column order, so shared
tables are stored once. A TBE module has one ``pooling_mode`` and one ``weights_precision``, so a
problem that mixes poolings or table dtypes is not supported, nor are bfloat16 tables (FBGEMM
1.8's CPU kernel has no BFloat16 forward). The output is FBGEMM's FP32 ``output_dtype``, untouched.

Bounds check: ``bounds_check_mode`` is a constructor argument and part of the backend's name
unless it is the default, FATAL (an invalid id raises). docs/torchrec-fbgemm.md records what each
mode did with an invalid id on the CPU.

Training (`FbgemmTBE.prepare_training`) is FBGEMM's fused backward-optimizer on the CPU: the TBE
is built with ``optimizer`` EXACT_SGD, EXACT_ADAGRAD or EXACT_ROWWISE_ADAGRAD and the config's
learning rate, eps, weight decay and ``WeightDecayMode`` (NONE, L2, DECOUPLE), with
``stochastic_rounding=False``; ``output.backward(grad_output)`` runs the backward and the update
in one op, and the tables are read back with ``split_embedding_weights()`` after each step. The
per-sample weights are a leaf with ``requires_grad``; FBGEMM computes their gradient from the
weights before the update. The weight-decay arguments are passed as given even where FBGEMM's
CPU kernels do not use them (its docstring: EXACT_SGD and EXACT_ADAGRAD "do not support weight
decay"; the constructor accepts it silently): the cases under ``cases/known/training/`` model
what it computes instead.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from harness.backend import BackendUnavailable, Lookup
from harness.model import JaggedBatch, Pooling, TableConfig, is_quantized, output_columns
from harness.training.contract import OptimizerConfig, TrainResult, TrainStep

DEFAULT_BOUNDS_CHECK = "FATAL"


def _import_fbgemm(name: str) -> None:
    try:
        import fbgemm_gpu.split_table_batched_embeddings_ops_training  # noqa: F401
    except ImportError as e:
        raise BackendUnavailable(f"{name}: fbgemm_gpu (fbgemm-gpu-cpu) is not installed ({e})") from e


class FbgemmTBE:
    """One CPU TBE module for all tables; ids go in as they come (int64 or int32), offsets alike.

    ``id_dtype`` (None, ``torch.int64`` or ``torch.int32``) converts the ids and offsets inside
    the timed lookup, to compare FBGEMM's two index kernels on the same problems.
    """

    def __init__(
        self,
        bounds_check_mode: str = DEFAULT_BOUNDS_CHECK,
        id_dtype: torch.dtype | None = None,
        name: str | None = None,
    ) -> None:
        self.bounds_check_mode = bounds_check_mode.upper()
        self.id_dtype = id_dtype
        suffix = (
            "" if self.bounds_check_mode == DEFAULT_BOUNDS_CHECK else f"-{self.bounds_check_mode.lower()}"
        )
        self.name = name or f"fbgemm-tbe{suffix}"
        _import_fbgemm(self.name)
        from fbgemm_gpu.split_table_batched_embeddings_ops_common import BoundsCheckMode

        if self.bounds_check_mode not in BoundsCheckMode.__members__:
            raise ValueError(
                f"{self.name}: unknown bounds_check_mode {bounds_check_mode!r}; "
                f"FBGEMM has {list(BoundsCheckMode.__members__)}"
            )

    def supports(self, tables: Sequence[TableConfig], batch: JaggedBatch) -> str | None:
        quantized = [t.name for t in tables if is_quantized(t)]
        if quantized:
            return f"quantized tables {quantized}: this TBE holds float tables (fbgemm-tbe-int-n runs them)"
        odd = sorted({t.embedding_dim for t in tables if t.embedding_dim % 4})
        if odd:
            return f"embedding_dim {odd}: FBGEMM's TBE asserts embedding_dim % 4 == 0"
        if any(t.dtype == torch.bfloat16 for t in tables):
            return "bfloat16 tables: FBGEMM's CPU TBE forward is not implemented for BFloat16"
        if len({t.pooling for t in tables}) > 1:
            return "mixed poolings: one TBE module has a single pooling_mode"
        if len({t.dtype for t in tables}) > 1:
            return "mixed table dtypes: one TBE module has a single weights_precision"
        return None

    def build(
        self,
        tables: Sequence[TableConfig],
        weights: Mapping[str, torch.Tensor],
        optimizer: OptimizerConfig | None = None,
    ) -> Any:
        """The TBE module holding the problem's weights (what `prepare` runs; the tests inspect it);
        with ``optimizer``, its fused optimizer (`fbgemm_optimizer_kwargs`)."""
        from fbgemm_gpu.split_embedding_configs import SparseType
        from fbgemm_gpu.split_table_batched_embeddings_ops_common import (
            BoundsCheckMode,
            EmbeddingLocation,
            PoolingMode,
        )
        from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
            ComputeDevice,
            SplitTableBatchedEmbeddingBagsCodegen,
        )

        precisions = {torch.float32: SparseType.FP32, torch.float16: SparseType.FP16}
        poolings = {Pooling.SUM: PoolingMode.SUM, Pooling.MEAN: PoolingMode.MEAN}
        index = {t.name: i for i, t in enumerate(tables)}
        tbe = SplitTableBatchedEmbeddingBagsCodegen(
            [(t.num_embeddings, t.embedding_dim, EmbeddingLocation.HOST, ComputeDevice.CPU) for t in tables],
            feature_table_map=[index[table] for table, _, _, _ in output_columns(tables)],
            weights_precision=precisions[tables[0].dtype],
            output_dtype=SparseType.FP32,
            pooling_mode=poolings[tables[0].pooling],
            bounds_check_mode=BoundsCheckMode[self.bounds_check_mode],
            device=torch.device("cpu"),
            **({} if optimizer is None else fbgemm_optimizer_kwargs(optimizer)),
        )
        with torch.no_grad():
            for t, w in zip(tables, tbe.split_embedding_weights(), strict=True):
                w.copy_(weights[t.name])
        return tbe

    def prepare(self, tables: Sequence[TableConfig], weights: Mapping[str, torch.Tensor]) -> Lookup:
        return tbe_lookup(self.build(tables, weights), tables, self.id_dtype)

    def supports_training(
        self, tables: Sequence[TableConfig], batch: JaggedBatch, optimizer: OptimizerConfig
    ) -> str | None:
        return self.supports(tables, batch)

    def prepare_training(
        self, tables: Sequence[TableConfig], weights: Mapping[str, torch.Tensor], optimizer: OptimizerConfig
    ) -> TrainStep:
        tables = tuple(tables)
        tbe = self.build(tables, weights, optimizer)
        order = [f for _, f, _, _ in output_columns(tables)]
        id_dtype = self.id_dtype

        def step(batch: JaggedBatch, grad_output: torch.Tensor) -> TrainResult:
            positions, lengths = feature_order(batch, order)
            ids = batch.values[positions]
            if id_dtype is not None:
                ids = ids.to(id_dtype)
            offsets = torch.ops.fbgemm.asynchronous_complete_cumsum(lengths).to(ids.dtype)
            per_sample = None
            if batch.weights is not None:
                per_sample = batch.weights[positions].requires_grad_(True)
            output = tbe(ids, offsets, per_sample_weights=per_sample)
            output.backward(grad_output)
            psw_grad = None
            if per_sample is not None:
                psw_grad = torch.empty_like(per_sample.grad)
                psw_grad[positions] = per_sample.grad
            new = dict(zip((t.name for t in tables), tbe.split_embedding_weights(), strict=True))
            return TrainResult(output.detach(), new, psw_grad)

        return step


def feature_order(batch: JaggedBatch, order: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """The positions of the batch's ids with its features in ``order`` (a TBE's feature order),
    and the lengths in that order: ``values[positions]`` is the TBE's input."""
    b = batch.batch_size
    offsets = batch.offsets
    pieces, lengths = [], []
    for feature in order:
        f = batch.keys.index(feature)
        pieces.append(torch.arange(int(offsets[f * b]), int(offsets[(f + 1) * b]), dtype=torch.int64))
        lengths.append(batch.lengths[f * b : (f + 1) * b].to(torch.int64))
    return torch.cat(pieces), torch.cat(lengths)


FBGEMM_OPTIMIZERS = {
    "sgd": "EXACT_SGD",
    "adagrad": "EXACT_ADAGRAD",
    "rowwise_adagrad": "EXACT_ROWWISE_ADAGRAD",
}
FBGEMM_WEIGHT_DECAY_MODES = {"none": "NONE", "l2": "L2", "decoupled": "DECOUPLE"}


def fbgemm_optimizer_kwargs(optimizer: OptimizerConfig) -> dict[str, Any]:
    """The TBE constructor's optimizer arguments for ``optimizer`` (also torchrec's ``fused_params``):
    the EXACT_* optimizer, learning rate, eps, weight decay and mode, no stochastic rounding."""
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import WeightDecayMode

    return {
        "optimizer": EmbOptimType[FBGEMM_OPTIMIZERS[optimizer.kind]],
        "learning_rate": float(optimizer.learning_rate),
        "eps": float(optimizer.eps),
        "weight_decay": float(optimizer.weight_decay),
        "weight_decay_mode": WeightDecayMode[FBGEMM_WEIGHT_DECAY_MODES[optimizer.weight_decay_mode]],
        "stochastic_rounding": False,
    }


def tbe_lookup(tbe: Any, tables: Sequence[TableConfig], id_dtype: torch.dtype | None = None) -> Lookup:
    """The lookup through a built TBE module: features permuted into its order, offsets from lengths."""
    order = [f for _, f, _, _ in output_columns(tables)]

    @torch.no_grad()
    def lookup(batch: JaggedBatch) -> torch.Tensor:
        values, lengths, per_sample = batch.values, batch.lengths, batch.weights
        if list(batch.keys) != order:
            permute = torch.tensor([batch.keys.index(f) for f in order], dtype=torch.int32)
            lengths, values, per_sample = torch.ops.fbgemm.permute_2D_sparse_data(
                permute, lengths.view(len(batch.keys), batch.batch_size), values, per_sample
            )
        ids = values if id_dtype is None else values.to(id_dtype)
        offsets = torch.ops.fbgemm.asynchronous_complete_cumsum(lengths.reshape(-1)).to(ids.dtype)
        return tbe(ids, offsets, per_sample_weights=per_sample)

    return lookup


def fbgemm_tbe_int32() -> FbgemmTBE:
    """The same module fed int32 ids and offsets (converted inside the timed lookup)."""
    return FbgemmTBE(id_dtype=torch.int32, name="fbgemm-tbe-int32")


def fbgemm_tbe_nocheck() -> FbgemmTBE:
    """``BoundsCheckMode.NONE``: no separate bounds-check pass (the CPU kernel still raises on a bad id)."""
    return FbgemmTBE(bounds_check_mode="NONE")
