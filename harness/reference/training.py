"""The training oracle in float64: one step (forward, backward, optimizer update) as DESIGN.md defines it.

`train_step_loop` is the definition: a plain loop over the batch's features, samples and ids that
adds each occurrence's gradient into its row, then updates every touched row with the optimizer's
formula. `train_step` computes the same numbers fast: one compiled pass per table for the
gradient sums (`harness.reference.gradient`), then the update of all touched rows at once with
tensor operations. Both add the gradient terms of a row in the same order (the batch's order),
so the gradients agree to the last bit and the rest to float64 rounding;
``tests/test_training_reference.py`` checks them against each other on generated problems and
multi-step sequences.

The semantics, per table (``w`` a row, ``G`` its gradient, from DESIGN.md):

- ``G[r]`` sums, over every occurrence of row ``r`` in the batch (every bag of every feature that
  shares the table), ``s * grad_output[sample, columns of the feature]``, with ``s`` the
  occurrence's per-sample weight (1 without weights), divided by the bag's length for MEAN.
- Only rows that occur change. ``G' = G + weight_decay * w`` with "l2", else ``G' = G``.
- sgd: ``w -= lr * G'``; "decoupled": ``w = (1 - lr * wd) * w - lr * G``.
- adagrad (``m`` per element, from 0): ``m += G'^2``; ``w -= lr * G' / (sqrt(m) + eps)``;
  "decoupled": ``w = (1 - lr * wd) * w - lr * G / (sqrt(m) + eps)``.
- rowwise_adagrad (``m`` per row, from 0): ``m += mean over the dim of G'^2``;
  ``mu = lr / (sqrt(m) + eps)``; ``w -= mu * G'``; "decoupled": ``w = (1 - lr * wd) * w - mu * G``.
- The per-sample weight gradient of an occurrence: the dot product of its row (before the
  update) with ``grad_output[sample, columns of its feature]``.

Everything is float64; the rows are the stored values widened (exactly). The step returns, besides
the values, what the tolerance (`harness.training.tolerance`) needs: each touched row's gradient
magnitude (the sum of its terms' magnitudes) and number of terms, and the per-sample weight
gradients' positive and negative parts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from harness.model import JaggedBatch, Pooling, TableConfig, output_columns
from harness.reference.forward import ReferenceResult, pool, pool_loop
from harness.reference.gradient import gradients
from harness.training.contract import OptimizerConfig


@dataclass(frozen=True, eq=False)
class ReferenceState:
    """The optimizer state of every table, float64: ``[rows, dim]`` for adagrad, ``[rows]`` for
    rowwise_adagrad, none for sgd. Never changed in place: a step returns a new state."""

    moments: Mapping[str, torch.Tensor]


def round_once(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float64 ``values`` rounded once, to nearest (ties to even), to ``dtype``.

    torch's float64 -> float16 / bfloat16 conversion goes through float32 and so rounds twice
    (``1 + 2**-11 + 2**-40`` becomes 1.0 in float16, not ``1 + 2**-10``). Here the float32 step
    rounds to odd instead (truncate, then set the last bit where inexact), which keeps enough
    information for the second rounding to be the correct single one (float32 has at least two
    more bits than either type, subnormals included).
    """
    if dtype == torch.float64:
        return values.clone()
    nearest = values.to(torch.float32)
    if dtype == torch.float32:
        return nearest
    wide = nearest.to(torch.float64)
    finite = torch.isfinite(wide)
    toward_zero = torch.where(
        finite & (wide.abs() > values.abs()), torch.nextafter(nearest, torch.zeros_like(nearest)), nearest
    )
    inexact = finite & (toward_zero.to(torch.float64) != values)
    bits = toward_zero.view(torch.int32)
    odd = torch.where(inexact, bits | 1, bits).view(torch.float32)
    return odd.to(dtype)


def initial_state(tables: Sequence[TableConfig], optimizer: OptimizerConfig) -> ReferenceState:
    """The state before the first step: zeros (DESIGN.md: the state starts at 0)."""
    if optimizer.kind == "adagrad":
        return ReferenceState(
            {t.name: torch.zeros(t.num_embeddings, t.embedding_dim, dtype=torch.float64) for t in tables}
        )
    if optimizer.kind == "rowwise_adagrad":
        return ReferenceState({t.name: torch.zeros(t.num_embeddings, dtype=torch.float64) for t in tables})
    return ReferenceState({})


@dataclass(frozen=True, eq=False)
class TableStep:
    """One table's part of a step, on its touched rows (``rows``: sorted, distinct, int64 ``[n]``).

    float64 ``[n, dim]``: ``gradient`` (G), ``gradient_magnitude`` (the sum of its terms'
    magnitudes), ``before`` and ``after`` (the rows before and after the update); ``occurrences``
    (int64 ``[n]``) is the number of terms of each row's G. ``moment_before`` / ``moment_after``:
    the state of those rows (``[n, dim]`` or ``[n]``), None for sgd.
    """

    rows: torch.Tensor
    gradient: torch.Tensor
    gradient_magnitude: torch.Tensor
    occurrences: torch.Tensor
    before: torch.Tensor
    after: torch.Tensor
    moment_before: torch.Tensor | None
    moment_after: torch.Tensor | None


