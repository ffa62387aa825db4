"""One training step as a benchmark case (``jagbench bench --mode train``): forward, backward of a
fixed grad_output and the optimizer update, timed as one call, as FBGEMM's and torchrec's training
benchmarks time a step.

``prepare`` is ``backend.prepare_training(tables, weights, optimizer)`` (the backend's own copy of
the tables and its optimizer state: the one-time work, outside any timing); the timed call is
``step(batch, grad_output)`` on the workload's batch and a seeded standard-normal grad_output.
Every call *continues* the backend's state: the weights and the optimizer state are those the
previous call left. Re-preparing before each call would time a copy of every table (gigabytes on
the large workloads) instead of the step; FBGEMM's benchmark also runs its forward and backward
repeatedly on one module. The work of a step does not depend on the values (the same batch updates
the same rows every call), and the default learning rate (0.01) keeps them from drifting far over
a thousand rounds.

The check before timing is `harness.training.check.check_training` on one step of the workload's
problem, sampled: up to ``samples`` samples of the batch spread over it (first and last included,
`harness.bench.forward.checked_samples`) with their rows of grad_output, from the starting weights,
on a freshly prepared instance (the timed instance's state has moved on by then). When the
workload's tables hold more than `FULL_TABLES_BYTES`, the checked problem keeps of each table only
the rows the sampled ids touch plus its first untouched row (renumbered in order, so that the
"untouched rows stay bit-identical" check still has one to look at): the oracle and the copies it
keeps then cost megabytes, not the tables' size.

Byte model (per step; `TRAIN_BYTE_MODEL`): the forward lookup's bytes (`harness.bench.metrics`:
each id reads its row, every occurrence counted; the pooled float32 output written), the
grad_output read (``B x total_dim x 4``), then per *unique* (table, row) of the batch, counted
once however many ids or features read it: the row read and written by the update and its
optimizer state read and written (float32: ``4 x D`` bytes for adagrad, ``4`` for
rowwise_adagrad, none for sgd); with per-sample weights, their gradient written (``ids x 4``).
Index bytes are not counted (recorded as ``index_bytes``), nor are the gradient's intermediate
buffers, which differ by library. FBGEMM's own benchmark counts a backward as twice the forward's
bytes; this model says where the bytes go instead.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import torch

from harness.agreement import Outcome, Verdict
from harness.backend import Backend, can_train
from harness.bench.case import BenchCase
from harness.bench.forward import checked_samples, sub_batch
from harness.bench.metrics import byte_model
from harness.bench.workloads import Workload
from harness.fuzz.minimise import edits
from harness.model import JaggedBatch, Problem, TableConfig, stored_row_bytes, total_dim
from harness.training.contract import OptimizerConfig
from harness.training.problem import TrainingProblem
from harness.training.spec import make_grad_output

DEFAULT_OPTIMIZER = OptimizerConfig("rowwise_adagrad", 0.01)
"""What ``--mode train`` trains with unless told otherwise: FBGEMM's EXACT_ROWWISE_ADAGRAD, the
optimizer of DLRM-style training, at a learning rate that keeps the values from drifting."""

FULL_TABLES_BYTES = 64 << 20
"""Above this much table data the check compacts each table to the rows it touches (module docstring)."""

TRAIN_BYTE_MODEL = (
    "bytes = forward (each id reads its row, every occurrence; output B x total_dim x 4 written) + "
    "grad_output read (B x total_dim x 4) + per unique (table, row) of the batch, once however many "
    "ids read it: the row read and written by the update and its float32 optimizer state read and "
    "written (adagrad 4 x D, rowwise_adagrad 4, sgd 0 bytes) + the per-sample weight gradient "
    "written (ids x 4, weighted batches only); index bytes not counted (recorded as index_bytes)"
)


def state_bytes_per_row(table: TableConfig, optimizer: OptimizerConfig) -> int:
    """Bytes of float32 optimizer state one row has: ``4 x D`` (adagrad), 4 (rowwise), 0 (sgd)."""
    if optimizer.kind == "adagrad":
        return 4 * table.embedding_dim
    return 4 if optimizer.kind == "rowwise_adagrad" else 0


def unique_rows(tables: Sequence[TableConfig], batch: JaggedBatch) -> dict[str, int]:
    """Per table, how many distinct rows the batch reads (over all the features that share it)."""
    out = {}
    for t in tables:
        ids = [batch.values[batch.feature_slice(f)] for f in t.feature_names if f in batch.keys]
        out[t.name] = len(torch.unique(torch.cat(ids))) if ids else 0
    return out


def training_byte_model(
    tables: Sequence[TableConfig], batch: JaggedBatch, optimizer: OptimizerConfig
) -> dict[str, int]:
    """What one training step moves by `TRAIN_BYTE_MODEL`: each part, their sum ``bytes``, the
    forward part's own sum ``forward_bytes``, ``ids``, ``unique_rows`` and ``index_bytes``."""
    forward = byte_model(tables, batch)
    rows = unique_rows(tables, batch)
    update = sum(rows[t.name] * stored_row_bytes(t) for t in tables)
    state = sum(rows[t.name] * state_bytes_per_row(t, optimizer) for t in tables)
    grad_output = batch.batch_size * total_dim(tables) * 4
    psw = 4 * forward["ids"] if batch.weights is not None else 0
    parts = {
        "rows_read_bytes": forward["rows_read_bytes"],
        "output_bytes": forward["output_bytes"],
        "grad_output_bytes": grad_output,
        "update_rows_read_bytes": update,
        "update_rows_written_bytes": update,
        "state_read_bytes": state,
        "state_written_bytes": state,
        "per_sample_weight_grad_bytes": psw,
    }
    return {
        "ids": forward["ids"],
        "unique_rows": sum(rows.values()),
        **parts,
        "bytes": sum(parts.values()),
        "forward_bytes": forward["bytes"],
        "index_bytes": forward["index_bytes"],
    }


