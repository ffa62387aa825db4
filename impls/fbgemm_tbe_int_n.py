"""FBGEMM's quantized inference TBE (``IntNBitTableBatchedEmbeddingBagsCodegen``) on the CPU.

Each quantized table (`harness.quantized.QuantizedTable`: unpacked codes, fp16 scale and bias)
becomes one of the module's tables of ``SparseType`` INT8 / INT4 / INT2 on
``EmbeddingLocation.HOST``, written through ``split_embedding_weights()`` in FBGEMM's own row
layout: ``[fp16 scale][fp16 bias][codes packed LSB-first]`` (for int4 the even element is the low
nibble), ``row_alignment`` 1 (the CPU default). The module is built with ``output_dtype``
``SparseType.FP32``: its default is FP16, which would round every pooled value. INT8, INT4 and
INT2 tables share one module; features map to tables through ``feature_table_map``.

A module has one ``pooling_mode``, so a problem that mixes SUM and MEAN tables gets one module
per pooling (as torchrec's ``QuantEmbeddingBagCollection`` groups them), each fed its own
features, and the results are put back in the contract's column order. Declined: float tables
(``fbgemm-tbe`` runs those), and dims FBGEMM's constructor refuses (INT4 needs an even dim, INT2
a multiple of 4: "we need to at least pack at byte granularity").

Bounds check: ``bounds_check_mode`` is a constructor argument and part of the backend's name
unless it is the default here, FATAL (an invalid id raises). What FBGEMM 1.8's CPU path did with
a bad id in each mode (docs/torchrec-fbgemm.md has the table; the robustness matrix shows it):
WARNING and IGNORE replace an id outside the table by row 0 (WARNING also logs); NONE leaves the
check to the kernel, which accepts ids up to the table's 128-byte padding and reads zeros there;
an id of -1 is taken as a pruned row in every mode: skipped, but still counted in a MEAN bag's
length.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from harness.backend import BackendUnavailable, Lookup
from harness.model import JaggedBatch, Pooling, TableConfig, output_columns, total_dim
from harness.quantized import QUANTIZED_STORAGE, QuantizedTable, bits_of, pack_codes, scale_bias_bytes

DEFAULT_BOUNDS_CHECK = "FATAL"
BOUNDS_CHECK_VARIANTS = ("WARNING", "IGNORE", "NONE")

# The dims FBGEMM's constructor accepts per storage: codes must fill whole bytes.
DIM_MULTIPLE = {"int8": 1, "int4": 2, "int2": 4}


def _import_fbgemm(name: str) -> None:
    try:
        import fbgemm_gpu.split_table_batched_embeddings_ops_inference  # noqa: F401
    except ImportError as e:
        raise BackendUnavailable(f"{name}: fbgemm_gpu (fbgemm-gpu-cpu) is not installed ({e})") from e


def unsupported_quantized(tables: Sequence[TableConfig], library: str) -> str | None:
    """Why FBGEMM's IntN TBE (``library`` runs it) cannot hold these tables, or None: float tables,
    or a dim that does not pack into whole bytes."""
    floats = sorted({t.name for t in tables if t.dtype not in QUANTIZED_STORAGE})
    if floats:
        return f"float tables {floats}: {library} is for quantized (int8/int4/int2) tables"
    odd = sorted({(t.dtype, t.embedding_dim) for t in tables if t.embedding_dim % DIM_MULTIPLE[t.dtype]})
    if odd:
        which = ", ".join(f"{s} dim {d}" for s, d in odd)
        return (
            f"{which}: FBGEMM's IntN TBE needs int4 dims even and int2 dims a multiple of 4 "
            "(it packs rows at byte granularity)"
        )
    return None


def write_quantized(split_weights: Sequence[Any], tables: Sequence[QuantizedTable]) -> None:
    """Write each table's codes and fp16 scale/bias into a TBE's ``split_embedding_weights()``
    views (``(codes [rows, packed bytes], scale_bias [rows, 4])`` per table, FBGEMM's row layout)."""
    with torch.no_grad():
        for (codes, scale_bias), q in zip(split_weights, tables, strict=True):
            codes.copy_(pack_codes(q.codes, q.storage))
            scale_bias.copy_(scale_bias_bytes(q))


class FbgemmIntNBitTBE:
    """One CPU IntN TBE module per pooling for the quantized tables; FP32 output."""

    def __init__(self, bounds_check_mode: str = DEFAULT_BOUNDS_CHECK, name: str | None = None) -> None:
        self.bounds_check_mode = bounds_check_mode.upper()
        suffix = (
            "" if self.bounds_check_mode == DEFAULT_BOUNDS_CHECK else f"-{self.bounds_check_mode.lower()}"
        )
        self.name = name or f"fbgemm-tbe-int-n{suffix}"
        _import_fbgemm(self.name)
        from fbgemm_gpu.split_table_batched_embeddings_ops_common import BoundsCheckMode

        if self.bounds_check_mode not in BoundsCheckMode.__members__:
            raise ValueError(
                f"{self.name}: unknown bounds_check_mode {bounds_check_mode!r}; "
                f"FBGEMM has {list(BoundsCheckMode.__members__)}"
            )
        # Ours (the harness's QuantizedTable) plus the module's packed rows.
        self.weight_copies = 1
        # What `jagbench fuzz` draws for it (harness.fuzz.driver.default_strategy).
        self.table_dtypes = QUANTIZED_STORAGE

    def supports(self, tables: Sequence[TableConfig], batch: JaggedBatch) -> str | None:
        return unsupported_quantized(tables, self.name)

    def build(self, tables: Sequence[TableConfig], weights: Mapping[str, QuantizedTable]) -> Any:
        """One IntN TBE module holding ``tables`` (all of one pooling), FP32 output."""
        from fbgemm_gpu.split_embedding_configs import SparseType
        from fbgemm_gpu.split_table_batched_embeddings_ops_common import (
            BoundsCheckMode,
            EmbeddingLocation,
            PoolingMode,
        )
        from fbgemm_gpu.split_table_batched_embeddings_ops_inference import (
            IntNBitTableBatchedEmbeddingBagsCodegen,
        )

        sparse_types = {8: SparseType.INT8, 4: SparseType.INT4, 2: SparseType.INT2}
        poolings = {Pooling.SUM: PoolingMode.SUM, Pooling.MEAN: PoolingMode.MEAN}
        index = {t.name: i for i, t in enumerate(tables)}
        tbe = IntNBitTableBatchedEmbeddingBagsCodegen(
            [
                (
                    t.name,
                    t.num_embeddings,
                    t.embedding_dim,
                    sparse_types[bits_of(t.dtype)],
                    EmbeddingLocation.HOST,
                )
                for t in tables
            ],
            feature_table_map=[index[table] for table, _, _, _ in output_columns(tables)],
            pooling_mode=poolings[tables[0].pooling],
            device="cpu",
            bounds_check_mode=BoundsCheckMode[self.bounds_check_mode],
            output_dtype=SparseType.FP32,
        )
        tbe.initialize_weights()
        write_quantized(tbe.split_embedding_weights(), [weights[t.name] for t in tables])
        return tbe

    def prepare(self, tables: Sequence[TableConfig], weights: Mapping[str, QuantizedTable]) -> Lookup:
        from impls.fbgemm_tbe import tbe_lookup

        tables = tuple(tables)
        groups = pooling_groups(tables)
        if len(groups) == 1:
            return tbe_lookup(self.build(tables, weights), tables)
        parts = [(tbe_lookup(self.build(g, weights), g), _columns_of(tables, g)) for g in groups]
        width = total_dim(tables)

        def lookup(batch: JaggedBatch) -> torch.Tensor:
            out = torch.empty(batch.batch_size, width, dtype=torch.float32)
            for part, columns in parts:
                out[:, columns] = part(batch)
            return out

        return lookup


def pooling_groups(tables: Sequence[TableConfig]) -> list[tuple[TableConfig, ...]]:
    """The tables grouped by pooling, groups in order of first appearance (one module each)."""
    groups: dict[Pooling, list[TableConfig]] = {}
    for t in tables:
        groups.setdefault(t.pooling, []).append(t)
    return [tuple(g) for g in groups.values()]


def _columns_of(tables: Sequence[TableConfig], group: Sequence[TableConfig]) -> torch.Tensor:
    """The contract's output columns of ``group``'s features, in the group's own column order."""
    first = {f: col for _, f, col, _ in output_columns(tables)}
    return torch.tensor(
        [c for _, f, _, dim in output_columns(group) for c in range(first[f], first[f] + dim)],
        dtype=torch.int64,
    )


def fbgemm_tbe_int_n_warning() -> FbgemmIntNBitTBE:
    """``BoundsCheckMode.WARNING``: an id outside its table becomes row 0 (and FBGEMM logs it)."""
    return FbgemmIntNBitTBE(bounds_check_mode="WARNING")


def fbgemm_tbe_int_n_ignore() -> FbgemmIntNBitTBE:
    """``BoundsCheckMode.IGNORE``: an id outside its table becomes row 0, silently."""
    return FbgemmIntNBitTBE(bounds_check_mode="IGNORE")


def fbgemm_tbe_int_n_none() -> FbgemmIntNBitTBE:
    """``BoundsCheckMode.NONE``: no bounds-check pass; the CPU kernel's own check stops at the table's
    padding, not at its rows."""
    return FbgemmIntNBitTBE(bounds_check_mode="NONE")
