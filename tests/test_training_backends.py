"""The third-party training backends: each trains as the contract says where it claims support
(judged by `harness.training.check` over generated multi-step problems, its known discrepancies
allowed only where their models explain them), declines what its library cannot do with the
reason, and every known training case still reproduces, is explained by its own model, and stops
being explained when one more error is planted in the same backend.

The torchrec and FBGEMM tests are skipped, with the reason, where torchrec is not installed; the
sharded ones use the module-wide rank pool of 2 gloo ranks (a few examples: each step is a round
trip over the ranks).
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings

from harness.agreement import Outcome
from harness.backend import BackendUnavailable, load_backend
from harness.fuzz.strategies import table_configs
from harness.model import JaggedBatch, Pooling, TableConfig
from harness.training.cases import (
    explain_with_cases,
    load_training_cases,
    mark_known_training,
    replay_training,
    training_case_files,
)
from harness.training.check import check_training
from harness.training.contract import OptimizerConfig, TrainResult
from harness.training.known import (
    DoubleRounded,
    RowwiseStatePerColumnShard,
    WeightDecayIgnored,
    column_shard_widths,
    explain_training,
)
from harness.training.problem import TrainingProblem
from harness.training.spec import build_training_problem
from harness.training.strategies import training_specs

CASES = load_training_cases()
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16

try:
    import torchrec  # noqa: F401

    TORCHREC = True
except ImportError:
    TORCHREC = False

needs_torchrec = pytest.mark.skipif(not TORCHREC, reason="torchrec (with fbgemm-gpu) is not installed")


def _multiple_of_4(tables: tuple[TableConfig, ...]) -> tuple[TableConfig, ...]:
    return tuple(dataclasses.replace(t, embedding_dim=4 * math.ceil(t.embedding_dim / 4)) for t in tables)


def _alike(tables: tuple[TableConfig, ...]) -> tuple[TableConfig, ...]:
    """Every table with the first one's pooling and dtype (one FBGEMM TBE module holds them all)."""
    return tuple(dataclasses.replace(t, pooling=tables[0].pooling, dtype=tables[0].dtype) for t in tables)


def _tables(dtypes, *, dim4: bool, alike: bool = False, max_tables: int = 4):
    s = table_configs(
        max_tables=max_tables,
        max_features=6,
        max_dim=48,
        max_num_embeddings=200,
        dtypes=dtypes,
        max_cost=2**13,
    )
    s = s.map(_multiple_of_4) if dim4 else s
    return s.map(_alike) if alike else s


ALL_KINDS = ["sgd", "adagrad", "rowwise_adagrad"]
ALL_MODES = ["none", "l2", "decoupled"]

# What each backend is fuzzed over: what it claims (its declines are tested below), and every
# optimizer and mode where it accepts them, so that its known discrepancies are met and modelled.
SPACES = {
    "torch": dict(kinds=["sgd", "adagrad"], modes=["none"], dtypes=[F32], dim4=False, examples=30),
    "fbgemm-tbe": dict(
        kinds=ALL_KINDS, modes=ALL_MODES, dtypes=[F32, F16], dim4=True, alike=True, examples=40
    ),
    "torchrec": dict(kinds=ALL_KINDS, modes=["none", "l2"], dtypes=[F32], dim4=False, examples=25),
    "torchrec-fused": dict(kinds=ALL_KINDS, modes=ALL_MODES, dtypes=[F32, F16, BF16], dim4=True, examples=30),
}
SHARDED_SPACE = dict(kinds=ALL_KINDS, modes=ALL_MODES, dtypes=[F32, F16], dim4=True, examples=4)


def _fuzz(backend, space: dict, **extra) -> Counter:
    """Judge ``backend`` on generated problems; every failure must be what its known cases model."""
    counts: Counter = Counter()
    strategy = training_specs(
        kinds=space["kinds"],
        weight_decay_modes=space["modes"],
        tables=_tables(space["dtypes"], dim4=space["dim4"], alike=space.get("alike", False)),
        max_cost=2**13,
        max_batch_size=12,
        **extra,
    )

    @settings(
        max_examples=space["examples"], derandomize=True, deadline=None, database=None,
        suppress_health_check=list(HealthCheck),
    )  # fmt: skip
    @given(strategy)
    def run(spec):
        problem = build_training_problem(spec)
        verdict = mark_known_training(check_training(backend, problem), backend, problem, CASES)
        counts[verdict.outcome] += 1
        assert verdict.outcome in (Outcome.AGREE, Outcome.UNSUPPORTED, Outcome.KNOWN), (
            f"{spec.optimizer.describe()}: {verdict.detail}"
        )

    run()
    return counts


