"""The agreement check: one problem, several backends, each compared with the reference."""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from harness.backend import Backend
from harness.cases import Case, known_discrepancy
from harness.model import JaggedBatch, Problem, TableConfig
from harness.reference.forward import ReferenceResult, reference_pool
from harness.tolerance import Comparison, compare, error_bound
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
    """One backend's result on one problem."""

    backend: str
    outcome: Outcome
    detail: str
    comparison: Comparison | None = None

    @property
    def failed(self) -> bool:
        return self.outcome in (Outcome.DISAGREE, Outcome.RAISED, Outcome.MUTATED)


@dataclass(frozen=True)
class Oracle:
    """The reference result of a problem and its per-element bound, computed once."""

    reference: ReferenceResult
    bound: torch.Tensor

    @classmethod
    def of(
        cls, tables: Sequence[TableConfig], weights: Mapping[str, torch.Tensor], batch: JaggedBatch
    ) -> Oracle:
        ref = reference_pool(tables, weights, batch)
        return cls(ref, error_bound(ref.magnitude, ref.bag_length, ref.is_mean))


def _snapshot(weights: Mapping[str, torch.Tensor], batch: JaggedBatch) -> list[tuple[str, torch.Tensor]]:
    tensors = [(f"weights of table {k!r}", w) for k, w in weights.items()]
    tensors += [("batch values", batch.values), ("batch lengths", batch.lengths)]
    if batch.weights is not None:
        tensors.append(("batch per-sample weights", batch.weights))
    return tensors


def _mutated(before: list[tuple[str, torch.Tensor, torch.Tensor]]) -> str | None:
    for what, tensor, copy in before:
        if not torch.equal(tensor, copy) and not (
            tensor.is_floating_point()
            and torch.equal(tensor.isnan(), copy.isnan())
            and torch.equal(tensor.nan_to_num(), copy.nan_to_num())
        ):
            return f"the backend changed its input: {what}"
    return None


def check_backend(
    backend: Backend,
    tables: Sequence[TableConfig],
    weights: Mapping[str, torch.Tensor],
    batch: JaggedBatch,
    oracle: Oracle,
) -> Verdict:
    """Run one backend on an already validated problem and judge it against ``oracle``."""
    name = getattr(backend, "name", type(backend).__name__)
    try:
        reason = backend.supports(tables, batch)
    except Exception as e:  # noqa: BLE001 - a backend's exception is the verdict
        return Verdict(name, Outcome.RAISED, f"supports() raised {type(e).__name__}: {e}")
    if reason is not None:
        return Verdict(name, Outcome.UNSUPPORTED, reason)
    before = [(what, t, t.clone()) for what, t in _snapshot(weights, batch)]
    try:
        lookup = backend.prepare(tables, weights)
        result = lookup(batch)
    except Exception as e:  # noqa: BLE001 - a backend's exception is the verdict
        return Verdict(name, Outcome.RAISED, f"{type(e).__name__}: {e}")
    mutated = _mutated(before)
    if mutated is not None:
        return Verdict(name, Outcome.MUTATED, mutated)
    comparison = compare(result, oracle.reference.value, oracle.bound)
    outcome = Outcome.AGREE if comparison.agree else Outcome.DISAGREE
    return Verdict(name, outcome, comparison.describe(), comparison)


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


def mark_known(verdicts: Sequence[Verdict], problem: Problem, cases: Sequence[Case]) -> list[Verdict]:
    """Relabel a disagreement or error explained by a known-discrepancy case as `Outcome.KNOWN`."""
    out = []
    for v in verdicts:
        case = (
            known_discrepancy(cases, v.backend, problem)
            if v.outcome in (Outcome.DISAGREE, Outcome.RAISED)
            else None
        )
        if case is None:
            out.append(v)
        else:
            out.append(
                Verdict(
                    v.backend, Outcome.KNOWN, f"known discrepancy {case.name!r}: {v.detail}", v.comparison
                )
            )
    return out


def check_problem(
    backends: Sequence[Backend], problem: Problem, *, id_policy: IdPolicy = "reject"
) -> list[Verdict]:
    """`check_agreement` for a `Problem`."""
    return check_agreement(backends, problem.tables, problem.weights, problem.batch, id_policy=id_policy)
