"""Hypothesis strategies for training problems, public and composable like the forward ones.

    from hypothesis import given
    from harness.training.strategies import training_problems

    @given(training_problems(kinds=["rowwise_adagrad"], dtypes=[torch.float32]))
    def test_my_trainer(problem): ...

A training example is a forward problem (`harness.fuzz.strategies.problem_specs`: tables, weights,
first batch, all their options), an optimizer (`optimizer_configs`) and 1-3 steps, each a batch
(the first one again, or another over the same tables: so optimizer state meets rows it has seen)
and a grad_output of a profile (`GRAD_PROFILES`: values across the range, zeros, cancellations).
Hypothesis draws only the structure and seeds (`training_specs`, giving a `TrainingSpec`); numpy
builds the tensors (`build_training_problem`). Shared tables and duplicate ids come from the
forward strategy: it draws tables with several features, hot, Zipf, duplicate and edge id
distributions, and every feature of two or more ids reads its table's rows 0 and
``num_embeddings - 1`` (so the features of a shared table always share rows).
"""

from __future__ import annotations

from collections.abc import Sequence

from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument

from harness.fuzz.problem_spec import WEIGHT_PROFILES
from harness.fuzz.strategies import problem_specs
from harness.model import SUPPORTED_DTYPES
from harness.training.contract import OPTIMIZER_KINDS, WEIGHT_DECAY_MODES, OptimizerConfig
from harness.training.problem import TrainingProblem
from harness.training.spec import GRAD_PROFILES, StepSpec, TrainingSpec, build_training_problem

__all__ = [
    "DEFAULT_TRAINING_COST",
    "GRAD_PROFILES",
    "TRAINING_WEIGHT_PROFILES",
    "optimizer_configs",
    "step_specs",
    "training_problems",
    "training_specs",
]

DEFAULT_TRAINING_COST = 2**18
"""The default cost budget of one step's forward problem (`ProblemSpec.cost`): a training example
runs up to three steps and the oracle does more work per element than the forward one."""

TRAINING_WEIGHT_PROFILES: tuple[str, ...] = tuple(p for p in WEIGHT_PROFILES if p != "huge")
"""The default weight profiles: all but ``huge``, whose updates overflow float32 so often that the
analysis leaves most of them unbounded (pass ``profiles=`` to include it)."""

_SEEDS = st.integers(0, 2**32 - 1)
_MANTISSAS = st.sampled_from([1.0, 1.5, 1.25, 1.75, 1.1])
_GRAD_WEIGHTS = {"normal": 35, "integers": 15, "sparse": 10, "cancel": 15, "zeros": 5, "wide": 10, "tiny": 10}


def _weighted(options: dict[str, int], allowed: Sequence[str]) -> st.SearchStrategy[str]:
    return st.sampled_from([name for name in options if name in allowed for _ in range(options[name])])


def _check_choices(name: str, values: object, allowed: Sequence[str]) -> tuple[str, ...]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
        raise InvalidArgument(f"{name}={values!r} must be a non-empty sequence")
    for v in values:
        if v not in allowed:
            raise InvalidArgument(f"{name} contains {v!r}; allowed: {list(allowed)}")
    return tuple(values)


@st.composite
def _optimizer_configs(draw: st.DrawFn, kinds: tuple[str, ...], modes: tuple[str, ...]) -> OptimizerConfig:
    kind = draw(st.sampled_from(kinds))
    if draw(st.integers(0, 9)) < 4:
        lr = draw(st.sampled_from([0.01, 0.1, 1.0, 1e-3]))
    else:  # tiny to large: about 1e-12 to 1e3
        lr = draw(_MANTISSAS) * 2.0 ** draw(st.integers(-40, 10))
    if draw(st.integers(0, 9)) < 3:
        eps = 1e-8
    else:  # 1e-10 to 1
        eps = min(1.0, draw(_MANTISSAS) * 10.0 ** draw(st.integers(-10, 0)))
    mode = draw(st.sampled_from(modes))
    decay = 0.0 if draw(st.integers(0, 9)) < 3 else draw(_MANTISSAS) * 10.0 ** draw(st.integers(-6, 0))
    return OptimizerConfig(kind, lr, eps, decay, mode)


def optimizer_configs(
    *, kinds: Sequence[str] = OPTIMIZER_KINDS, weight_decay_modes: Sequence[str] = WEIGHT_DECAY_MODES
) -> st.SearchStrategy[OptimizerConfig]:
    """Valid `OptimizerConfig`s of ``kinds`` and ``weight_decay_modes``: learning rates from about
    1e-12 to 1e3 (often 1e-3 to 1), eps from 1e-10 to 1 (often 1e-8), weight decay zero (30%) or
    from 1e-6 to 1.75."""
    kinds = _check_choices("kinds", kinds, OPTIMIZER_KINDS)
    modes = _check_choices("weight_decay_modes", weight_decay_modes, WEIGHT_DECAY_MODES)
    return _optimizer_configs(kinds, modes)


