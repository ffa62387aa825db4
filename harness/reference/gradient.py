"""The compiled gradient pass behind `harness.reference.training.train_step`: numba, float64.

For one table it walks the batch exactly as `train_step_loop` does (the table's features in the
batch's order, each sample's bag, each id in bag order) and adds each occurrence's term into its
touched row's gradient sum, with the term's magnitude and a count beside it, and, for weighted
batches, computes each id's per-sample weight gradient (a sequential dot product of the row
before the update with the grad_output slice). Same order, same float64 operations: the results
are the loop's to the last bit. The bookkeeping around it (which ids belong to which table, the
distinct touched rows) is numpy: single-threaded and vectorised.

Written apart from every backend in `impls/`, and trusting its input: validate first.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numba
import numpy as np
import torch

from harness.model import JaggedBatch, Pooling, TableConfig, output_columns


@numba.njit(cache=True, nogil=True)
def _table_gradient(
    grad_output,
    offsets,
    per_sample,
    weighted,
    is_mean,
    features,
    first_cols,
    batch_size,
    slots,
    before,
    gradient,
    magnitude,
    count,
    psw_grad,
    psw_pos,
    psw_neg,
):
    dim = gradient.shape[1]
    k = 0
    for j in range(features.shape[0]):
        f = features[j]
        col = first_cols[j]
        for s in range(batch_size):
            start = offsets[f * batch_size + s]
            end = offsets[f * batch_size + s + 1]
            n = end - start
            for p in range(start, end):
                slot = slots[k]
                k += 1
                count[slot] += 1
                if weighted:
                    w = np.float64(per_sample[p])
                    dot = 0.0
                    above = 0.0
                    below = 0.0
                    for d in range(dim):
                        g = np.float64(grad_output[s, col + d])
                        t = g * w
                        gradient[slot, d] += t
                        magnitude[slot, d] += abs(t)
                        x = before[slot, d] * g
                        dot += x
                        above += x if x > 0.0 else 0.0
                        below += -x if x < 0.0 else 0.0
                    psw_grad[p] = dot
                    psw_pos[p] = above
                    psw_neg[p] = below
                elif is_mean:
                    for d in range(dim):
                        t = np.float64(grad_output[s, col + d]) / n
                        gradient[slot, d] += t
                        magnitude[slot, d] += abs(t)
                else:
                    for d in range(dim):
                        t = np.float64(grad_output[s, col + d])
                        gradient[slot, d] += t
                        magnitude[slot, d] += abs(t)


@dataclass(frozen=True, eq=False)
class TableGradient:
    """One table's touched rows (sorted, distinct, int64 ``[n]``) and their float64 rows before
    the update, gradient sums and magnitudes (``[n, dim]``), and term counts (int64 ``[n]``)."""

    rows: torch.Tensor
    before: torch.Tensor
    gradient: torch.Tensor
    magnitude: torch.Tensor
    occurrences: torch.Tensor


@dataclass(frozen=True, eq=False)
class BatchGradient:
    """Every table's `TableGradient` by name, and (weighted batches) each id's per-sample weight
    gradient with the sums of its positive products and of its negative ones' magnitudes."""

    tables: dict[str, TableGradient]
    psw_grad: torch.Tensor | None
    psw_positive: torch.Tensor | None
    psw_negative: torch.Tensor | None


def gradients(
    tables: Sequence[TableConfig],
    weights: dict[str, torch.Tensor],
    batch: JaggedBatch,
    grad_output: torch.Tensor,
) -> BatchGradient:
    """The gradient sums of every table's touched rows (and the per-sample weight gradients)."""
    b = batch.batch_size
    n_keys = len(batch.keys)
    ids = batch.values.detach().to(torch.int64).numpy()
    offsets = batch.offsets.numpy()
    lengths = batch.lengths.detach().to(torch.int64).numpy()
    weighted = batch.weights is not None
    per_sample = batch.weights.detach().contiguous().numpy() if weighted else np.zeros(1, np.float32)
    go = grad_output.detach().contiguous().numpy()
    table_index = {f: i for i, t in enumerate(tables) for f in t.feature_names}
    first_col = {feature: col for _, feature, col, _ in output_columns(tables)}
    table_of_key = np.array([table_index[k] for k in batch.keys], np.int64)
    per_key = lengths.reshape(n_keys, b).sum(axis=1) if b else np.zeros(n_keys, np.int64)
    table_of_id = np.repeat(table_of_key, per_key)
    order = np.argsort(table_of_id, kind="stable")
    groups = np.split(order, np.cumsum(np.bincount(table_of_id, minlength=len(tables)))[:-1])
    n = len(ids)
    psw = [np.zeros(n) for _ in range(3)] if weighted else [np.zeros(1)] * 3
    out = {}
    for ti, (t, positions) in enumerate(zip(tables, groups, strict=True)):
        touched, slots = np.unique(ids[positions], return_inverse=True)
        dim = t.embedding_dim
        before = weights[t.name][torch.from_numpy(touched)].to(torch.float64).numpy()
        gradient = np.zeros((len(touched), dim))
        magnitude = np.zeros((len(touched), dim))
        count = np.zeros(len(touched), np.int64)
        features = np.flatnonzero(table_of_key == ti).astype(np.int64)
        if len(positions):
            _table_gradient(
                go,
                offsets,
                per_sample,
                weighted,
                t.pooling is Pooling.MEAN,
                features,
                np.array([first_col[batch.keys[f]] for f in features], np.int64),
                b,
                slots.reshape(-1).astype(np.int64),
                before,
                gradient,
                magnitude,
                count,
                *psw,
            )
        out[t.name] = TableGradient(
            torch.from_numpy(touched.astype(np.int64)),
            torch.from_numpy(before),
            torch.from_numpy(gradient),
            torch.from_numpy(magnitude),
            torch.from_numpy(count),
        )
    if not weighted:
        return BatchGradient(out, None, None, None)
    return BatchGradient(out, *(torch.from_numpy(a) for a in psw))
