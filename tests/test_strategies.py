"""The public strategies: argument checks, validity, and that they reach what the fuzzer needs."""

import pytest
import torch
from hypothesis import Phase, find, given, settings
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument

from harness.agreement import Oracle
from harness.fuzz.metamorphic import permute_bags, split_table, within
from harness.fuzz.strategies import (
    WEIGHT_PROFILES,
    jagged_batches,
    make_profile_weights,
    per_sample_weights,
    problems,
    table_configs,
    table_weights,
)
from harness.model import Pooling, Problem, TableConfig
from harness.validate import validate_problem

T = TableConfig("t", 10, 3, ("a", "b"), Pooling.MEAN)


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Generation runs many tiny torch ops: on a shared 2-core machine one thread is far faster."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize(
    "make",
    [
        lambda: table_configs(min_tables=0),
        lambda: table_configs(min_tables=3, max_tables=2),
        lambda: table_configs(max_dim=1.5),
        lambda: table_configs(dtypes=[torch.float64]),
        lambda: table_configs(dtypes=[]),
        lambda: table_configs(poolings="sum"),
        lambda: jagged_batches([]),
        lambda: jagged_batches(T),
        lambda: jagged_batches([T], weighted=True),
        lambda: jagged_batches([T], max_batch_size=-1),
        lambda: jagged_batches([T], max_bag_length=10, max_long_bag_length=5),
        lambda: jagged_batches([T], id_dtypes=[torch.int16]),
        lambda: per_sample_weights(size=-1),
        lambda: table_weights(T, profiles=["nope"]),
        lambda: problems(tables=[T]),
        lambda: problems(weighted="yes"),
        lambda: problems(max_batch_size=True),
    ],
)
def test_bad_arguments_raise_invalid_argument(make):
    with pytest.raises(InvalidArgument):
        make().validate()


@settings(max_examples=40)
@given(problems())
def test_every_generated_problem_is_valid(problem):
    assert validate_problem(problem.tables, problem.batch, problem.weights) is problem.batch


@settings(max_examples=25)
@given(st.data())
def test_strategies_compose(data):
    tables = data.draw(table_configs(max_tables=2, dtypes=[torch.float16], poolings=[Pooling.SUM]))
    batch = data.draw(jagged_batches(tables, weighted=True, max_batch_size=5, id_dtypes=[torch.int32]))
    weights = {t.name: data.draw(table_weights(t, profiles=["integers"])) for t in tables}
    validate_problem(tables, batch, weights)
    assert batch.weights is not None and batch.values.dtype == torch.int32
    assert all(w.dtype == torch.float16 and w.abs().max() <= 4 for w in weights.values())


def _has(predicate, strategy):
    """An example of ``strategy`` that satisfies ``predicate`` is found (no shrinking)."""
    find(
        strategy,
        predicate,
        settings=settings(max_examples=1500, phases=[Phase.generate], database=None, deadline=None),
    )


ONE_TABLE = (TableConfig("t", 5, 1, ("f",)),)


def _bags(p: Problem):
    offsets = p.batch.offsets.tolist()
    return [p.batch.values[offsets[i] : offsets[i + 1]].tolist() for i in range(len(p.batch.lengths))]


def _tables_of_keys(p: Problem):
    return {f: t for t in p.tables for f in t.feature_names}


