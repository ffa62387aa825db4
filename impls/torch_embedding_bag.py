"""`torch.nn.functional.embedding_bag`, one call per feature, on a chosen device.

The table's weights are used in their own dtype, as a torch user would use them. torch returns
pooled float16 / bfloat16 for such tables, which the adapter widens to float32 without correcting,
and it requires per-sample weights in the table's dtype, so they are cast as a torch user must.
Both round; the difference from the contract is kept as a known discrepancy under ``cases/known/``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from harness.backend import BackendUnavailable, Lookup
from harness.model import JaggedBatch, TableConfig, output_columns


class TorchEmbeddingBag:
    """``F.embedding_bag`` per feature; shared tables reuse one weight tensor."""

    def __init__(self, device: str = "cpu", name: str = "torch") -> None:
        self.device = torch.device(device)
        self.name = name
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise BackendUnavailable(f"{name}: torch {torch.__version__} sees no CUDA device")

    def supports(self, tables: Sequence[TableConfig], batch: JaggedBatch) -> str | None:
        return None

    def prepare(self, tables: Sequence[TableConfig], weights: Mapping[str, torch.Tensor]) -> Lookup:
        device = self.device
        on_device = {t.name: weights[t.name].to(device) for t in tables}
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


def torch_cuda() -> TorchEmbeddingBag:
    """The same backend on the first CUDA device."""
    return TorchEmbeddingBag(device="cuda", name="torch-cuda")
