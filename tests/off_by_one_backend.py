"""A deliberately wrong user backend for the benchmark tests: torch's result plus one."""

from __future__ import annotations

from impls.torch_embedding_bag import TorchEmbeddingBag


class OffByOne(TorchEmbeddingBag):
    def __init__(self) -> None:
        super().__init__(name="off-by-one")

    def prepare(self, tables, weights):  # type: ignore[no-untyped-def]
        inner = super().prepare(tables, weights)
        return lambda batch: inner(batch) + 1.0