def compacted(problem: Problem) -> Problem:
    """``problem`` with each table cut to the rows its batch touches plus its first untouched row
    (in order; the ids renumbered to match)."""
    out = problem
    for i, t in enumerate(problem.tables):
        mine = edits.table_of_ids(out) == i
        touched = torch.unique(out.batch.values[mine].to(torch.int64))
        free = torch.ones(t.num_embeddings, dtype=torch.bool)
        free[touched] = False
        extra = torch.nonzero(free).reshape(-1)[:1]
        rows = torch.sort(torch.cat([touched, extra])).values
        weights = out.weights[t.name][rows].clone()
        out = edits.with_rows(out, i, weights, lambda ids, rows=rows: torch.searchsorted(rows, ids))
    return out


def _training_known():
    from harness.training.cases import load_training_cases

    return load_training_cases()


class TrainCase(BenchCase):
    """``backend.prepare_training(tables, weights, optimizer)``, then the timed call
    ``step(batch, grad_output)`` (module docstring)."""

    mode: ClassVar[str] = "train"
    test_name: ClassVar[str] = "test_train_step"
    byte_model_text: ClassVar[str] = TRAIN_BYTE_MODEL

    def __init__(
        self,
        backend: Backend,
        workload: Workload,
        problem: Problem,
        batch: JaggedBatch,
        *,
        optimizer: OptimizerConfig = DEFAULT_OPTIMIZER,
    ) -> None:
        super().__init__(backend, workload, problem, batch)
        self.optimizer = optimizer
        self.grad_output = make_grad_output(problem.tables, batch.batch_size, "normal", workload.seed)
        self.checked: TrainingProblem | None = None
        self.training_verdict = None

    def backend_declines(self) -> str | None:
        if not can_train(self.backend):
            return "the backend does not train (no supports_training / prepare_training)"
        return self.backend.supports_training(self.problem.tables, self.batch, self.optimizer)

    def prepare(self) -> Callable[[], Any]:
        step = self.backend.prepare_training(self.problem.tables, self.problem.weights, self.optimizer)
        batch, grad = self.batch, self.grad_output
        return lambda: step(batch, grad)

    def device_of(self, result: Any) -> str:
        return str(getattr(getattr(result, "output", None), "device", "cpu"))

    def checked_problem(self, samples: int) -> TrainingProblem:
        """One step of the workload, sampled and (for large tables) compacted (module docstring)."""
        chosen = checked_samples(self.batch.batch_size, samples)
        sub = Problem(self.problem.tables, self.problem.weights, sub_batch(self.batch, chosen))
        if self.workload.weights_bytes > FULL_TABLES_BYTES:
            sub = compacted(sub)
        grad = self.grad_output[chosen].clone()
        metadata = {"workload": self.workload.name, "samples": len(chosen)}
        return TrainingProblem.of(sub.tables, sub.weights, self.optimizer, [(sub.batch, grad)], metadata)

    def check(self, result: Any, samples: int) -> Verdict:
        from harness.training.check import check_training

        if not all(hasattr(result, a) for a in ("output", "weights", "per_sample_weight_grad")):
            return Verdict(
                "?", Outcome.DISAGREE, f"the step returned a {type(result).__name__}, not a TrainResult"
            )
        self.checked = self.checked_problem(samples)
        self.training_verdict = check_training(self.backend, self.checked)
        v = self.training_verdict
        return Verdict("?", v.outcome, v.detail)

    def mark_known(self, verdict: Verdict, known: Sequence[object]) -> Verdict:
        """The backend's known *training* cases (`harness.training.cases`), not the forward ones:
        a failed check is relabelled known when they explain the sampled step; a timed call that
        raised is checked on the sampled step first (the same exception there, explained, is known)."""
        from harness.training.cases import explain_with_cases
        from harness.training.check import check_training

        if verdict.outcome not in (Outcome.DISAGREE, Outcome.RAISED):
            return verdict
        if self.checked is None:  # the timed call raised before any check
            self.checked = self.checked_problem(256)
            self.training_verdict = check_training(self.backend, self.checked)
            if self.training_verdict.outcome is not Outcome.RAISED:
                return verdict
        explanation, usable = explain_with_cases(self.backend, self.checked, _training_known())
        if not usable or not explanation.explained:
            return verdict
        names = explanation.cases or (usable[0].name,)
        detail = f"known discrepancy {' + '.join(map(repr, names))}: {verdict.detail}"
        return Verdict(verdict.backend, Outcome.KNOWN, detail, known_cases=tuple(names))

    def byte_model(self) -> dict[str, int]:
        return training_byte_model(self.problem.tables, self.batch, self.optimizer)

    def extra_info(self) -> dict[str, Any]:
        return {
            **super().extra_info(),
            "optimizer": self.optimizer.to_json(),
            "grad_output": f"standard normal, seed {self.workload.seed}",
            "state": "continued from call to call (prepared once)",
            "index_bytes_counted": False,
        }


def options_json(options: Mapping[str, Any]) -> dict[str, Any]:
    """A case kind's options as JSON (an `OptimizerConfig` as its ``to_json``)."""
    return {k: v.to_json() if hasattr(v, "to_json") else v for k, v in options.items()}
