"""The ``reference`` backend: the forward oracle (`harness.reference`) behind the backend contract."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from harness.backend import Lookup
from harness.model import JaggedBatch, TableConfig
from harness.reference.forward import reference_pool


class ReferenceBackend:
    """The oracle as a backend; its lookup rounds the float64 result to the contract's float32."""

    name = "reference"

    def supports(self, tables: Sequence[TableConfig], batch: JaggedBatch) -> str | None:
        return None

    def prepare(self, tables: Sequence[TableConfig], weights: Mapping[str, torch.Tensor]) -> Lookup:
        tables = tuple(tables)
        weights = dict(weights)

        def lookup(batch: JaggedBatch) -> torch.Tensor:
            return reference_pool(tables, weights, batch).value.to(torch.float32)

        return lookup