@dataclass(frozen=True, eq=False)
class ReferenceStep:
    """One training step in float64.

    ``forward`` is the forward oracle of the step (before the update); ``tables`` the update of
    each table by name; ``state`` the optimizer state after the step. ``per_sample_weight_grad``
    (one per id, float64) is None when the batch has no per-sample weights; then so are
    ``psw_positive`` and ``psw_negative``, the sums of the positive products ``w_c * g_c`` of each
    dot product and of the negative ones' magnitudes.
    """

    forward: ReferenceResult
    tables: Mapping[str, TableStep]
    state: ReferenceState
    per_sample_weight_grad: torch.Tensor | None
    psw_positive: torch.Tensor | None = None
    psw_negative: torch.Tensor | None = None

    def updated_weights(self, weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Every table after the step in float64: ``weights`` (those the step started from) with
        the touched rows replaced."""
        out = {}
        for name, w in weights.items():
            new = w.to(torch.float64, copy=True)
            step = self.tables[name]
            new[step.rows] = step.after
            out[name] = new
        return out

    def rounded_weights(self, weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Every table after the step in its own dtype: untouched rows are ``weights``' (bit for
        bit), touched rows the float64 update rounded to the dtype."""
        out = {}
        for name, w in weights.items():
            new = w.clone()
            step = self.tables[name]
            new[step.rows] = round_once(step.after, w.dtype)
            out[name] = new
        return out


def _check_state(
    tables: Sequence[TableConfig], optimizer: OptimizerConfig, state: ReferenceState | None
) -> ReferenceState:
    if state is None:
        return initial_state(tables, optimizer)
    if optimizer.has_state:
        missing = [t.name for t in tables if t.name not in state.moments]
        if missing:
            raise ValueError(f"the optimizer state has no moments for table {missing[0]!r}")
    return state


def _update(
    optimizer: OptimizerConfig, w: torch.Tensor, g: torch.Tensor, m: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """DESIGN.md's update of rows ``w`` (float64, ``[n, dim]`` or ``[dim]``) with gradient ``g``
    and state ``m`` (per element: ``w``'s shape; per row: one less dimension). Returns the new
    rows and the new state."""
    lr, eps, wd, mode = (
        optimizer.learning_rate,
        optimizer.eps,
        optimizer.weight_decay,
        optimizer.weight_decay_mode,
    )
    g_prime = g + wd * w if mode == "l2" else g
    step = g if mode == "decoupled" else g_prime
    kept = (1 - lr * wd) * w if mode == "decoupled" else w
    if optimizer.kind == "sgd":
        return kept - lr * step, None
    if optimizer.kind == "adagrad":
        m = m + g_prime * g_prime
        return kept - lr * step / (torch.sqrt(m) + eps), m
    m = m + (g_prime * g_prime).mean(dim=-1)
    mu = lr / (torch.sqrt(m) + eps)
    return kept - mu.unsqueeze(-1) * step, m


def _new_state(state: ReferenceState, updates: Mapping[str, TableStep]) -> ReferenceState:
    moments = {}
    for name, m in state.moments.items():
        new = m.clone()
        step = updates[name]
        new[step.rows] = step.moment_after
        moments[name] = new
    return ReferenceState(moments)


# ---------------------------------------------------------------------------------------------
# The definition: a loop


def _dot(row: torch.Tensor, g: torch.Tensor) -> tuple[float, float, float]:
    """``sum_c row_c g_c`` added in column order, and the sums of its positive products and of
    its negative products' magnitudes."""
    dot = above = below = 0.0
    for x in (row * g).tolist():
        dot += x
        above += x if x > 0 else 0.0
        below += -x if x < 0 else 0.0
    return dot, above, below


def train_step_loop(
    tables: Sequence[TableConfig],
    weights: Mapping[str, torch.Tensor],
    batch: JaggedBatch,
    grad_output: torch.Tensor,
    optimizer: OptimizerConfig,
    state: ReferenceState | None = None,
) -> ReferenceStep:
    """One training step, feature by feature (in the batch's order), sample by sample, id by id."""
    state = _check_state(tables, optimizer, state)
    table_of = {f: t for t in tables for f in t.feature_names}
    first_col = {feature: col for _, feature, col, _ in output_columns(tables)}
    rows64 = {t.name: weights[t.name].double() for t in tables}
    go = grad_output.double()
    b = batch.batch_size
    offsets = batch.offsets.tolist()
    ids = batch.values.tolist()
    per_sample = batch.weights.double().tolist() if batch.weights is not None else None
    gradient: dict[str, dict[int, torch.Tensor]] = {t.name: {} for t in tables}
    magnitude: dict[str, dict[int, torch.Tensor]] = {t.name: {} for t in tables}
    count: dict[str, dict[int, int]] = {t.name: {} for t in tables}
    psw_grad = [0.0] * len(ids) if per_sample is not None else None
    psw_pos = [0.0] * len(ids) if per_sample is not None else None
    psw_neg = [0.0] * len(ids) if per_sample is not None else None

    for f, feature in enumerate(batch.keys):
        table = table_of[feature]
        cols = slice(first_col[feature], first_col[feature] + table.embedding_dim)
        for sample in range(b):
            start, end = offsets[f * b + sample], offsets[f * b + sample + 1]
            g = go[sample, cols]
            for pos in range(start, end):
                row = ids[pos]
                if per_sample is not None:
                    term = g * per_sample[pos]
                    psw_grad[pos], psw_pos[pos], psw_neg[pos] = _dot(rows64[table.name][row], g)
                elif table.pooling is Pooling.MEAN:
                    term = g / (end - start)
                else:
                    term = g.clone()
                if row in gradient[table.name]:
                    gradient[table.name][row] = gradient[table.name][row] + term
                    magnitude[table.name][row] = magnitude[table.name][row] + term.abs()
                    count[table.name][row] += 1
                else:
                    gradient[table.name][row] = term
                    magnitude[table.name][row] = term.abs()
                    count[table.name][row] = 1

    updates = {}
    for t in tables:
        touched = sorted(gradient[t.name])
        before, after, m_before, m_after = [], [], [], []
        for row in touched:
            w = rows64[t.name][row]
            m = state.moments[t.name][row] if optimizer.has_state else None
            new, new_m = _update(optimizer, w, gradient[t.name][row], m)
            before.append(w)
            after.append(new)
            if optimizer.has_state:
                m_before.append(m)
                m_after.append(new_m)
        empty = torch.zeros(0, t.embedding_dim, dtype=torch.float64)
        moment_shape = (0, t.embedding_dim) if optimizer.kind == "adagrad" else (0,)
        updates[t.name] = TableStep(
            rows=torch.tensor(touched, dtype=torch.int64),
            gradient=torch.stack([gradient[t.name][r] for r in touched]) if touched else empty,
            gradient_magnitude=torch.stack([magnitude[t.name][r] for r in touched]) if touched else empty,
            occurrences=torch.tensor([count[t.name][r] for r in touched], dtype=torch.int64),
            before=torch.stack(before) if touched else empty,
            after=torch.stack(after) if touched else empty,
            moment_before=None
            if not optimizer.has_state
            else (torch.stack(m_before) if touched else torch.zeros(moment_shape, dtype=torch.float64)),
            moment_after=None
            if not optimizer.has_state
            else (torch.stack(m_after) if touched else torch.zeros(moment_shape, dtype=torch.float64)),
        )

    def tensor(values: list[float] | None) -> torch.Tensor | None:
        return None if values is None else torch.tensor(values, dtype=torch.float64)

    return ReferenceStep(
        forward=pool_loop(tables, weights, batch),
        tables=updates,
        state=_new_state(state, updates),
        per_sample_weight_grad=tensor(psw_grad),
        psw_positive=tensor(psw_pos),
        psw_negative=tensor(psw_neg),
    )


# ---------------------------------------------------------------------------------------------
# The same, vectorised


def train_step(
    tables: Sequence[TableConfig],
    weights: Mapping[str, torch.Tensor],
    batch: JaggedBatch,
    grad_output: torch.Tensor,
    optimizer: OptimizerConfig,
    state: ReferenceState | None = None,
) -> ReferenceStep:
    """`train_step_loop`'s result, vectorised per table. Assumes a validated problem
    (`harness.training.validate`)."""
    state = _check_state(tables, optimizer, state)
    grads = gradients(tables, weights, batch, grad_output)
    updates = {}
    for t in tables:
        g = grads.tables[t.name]
        m_before = state.moments[t.name][g.rows] if optimizer.has_state else None
        after, m_after = _update(optimizer, g.before, g.gradient, m_before)
        updates[t.name] = TableStep(
            rows=g.rows,
            gradient=g.gradient,
            gradient_magnitude=g.magnitude,
            occurrences=g.occurrences,
            before=g.before,
            after=after,
            moment_before=m_before,
            moment_after=m_after,
        )
    return ReferenceStep(
        forward=pool(tables, weights, batch),
        tables=updates,
        state=_new_state(state, updates),
        per_sample_weight_grad=grads.psw_grad,
        psw_positive=grads.psw_positive,
        psw_negative=grads.psw_negative,
    )


def train_steps(
    tables: Sequence[TableConfig],
    weights: Mapping[str, torch.Tensor],
    steps: Sequence[tuple[JaggedBatch, torch.Tensor]],
    optimizer: OptimizerConfig,
    *,
    loop: bool = False,
) -> list[ReferenceStep]:
    """Several steps, each from the previous one's weights rounded to the table dtypes (as a
    backend stores them) and its state. ``loop`` uses `train_step_loop`."""
    step_fn = train_step_loop if loop else train_step
    state = initial_state(tables, optimizer)
    current = dict(weights)
    out = []
    for batch, grad_output in steps:
        ref = step_fn(tables, current, batch, grad_output, optimizer, state)
        out.append(ref)
        current = ref.rounded_weights(current)
        state = ref.state
    return out
