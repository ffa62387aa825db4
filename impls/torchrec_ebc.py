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

Training, each with torchrec's own machinery (``prepare_training``):

- ``torchrec``: the EBC with autograd and a torch optimizer over ``ebc.parameters()``:
  ``torch.optim.SGD``, ``torch.optim.Adagrad`` or ``torchrec.optim.RowWiseAdagrad`` with the
  config's learning rate, eps and (L2) weight decay; ``values().backward(grad_output)``, then
  ``step()``. The EBC's ``nn.EmbeddingBag`` gradients are dense, so with weight decay every row
  decays, touched or not (cases/known/training/). None of the three has a decoupled mode, and
  they step a float16 parameter in float16 (the EBC also makes bfloat16 tables float16): those
  are declined.
- ``torchrec-fused``: ``FusedEmbeddingBagCollection`` with ``optimizer_type`` ``torch.optim.SGD``,
  ``torch.optim.Adagrad`` or ``torchrec.optim.RowWiseAdagrad`` (torchrec maps them to FBGEMM's
  EXACT_SGD, EXACT_ADAGRAD, EXACT_ROWWISE_ADAGRAD) and ``optimizer_kwargs`` ``lr``, ``eps``,
  ``weight_decay``, ``weight_decay_mode`` (FBGEMM's ``WeightDecayMode``) and
  ``stochastic_rounding=False``, passed through to the TBE as torchrec does. The update happens
  in ``backward``. Its ``is_weighted`` is fixed at construction and its optimizer state lives in
  the module, so one module is built at the first step, for that step's kind of batch; a later
  step of the other kind is an error (the strategies never make one).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from harness.backend import BackendUnavailable, Lookup
from harness.model import JaggedBatch, Pooling, TableConfig, dtype_name, is_quantized
from harness.training.contract import OptimizerConfig, TrainResult, TrainStep


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


def _quantized_declined(tables: Sequence[TableConfig]) -> str | None:
    quantized = [t.name for t in tables if is_quantized(t)]
    if quantized:
        return f"quantized tables {quantized}: this module holds float tables (torchrec-quant runs them)"
    return None


def _lookup_with(modules: Mapping[bool, torch.nn.Module]) -> Lookup:
    @torch.no_grad()
    def lookup(batch: JaggedBatch) -> torch.Tensor:
        return modules[batch.weights is not None](batch.to_kjt()).values()

    return lookup


def _torchrec_optimizer_type(kind: str) -> type:
    """The torch optimizer class torchrec users train an EBC with (and FusedEBC maps to FBGEMM)."""
    import torchrec.optim

    return {
        "sgd": torch.optim.SGD,
        "adagrad": torch.optim.Adagrad,
        "rowwise_adagrad": torchrec.optim.RowWiseAdagrad,
    }[kind]


def _weighted_kjt(batch: JaggedBatch) -> tuple[Any, torch.Tensor | None]:
    """The batch as a KJT whose per-sample weights (if any) are a fresh leaf with ``requires_grad``."""
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    per_sample = None if batch.weights is None else batch.weights.clone().requires_grad_(True)
    kjt = KeyedJaggedTensor(
        keys=list(batch.keys), values=batch.values, lengths=batch.lengths, weights=per_sample
    )
    return kjt, per_sample


class TorchrecEBC:
    """torchrec ``EmbeddingBagCollection`` (one ``nn.EmbeddingBag`` per table) on the CPU."""

    name = "torchrec"

    def __init__(self) -> None:
        _import_torchrec(self.name)

    def supports(self, tables: Sequence[TableConfig], batch: JaggedBatch) -> str | None:
        return _quantized_declined(tables)

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

    def supports_training(
        self, tables: Sequence[TableConfig], batch: JaggedBatch, optimizer: OptimizerConfig
    ) -> str | None:
        reason = self.supports(tables, batch)
        if reason is not None:
            return reason
        if optimizer.decays and optimizer.weight_decay_mode == "decoupled":
            name = _torchrec_optimizer_type(optimizer.kind).__name__
            return f"decoupled weight decay: {name} (a torch.optim-style optimizer) has no decoupled mode"
        half = sorted({dtype_name(t.dtype) for t in tables if t.dtype != torch.float32})
        if half:
            return (
                f"{'/'.join(half)} tables: the EBC holds them as float16 parameters, which torch optimizers "
                "update in float16 (gradient, duplicate sums and state rounded at every operation)"
            )
        return None

    def prepare_training(
        self, tables: Sequence[TableConfig], weights: Mapping[str, torch.Tensor], optimizer: OptimizerConfig
    ) -> TrainStep:
        tables = tuple(tables)
        modules = {w: self.build(tables, weights, is_weighted=w) for w in (False, True)}
        for t in tables:  # one set of parameters: the optimizer's
            modules[True].embedding_bags[t.name].weight = modules[False].embedding_bags[t.name].weight
        params = list(modules[False].parameters())
        kwargs: dict[str, Any] = {"lr": optimizer.learning_rate}
        if optimizer.kind != "sgd":
            kwargs["eps"] = optimizer.eps
        if optimizer.weight_decay_mode == "l2":
            kwargs["weight_decay"] = optimizer.weight_decay
        optim = _torchrec_optimizer_type(optimizer.kind)(params, **kwargs)

        def step(batch: JaggedBatch, grad_output: torch.Tensor) -> TrainResult:
            kjt, per_sample = _weighted_kjt(batch)
            module = modules[per_sample is not None]
            output = module(kjt).values()
            output.backward(grad_output)
            optim.step()
            optim.zero_grad(set_to_none=True)
            new = {t.name: module.embedding_bags[t.name].weight.detach() for t in tables}
            return TrainResult(output.detach(), new, None if per_sample is None else per_sample.grad)

        return step


class TorchrecFusedEBC:
    """torchrec ``FusedEmbeddingBagCollection``: FBGEMM TBE modules on the host, an SGD optimizer fused in."""

    name = "torchrec-fused"

    def __init__(self) -> None:
        _import_torchrec(self.name)

    def supports(self, tables: Sequence[TableConfig], batch: JaggedBatch) -> str | None:
        quantized = _quantized_declined(tables)
        if quantized:
            return quantized
        odd = sorted({t.embedding_dim for t in tables if t.embedding_dim % 4})
        if odd:
            return f"embedding_dim {odd}: FBGEMM's TBE underneath asserts embedding_dim % 4 == 0"
        return None

    def build(
        self,
        tables: Sequence[TableConfig],
        weights: Mapping[str, torch.Tensor],
        *,
        is_weighted: bool,
        optimizer: OptimizerConfig | None = None,
    ) -> torch.nn.Module:
        """One fused EBC holding the problem's weights; without ``optimizer``, SGD with learning
        rate 0 (a lookup never steps it)."""
        from torchrec.modules.fused_embedding_modules import FusedEmbeddingBagCollection

        optimizer_type: type = torch.optim.SGD
        kwargs: dict[str, Any] = {"lr": 0.0}
        if optimizer is not None:
            from impls.fbgemm_tbe import fbgemm_optimizer_kwargs

            optimizer_type = _torchrec_optimizer_type(optimizer.kind)
            fbgemm = fbgemm_optimizer_kwargs(optimizer)
            kwargs = {"lr": optimizer.learning_rate}
            kwargs.update(
                {k: fbgemm[k] for k in ("eps", "weight_decay", "weight_decay_mode", "stochastic_rounding")}
            )
        febc = FusedEmbeddingBagCollection(
            embedding_bag_configs(tables),
            optimizer_type=optimizer_type,
            optimizer_kwargs=kwargs,
            is_weighted=is_weighted,
            device=torch.device("cpu"),
        )
        load_weights(febc, {t.name: weights[t.name] for t in tables})
        return febc

    def prepare(self, tables: Sequence[TableConfig], weights: Mapping[str, torch.Tensor]) -> Lookup:
        return _lookup_with({w: self.build(tables, weights, is_weighted=w) for w in (False, True)})

    def supports_training(
        self, tables: Sequence[TableConfig], batch: JaggedBatch, optimizer: OptimizerConfig
    ) -> str | None:
        return self.supports(tables, batch)

    def prepare_training(
        self, tables: Sequence[TableConfig], weights: Mapping[str, torch.Tensor], optimizer: OptimizerConfig
    ) -> TrainStep:
        tables = tuple(tables)
        weights = {t.name: weights[t.name].clone() for t in tables}
        built: list[tuple[bool, torch.nn.Module]] = []

        def step(batch: JaggedBatch, grad_output: torch.Tensor) -> TrainResult:
            kjt, per_sample = _weighted_kjt(batch)
            weighted = per_sample is not None
            if not built:
                built.append(
                    (weighted, self.build(tables, weights, is_weighted=weighted, optimizer=optimizer))
                )
            is_weighted, febc = built[0]
            if weighted != is_weighted:
                raise ValueError(
                    f"{self.name}: FusedEmbeddingBagCollection fixes is_weighted={is_weighted} when built "
                    "(the first step's batch), and its optimizer state lives in that module: a later "
                    f"{'weighted' if weighted else 'unweighted'} batch cannot continue the run"
                )
            output = febc(kjt).values()
            output.backward(grad_output)
            new = {t.name: febc.embedding_bags[t.name].weight.detach() for t in tables}
            return TrainResult(output.detach(), new, None if per_sample is None else per_sample.grad)

        return step
