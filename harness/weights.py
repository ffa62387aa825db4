"""Seeded table weights: the same (seed, table) always gives the same tensor, on any machine."""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import torch

from harness.model import TableConfig, TableWeights, is_quantized
from harness.quantized import quantize_rows


def table_seed(seed: int, table_name: str) -> int:
    """A per-table seed, so adding a table does not change the others' weights."""
    return (seed * 1_000_003 + zlib.crc32(table_name.encode())) % (2**63)


def make_table_weights(table: TableConfig, seed: int = 0, scale: float = 1.0) -> TableWeights:
    """``[num_embeddings, embedding_dim]`` standard-normal values times ``scale``, in the table's dtype
    (a quantized table: those float32 values quantized by `harness.quantized.quantize_rows`)."""
    gen = torch.Generator().manual_seed(table_seed(seed, table.name))
    w = torch.randn(table.num_embeddings, table.embedding_dim, generator=gen, dtype=torch.float32)
    if scale != 1.0:
        w.mul_(scale)
    if is_quantized(table):
        return quantize_rows(w, table.dtype)
    return w.to(table.dtype)


def make_weights(tables: Sequence[TableConfig], seed: int = 0, scale: float = 1.0) -> dict[str, TableWeights]:
    """Weights for every table, by table name (see `make_table_weights`)."""
    return {t.name: make_table_weights(t, seed, scale) for t in tables}
