"""torchrec's ``QuantEmbeddingBagCollection`` (``torchrec.quant.embedding_modules``) on the CPU.

Each quantized `TableConfig` becomes an ``EmbeddingBagConfig`` with ``data_type`` INT8 / INT4 /
INT2 and its pooling; the tables' data go in through the constructor's
``table_name_to_quantized_weights``, in the format torchrec's own ``quantize_state_dict`` produces:
per table, the codes packed LSB-first ``[rows, packed bytes]`` and the fp16 scale and bias as
``[rows, 4]`` bytes. Everything else is torchrec's choice and left as it is: its default
``row_alignment`` 16, one FBGEMM IntN TBE per pooling underneath, ``output_dtype`` float32 (its
default). The batch goes in as ``batch.to_kjt()``; the KeyedTensor's keys follow torchrec's
groups, not the table order (with poolings SUM, MEAN, SUM the keys come as f0, f2, f1), so the
result is taken by key (``to_dict()``) and concatenated in the contract's column order.

``is_weighted`` is fixed at construction, so ``prepare`` builds one module for unweighted
batches and one for weighted ones (each holds its own copy of the packed rows).

Bounds check: torchrec has no argument for it and builds its TBEs with WARNING (an id outside the
table becomes row 0, with a log line). This adapter sets every IntN TBE inside the module to
FATAL (``bounds_check_mode_int``), so an invalid id raises, as in the other FBGEMM backends;
that is the one setting changed from torchrec's defaults. To reach the TBEs it builds the module
with ``register_tbes=True`` (they become submodules; the forward calls them the same way).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from harness.backend import BackendUnavailable, Lookup
from harness.model import JaggedBatch, Pooling, TableConfig, output_columns
from harness.quantized import QUANTIZED_STORAGE, QuantizedTable, pack_codes, scale_bias_bytes
from impls.fbgemm_tbe_int_n import unsupported_quantized


def _import_torchrec_quant(name: str) -> None:
    try:
        import torchrec.quant.embedding_modules  # noqa: F401
    except ImportError as e:
        raise BackendUnavailable(f"{name}: torchrec (with fbgemm-gpu-cpu) is not installed ({e})") from e


def quant_embedding_bag_configs(tables: Sequence[TableConfig]) -> list[Any]:
    """torchrec ``EmbeddingBagConfig`` for each quantized table: name, sizes, features, pooling,
    ``DataType`` INT8 / INT4 / INT2."""
    from torchrec.modules.embedding_configs import DataType, EmbeddingBagConfig, PoolingType

    data_types = {"int8": DataType.INT8, "int4": DataType.INT4, "int2": DataType.INT2}
    poolings = {Pooling.SUM: PoolingType.SUM, Pooling.MEAN: PoolingType.MEAN}
    return [
        EmbeddingBagConfig(
            num_embeddings=t.num_embeddings,
            embedding_dim=t.embedding_dim,
            name=t.name,
            feature_names=list(t.feature_names),
            pooling=poolings[t.pooling],
            data_type=data_types[t.dtype],
        )
        for t in tables
    ]


def set_bounds_check(module: torch.nn.Module, mode: str) -> int:
    """Set every FBGEMM IntN TBE inside ``module`` to ``BoundsCheckMode[mode]``; how many there were.
    The module must have been built with ``register_tbes=True`` (else its TBEs are no submodules:
    then nothing is found, and that raises rather than leaving torchrec's WARNING in place)."""
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import BoundsCheckMode
    from fbgemm_gpu.split_table_batched_embeddings_ops_inference import (
        IntNBitTableBatchedEmbeddingBagsCodegen,
    )

    tbes = [m for m in module.modules() if isinstance(m, IntNBitTableBatchedEmbeddingBagsCodegen)]
    if not tbes:
        raise RuntimeError(f"no IntNBitTableBatchedEmbeddingBagsCodegen inside {type(module).__name__}")
    for tbe in tbes:
        tbe.bounds_check_mode_int = BoundsCheckMode[mode].value
    return len(tbes)


class TorchrecQuantEBC:
    """torchrec ``QuantEmbeddingBagCollection`` fed a KJT (FBGEMM's IntN TBE underneath, set to FATAL)."""

    name = "torchrec-quant"
    bounds_check_mode = "FATAL"

    def __init__(self) -> None:
        _import_torchrec_quant(self.name)
        # Ours plus the unweighted and the weighted module's packed rows.
        self.weight_copies = 2
        # What `jagbench fuzz` draws for it (harness.fuzz.driver.default_strategy).
        self.table_dtypes = QUANTIZED_STORAGE

    def supports(self, tables: Sequence[TableConfig], batch: JaggedBatch) -> str | None:
        return unsupported_quantized(tables, self.name)

    def build(
        self, tables: Sequence[TableConfig], weights: Mapping[str, QuantizedTable], *, is_weighted: bool
    ) -> torch.nn.Module:
        """One QuantEmbeddingBagCollection holding the problem's tables (the tests inspect it)."""
        from torchrec.quant.embedding_modules import EmbeddingBagCollection as QuantEmbeddingBagCollection

        packed = {
            t.name: (pack_codes(weights[t.name].codes, t.dtype), scale_bias_bytes(weights[t.name]))
            for t in tables
        }
        module = QuantEmbeddingBagCollection(
            quant_embedding_bag_configs(tables),
            is_weighted=is_weighted,
            device=torch.device("cpu"),
            output_dtype=torch.float32,
            table_name_to_quantized_weights=packed,
            register_tbes=True,  # its TBEs as submodules, so that set_bounds_check finds them
        )
        set_bounds_check(module, self.bounds_check_mode)
        return module

    def prepare(self, tables: Sequence[TableConfig], weights: Mapping[str, QuantizedTable]) -> Lookup:
        modules = {w: self.build(tables, weights, is_weighted=w) for w in (False, True)}
        order = [f for _, f, _, _ in output_columns(tables)]

        @torch.no_grad()
        def lookup(batch: JaggedBatch) -> torch.Tensor:
            pooled = modules[batch.weights is not None](batch.to_kjt())
            if list(pooled.keys()) == order:
                return pooled.values()
            by_key = pooled.to_dict()
            return torch.cat([by_key[f] for f in order], dim=1)

        return lookup