REACHES = {
    "several tables, one shared": lambda p: (
        len(p.tables) >= 2 and any(len(t.feature_names) > 1 for t in p.tables)
    ),
    "batch keys in another order": lambda p: (
        list(p.batch.keys) != [f for t in p.tables for f in t.feature_names]
    ),
    "dim 1": lambda p: any(t.embedding_dim == 1 for t in p.tables),
    "odd dim above 8": lambda p: any(t.embedding_dim > 8 and t.embedding_dim % 2 for t in p.tables),
    "1-row table": lambda p: any(t.num_embeddings == 1 for t in p.tables),
    "table > 10000 rows": lambda p: any(t.num_embeddings > 10_000 for t in p.tables),
    "batch size 0": lambda p: p.batch.batch_size == 0,
    "batch size 1": lambda p: p.batch.batch_size == 1,
    "empty and length-1 bags": lambda p: 0 in p.batch.lengths.tolist() and 1 in p.batch.lengths.tolist(),
    "duplicate ids in a bag": lambda p: any(len(set(b)) < len(b) for b in _bags(p)),
    "ids 0 and num_embeddings - 1 (> 0)": lambda p: any(
        t.num_embeddings > 1
        and 0 in p.batch.bag(f, s).tolist()
        and t.num_embeddings - 1 in p.batch.bag(f, s).tolist()
        for f, t in _tables_of_keys(p).items()
        for s in range(p.batch.batch_size)
    ),
    "MEAN": lambda p: any(t.pooling is Pooling.MEAN for t in p.tables),
    "zero and negative per-sample weights": lambda p: (
        p.batch.weights is not None
        and bool((p.batch.weights == 0).any())
        and bool((p.batch.weights < 0).any())
    ),
    "bfloat16 and float16 tables": lambda p: {torch.bfloat16, torch.float16} <= {t.dtype for t in p.tables},
    "int32 ids": lambda p: p.batch.values.dtype == torch.int32,
    "subnormal weights": lambda p: any(
        bool(((w != 0) & (w.abs() < torch.finfo(w.dtype).tiny)).any()) for w in p.weights.values()
    ),
}


@pytest.mark.filterwarnings("ignore:Generating overly large repr")
@pytest.mark.parametrize("name", list(REACHES))
def test_problems_reach(name):
    _has(REACHES[name], problems())


@pytest.mark.parametrize(
    "name, predicate",
    [
        ("batch size > 100", lambda b: b.batch_size > 100),
        ("bag of 1000+ ids", lambda b: len(b.lengths) > 0 and int(b.lengths.max()) >= 1000),
        ("weighted long bag", lambda b: b.weights is not None and len(b.weights) >= 1000),
    ],
)
def test_batches_reach(name, predicate):
    _has(predicate, jagged_batches(ONE_TABLE))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_weight_profiles_span_the_dtype_range(dtype):
    info = torch.finfo(dtype)
    t = TableConfig("t", 50, 8, ("f",), dtype=dtype)
    ws = {p: make_profile_weights(t, p, 3).to(torch.float64).abs() for p in WEIGHT_PROFILES}
    assert all(torch.isfinite(w).all() for w in ws.values())
    assert ws["huge"].max() >= info.max / 8
    assert ws["tiny"].min() >= info.tiny and ws["tiny"].max() <= 8 * info.tiny
    assert ((ws["subnormal"] < info.tiny) & (ws["subnormal"] > 0)).any()
    assert ws["wide"].max() > 2**10 * ws["wide"][ws["wide"] > 0].min()
    cancel = make_profile_weights(t, "cancel", 3).to(torch.float64)
    assert ((cancel[0] + cancel[1]).abs() < cancel[0].abs() / 8).all()
    assert torch.equal(make_profile_weights(t, "wide", 3), make_profile_weights(t, "wide", 3))


def test_large_tables_are_built_from_a_block():
    t = TableConfig("t", 100_000, 4, ("f",))
    w = make_profile_weights(t, "unit", 1)
    assert w.shape == (100_000, 4) and w.is_contiguous()


@settings(max_examples=30)
@given(problems(max_batch_size=20), st.integers(0, 2**31 - 1))
def test_metamorphic_transformations_keep_the_reference(problem, seed):
    oracle = Oracle.of(problem.tables, problem.weights, problem.batch)
    ref = oracle.reference.value

    permuted = permute_bags(problem.batch, seed)
    assert permuted.lengths.tolist() == problem.batch.lengths.tolist()
    assert within(Oracle.of(problem.tables, problem.weights, permuted).reference.value, ref, oracle.bound)[0]

    b = problem.batch.batch_size
    k = seed % (b + 1)
    halves = [problem.batch.select_samples(0, k), problem.batch.select_samples(k, b)]
    parts = [Oracle.of(problem.tables, problem.weights, h).reference.value for h in halves]
    assert torch.equal(torch.cat(parts), ref)

    split = split_table(problem)
    if split is not None:
        assert len(split.tables) == len(problem.tables) + 1
        validate_problem(split.tables, split.batch, split.weights)
        assert torch.equal(Oracle.of(split.tables, split.weights, split.batch).reference.value, ref)
