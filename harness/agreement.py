"""The agreement check: one problem, several backends, each compared with the reference."""

from __future__ import annotations

import enum
import os
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import torch

from harness.backend import Backend
from harness.cases import Case, scoped_cases
from harness.known import Observation, explain
from harness.model import JaggedBatch, Problem, TableConfig, total_dim
from harness.quantized import QuantizedTable
from harness.reference.forward import PooledReference, pool_with_tolerance
from harness.tolerance import Comparison, Tolerance, compare
from harness.validate import IdPolicy, validate_problem


class Outcome(str, enum.Enum):
    AGREE = "agree"
    DISAGREE = "disagree"
    UNSUPPORTED = "unsupported"
    RAISED = "raised"
    MUTATED = "mutated"
    KNOWN = "known"


@dataclass(frozen=True)
class Verdict:
    """One backend's result on one problem.

    ``observed`` keeps what the backend did (its result, or its exception's type and message, and
    the backend object) so that `mark_known` can check a known case's model against it; it is
    left out of ``repr`` and equality. Rebuild a verdict with ``dataclasses.replace`` to keep it.
    ``known_cases`` names the cases whose models explain a `Outcome.KNOWN` verdict.
    """

    backend: str
    outcome: Outcome
    detail: str
    comparison: Comparison | None = None
    observed: Observation | None = field(default=None, repr=False, compare=False)
    known_cases: tuple[str, ...] = ()

    @property
    def failed(self) -> bool:
        return self.outcome in (Outcome.DISAGREE, Outcome.RAISED, Outcome.MUTATED)

    @classmethod
    def of_exception(cls, backend: object, error: BaseException, context: str = "") -> Verdict:
        """`Outcome.RAISED` for ``error`` raised by ``backend`` (an object, or its name), observed."""
        name = backend if isinstance(backend, str) else getattr(backend, "name", type(backend).__name__)
        owner = None if isinstance(backend, str) else backend
        return cls(
            name,
            Outcome.RAISED,
            f"{type(error).__name__}: {error}{context}",
            observed=Observation.of_exception(error, owner),
        )


@dataclass(frozen=True)
class Oracle:
    """The reference result of a problem and its per-element tolerance, computed once."""

    reference: PooledReference
    tolerance: Tolerance

    @property
    def bound(self) -> torch.Tensor:
        """The finite bound per element (``tolerance.bound``)."""
        return self.tolerance.bound

    @classmethod
    def of(
        cls, tables: Sequence[TableConfig], weights: Mapping[str, torch.Tensor], batch: JaggedBatch
    ) -> Oracle:
        return cls(*pool_with_tolerance(tables, weights, batch))


def _snapshot(weights: Mapping[str, torch.Tensor], batch: JaggedBatch) -> list[tuple[str, torch.Tensor]]:
    tensors = []
    for k, w in weights.items():
        if isinstance(w, QuantizedTable):
            tensors += [
                (f"{part} of quantized table {k!r}", getattr(w, part)) for part in ("codes", "scale", "bias")
            ]
        else:
            tensors.append((f"weights of table {k!r}", w))
    tensors += [("batch values", batch.values), ("batch lengths", batch.lengths)]
    if batch.weights is not None:
        tensors.append(("batch per-sample weights", batch.weights))
    return tensors


def copy_inputs(
    weights: Mapping[str, torch.Tensor], batch: JaggedBatch
) -> tuple[dict[str, torch.Tensor], JaggedBatch]:
    """New tensors holding the inputs as they are now (a `QuantizedTable` copied part by part)."""
    copied = {k: w.clone() for k, w in weights.items()}
    values, lengths = batch.values.clone(), batch.lengths.clone()
    per_sample = None if batch.weights is None else batch.weights.clone()
    return copied, replace(batch, values=values, lengths=lengths, weights=per_sample)


def _mutated(
    weights: Mapping[str, torch.Tensor],
    batch: JaggedBatch,
    weights_before: Mapping[str, torch.Tensor],
    batch_before: JaggedBatch,
) -> str | None:
    before = _snapshot(weights_before, batch_before)
    for (what, tensor), (_, copy) in zip(_snapshot(weights, batch), before, strict=True):
        if not torch.equal(tensor, copy) and not (
            tensor.is_floating_point()
            and torch.equal(tensor.isnan(), copy.isnan())
            and torch.equal(tensor.nan_to_num(), copy.nan_to_num())
        ):
            return f"the backend changed its input: {what}"
    return None


