"""A kernel author's backend, as it sits in their own project (next to their tests).

``MyKernel`` pools with one ``torch.index_add_`` per feature over float32 copies of the tables:
correct, and cheap enough for a property test. ``DropsLastId`` is the same with a planted bug (the
last id of every bag is skipped), to show what a failure looks like.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from harness.model import JaggedBatch, Pooling, TableConfig, output_columns, total_dim


class MyKernel:
    name = "my-kernel"
    skip_last = False

    def supports(self, tables: Sequence[TableConfig], batch: JaggedBatch) -> str | None:
        return None

    def prepare(self, tables: Sequence[TableConfig], weights: Mapping[str, torch.Tensor]):
        tables = tuple(tables)
        rows = {t.name: weights[t.name].to(torch.float32) for t in tables}
        table_of = {f: t for t in tables for f in t.feature_names}
        columns = {feature: (first, dim) for _, feature, first, dim in output_columns(tables)}

        def lookup(batch: JaggedBatch) -> torch.Tensor:
            b = batch.batch_size
            out = torch.zeros(b, total_dim(tables))
            lengths = batch.lengths.to(torch.int64).reshape(len(batch.keys), b)
            for f, key in enumerate(batch.keys):
                ids = batch.values[batch.feature_slice(key)].to(torch.int64)
                bag = torch.repeat_interleave(torch.arange(b), lengths[f])
                keep = torch.ones(len(ids), dtype=torch.bool)
                if self.skip_last and len(ids):
                    keep[torch.cumsum(lengths[f], 0)[lengths[f] > 0] - 1] = False
                x = rows[table_of[key].name][ids]
                if batch.weights is not None:
                    x = x * batch.weights[batch.feature_slice(key)].unsqueeze(1)
                pooled = torch.zeros(b, x.shape[1]).index_add_(0, bag[keep], x[keep])
                if table_of[key].pooling is Pooling.MEAN:
                    pooled /= lengths[f].clamp(min=1).unsqueeze(1)
                first, dim = columns[key]
                out[:, first : first + dim] = pooled
            return out

        return lookup


class DropsLastId(MyKernel):
    name = "drops-last-id"
    skip_last = True