@pytest.mark.parametrize(
    "name", ["torch"] + (["fbgemm-tbe", "torchrec", "torchrec-fused"] if TORCHREC else [])
)
def test_backend_trains_as_the_contract_or_its_known_cases_say(name):
    counts = _fuzz(load_backend(name), SPACES[name])
    ran = counts[Outcome.AGREE] + counts[Outcome.KNOWN]
    assert counts[Outcome.AGREE] >= 3, counts
    assert ran >= SPACES[name]["examples"] // 2, counts


@pytest.fixture(scope="module")
def sharded():
    pytest.importorskip("torchrec", reason="torchrec is not installed: the sharded backends are unavailable")
    from impls import torchrec_sharded

    yield {s: load_backend(f"torchrec-sharded-{s}") for s in ("tw", "cw", "twcw", "rw", "dp")}
    torchrec_sharded.shutdown_pools()


@pytest.mark.parametrize("plan", ["tw", "cw", "twcw"])
def test_sharded_trains_as_the_contract_or_its_known_cases_say(sharded, plan):
    counts = _fuzz(sharded[plan], SHARDED_SPACE, weighted=False, min_batch_size=2)
    assert counts[Outcome.AGREE] + counts[Outcome.KNOWN] >= 2, counts


def _two_step_problem(optimizer: OptimizerConfig, dtype=F32) -> TrainingProblem:
    """A shared table and a table of its own, duplicates within and across bags and features, two
    steps over different batches (so the optimizer state meets rows it has seen)."""
    g = torch.Generator().manual_seed(3)
    tables = [
        TableConfig("s", 9, 8, ("a", "b"), Pooling.SUM, dtype),
        TableConfig("o", 7, 12, ("c",), Pooling.SUM, dtype),
    ]
    weights = {t.name: torch.randn(t.num_embeddings, t.embedding_dim, generator=g).to(dtype) for t in tables}
    first = JaggedBatch.from_bags(
        {"a": [[1, 1, 3], [2], [], [8]], "b": [[1], [], [0, 1, 1], [8]], "c": [[4, 4], [0], [4], []]}
    )
    second = JaggedBatch.from_bags({"a": [[3], [1, 5], [1]], "b": [[5, 5], [0], []], "c": [[], [6, 4], [4]]})
    steps = [(first, torch.randn(4, 28, generator=g)), (second, torch.randn(3, 28, generator=g))]
    return TrainingProblem.of(tables, weights, optimizer, steps)


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_sharded_two_steps_over_a_shared_table_agree(sharded, kind):
    """No weight decay, float32: torchrec's fused kernel is exact here, on every plan it trains with
    (column-wise rowwise keeps its state per shard: the case's model must then explain it)."""
    problem = _two_step_problem(OptimizerConfig(kind, 0.3, 1e-3))
    for plan in ("tw", "cw", "twcw"):
        verdict = check_training(sharded[plan], problem)
        if plan != "tw" and kind == "rowwise_adagrad":
            assert verdict.outcome is Outcome.DISAGREE, verdict.detail
            verdict = mark_known_training(verdict, sharded[plan], problem, CASES)
            assert verdict.outcome is Outcome.KNOWN, verdict.detail
        else:
            assert verdict.outcome is Outcome.AGREE, f"{plan}: {verdict.detail}"


# ---------------------------------------------------------------------------------------------
# What each backend declines, and why.


def _simple(dtype=F32, dim=4, pooling=Pooling.SUM, weighted=False, tables=None):
    tables = tables or [TableConfig("t0", 3, dim, ("f0",), pooling, dtype)]
    keys = [f for t in tables for f in t.feature_names]
    bags = {k: [[0, 1], [2]] for k in keys}
    weights = {k: [[1.0, 0.5], [2.0]] for k in keys} if weighted else None
    return tables, JaggedBatch.from_bags(bags, weights)


