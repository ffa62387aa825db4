"""Float32 training backends: a correct one in several operation orders, and planted faults.

`Float32Trainer` is a small correct training backend quite unlike the float64 reference: it pools,
accumulates the gradient and updates in float32 with torch (``index_put_`` accumulation, the state
in float32), and rounds each updated row once to the table's dtype. Its class attributes choose
among correct float32 evaluations of DESIGN.md's formulas, each a different rounding:

- ``product``: ``lr * H / b`` (``"lr*H/b"``), ``(lr / b) * H`` (``"(lr/b)*H"``) or ``lr * (H / b)``;
- ``mean``: the rowwise mean as ``sum / dim``, ``sum * fl(1 / dim)`` or ``sum of (q / dim)``;
- ``fused``: the last subtraction rounded once from a float64 intermediate (like an FMA);
- ``l2_form``: ``w - mu (G + wd w)`` or FBGEMM's ``(1 - mu wd) w - mu G``;
- ``decoupled_form``: ``(1 - lr wd) w - step`` or ``w - (lr wd) w - step``;
- ``reverse``: gradient terms added in the opposite order; ``state_dtype``: float32 or float64.

`ORDERINGS` lists variants that the check must accept on every problem (the bound is sound for
each); every other subclass plants one bug seen in real training kernels, which the check must
catch (`FAULTS`, tests/test_training.py).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from harness.model import JaggedBatch, Pooling, TableConfig, output_columns
from harness.training.contract import OptimizerConfig, TrainResult


def _f32(x: float) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float32)


class Float32Trainer:
    """Correct: float32 forward, gradient sums, state and update; one rounding to the table dtype."""

    name = "float32-trainer"
    product = "lr*H/b"
    mean = "sum/dim"
    fused = False
    l2_form = "decayed-gradient"
    decoupled_form = "scaled"
    reverse = False
    state_dtype = torch.float32

    def supports(self, tables: Sequence[TableConfig], batch: JaggedBatch) -> str | None:
        return None

    def prepare(self, tables: Sequence[TableConfig], weights: Mapping[str, torch.Tensor]):
        tables = tuple(tables)
        return lambda batch: self.forward(tables, weights, batch)

    def supports_training(self, tables, batch, optimizer: OptimizerConfig) -> str | None:
        return None

    def prepare_training(self, tables, weights, optimizer: OptimizerConfig):
        tables = tuple(tables)
        current = {t.name: weights[t.name].clone() for t in tables}
        state = {}
        for t in tables:
            if optimizer.kind == "adagrad" and not self.adagrad_state_per_row():
                state[t.name] = torch.zeros(t.num_embeddings, t.embedding_dim, dtype=self.state_dtype)
            elif optimizer.has_state:
                state[t.name] = torch.zeros(t.num_embeddings, dtype=self.state_dtype)

        def step(batch: JaggedBatch, grad_output: torch.Tensor) -> TrainResult:
            if self.reset_state_each_step():
                for m in state.values():
                    m.zero_()
            output = self.forward(tables, current, batch)
            before = {n: w.clone() for n, w in current.items()}
            updates = []
            for i, t in enumerate(tables):
                rows, grad = self.gradient(tables, t, batch, grad_output)
                new = self.update(optimizer, t, current[t.name], state.get(t.name), rows, grad)
                updates.append((i, rows, new))
            for i, rows, new in updates:
                self.write(tables, current, i, rows, new)
            psw = self.psw_grad(
                tables, before if not self.psw_after_update() else current, batch, grad_output
            )
            return TrainResult(output, dict(current), psw)

        return step

    # -- the parts -------------------------------------------------------------------------------

    def _ids(self, tables, t: TableConfig, batch: JaggedBatch, feature: str):
        """A feature's ids, the sample and bag length of each, its first output column, its slice."""
        cached = getattr(batch, "_trainer_index", None)
        if cached is None:
            b = batch.batch_size
            lengths = batch.lengths.to(torch.int64).numpy()
            bag = np.repeat(np.arange(len(lengths)), lengths)
            ends = (
                np.cumsum(lengths.reshape(len(batch.keys), b).sum(1)) if b else np.zeros(len(batch.keys), int)
            )
            cols = {f: c for _, f, c, _ in output_columns(tables)}
            cached = {}
            for k, f in enumerate(batch.keys):
                sl = slice(int(ends[k - 1]) if k else 0, int(ends[k]))
                samples = torch.from_numpy(bag[sl] - k * b)
                cached[f] = (
                    batch.values[sl].to(torch.int64),
                    samples,
                    torch.from_numpy(lengths[bag[sl]]),
                    cols[f],
                    sl,
                )
            object.__setattr__(batch, "_trainer_index", cached)  # a cache on the (frozen) batch
        return cached[feature]

    def forward(self, tables, weights, batch: JaggedBatch) -> torch.Tensor:
        b = batch.batch_size
        out = torch.zeros(b, sum(t.embedding_dim * len(t.feature_names) for t in tables))
        for t in tables:
            for f in t.feature_names:
                ids, samples, lengths, col, sl = self._ids(tables, t, batch, f)
                rows = weights[t.name][ids].to(torch.float32)
                if batch.weights is not None:
                    rows = rows * batch.weights[sl].unsqueeze(1)
                acc = torch.zeros(b, t.embedding_dim).index_put_((samples,), rows, accumulate=True)
                if t.pooling is Pooling.MEAN:
                    k = batch.keys.index(f)
                    n = batch.lengths[k * b : (k + 1) * b].to(torch.float32).clamp(min=1)
                    acc = acc / n.unsqueeze(1)
                out[:, col : col + t.embedding_dim] = acc
        return out

    def psw_grad(self, tables, weights, batch: JaggedBatch, grad_output: torch.Tensor):
        if batch.weights is None:
            return None
        out = torch.zeros(len(batch.values))
        for t in tables:
            for f in t.feature_names:
                ids, samples, _, col, sl = self._ids(tables, t, batch, f)
                g = grad_output[samples, col : col + t.embedding_dim]
                out[sl] = (weights[t.name][ids].to(torch.float32) * g).sum(1)
        return out

    def gradient(self, tables, t: TableConfig, batch: JaggedBatch, grad_output: torch.Tensor):
        """The table's touched rows and their float32 gradient sums."""
        all_ids, all_terms = [], []
        for f in self.gradient_features(t):
            ids, samples, lengths, col, sl = self._ids(tables, t, batch, f)
            terms = grad_output[samples, col : col + t.embedding_dim]
            if batch.weights is not None and self.uses_sample_weights():
                terms = terms * batch.weights[sl].unsqueeze(1)
            if t.pooling is Pooling.MEAN:
                terms = terms / self.mean_divisor(lengths).to(torch.float32).unsqueeze(1)
            all_ids.append(ids)
            all_terms.append(terms)
        ids = torch.cat([torch.zeros(0, dtype=torch.int64)] + all_ids)
        terms = torch.cat([torch.zeros(0, t.embedding_dim)] + all_terms)
        if self.reverse:
            ids, terms = ids.flip(0), terms.flip(0)
        rows, inverse = torch.unique(ids, return_inverse=True)
        grad = torch.zeros(len(rows), t.embedding_dim).index_put_((inverse,), terms, accumulate=True)
        return self.updated_rows(t, rows, grad)

    def _minus(self, kept: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        if self.fused:
            return (kept.double() - step.double()).float()
        return kept - step

    def _times(self, lr: torch.Tensor, h: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if self.product == "(lr/b)*H":
            return (lr / b) * h
        if self.product == "lr*(H/b)":
            return lr * (h / b)
        return lr * h / b

    def _row_mean(self, q: torch.Tensor) -> torch.Tensor:
        dim = q.shape[1]
        if self.mean == "sum*(1/dim)":
            return q.sum(1) * _f32(1.0 / dim)
        if self.mean == "sum(q/dim)":
            return (q / dim).sum(1)
        return q.sum(1) / dim

    def update(self, opt: OptimizerConfig, t: TableConfig, table, m, rows, grad) -> torch.Tensor:
        """The touched rows after the update, float32 (the state is updated in place)."""
        lr, eps, wd = _f32(self.learning_rate(opt.learning_rate)), _f32(opt.eps), _f32(opt.weight_decay)
        mode = opt.weight_decay_mode
        w = table[rows].to(torch.float32)
        h = grad + wd * w if mode == "l2" else grad
        one = _f32(1.0)
        if mode == "decoupled":
            kept = (one - lr * wd) * w if self.decoupled_form == "scaled" else w - (lr * wd) * w
        else:
            kept = w
        if opt.kind == "sgd":
            if mode == "l2" and self.l2_form == "split":
                return self._minus((one - lr * wd) * w, lr * grad)
            return self._minus(kept, lr * h)
        if opt.kind == "adagrad" and not self.adagrad_state_per_row():
            m[rows] = (m[rows] + (h * h).to(m.dtype)).to(m.dtype)
            b = self.denominator(m[rows].to(torch.float32), eps)
            if mode == "l2" and self.l2_form == "split":
                mult = lr / b
                return self._minus((one - mult * wd) * w, mult * grad)
            return self._minus(kept, self._times(lr, h, b))
        q = h * h
        m[rows] = m[rows] + self.row_state(q).to(m.dtype)
        mu = (lr / self.denominator(m[rows].to(torch.float32), eps)).unsqueeze(1)
        if mode == "l2" and self.l2_form == "split":
            return self._minus((one - mu * wd) * w, mu * grad)
        return self._minus(kept, mu * h)

    def write(self, tables, current, i: int, rows, new) -> None:
        t = tables[i]
        current[t.name][rows] = new.to(t.dtype)

    # -- hooks a faulty subclass overrides ------------------------------------------------------

    def gradient_features(self, t: TableConfig) -> tuple[str, ...]:
        return t.feature_names

    def uses_sample_weights(self) -> bool:
        return True

    def mean_divisor(self, lengths: torch.Tensor) -> torch.Tensor:
        return lengths

    def updated_rows(self, t: TableConfig, rows: torch.Tensor, grad: torch.Tensor):
        return rows, grad

    def denominator(self, m: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(m) + eps

    def learning_rate(self, lr: float) -> float:
        return lr

    def adagrad_state_per_row(self) -> bool:
        return False

    def row_state(self, q: torch.Tensor) -> torch.Tensor:
        return self._row_mean(q)

    def reset_state_each_step(self) -> bool:
        return False

    def psw_after_update(self) -> bool:
        return False


# -- correct variants: other float32 operation orders ------------------------------------------


class DivideFirst(Float32Trainer):
    name = "order-(lr/b)*H"
    product = "(lr/b)*H"
    mean = "sum*(1/dim)"
    reverse = True


class QuotientFirst(Float32Trainer):
    name = "order-lr*(H/b)"
    product = "lr*(H/b)"
    mean = "sum(q/dim)"
    decoupled_form = "subtracted"


class FusedLast(Float32Trainer):
    name = "order-fused"
    fused = True
    l2_form = "split"


class FbgemmForm(Float32Trainer):
    name = "order-fbgemm"
    product = "(lr/b)*H"
    l2_form = "split"
    decoupled_form = "subtracted"
    reverse = True


class WideState(Float32Trainer):
    name = "order-wide-state"
    state_dtype = torch.float64
    product = "lr*(H/b)"
    fused = True


ORDERINGS = (Float32Trainer, DivideFirst, QuotientFirst, FusedLast, FbgemmForm, WideState)


# -- planted faults ------------------------------------------------------------------------------


class DecaysEveryRow(Float32Trainer):
    """Applies the update (weight decay included) to every row, touched or not."""

    name = "fault-decays-every-row"

    def updated_rows(self, t, rows, grad):
        full = torch.zeros(t.num_embeddings, t.embedding_dim)
        full[rows] = grad
        return torch.arange(t.num_embeddings), full


class EpsInsideSqrt(Float32Trainer):
    name = "fault-eps-inside-sqrt"

    def denominator(self, m, eps):
        return torch.sqrt(m + eps)


class MeanNotDivided(Float32Trainer):
    name = "fault-mean-not-divided"

    def mean_divisor(self, lengths):
        return torch.ones_like(lengths)


class IgnoresSampleWeights(Float32Trainer):
    name = "fault-ignores-sample-weights-in-gradient"

    def uses_sample_weights(self):
        return False


class DropsSecondFeature(Float32Trainer):
    """A shared table's gradient comes from its first feature only."""

    name = "fault-drops-shared-table-second-feature"

    def gradient_features(self, t):
        return t.feature_names[:1]


class AdagradStatePerRow(Float32Trainer):
    """adagrad keeps one state per row (the row's mean of G^2), as if it were rowwise."""

    name = "fault-adagrad-state-per-row"

    def adagrad_state_per_row(self):
        return True


class WrongTable(Float32Trainer):
    """A table's update lands in the next table of the same shape (a table-offset bug)."""

    name = "fault-update-into-wrong-table"

    def write(self, tables, current, i, rows, new):
        t = tables[i]
        for other in tables[i + 1 :]:
            if (other.num_embeddings, other.embedding_dim) == (t.num_embeddings, t.embedding_dim):
                current[other.name][rows] = new.to(other.dtype)
                return
        current[t.name][rows] = new.to(t.dtype)


class LearningRateTwice(Float32Trainer):
    name = "fault-learning-rate-twice"

    def learning_rate(self, lr):
        return lr * lr


class RowwiseSumNotMean(Float32Trainer):
    """rowwise_adagrad adds the row's sum of G^2 to its state, not the mean."""

    name = "fault-rowwise-sum-not-mean"

    def row_state(self, q):
        return q.sum(1)


class StateResetEachStep(Float32Trainer):
    """The optimizer state starts from zero at every step (not carried)."""

    name = "fault-state-reset-each-step"

    def reset_state_each_step(self):
        return True


class SampleWeightGradAfterUpdate(Float32Trainer):
    """The per-sample weight gradient is computed from the rows after the update."""

    name = "fault-psw-grad-after-update"

    def psw_after_update(self):
        return True


class DuplicatesNotAggregated(Float32Trainer):
    """Each occurrence updates its row on its own; with duplicates the last write wins."""

    name = "fault-duplicates-not-aggregated"

    def gradient(self, tables, t, batch, grad_output):
        rows, grad = super().gradient(tables, t, batch, grad_output)
        ids, terms = [], []
        for f in t.feature_names:
            i, samples, lengths, col, sl = self._ids(tables, t, batch, f)
            g = grad_output[samples, col : col + t.embedding_dim]
            if batch.weights is not None:
                g = g * batch.weights[sl].unsqueeze(1)
            if t.pooling is Pooling.MEAN:
                g = g / lengths.to(torch.float32).unsqueeze(1)
            ids.append(i)
            terms.append(g)
        ids = torch.cat([torch.zeros(0, dtype=torch.int64)] + ids)
        terms = torch.cat([torch.zeros(0, t.embedding_dim)] + terms)
        position = torch.arange(len(ids))
        last = torch.full((t.num_embeddings,), -1).scatter_reduce(0, ids, position, "amax")
        return rows, terms[last[rows]]  # the last occurrence's term per row, not the sum


class SkipsFirstIdOfBag(Float32Trainer):
    """The backward loop over a bag starts one id late: each bag's first id gets no gradient."""

    name = "fault-skips-first-id-of-bag"

    def gradient(self, tables, t, batch, grad_output):
        self._skipping = True
        try:
            return super().gradient(tables, t, batch, grad_output)
        finally:
            self._skipping = False

    def _ids(self, tables, t, batch, feature):
        ids, samples, lengths, col, sl = super()._ids(tables, t, batch, feature)
        if not getattr(self, "_skipping", False):
            return ids, samples, lengths, col, sl
        first = torch.ones(len(samples), dtype=torch.bool)
        first[1:] = samples[1:] != samples[:-1]
        keep = ~first
        return ids[keep], samples[keep], lengths[keep], col, torch.arange(sl.start, sl.stop)[keep]


class RowwisePerElement(Float32Trainer):
    """rowwise_adagrad keeps the mean of squares per element (adagrad's state) instead of per row."""

    name = "fault-rowwise-state-per-element"

    def prepare_training(self, tables, weights, optimizer):
        self._elements = {t.name: torch.zeros(t.num_embeddings, t.embedding_dim) for t in tables}
        return super().prepare_training(tables, weights, optimizer)

    def update(self, opt, t, table, m, rows, grad):
        if opt.kind != "rowwise_adagrad":
            return super().update(opt, t, table, m, rows, grad)
        per_element = OptimizerConfig(
            "adagrad", opt.learning_rate, opt.eps, opt.weight_decay, opt.weight_decay_mode
        )
        return super().update(per_element, t, table, self._elements[t.name], rows, grad)


class StateInHalf(Float32Trainer):
    """Keeps the optimizer state in float16: its rounding drifts further than float32's allows."""

    name = "fault-state-in-float16"
    state_dtype = torch.float16


class DoubleRoundedHalf(Float32Trainer):
    """Rounds the step to the table's dtype before subtracting it (``X(w - X(delta))``), as
    FBGEMM's CPU EXACT_SGD / EXACT_ADAGRAD do for float16 tables."""

    name = "fault-double-rounded-half"

    def _minus(self, kept, step):
        if self._dtype in (torch.float16, torch.bfloat16):
            step = step.to(self._dtype).to(torch.float32)
        return kept - step

    def update(self, opt, t, table, m, rows, grad):
        self._dtype = t.dtype
        return super().update(opt, t, table, m, rows, grad)


class ColumnsInKeyOrder(Float32Trainer):
    """Lays out the output (and reads grad_output) in the batch's key order, not the tables'."""

    name = "fault-columns-in-key-order"

    def _ids(self, tables, t, batch, feature):
        ids, samples, lengths, _, sl = super()._ids(tables, t, batch, feature)
        dims = {f: x.embedding_dim for x in tables for f in x.feature_names}
        col = sum(dims[k] for k in batch.keys[: batch.keys.index(feature)])
        return ids, samples, lengths, col, sl


class GradientClipped(Float32Trainer):
    """Clamps each gradient sum to [-1, 1] (a stray clamp left in a kernel)."""

    name = "fault-gradient-clipped"

    def updated_rows(self, t, rows, grad):
        return rows, grad.clamp(-1, 1)


FAULTS = (
    DecaysEveryRow,
    EpsInsideSqrt,
    MeanNotDivided,
    IgnoresSampleWeights,
    DropsSecondFeature,
    AdagradStatePerRow,
    WrongTable,
    LearningRateTwice,
    RowwiseSumNotMean,
    StateResetEachStep,
    SampleWeightGradAfterUpdate,
    DuplicatesNotAggregated,
    RowwisePerElement,
    ColumnsInKeyOrder,
    GradientClipped,
    SkipsFirstIdOfBag,
)
"""The planted faults the check must find on generated problems (tests/test_training.py)."""
