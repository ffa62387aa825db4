"""A training problem's structure and seeds (`TrainingSpec`), and the tensors numpy builds from them.

Like the forward `harness.fuzz.problem_spec.ProblemSpec` (which it holds for the tables, weights
and the first batch): Hypothesis draws only the structure (`harness.training.strategies`), and
`build_training_problem` makes every tensor from seeds, vectorised and deterministic. A spec is
JSON (`to_json` / `from_json`), so a training case can be saved and replayed::

    spec = TrainingSpec(problem=ProblemSpec(...), optimizer=OptimizerConfig("rowwise_adagrad", 0.1),
                        steps=(StepSpec("normal", 1), StepSpec("cancel", 2, batch_seed=7)))
    problem = build_training_problem(spec)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from harness.fuzz.problem_spec import ProblemSpec, build_batch, build_problem
from harness.model import TableConfig, total_dim
from harness.training.contract import OptimizerConfig
from harness.training.problem import StepInput, TrainingProblem

GRAD_PROFILES: tuple[str, ...] = ("normal", "integers", "sparse", "cancel", "zeros", "wide", "tiny")
"""Profiles of grad_output (float32 ``[batch_size, total_dim]``, `make_grad_output`):

- ``normal``: standard normal;
- ``integers``: integers in [-3, 3] (exact gradient sums: a misplaced term shows exactly);
- ``sparse``: about 90% zeros, the rest standard normal;
- ``cancel``: samples in pairs, the second ``-(1 + 2**-20 x)`` times the first, so the gradient
  of a row both samples read nearly cancels;
- ``zeros``: all zero (with no weight decay, nothing may change);
- ``wide``: random signs and exponents from ``2**-100`` to ``2**100``;
- ``tiny``: magnitudes from float32's subnormals to ``2**-120`` (underflow in the update).
"""

_GRAD_STREAM = 11


@dataclass(frozen=True)
class StepSpec:
    """One step: its grad_output's profile and seed, and its batch: the problem's first batch when
    ``batch_seed`` is None, else the problem's batch fields with that seed and ``batch_size``
    samples (None: the first batch's size)."""

    grad_profile: str
    grad_seed: int
    batch_seed: int | None = None
    batch_size: int | None = None

    def __post_init__(self) -> None:
        if self.grad_profile not in GRAD_PROFILES:
            raise ValueError(f"grad_profile={self.grad_profile!r}; expected one of {list(GRAD_PROFILES)}")
        for name in ("grad_seed", "batch_seed", "batch_size"):
            v = getattr(self, name)
            if v is None and name != "grad_seed":
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name}={v!r} must be a non-negative integer")
        if self.batch_size is not None and self.batch_seed is None:
            raise ValueError("batch_size needs batch_seed: the first batch keeps its own size")


@dataclass(frozen=True)
class TrainingSpec:
    """The tables, weights and first batch (``problem``), the optimizer and the steps."""

    problem: ProblemSpec
    optimizer: OptimizerConfig
    steps: tuple[StepSpec, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "steps", tuple(self.steps))
        if not self.steps:
            raise ValueError("a training spec needs at least one step")

    def to_json(self) -> dict[str, Any]:
        return {
            "problem": self.problem.to_json(),
            "optimizer": self.optimizer.to_json(),
            "steps": [dataclasses.asdict(s) for s in self.steps],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TrainingSpec:
        return cls(
            problem=ProblemSpec.from_json(data["problem"]),
            optimizer=OptimizerConfig.from_json(data["optimizer"]),
            steps=tuple(StepSpec(**s) for s in data["steps"]),
        )


def make_grad_output(tables: Sequence[TableConfig], batch_size: int, profile: str, seed: int) -> torch.Tensor:
    """A float32 ``[batch_size, total_dim]`` grad_output of a profile (`GRAD_PROFILES`) and seed."""
    if profile not in GRAD_PROFILES:
        raise ValueError(f"profile={profile!r}; expected one of {list(GRAD_PROFILES)}")
    shape = (batch_size, total_dim(tables))
    rng = np.random.Generator(np.random.PCG64([seed, _GRAD_STREAM]))
    if profile == "normal":
        g = rng.standard_normal(shape)
    elif profile == "zeros":
        g = np.zeros(shape)
    elif profile == "integers":
        g = rng.integers(-3, 4, shape).astype(np.float64)
    elif profile == "sparse":
        g = np.where(rng.random(shape) < 0.9, 0.0, rng.standard_normal(shape))
    elif profile == "cancel":
        g = rng.standard_normal(shape)
        pairs = batch_size // 2
        g[1 : 2 * pairs : 2] = -g[0 : 2 * pairs : 2] * (1 + np.ldexp(rng.random((pairs, shape[1])), -20))
    else:  # wide, tiny
        sign = rng.integers(0, 2, shape) * 2.0 - 1
        low, high = (-100, 101) if profile == "wide" else (-149, -119)
        g = sign * np.ldexp(1 + rng.random(shape), rng.integers(low, high, shape, dtype=np.int32))
    return torch.from_numpy(g.astype(np.float32))


def build_training_problem(spec: TrainingSpec) -> TrainingProblem:
    """The `TrainingProblem` a spec describes (deterministic); ``metadata["training_spec"]`` is
    ``spec.to_json()``."""
    first = build_problem(spec.problem)
    steps = []
    for s in spec.steps:
        if s.batch_seed is None:
            batch = first.batch
        else:
            size = spec.problem.batch_size if s.batch_size is None else s.batch_size
            batch = build_batch(dataclasses.replace(spec.problem, seed=s.batch_seed, batch_size=size))
        steps.append(
            StepInput(
                batch, make_grad_output(spec.problem.tables, batch.batch_size, s.grad_profile, s.grad_seed)
            )
        )
    return TrainingProblem(
        spec.problem.tables, first.weights, spec.optimizer, tuple(steps), {"training_spec": spec.to_json()}
    )