DECLINES = [
    ("torch", OptimizerConfig("rowwise_adagrad", 0.1), {}, "no row-wise Adagrad"),
    (
        "torch",
        OptimizerConfig("sgd", 0.1, weight_decay=0.1, weight_decay_mode="l2"),
        {},
        "raises on weight decay",
    ),
    (
        "torch",
        OptimizerConfig("adagrad", 0.1, weight_decay=0.1, weight_decay_mode="decoupled"),
        {},
        "no decoupled",
    ),
    ("torch", OptimizerConfig("sgd", 0.1), {"dtype": F16}, "own dtype"),
    ("torch", OptimizerConfig("adagrad", 0.1), {"dtype": BF16}, "own dtype"),
    ("fbgemm-tbe", OptimizerConfig("sgd", 0.1), {"dtype": BF16}, "not implemented for BFloat16"),
    ("fbgemm-tbe", OptimizerConfig("sgd", 0.1), {"dim": 6}, "embedding_dim % 4"),
    (
        "torchrec",
        OptimizerConfig("sgd", 0.1, weight_decay=0.1, weight_decay_mode="decoupled"),
        {},
        "no decoupled",
    ),
    ("torchrec", OptimizerConfig("rowwise_adagrad", 0.1), {"dtype": F16}, "float16 parameters"),
    ("torchrec-fused", OptimizerConfig("sgd", 0.1), {"dim": 2}, "embedding_dim % 4"),
    ("torchrec-sharded-rw", OptimizerConfig("sgd", 0.1), {}, "row_wise"),
    ("torchrec-sharded-dp", OptimizerConfig("sgd", 0.1), {}, "dense kernel only"),
    ("torchrec-sharded-tw", OptimizerConfig("sgd", 0.1), {"weighted": True}, "never computed"),
    ("torchrec-sharded-cw", OptimizerConfig("sgd", 0.1), {"dim": 6}, "embedding_dim % 4"),
    ("torchrec-sharded-tw", OptimizerConfig("sgd", 0.1), {"dtype": BF16}, "bfloat16"),
]


@pytest.mark.parametrize(("name", "optimizer", "problem", "reason"), DECLINES, ids=lambda x: str(x)[:40])
def test_what_a_backend_cannot_do_is_declined_with_the_reason(name, optimizer, problem, reason):
    if name != "torch" and not TORCHREC:
        pytest.skip("torchrec is not installed")
    backend = load_backend(name)
    tables, batch = _simple(**problem)
    got = backend.supports_training(tables, batch, optimizer)
    assert got is not None and reason in got, got
    t = tables[0]
    weights = {t.name: torch.ones(t.num_embeddings, t.embedding_dim).to(t.dtype)}
    problem = TrainingProblem.of(tables, weights, optimizer, [(batch, torch.zeros(2, t.embedding_dim))])
    verdict = check_training(backend, problem)
    assert verdict.outcome is Outcome.UNSUPPORTED and reason in verdict.detail


def test_the_declined_torch_combinations_are_what_torch_refuses_or_lacks():
    """The reasons are torch's own behaviour, not a guess."""
    w = torch.ones(3, 4, requires_grad=True)
    for optim, message in (
        (torch.optim.SGD([w], lr=0.1, weight_decay=0.1), "add\\(sparse, dense\\) is not supported"),
        (torch.optim.Adagrad([w], lr=0.1, weight_decay=0.1), "not compatible with sparse gradients"),
    ):
        F.embedding_bag(torch.tensor([0, 1]), w, torch.tensor([0]), sparse=True).sum().backward()
        with pytest.raises(RuntimeError, match=message):
            optim.step()
        w.grad = None
    assert not any("rowwise" in n.lower() for n in dir(torch.optim))
    half = torch.ones(3, 4, dtype=F16, requires_grad=True)
    opt = torch.optim.Adagrad([half], lr=0.1)
    F.embedding_bag(torch.tensor([0]), half, torch.tensor([0]), sparse=True).float().sum().backward()
    opt.step()
    assert opt.state[half]["sum"].dtype == F16, "torch.optim keeps a half parameter's state in half"


