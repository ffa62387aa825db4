"""The training oracle: each step's reference values and their tolerance, with the state carried.

`TrainingOracle` holds, between steps, the exact float64 optimizer state and the bound on how far
a correct backend's own state may be from it (`harness.training.tolerance`). Each `step` starts
from the weights it is given: the backend's own weights after its previous step, so that every
step judges one update (and the state error, which no backend reports, is what accumulates).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from harness.model import JaggedBatch, TableConfig
from harness.reference.training import ReferenceState, ReferenceStep, initial_state, train_step
from harness.tolerance import Tolerance
from harness.training.contract import OptimizerConfig
from harness.training.tolerance import per_sample_weight_tolerance, update_tolerance


@dataclass(frozen=True, eq=False)
class ExpectedTable:
    """One table after a step: its touched ``rows``, their exact float64 values ``after`` and
    their `Tolerance`; ``unconstrained`` marks the elements where float32 may overflow (any value
    allowed). Every other row must equal the weights the step started from, bit for bit."""

    rows: torch.Tensor
    after: torch.Tensor
    tolerance: Tolerance
    unconstrained: torch.Tensor
    occurrences: torch.Tensor


@dataclass(frozen=True, eq=False)
class ExpectedStep:
    """Everything one step is judged by: the reference (`ReferenceStep`), the output's tolerance,
    each table's expectation, and the per-sample weight gradients' tolerance (None without them)."""

    reference: ReferenceStep
    output_tolerance: Tolerance
    tables: Mapping[str, ExpectedTable]
    psw_tolerance: Tolerance | None

    @property
    def unconstrained(self) -> int:
        """How many updated elements the analysis could not bound (float32 may overflow there)."""
        return sum(int(t.unconstrained.sum()) for t in self.tables.values())


def _id_dims(tables: Sequence[TableConfig], batch: JaggedBatch) -> torch.Tensor:
    """Each id's table dim (int64, one per id)."""
    dim_of = {f: t.embedding_dim for t in tables for f in t.feature_names}
    per_key = np.array([dim_of[k] for k in batch.keys], np.int64)
    counts = batch.lengths.to(torch.int64).numpy().reshape(len(batch.keys), batch.batch_size).sum(1)
    return torch.from_numpy(np.repeat(per_key, counts))


class TrainingOracle:
    """The expected result of each step of one training run (`step`, in order)."""

    def __init__(self, tables: Sequence[TableConfig], optimizer: OptimizerConfig) -> None:
        self.tables = tuple(tables)
        self.optimizer = optimizer
        self.state: ReferenceState = initial_state(self.tables, optimizer)
        self.state_error: dict[str, torch.Tensor] = {
            name: torch.zeros_like(m) for name, m in self.state.moments.items()
        }

    def step(
        self, weights: Mapping[str, torch.Tensor], batch: JaggedBatch, grad_output: torch.Tensor
    ) -> ExpectedStep:
        """The expectation of one step from ``weights`` (validated problem assumed); advances the
        carried state and its error bound."""
        ref = train_step(self.tables, weights, batch, grad_output, self.optimizer, self.state)
        expected = {}
        new_error = {}
        for t in self.tables:
            s = ref.tables[t.name]
            err_before = self.state_error[t.name][s.rows] if self.optimizer.has_state else None
            tol = update_tolerance(
                self.optimizer,
                t.dtype,
                s.before,
                s.gradient,
                s.gradient_magnitude,
                s.occurrences,
                s.after,
                s.moment_after,
                err_before,
            )
            expected[t.name] = ExpectedTable(s.rows, s.after, tol.tolerance, tol.unconstrained, s.occurrences)
            if self.optimizer.has_state:
                e = self.state_error[t.name].clone()
                e[s.rows] = tol.moment_error
                new_error[t.name] = e
        psw = None
        if ref.per_sample_weight_grad is not None:
            psw = per_sample_weight_tolerance(
                ref.per_sample_weight_grad, ref.psw_positive, ref.psw_negative, _id_dims(self.tables, batch)
            )
        self.state = ref.state
        self.state_error = new_error
        return ExpectedStep(ref, ref.forward.tolerance(), expected, psw)
