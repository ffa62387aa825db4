"""torchrec's unsharded ``EmbeddingBagCollection`` and ``FusedEmbeddingBagCollection`` on the CPU.

Each `TableConfig` becomes torchrec's own ``EmbeddingBagConfig`` (name, sizes, ``feature_names``,
``PoolingType``, ``DataType``); the problem's weights are copied into the module's parameters as a
torchrec user would (``param.copy_``), the batch goes in as ``batch.to_kjt()`` and the result is
``KeyedTensor.values()``, untouched. What torchrec does with a config is its own business: in
torchrec 1.8 the EBC allocates every non-FP32 table as float16 and pools in it, and the fused EBC
ignores ``data_type`` (FBGEMM stores FP32) and concatenates its per-(pooling, data type) groups out
of table order. The harness shows those; the cases under ``cases/known/`` name them.

torchrec's modules fix ``is_weighted`` at construction, so ``prepare`` builds one module for
unweighted batches and one for weighted batches (the EBC pair shares its parameters). The lookup
runs under ``torch.no_grad()``: a forward-only lookup, like the other backends.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from harness.backend import BackendUnavailable, Lookup
from harness.model import JaggedBatch, Pooling, TableConfig


def _import_torchrec(name: str) -> Any:
    try:
        import torchrec
    except ImportError as e:
        raise BackendUnavailable(f"{name}: torchrec is not installed ({e})") from e
    return torchrec


def embedding_bag_configs(tables: Sequence[TableConfig]) -> list[Any]:
    """torchrec ``EmbeddingBagConfig`` for each table: the same name, sizes, features, pooling, dtype."""
    from torchrec.modules.embedding_configs import DataType, EmbeddingBagConfig, PoolingType

    data_types = {torch.float32: DataType.FP32, torch.float16: DataType.FP16, torch.bfloat16: DataType.BF16}
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


@torch.no_grad()
def load_weights(module: torch.nn.Module, weights: Mapping[str, torch.Tensor]) -> None:
    """Copy each table's weights into ``module.embedding_bags[name].weight`` (torchrec's layout)."""
    for name, w in weights.items():
        module.embedding_bags[name].weight.copy_(w)


def _lookup_with(modules: Mapping[bool, torch.nn.Module]) -> Lookup:
    @torch.no_grad()
    def lookup(batch: JaggedBatch) -> torch.Tensor:
        return modules[batch.weights is not None](batch.to_kjt()).values()

    return lookup


class TorchrecEBC:
    """torchrec ``EmbeddingBagCollection`` (one ``nn.EmbeddingBag`` per table) on the CPU."""

    name = "torchrec"

    def __init__(self) -> None:
        _import_torchrec(self.name)

    def supports(self, tables: Sequence[TableConfig], batch: JaggedBatch) -> str | None:
        return None

    def build(
        self, tables: Sequence[TableConfig], weights: Mapping[str, torch.Tensor], *, is_weighted: bool
    ) -> torch.nn.Module:
        """One EBC holding the problem's weights (what `prepare` runs; the tests inspect it)."""
        from torchrec.modules.embedding_modules import EmbeddingBagCollection

        ebc = EmbeddingBagCollection(embedding_bag_configs(tables), is_weighted=is_weighted)
        load_weights(ebc, {t.name: weights[t.name] for t in tables})
        return ebc

    def prepare(self, tables: Sequence[TableConfig], weights: Mapping[str, torch.Tensor]) -> Lookup:
        from torchrec.modules.embedding_modules import EmbeddingBagCollection

        unweighted = self.build(tables, weights, is_weighted=False)
        weighted = EmbeddingBagCollection(
            embedding_bag_configs(tables), is_weighted=True, device=torch.device("meta")
        )
        weighted.load_state_dict(unweighted.state_dict(), assign=True)
        return _lookup_with({False: unweighted, True: weighted})


class TorchrecFusedEBC:
    """torchrec ``FusedEmbeddingBagCollection``: FBGEMM TBE modules on the host, an SGD optimizer fused in."""

    name = "torchrec-fused"

    def __init__(self) -> None:
        _import_torchrec(self.name)

    def supports(self, tables: Sequence[TableConfig], batch: JaggedBatch) -> str | None:
        odd = sorted({t.embedding_dim for t in tables if t.embedding_dim % 4})
        if odd:
            return f"embedding_dim {odd}: FBGEMM's TBE underneath asserts embedding_dim % 4 == 0"
        return None

    def build(
        self, tables: Sequence[TableConfig], weights: Mapping[str, torch.Tensor], *, is_weighted: bool
    ) -> torch.nn.Module:
        """One fused EBC holding the problem's weights (the optimizer is never stepped)."""
        from torchrec.modules.fused_embedding_modules import FusedEmbeddingBagCollection

        febc = FusedEmbeddingBagCollection(
            embedding_bag_configs(tables),
            optimizer_type=torch.optim.SGD,
            optimizer_kwargs={"lr": 0.0},
            is_weighted=is_weighted,
            device=torch.device("cpu"),
        )
        load_weights(febc, {t.name: weights[t.name] for t in tables})
        return febc

    def prepare(self, tables: Sequence[TableConfig], weights: Mapping[str, torch.Tensor]) -> Lookup:
        return _lookup_with({w: self.build(tables, weights, is_weighted=w) for w in (False, True)})