@needs_torchrec
def test_fbgemm_cpu_really_cannot_run_bfloat16():
    from fbgemm_gpu.split_embedding_configs import SparseType
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
        ComputeDevice,
        SplitTableBatchedEmbeddingBagsCodegen,
    )

    tbe = SplitTableBatchedEmbeddingBagsCodegen(
        [(3, 4, EmbeddingLocation.HOST, ComputeDevice.CPU)], weights_precision=SparseType.BF16, device="cpu"
    )
    with pytest.raises(NotImplementedError, match="BFloat16"):
        tbe(torch.tensor([0, 1]), torch.tensor([0, 2]))


# ---------------------------------------------------------------------------------------------
# The known training cases.


class Planted:
    """The wrapped backend with one more error: a changed weight of the first row the step updates
    (raised by 2^-6 of its magnitude plus one, many ulps of any dtype, at any value: ``w (1 +
    2^-6) + 2^-6``, the earlier change, left ``w = -1`` as it was), or a different exception."""

    def __init__(self, backend, kind: str = "weight") -> None:
        self.backend = backend
        self.name = backend.name
        self.kind = kind

    def supports_training(self, tables, batch, optimizer):
        return self.backend.supports_training(tables, batch, optimizer)

    def prepare_training(self, tables, weights, optimizer):
        step = self.backend.prepare_training(tables, weights, optimizer)
        table_of = {f: t for t in tables for f in t.feature_names}

        def planted(batch: JaggedBatch, grad_output: torch.Tensor) -> TrainResult:
            if self.kind == "exception":
                raise ValueError("planted: not the modelled exception")
            result = step(batch, grad_output)
            if len(batch.values) == 0:
                return result
            key = batch.keys[int(torch.nonzero(batch.lengths)[0]) // batch.batch_size]
            table = table_of[key].name
            row = int(batch.values[batch.feature_slice(key)][0])
            weights = {k: v.clone() for k, v in result.weights.items()}
            w = weights[table]
            w[row, 0] = (w[row, 0].double() + (w[row, 0].double().abs() + 1) * 2.0**-6).to(w.dtype)
            return TrainResult(result.output, weights, result.per_sample_weight_grad)

        return planted


def _backend_of(name: str, sharded: dict | None):
    if name.startswith("torchrec-sharded-"):
        if sharded is None:
            pytest.skip("torchrec is not installed")
        return sharded[name.removeprefix("torchrec-sharded-")]
    if name not in ("torch", "torch-cuda") and not TORCHREC:
        pytest.skip("torchrec is not installed")
    try:
        return load_backend(name)
    except BackendUnavailable as e:
        pytest.skip(f"not run here: {e}")


@pytest.fixture(scope="module")
def maybe_sharded():
    if not TORCHREC:
        yield None
        return
    from impls import torchrec_sharded

    yield {s: load_backend(f"torchrec-sharded-{s}") for s in ("tw", "cw", "twcw")}
    torchrec_sharded.shutdown_pools()


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_known_case_reproduces_is_modelled_and_a_planted_error_is_caught(case, maybe_sharded):
    backend = _backend_of(case.backend, maybe_sharded)
    (replayed,) = replay_training([case], {case.backend: backend})
    assert replayed.verdict.outcome.value == case.expect, replayed.verdict.detail
    assert replayed.explanation is not None and replayed.explanation.explained, replayed.explanation
    assert case.in_scope(case.backend, case.problem), "its own problem is in its scope"
    planted = Planted(backend, "exception" if case.expect == "raised" else "weight")
    caught = explain_training(planted, case.problem, [(case.name, case.model)])
    assert not caught.explained, f"the planted error hides behind {case.name}'s model: {caught.detail}"


def test_every_training_case_file_loads_and_names_a_training_backend():
    names = [c.name for c in CASES]
    assert len(names) == len(set(names)) == len(training_case_files())
    for c in CASES:
        assert c.path is not None and c.path.stem == c.name
        assert c.summary and c.scope and c.model is not None
        assert c.reproduced or "not reproduced" in c.found.get("status", ""), c.name


@pytest.mark.skipif(not TORCHREC, reason="fbgemm-gpu-cpu is not installed")
@pytest.mark.parametrize("variant", ["fbgemm-tbe-int32", "fbgemm-tbe-none"])
def test_a_case_explains_its_variants_runs_and_no_other_backend(variant):
    """The same FBGEMM kernel fed int32 indices, or with another bounds-check mode, fails as the
    case's model says: it is known there; another library's backend is not in its scope."""
    case = next(c for c in CASES if c.name == "fbgemm-tbe-float16-sgd-rounds-twice")
    assert variant in case.variants and not case.in_scope("torchrec-fused", case.problem)
    backend = load_backend(variant)
    failed = check_training(backend, case.problem)
    assert failed.outcome is Outcome.DISAGREE
    assert mark_known_training(failed, backend, case.problem, CASES).outcome is Outcome.KNOWN
    assert mark_known_training(failed, backend, case.problem, []).outcome is Outcome.DISAGREE


def test_a_model_explains_nothing_it_does_not_claim():
    """WeightDecayIgnored on a problem without decay, DoubleRounded without float16 tables: they
    claim no table, so a wrong result is not explained (and a right one is not 'known')."""
    tables = [TableConfig("t0", 2, 4, ("f0",), Pooling.SUM, F32)]
    batch = JaggedBatch.from_bags({"f0": [[0]]})
    problem = TrainingProblem.of(
        tables, {"t0": torch.ones(2, 4)}, OptimizerConfig("sgd", 0.5), [(batch, torch.ones(1, 4))]
    )
    from harness.training.known import ModelledTrainingOracle

    oracle = ModelledTrainingOracle(
        tables, problem.optimizer, [("wd", WeightDecayIgnored()), ("x2", DoubleRounded())]
    )
    assert oracle.used == ()
    wrong = Planted(load_backend("torch"))
    assert not explain_training(
        wrong, problem, [("wd", WeightDecayIgnored()), ("x2", DoubleRounded())]
    ).explained


def test_column_shard_widths_follow_the_training_plan():
    assert column_shard_widths(8, 2, 4) == [4, 4]
    assert column_shard_widths(12, 2, 4) == [8, 4]
    assert column_shard_widths(4, 2, 4) == [4]
    assert column_shard_widths(6, 2, 4) == [6]
    from impls.torchrec_sharded_worker import training_column_widths

    assert (
        training_column_widths(20, 2)
        == [12, 8]
        == RowwiseStatePerColumnShard(2, 4).widths(TableConfig("t", 1, 20, ("f",)))
    )


@needs_torchrec
def test_known_cases_explain_generated_runs_beyond_their_own_problem():
    """The fbgemm-tbe cases, together, explain its runs on generated problems with weight decay
    and float16 tables (every such run fails the contract), and only with their models."""
    backend = load_backend("fbgemm-tbe")
    explained = 0

    @settings(
        max_examples=12,
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(
        training_specs(
            kinds=["sgd"],
            weight_decay_modes=["l2"],
            tables=_tables([F16], dim4=True),
            max_cost=2**12,
            max_batch_size=8,
        )
    )
    def run(spec):
        nonlocal explained
        problem = build_training_problem(spec)
        if not problem.optimizer.decays or backend.supports_training(
            problem.tables, problem.steps[0].batch, problem.optimizer
        ):
            return
        verdict = check_training(backend, problem)
        if verdict.outcome is not Outcome.DISAGREE:
            return
        explanation, used = explain_with_cases(backend, problem, CASES)
        assert explanation.explained, explanation.detail
        explained += 1
        assert not explain_training(Planted(backend), problem, [(c.name, c.model) for c in used]).explained

    run()
    assert explained >= 3


# ---------------------------------------------------------------------------------------------
# The sharded rank pool in training: errors surface with the rank, and the pool carries on.


def test_sharded_training_error_names_the_rank_and_the_pool_carries_on(sharded):
    problem = _two_step_problem(OptimizerConfig("sgd", 0.1))
    step = sharded["tw"].prepare_training(problem.tables, problem.weights, problem.optimizer)
    first = problem.steps[0]
    step(first.batch, first.grad_output)
    weighted = JaggedBatch(
        first.batch.keys, first.batch.values, first.batch.lengths, torch.ones(len(first.batch.values))
    )
    with pytest.raises(
        RuntimeError, match=r"rank \d raised ValueError: the training module was built for unweighted"
    ):
        step(weighted, first.grad_output)
    assert check_training(sharded["tw"], problem).outcome is Outcome.AGREE
