"""The ``reference`` backend: the forward and training oracles (`harness.reference`) behind the
backend contract."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from harness.backend import Lookup
from harness.model import TABLE_DTYPES, JaggedBatch, TableConfig
from harness.reference.forward import pool
from harness.reference.training import initial_state, train_step
from harness.training.contract import OptimizerConfig, TrainResult, TrainStep


class ReferenceBackend:
    """The oracle as a backend; its lookup rounds the float64 result to the contract's float32.

    It trains too: each step is the float64 reference step (`harness.reference.training`), its
    output and per-sample weight gradients rounded to float32 and each updated row rounded once
    to the table's dtype; the optimizer state stays float64 between steps.
    """

    name = "reference"
    table_dtypes = TABLE_DTYPES

    def supports(self, tables: Sequence[TableConfig], batch: JaggedBatch) -> str | None:
        return None

    def prepare(self, tables: Sequence[TableConfig], weights: Mapping[str, torch.Tensor]) -> Lookup:
        tables = tuple(tables)
        weights = dict(weights)

        def lookup(batch: JaggedBatch) -> torch.Tensor:
            return pool(tables, weights, batch).value.to(torch.float32)

        return lookup

    def supports_training(
        self, tables: Sequence[TableConfig], batch: JaggedBatch, optimizer: OptimizerConfig
    ) -> str | None:
        return None

    def prepare_training(
        self, tables: Sequence[TableConfig], weights: Mapping[str, torch.Tensor], optimizer: OptimizerConfig
    ) -> TrainStep:
        tables = tuple(tables)
        current = {t.name: weights[t.name].clone() for t in tables}
        state = initial_state(tables, optimizer)

        def step(batch: JaggedBatch, grad_output: torch.Tensor) -> TrainResult:
            nonlocal state
            ref = train_step(tables, current, batch, grad_output, optimizer, state)
            current.update(ref.rounded_weights(current))
            state = ref.state
            grad = ref.per_sample_weight_grad
            return TrainResult(
                ref.forward.value.to(torch.float32),
                dict(current),
                None if grad is None else grad.to(torch.float32),
            )

        return step
