"""The forward oracle's definition: a plain float64 loop over features, samples and ids.

Slow on purpose and meant to be checked by reading it. Besides the pooled value it returns, per
output element, the sum of the terms' magnitudes and the bag length: the inputs of the error bound
in `harness.tolerance`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from harness.model import JaggedBatch, Pooling, TableConfig, output_columns, total_dim


@dataclass(frozen=True)
class ReferenceResult:
    """float64 ``[batch, total_dim]`` tensors, plus the pooling and bag length of each element."""

    value: torch.Tensor
    magnitude: torch.Tensor
    bag_length: torch.Tensor
    is_mean: torch.Tensor


def reference_pool(
    tables: Sequence[TableConfig], weights: Mapping[str, torch.Tensor], batch: JaggedBatch
) -> ReferenceResult:
    """Pool every bag in float64, feature by feature, sample by sample, id by id."""
    b = batch.batch_size
    width = total_dim(tables)
    value = torch.zeros(b, width, dtype=torch.float64)
    magnitude = torch.zeros(b, width, dtype=torch.float64)
    bag_length = torch.zeros(b, width, dtype=torch.int64)
    is_mean = torch.zeros(b, width, dtype=torch.bool)
    table_by_name = {t.name: t for t in tables}
    offsets = batch.offsets.tolist()
    ids = batch.values.tolist()
    per_sample = batch.weights.double().tolist() if batch.weights is not None else None

    for table_name, feature, first_col, dim in output_columns(tables):
        table = table_by_name[table_name]
        rows = weights[table_name].double()
        cols = slice(first_col, first_col + dim)
        f = batch.keys.index(feature)
        for sample in range(b):
            start, end = offsets[f * b + sample], offsets[f * b + sample + 1]
            acc = torch.zeros(dim, dtype=torch.float64)
            mag = torch.zeros(dim, dtype=torch.float64)
            for pos in range(start, end):
                w = per_sample[pos] if per_sample is not None else 1.0
                term = rows[ids[pos]] * w
                acc += term
                mag += term.abs()
            n = end - start
            if table.pooling is Pooling.MEAN and n > 0:
                acc /= n
                mag /= n
            value[sample, cols] = acc
            magnitude[sample, cols] = mag
            bag_length[sample, cols] = n
            is_mean[sample, cols] = table.pooling is Pooling.MEAN
    return ReferenceResult(value, magnitude, bag_length, is_mean)
