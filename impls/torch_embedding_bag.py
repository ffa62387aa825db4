"""`torch.nn.functional.embedding_bag`, one call per feature, on a chosen device.

The table's weights are used in their own dtype, as a torch user would use them. torch returns
pooled float16 / bfloat16 for such tables, which the adapter widens to float32 without correcting,
and it requires per-sample weights in the table's dtype, so they are cast as a torch user must.
Both round; the difference from the contract is kept as a known discrepancy under ``cases/known/``.

Quantized tables (int8 / int4 / int2, CPU only) are pooled with torch's own quantized ops instead,
one call per feature with the same arguments (`impls.torch_quantized`): a torch user has no
other lookup for them. Those ops ignore ``mode`` (MEAN returns the SUM); the adapter passes it as
a torch user would, and ``cases/known/torch-quantized-mean-pooled-as-sum.json`` models the result.

Training (`TorchEmbeddingBag.prepare_training`) is torch's own machinery: a float32 leaf tensor
per table, autograd through ``F.embedding_bag(..., sparse=True)`` (one call per feature, so a
shared table's features add their sparse gradients into one ``.grad``), the per-sample weights a
leaf with ``requires_grad`` (their gradient is autograd's), and ``torch.optim.SGD`` or
``torch.optim.Adagrad`` (DESIGN.md's eps passed: torch's default is 1e-10) stepped once per
step. torch.optim updates exactly what DESIGN.md asks on sparse gradients: Adagrad coalesces them
(duplicates summed first) and updates only those rows, SGD adds the sparse gradient into the
rows it names. What it cannot do is declined by ``supports_training``, never emulated:

- row-wise Adagrad: torch.optim has none;
- weight decay: with sparse gradients torch.optim raises (SGD: "add(sparse, dense) is not
  supported"; Adagrad: "weight_decay option is not compatible with sparse gradients"), and it has
  no decoupled mode at all. Dense gradients would decay every row, touched or not: that is
  torchrec's EBC backend, whose known case shows it;
- float16 / bfloat16 tables: torch.optim steps a parameter in its own dtype (the gradient terms,
  their sum over duplicates and the Adagrad state are all rounded to it at every operation) and
  has no optimizer that keeps float32 values for a half-precision parameter, so DESIGN.md's "one
  rounding per update" is out of its reach. A torch user trains such tables from a float32 copy,
  which is a float32 table: the contract's float32 case.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from harness.backend import BackendUnavailable, Lookup
from harness.model import TABLE_DTYPES, JaggedBatch, TableConfig, dtype_name, output_columns
from harness.quantized import QUANTIZED_STORAGE
from harness.training.contract import OptimizerConfig, TrainResult, TrainStep
from impls.torch_quantized import quantized_pool, unsupported_dims


class TorchEmbeddingBag:
    """``F.embedding_bag`` per feature; shared tables reuse one weight tensor."""

    def __init__(self, device: str = "cpu", name: str = "torch") -> None:
        self.device = torch.device(device)
        self.name = name
        self.table_dtypes = TABLE_DTYPES
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise BackendUnavailable(f"{name}: torch {torch.__version__} sees no CUDA device")

    def supports(self, tables: Sequence[TableConfig], batch: JaggedBatch) -> str | None:
        quantized = {(t.dtype, t.embedding_dim) for t in tables if t.dtype in QUANTIZED_STORAGE}
        if quantized and self.device.type != "cpu":
            return f"quantized tables: {self.name} runs torch.ops.quantized's embedding-bag ops on CPU only"
        return unsupported_dims(quantized)

    def prepare(self, tables: Sequence[TableConfig], weights: Mapping[str, torch.Tensor]) -> Lookup:
        device = self.device
        on_device = {t.name: weights[t.name].to(device) for t in tables if t.dtype not in QUANTIZED_STORAGE}
        # Quantized tables: torch.ops.quantized's op per table (impls.torch_quantized).
        quantized = {
            t.name: quantized_pool(weights[t.name], t.pooling.value)
            for t in tables
            if t.dtype in QUANTIZED_STORAGE
        }
        modes = {t.name: t.pooling.value for t in tables}
        columns = output_columns(tables)

        def lookup(batch: JaggedBatch) -> torch.Tensor:
            b = batch.batch_size
            offsets = batch.offsets
            values = batch.values.to(device)
            per_sample = batch.weights.to(device) if batch.weights is not None else None
            pooled = []
            for table_name, feature, _, _ in columns:
                f = batch.keys.index(feature)
                lo, hi = int(offsets[f * b]), int(offsets[(f + 1) * b])
                bag_offsets = (offsets[f * b : (f + 1) * b] - lo).to(device, values.dtype)
                if table_name in quantized:
                    part = None if per_sample is None else per_sample[lo:hi]
                    pooled.append(quantized[table_name](values[lo:hi], bag_offsets, part))
                    continue
                pooled.append(
                    F.embedding_bag(
                        values[lo:hi],
                        on_device[table_name],
                        bag_offsets,
                        mode=modes[table_name],
                        per_sample_weights=None
                        if per_sample is None
                        else per_sample[lo:hi].to(on_device[table_name].dtype),
                    )
                )
            return torch.cat(pooled, dim=1).to(torch.float32)

        return lookup

    def supports_training(
        self, tables: Sequence[TableConfig], batch: JaggedBatch, optimizer: OptimizerConfig
    ) -> str | None:
        if any(t.dtype in QUANTIZED_STORAGE for t in tables):
            return "quantized tables: a lookup-only format (torch.optim trains float parameters)"
        return self.supports(tables, batch) or torch_optim_unsupported(tables, optimizer)

    def prepare_training(
        self, tables: Sequence[TableConfig], weights: Mapping[str, torch.Tensor], optimizer: OptimizerConfig
    ) -> TrainStep:
        device = self.device
        tables = tuple(tables)
        params = {
            t.name: weights[t.name].to(device, torch.float32, copy=True).requires_grad_(True) for t in tables
        }
        optim = torch_optimizer(list(params.values()), optimizer)
        modes = {t.name: t.pooling.value for t in tables}
        columns = output_columns(tables)

        def step(batch: JaggedBatch, grad_output: torch.Tensor) -> TrainResult:
            b = batch.batch_size
            offsets = batch.offsets
            values = batch.values.to(device)
            per_sample = None
            if batch.weights is not None:
                per_sample = batch.weights.to(device, copy=True).requires_grad_(True)
            pooled = []
            for table_name, feature, _, _ in columns:
                f = batch.keys.index(feature)
                lo, hi = int(offsets[f * b]), int(offsets[(f + 1) * b])
                pooled.append(
                    F.embedding_bag(
                        values[lo:hi],
                        params[table_name],
                        (offsets[f * b : (f + 1) * b] - lo).to(device, values.dtype),
                        mode=modes[table_name],
                        sparse=True,
                        per_sample_weights=None if per_sample is None else per_sample[lo:hi],
                    )
                )
            output = torch.cat(pooled, dim=1)
            output.backward(grad_output.to(device))
            optim.step()
            optim.zero_grad(set_to_none=True)
            return TrainResult(
                output.detach(),
                {name: p.detach() for name, p in params.items()},
                None if per_sample is None else per_sample.grad,
            )

        return step


def torch_optim_unsupported(tables: Sequence[TableConfig], optimizer: OptimizerConfig) -> str | None:
    """Why torch.optim on sparse gradients cannot train this (the module docstring), or None."""
    if optimizer.kind == "rowwise_adagrad":
        return "rowwise_adagrad: torch.optim has no row-wise Adagrad"
    if optimizer.decays and optimizer.weight_decay_mode == "decoupled":
        return (
            f"decoupled weight decay: torch.optim's {_TORCH_OPTIMIZERS[optimizer.kind]} has no decoupled mode"
        )
    if optimizer.decays:
        return (
            f"l2 weight decay: torch.optim's {_TORCH_OPTIMIZERS[optimizer.kind]} raises on weight decay with "
            "sparse gradients (and with dense ones it would decay every row, touched or not)"
        )
    half = sorted({dtype_name(t.dtype) for t in tables if t.dtype != torch.float32})
    if half:
        return (
            f"{'/'.join(half)} tables: torch.optim updates a parameter in its own dtype (gradient, "
            "duplicate sums and state rounded at every operation), not in float32 rounded once"
        )
    return None


_TORCH_OPTIMIZERS = {"sgd": "SGD", "adagrad": "Adagrad"}


def torch_optimizer(params: list[torch.Tensor], optimizer: OptimizerConfig) -> torch.optim.Optimizer:
    """torch.optim's SGD or Adagrad with the config's learning rate (and eps, for Adagrad: DESIGN.md's
    default 1e-8 is not torch's 1e-10); no weight decay (`torch_optim_unsupported` declines it)."""
    if optimizer.kind == "sgd":
        return torch.optim.SGD(params, lr=optimizer.learning_rate)
    if optimizer.kind == "adagrad":
        return torch.optim.Adagrad(params, lr=optimizer.learning_rate, eps=optimizer.eps)
    raise ValueError(f"torch.optim has no optimizer for {optimizer.kind!r}")


def torch_cuda() -> TorchEmbeddingBag:
    """The same backend on the first CUDA device."""
    return TorchEmbeddingBag(device="cuda", name="torch-cuda")
