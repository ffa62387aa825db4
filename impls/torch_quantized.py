"""torch's own quantized embedding-bag ops, for the ``torch`` backend's quantized tables (CPU).

A torch user pools a row-wise quantized table with ``torch.ops.quantized``:

- int8: ``embedding_bag_byte_rowwise_offsets`` on rows ``[codes][fp32 scale][fp32 bias]`` (the
  layout of ``embedding_bag_byte_prepack``). Our fp16 scale and bias become fp32 exactly.
- int4 / int2: ``embedding_bag_4bit_rowwise_offsets`` / ``embedding_bag_2bit_rowwise_offsets`` on
  rows ``[codes packed LSB-first][fp16 scale][fp16 bias]`` (the layout of
  ``embedding_bag_4bit_prepack`` / ``embedding_bag_2bit_prepack``). Their dims: int4 even, int2 a
  multiple of 4 (the op infers the dim from the row's bytes).

One call per feature, with the same arguments as ``F.embedding_bag``: ids, per-bag offsets (no
last offset), ``mode`` (0 sum, 1 mean) and float32 per-sample weights. torch 2.13's ops ignore
``mode``: mode=1 returns the SUM, without an error (pytorch PR #106105: "``mode`` and
``scale_grad_by_freq`` aren't used at all"). The adapter passes mode=1 for a MEAN table as a torch
user would and leaves the result alone: cases/known/torch-quantized-mean-pooled-as-sum.json
models it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from harness.quantized import QuantizedTable, pack_codes

TORCH_MODES = {"sum": 0, "mean": 1}
"""``mode`` of torch's embedding-bag ops (``F.embedding_bag``'s "sum" and "mean")."""

DIM_MULTIPLE = {"int8": 1, "int4": 2, "int2": 4}
"""The dims torch's ops can hold per storage: the dim is inferred from whole bytes of codes."""


def quantized_weight(table: QuantizedTable) -> torch.Tensor:
    """The table in the row layout of its torch op (module docstring): uint8 ``[rows, bytes]``."""
    if table.storage == "int8":
        qparams = torch.stack([table.scale.float(), table.bias.float()], dim=1).contiguous()
        return torch.cat([table.codes, qparams.view(torch.uint8)], dim=1).contiguous()
    qparams = torch.stack([table.scale, table.bias], dim=1).contiguous()
    return torch.cat([pack_codes(table.codes, table.storage), qparams.view(torch.uint8)], dim=1).contiguous()


def quantized_op(storage: str) -> Callable[..., torch.Tensor]:
    """torch's embedding-bag op for ``storage`` ("int8", "int4" or "int2")."""
    ops = {
        "int8": torch.ops.quantized.embedding_bag_byte_rowwise_offsets,
        "int4": torch.ops.quantized.embedding_bag_4bit_rowwise_offsets,
        "int2": torch.ops.quantized.embedding_bag_2bit_rowwise_offsets,
    }
    return ops[storage]


def unsupported_dims(dtypes_and_dims: set[tuple[str, int]]) -> str | None:
    """Why torch's ops cannot hold some (storage, dim), or None."""
    odd = sorted((s, d) for s, d in dtypes_and_dims if d % DIM_MULTIPLE[s])
    if not odd:
        return None
    which = ", ".join(f"{s} dim {d}" for s, d in odd)
    return (
        f"{which}: torch's 4-bit / 2-bit ops infer the dim from whole bytes (int4 even, int2 a multiple of 4)"
    )


def quantized_pool(
    table: QuantizedTable, pooling: str
) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]:
    """``pool(ids, offsets, per_sample_weights)`` for one feature of ``table``: its torch op, called
    as ``F.embedding_bag`` is (offsets of each bag's first id; ``mode`` from ``pooling``)."""
    weight = quantized_weight(table)
    op = quantized_op(table.storage)
    mode = TORCH_MODES[pooling]

    def pool(ids: torch.Tensor, offsets: torch.Tensor, per_sample: torch.Tensor | None) -> torch.Tensor:
        return op(weight, ids, offsets, mode=mode, per_sample_weights=per_sample)

    return pool