@st.composite
def _step_specs(
    draw: st.DrawFn,
    first_batch_size: int,
    grad_profiles: tuple[str, ...],
    first: bool,
    same_batch: bool | None,
) -> StepSpec:
    profile = draw(_weighted(_GRAD_WEIGHTS, grad_profiles))
    seed = draw(_SEEDS)
    if first or same_batch or (same_batch is None and draw(st.booleans())):
        return StepSpec(profile, seed)
    return StepSpec(profile, seed, batch_seed=draw(_SEEDS), batch_size=draw(st.integers(0, first_batch_size)))


def step_specs(
    *,
    first_batch_size: int,
    grad_profiles: Sequence[str] = GRAD_PROFILES,
    first: bool = False,
    same_batch: bool | None = None,
) -> st.SearchStrategy[StepSpec]:
    """One `StepSpec`: a grad_output profile of ``grad_profiles`` (weighted towards ``normal``)
    and seed; unless ``first``, the first batch again or (``same_batch=None``: either) a new one
    of 0 to ``first_batch_size`` samples."""
    if isinstance(first_batch_size, bool) or not isinstance(first_batch_size, int) or first_batch_size < 0:
        raise InvalidArgument(f"first_batch_size={first_batch_size!r} must be a non-negative integer")
    grad_profiles = _check_choices("grad_profiles", grad_profiles, GRAD_PROFILES)
    return _step_specs(first_batch_size, grad_profiles, first, same_batch)


@st.composite
def _training_specs(
    draw: st.DrawFn,
    problems: st.SearchStrategy,
    optimizers: st.SearchStrategy[OptimizerConfig],
    min_steps: int,
    max_steps: int,
    grad_profiles: tuple[str, ...],
    same_batch: bool | None,
) -> TrainingSpec:
    problem = draw(problems)
    optimizer = draw(optimizers)
    n = draw(st.integers(min_steps, max_steps))
    steps = [draw(_step_specs(problem.batch_size, grad_profiles, i == 0, same_batch)) for i in range(n)]
    return TrainingSpec(problem, optimizer, tuple(steps))


def training_specs(
    *,
    kinds: Sequence[str] = OPTIMIZER_KINDS,
    weight_decay_modes: Sequence[str] = WEIGHT_DECAY_MODES,
    min_steps: int = 1,
    max_steps: int = 3,
    grad_profiles: Sequence[str] = GRAD_PROFILES,
    same_batch: bool | None = None,
    max_cost: int = DEFAULT_TRAINING_COST,
    profiles: Sequence[str] = TRAINING_WEIGHT_PROFILES,
    **problem_options: object,
) -> st.SearchStrategy[TrainingSpec]:
    """`TrainingSpec`s: a forward `ProblemSpec` (`problem_specs` with ``max_cost``, ``profiles``
    and any other of its options; ``dtypes`` defaults to the float ones, which training needs), an
    optimizer (`optimizer_configs`) and ``min_steps`` to ``max_steps`` steps (`step_specs`)."""
    for name, v in (("min_steps", min_steps), ("max_steps", max_steps)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise InvalidArgument(f"{name}={v!r} must be a positive integer")
    if min_steps > max_steps:
        raise InvalidArgument(f"min_steps={min_steps} is larger than max_steps={max_steps}")
    if same_batch is not None and not isinstance(same_batch, bool):
        raise InvalidArgument(f"same_batch={same_batch!r} must be True, False or None (either)")
    grad_profiles = _check_choices("grad_profiles", grad_profiles, GRAD_PROFILES)
    if "tables" not in problem_options:
        problem_options.setdefault("dtypes", SUPPORTED_DTYPES)  # training updates float tables only
    problems = problem_specs(max_cost=max_cost, profiles=profiles, **problem_options)
    optimizers = optimizer_configs(kinds=kinds, weight_decay_modes=weight_decay_modes)
    return _training_specs(problems, optimizers, min_steps, max_steps, grad_profiles, same_batch)


def training_problems(**options: object) -> st.SearchStrategy[TrainingProblem]:
    """Whole valid `TrainingProblem`s: `training_specs` (same keyword options) built by
    `build_training_problem`; ``problem.metadata["training_spec"]`` is the spec, as JSON."""
    return training_specs(**options).map(build_training_problem)
