"""The training contract (DESIGN.md, "Training"): an optional capability of a backend.

A backend that trains has, besides ``name``, ``supports`` and ``prepare``:

- ``supports_training(tables, batch, optimizer) -> str | None``: ``None`` when it can train this
  problem with this optimizer, else the reason it cannot (counted, not failed);
- ``prepare_training(tables, weights, optimizer) -> TrainStep``: the one-time work; the step works
  on the backend's own copy of the weights (the caller's are never changed). Each call
  ``step(batch, grad_output)`` is one training step: the forward lookup, the backward of
  ``grad_output`` (float32 ``[batch_size, total_dim]``) and one optimizer update, continuing from
  the state the previous call left.

The semantics of the three optimizers and the weight-decay modes are DESIGN.md's; the float64
reference `harness.reference.training` is their executable definition.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

from harness.backend import Backend
from harness.model import JaggedBatch, TableConfig

OPTIMIZER_KINDS: tuple[str, ...] = ("sgd", "adagrad", "rowwise_adagrad")
"""``sgd``; ``adagrad`` (a state per element); ``rowwise_adagrad`` (a state per row: FBGEMM's
EXACT_ROWWISE_ADAGRAD)."""

WEIGHT_DECAY_MODES: tuple[str, ...] = ("none", "l2", "decoupled")
"""``none``; ``l2`` (``G' = G + weight_decay * w``); ``decoupled`` (``w`` scaled by
``1 - learning_rate * weight_decay`` before the gradient step)."""


@dataclass(frozen=True)
class OptimizerConfig:
    """One optimizer for every table (DESIGN.md). Only stores what it is given:
    `harness.training.validate.validate_optimizer` checks it."""

    kind: str
    learning_rate: float
    eps: float = 1e-8
    weight_decay: float = 0.0
    weight_decay_mode: str = "none"

    @property
    def has_state(self) -> bool:
        """Whether the optimizer keeps a state between steps (the adagrad kinds)."""
        return self.kind in ("adagrad", "rowwise_adagrad")

    @property
    def decays(self) -> bool:
        """Whether a weight-decay term takes part (a mode other than "none" and a non-zero decay)."""
        return self.weight_decay_mode != "none" and self.weight_decay != 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "learning_rate": self.learning_rate,
            "eps": self.eps,
            "weight_decay": self.weight_decay,
            "weight_decay_mode": self.weight_decay_mode,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> OptimizerConfig:
        return cls(
            kind=data["kind"],
            learning_rate=data["learning_rate"],
            eps=data.get("eps", 1e-8),
            weight_decay=data.get("weight_decay", 0.0),
            weight_decay_mode=data.get("weight_decay_mode", "none"),
        )

    def describe(self) -> str:
        """``"rowwise_adagrad lr=0.01 eps=1e-08 l2 weight_decay=0.1"``."""
        text = f"{self.kind} lr={self.learning_rate:g}"
        if self.has_state:
            text += f" eps={self.eps:g}"
        if self.weight_decay_mode != "none":
            text += f" {self.weight_decay_mode} weight_decay={self.weight_decay:g}"
        return text


@dataclass(frozen=True, eq=False)
class TrainResult:
    """What one training step returns.

    ``output``: the forward result, float32 ``[batch_size, total_dim]``, as the lookup gives it
    (before the update). ``weights``: each table by name as it is after the update, of the table's
    dtype (views are fine; the harness copies what it keeps). ``per_sample_weight_grad``: the
    gradient with respect to the batch's per-sample weights (float32, one per id), or ``None``
    when the batch has none.
    """

    output: torch.Tensor
    weights: Mapping[str, torch.Tensor]
    per_sample_weight_grad: torch.Tensor | None


TrainStep = Callable[[JaggedBatch, torch.Tensor], TrainResult]
"""``step(batch, grad_output) -> TrainResult``: one forward, backward and optimizer update."""


@runtime_checkable
class TrainingBackend(Backend, Protocol):
    """A backend that also trains (DESIGN.md, "Training")."""

    def supports_training(
        self, tables: Sequence[TableConfig], batch: JaggedBatch, optimizer: OptimizerConfig
    ) -> str | None:
        """``None`` when this backend can train the problem with ``optimizer``, else the reason."""

    def prepare_training(
        self, tables: Sequence[TableConfig], weights: Mapping[str, torch.Tensor], optimizer: OptimizerConfig
    ) -> TrainStep:
        """One-time work; returns the step, which trains the backend's own copy of ``weights``."""