def run_backend(
    backend: Backend,
    tables: Sequence[TableConfig],
    weights: Mapping[str, torch.Tensor],
    batch: JaggedBatch,
    *,
    meanwhile: Callable[[Mapping[str, torch.Tensor], JaggedBatch], object] | None = None,
) -> Verdict | object:
    """Run one backend on an already validated problem: a `Verdict` when no reference is needed to
    give one (it declined, raised or changed its input), else what its lookup returned.

    ``meanwhile`` is called with copies of the inputs, made just before the backend's ``prepare``
    (the same copies its input is compared with afterwards), when the backend has not declined.
    """
    name = getattr(backend, "name", type(backend).__name__)
    try:
        reason = backend.supports(tables, batch)
    except Exception as e:  # noqa: BLE001 - a backend's exception is the verdict
        return Verdict(name, Outcome.RAISED, f"supports() raised {type(e).__name__}: {e}")
    if reason is not None:
        return Verdict(name, Outcome.UNSUPPORTED, reason)
    weights_before, batch_before = copy_inputs(weights, batch)
    if meanwhile is not None:
        meanwhile(weights_before, batch_before)
    try:
        lookup = backend.prepare(tables, weights)
        result = lookup(batch)
    except Exception as e:  # noqa: BLE001 - a backend's exception is the verdict
        return Verdict.of_exception(backend, e)
    mutated = _mutated(weights, batch, weights_before, batch_before)
    if mutated is not None:
        return Verdict(name, Outcome.MUTATED, mutated)
    return result


def judge_result(
    backend: Backend,
    tables: Sequence[TableConfig],
    weights: Mapping[str, torch.Tensor],
    batch: JaggedBatch,
    result: object,
    oracle: Oracle,
) -> Verdict:
    """The verdict on what ``backend``'s lookup returned for a validated problem, against ``oracle``."""
    name = getattr(backend, "name", type(backend).__name__)
    comparison = compare(result, oracle.reference.value, oracle.tolerance)
    outcome = Outcome.AGREE if comparison.agree else Outcome.DISAGREE
    observed = None
    if outcome is Outcome.DISAGREE:
        judged = Problem(tuple(tables), weights, batch)
        observed = Observation(result=result, backend=backend, problem=judged, oracle=oracle)
    return Verdict(name, outcome, comparison.describe(), comparison, observed)


def check_backend(
    backend: Backend,
    tables: Sequence[TableConfig],
    weights: Mapping[str, torch.Tensor],
    batch: JaggedBatch,
    oracle: Oracle,
) -> Verdict:
    """Run one backend on an already validated problem and judge it against ``oracle``."""
    ran = run_backend(backend, tables, weights, batch)
    if isinstance(ran, Verdict):
        return ran
    return judge_result(backend, tables, weights, batch, ran, oracle)


class _OracleThread:
    """One worker thread for `check_backend_pooling`, started on first use in each process (a
    forked child has no copy of its parent's threads)."""

    _executor: ThreadPoolExecutor | None = None
    _pid = -1

    @classmethod
    def submit(cls, *args: object) -> Future:
        if cls._executor is None or cls._pid != os.getpid():
            cls._executor = ThreadPoolExecutor(1, thread_name_prefix="jagbench-oracle")
            cls._pid = os.getpid()
        return cls._executor.submit(Oracle.of, *args)


OVERLAP_ELEMENTS = 100_000
"""The reference work (`_reference_elements`) above which `check_backend_pooling` computes the
oracle on a second thread: below it, handing the work to a thread costs about what it saves."""


def _reference_elements(tables: Sequence[TableConfig], batch: JaggedBatch) -> int:
    """An upper bound on the elements the reference adds and writes: every id times the widest dim,
    plus the output."""
    widest = max((t.embedding_dim for t in tables), default=0)
    return len(batch.values) * widest + batch.batch_size * total_dim(tables)


