"""A training problem: tables, their starting weights, one optimizer and a sequence of steps.

Every step is a batch over the same tables and the loss gradient of its pooled result
(``grad_output``, float32 ``[batch_size, total_dim]``). The steps run in order on one prepared
backend, so the optimizer state of one step is the starting state of the next. Like the forward
model, the constructors only store; `harness.training.validate.validate_training_problem` checks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from harness.model import JaggedBatch, Problem, TableConfig
from harness.training.contract import OptimizerConfig


@dataclass(frozen=True, eq=False)
class StepInput:
    """One training step's inputs: a batch and the gradient of the loss w.r.t. its pooled result."""

    batch: JaggedBatch
    grad_output: torch.Tensor


@dataclass(frozen=True, eq=False)
class TrainingProblem:
    """``steps`` run in order from ``weights`` with ``optimizer``; ``metadata`` says where it came from."""

    tables: tuple[TableConfig, ...]
    weights: Mapping[str, torch.Tensor]
    optimizer: OptimizerConfig
    steps: tuple[StepInput, ...]
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "tables", tuple(self.tables))
        object.__setattr__(self, "steps", tuple(self.steps))

    def forward_problem(self, step: int = 0) -> Problem:
        """The forward lookup of step ``step`` from the starting weights."""
        return Problem(self.tables, self.weights, self.steps[step].batch, dict(self.metadata))

    @classmethod
    def of(
        cls,
        tables: Sequence[TableConfig],
        weights: Mapping[str, torch.Tensor],
        optimizer: OptimizerConfig,
        steps: Sequence[tuple[JaggedBatch, torch.Tensor] | StepInput],
        metadata: dict[str, Any] | None = None,
    ) -> TrainingProblem:
        """A problem from ``(batch, grad_output)`` pairs (or `StepInput`s)."""
        inputs = tuple(s if isinstance(s, StepInput) else StepInput(*s) for s in steps)
        return cls(tuple(tables), dict(weights), optimizer, inputs, dict(metadata or {}))
