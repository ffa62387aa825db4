"""A user's backend as a new user would first write one: ``F.embedding_bag`` per feature.

Fuzz it against the reference (and measure the harness's throughput on it)::

    jagbench fuzz --backend docs/examples/mykernel.py:K --time-budget 60

It widens every table to float32 once in ``prepare`` (the contract asks for at least float32
accumulation), then pools each feature with one ``F.embedding_bag`` call per lookup.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from harness.model import JaggedBatch, TableConfig


class K:
    """``F.embedding_bag`` per feature over float32 copies of the tables; correct, not fused."""

    name = "mykernel"

    def supports(self, tables: Sequence[TableConfig], batch: JaggedBatch) -> str | None:
        return None

    def prepare(self, tables: Sequence[TableConfig], weights: Mapping[str, torch.Tensor]):
        tables = tuple(tables)
        wide = {t.name: weights[t.name].to(torch.float32) for t in tables}

        def lookup(batch: JaggedBatch) -> torch.Tensor:
            b = batch.batch_size
            offsets = batch.offsets
            pooled = []
            for t in tables:
                for feature in t.feature_names:
                    f = batch.keys.index(feature)
                    lo, hi = int(offsets[f * b]), int(offsets[(f + 1) * b])
                    per_sample = None if batch.weights is None else batch.weights[lo:hi]
                    pooled.append(
                        F.embedding_bag(
                            batch.values[lo:hi],
                            wide[t.name],
                            offsets[f * b : (f + 1) * b] - lo,
                            mode=t.pooling.value,
                            per_sample_weights=per_sample,
                        )
                    )
            return torch.cat(pooled, dim=1) if pooled else torch.zeros(b, 0)

        return lookup