def check_backend_pooling(
    backend: Backend,
    tables: Sequence[TableConfig],
    weights: Mapping[str, torch.Tensor],
    batch: JaggedBatch,
) -> tuple[Verdict, Oracle]:
    """`check_backend` with its oracle computed while the backend runs: the verdict and the oracle.

    For a problem of more than `OVERLAP_ELEMENTS`, the oracle is computed on a second thread
    from the copies of the inputs taken before the backend runs (`run_backend`), so a backend
    that changes its inputs cannot change the reference. Its compiled pass releases the GIL:
    where a core is free (the fuzzer runs backends on one thread) its time hides behind the
    backend's instead of adding to it. The result is the same as computing the oracle first.
    A smaller problem, or a backend that declines, gets the oracle on the calling thread."""
    if _reference_elements(tables, batch) <= OVERLAP_ELEMENTS:
        oracle = Oracle.of(tables, weights, batch)
        return check_backend(backend, tables, weights, batch, oracle), oracle
    pending: list[Future] = []
    ran = run_backend(
        backend,
        tables,
        weights,
        batch,
        meanwhile=lambda w, b: pending.append(_OracleThread.submit(tables, w, b)),
    )
    oracle = pending[0].result() if pending else Oracle.of(tables, weights, batch)
    if isinstance(ran, Verdict):
        return ran, oracle
    return judge_result(backend, tables, weights, batch, ran, oracle), oracle


def check_agreement(
    backends: Sequence[Backend],
    tables: Sequence[TableConfig],
    weights: Mapping[str, torch.Tensor],
    batch: JaggedBatch,
    *,
    id_policy: IdPolicy = "reject",
) -> list[Verdict]:
    """Validate the problem, compute the reference once, and judge every backend on it.

    Raises `harness.validate.ProblemError` for a malformed problem before any backend runs.
    """
    batch = validate_problem(tables, batch, weights, id_policy=id_policy)
    oracle = Oracle.of(tables, weights, batch)
    return [check_backend(b, tables, weights, batch, oracle) for b in backends]


def _observation(v: Verdict) -> Observation:
    """What the verdict observed; for a `Outcome.RAISED` verdict made without one, the exception
    type and message are read from its detail (``"Type: message"``, the form every caller writes)."""
    if v.observed is not None:
        return v.observed
    if v.outcome is Outcome.RAISED:
        kind, sep, message = v.detail.partition(": ")
        if sep and kind.isidentifier():
            return Observation(error_types=(kind,), error_message=message)
    return Observation()


def mark_known(verdicts: Sequence[Verdict], problem: Problem, cases: Sequence[Case]) -> list[Verdict]:
    """Relabel a disagreement or error as `Outcome.KNOWN` where known cases' models explain it.

    For each `Outcome.DISAGREE` or `Outcome.RAISED` verdict, the known-discrepancy cases of that
    backend whose scope holds ``problem`` are tried (`harness.known.explain`): an exception must be
    the one a ``raises`` model names; a result must be, in every column, what the cases' models
    predict (each for the tables it claims), or else what the contract says. Cases never
    reproduced (``reproduced: false``) or without a model are not tried: they silence nothing. A
    verdict that stays failed says in its detail which cases were tried and why they do not
    explain it. The observation's own problem, when it has one, is what is judged.
    """
    out = []
    for v in verdicts:
        if v.outcome not in (Outcome.DISAGREE, Outcome.RAISED):
            out.append(v)
            continue
        observed = _observation(v)
        judged = observed.problem or problem
        scoped = scoped_cases(cases, v.backend, judged, observed.backend)
        usable = [c for c in scoped if c.can_silence]
        idle = [c.name for c in scoped if not c.can_silence]
        note = f"; in scope but never reproduced, so not tried: {', '.join(map(repr, idle))}" if idle else ""
        if not usable:
            out.append(replace(v, detail=v.detail + note) if note else v)
            continue
        explanation = explain([(c.name, c.model) for c in usable], judged, observed, Oracle.of)
        if explanation.explained:
            names = explanation.cases or (usable[0].name,)
            known = " + ".join(map(repr, names))
            out.append(
                replace(
                    v,
                    outcome=Outcome.KNOWN,
                    detail=f"known discrepancy {known}: {v.detail}",
                    known_cases=names,
                )
            )
        else:
            tried = ", ".join(repr(c.name) for c in usable)
            detail = f"{v.detail}; not explained by known case(s) {tried}: {explanation.detail}{note}"
            out.append(replace(v, detail=detail))
    return out


def check_problem(
    backends: Sequence[Backend], problem: Problem, *, id_policy: IdPolicy = "reject"
) -> list[Verdict]:
    """`check_agreement` for a `Problem`."""
    return check_agreement(backends, problem.tables, problem.weights, problem.batch, id_policy=id_policy)
