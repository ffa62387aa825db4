"""The fast float64 reference (`pool`) against its readable definition (`pool_loop`).

Both add each bag's float64 terms in bag order, so every field but ``tree_sum`` must agree to the
last bit; ``tree_sum`` is exact in the loop and an upper bound in `pool` (never below it).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness.agreement import Oracle
from harness.fuzz.strategies import (
    ID_DISTRIBUTIONS,
    LENGTH_PROFILES,
    SAMPLE_WEIGHT_PROFILES,
    WEIGHT_PROFILES,
    jagged_batches,
    problems,
    table_configs,
)
from harness.model import JaggedBatch, Pooling, TableConfig
from harness.reference.forward import exact_tree_sum, pool, pool_loop, pool_with_tolerance
from harness.validate import validate_problem
from harness.weights import make_weights

# Sizes the loop reference gets through in milliseconds, long bags (the tree-bound path) included.
SMALL = dict(
    max_cost=12_000,
    max_tables=4,
    max_features=8,
    max_dim=40,
    max_batch_size=24,
    max_bag_length=64,
    max_long_bag_length=300,
)
EXACT_FIELDS = ("value", "magnitude", "positive", "negative", "bag_length", "is_mean")
LOOP_SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def assert_same_as_the_loop(tables, weights, batch) -> None:
    fast, loop = pool(tables, weights, batch), pool_loop(tables, weights, batch)
    for name in EXACT_FIELDS:
        a, b = getattr(fast, name), getattr(loop, name)
        assert a.dtype == b.dtype and a.shape == b.shape, name
        same = (a == b) | (torch.isnan(a) & torch.isnan(b)) if a.is_floating_point() else a == b
        assert bool(same.all()), f"{name} differs at {same.logical_not().nonzero()[0].tolist()}"
    finite = torch.isfinite(loop.tree_sum)
    assert bool((fast.tree_sum[finite] >= loop.tree_sum[finite] * (1 - 1e-12)).all()), "tree_sum below exact"
    classic = (loop.term_count - 1).clamp(min=0) * loop.magnitude  # (n - 1) S over its n terms
    assert bool((fast.tree_sum[finite] <= classic[finite] * (1 + 1e-9)).all()), "tree_sum above (n-1) S"


@LOOP_SETTINGS
@given(problems(**SMALL))
def test_fast_pool_is_the_loop_on_the_default_strategy(problem):
    assert_same_as_the_loop(problem.tables, problem.weights, problem.batch)


@pytest.mark.parametrize("profile", WEIGHT_PROFILES)
@LOOP_SETTINGS
@given(data=st.data())
def test_fast_pool_is_the_loop_on_every_weight_profile(profile, data):
    p = data.draw(problems(profiles=[profile], **SMALL))
    assert_same_as_the_loop(p.tables, p.weights, p.batch)


@pytest.mark.parametrize("lengths", LENGTH_PROFILES)
@LOOP_SETTINGS
@given(data=st.data())
def test_fast_pool_is_the_loop_on_every_length_profile(lengths, data):
    p = data.draw(problems(length_profiles=[lengths], **SMALL))
    assert_same_as_the_loop(p.tables, p.weights, p.batch)


@pytest.mark.parametrize("sample_weights", SAMPLE_WEIGHT_PROFILES)
@LOOP_SETTINGS
@given(data=st.data())
def test_fast_pool_is_the_loop_on_every_per_sample_weight_profile(sample_weights, data):
    p = data.draw(problems(weighted=True, sample_weight_profiles=[sample_weights], **SMALL))
    assert_same_as_the_loop(p.tables, p.weights, p.batch)


@LOOP_SETTINGS
@given(data=st.data(), ids=st.sampled_from(ID_DISTRIBUTIONS))
def test_fast_pool_is_the_loop_on_composed_tables_and_batches(data, ids):
    tables = data.draw(table_configs(max_tables=3, max_dim=24, max_num_embeddings=2000))
    batch = data.draw(
        jagged_batches(
            tables,
            max_batch_size=16,
            max_bag_length=40,
            max_long_bag_length=200,
            id_distributions=[ids],
            max_cost=10_000,
        )
    )
    weights = make_weights(tables, seed=3)
    assert_same_as_the_loop(tables, weights, batch)


def test_non_finite_rows_half_precision_and_empty_bags():
    big = torch.finfo(torch.float16).max
    tables = [
        TableConfig("h", 4, 3, ("f", "g"), Pooling.MEAN, torch.float16),
        TableConfig("b", 3, 2, ("k",), Pooling.SUM, torch.bfloat16),
    ]
    weights = {
        "h": torch.tensor(
            [[1, -2, 0.5], [float("inf"), float("nan"), -float("inf")], [big, big, -big], [0, -0.0, 6e-8]]
        ).half(),
        "b": torch.tensor([[1e38, -1e38], [3e-39, float("nan")], [-1.5, 2.25]]).bfloat16(),
    }
    batch = JaggedBatch.from_bags(
        {"g": [[], [0, 1], [2, 2, 3]], "k": [[0, 0, 1], [], [2]], "f": [[3], [2] * 40, []]}
    )
    assert_same_as_the_loop(tables, weights, batch)
    ref = pool(tables, weights, batch)
    empty = ref.bag_length == 0
    assert bool((ref.value[empty] == 0).all()) and bool(
        (Oracle.of(tables, weights, batch).bound[empty] == 0).all()
    )


def test_per_sample_weights_int32_ids_and_keys_out_of_table_order():
    tables = [TableConfig("a", 5, 4, ("x",)), TableConfig("c", 9, 1, ("y", "z"))]
    weights = make_weights(tables, seed=5)
    batch = JaggedBatch.from_bags(
        {"z": [[8], [0, 1, 2]], "x": [[4, 4], []], "y": [[], [3]]},
        weights={"z": [[2.0], [-1.0, 0.0, 1e30]], "x": [[0.5, -0.25], []], "y": [[], [3.0]]},
        id_dtype=torch.int32,
    )
    assert_same_as_the_loop(tables, weights, batch)


def test_exact_tree_sum_is_the_caterpillar_with_the_largest_terms_deepest():
    terms = torch.tensor([[3.0], [-1.0], [2.0], [0.0]])
    # sorted magnitudes 3, 2, 1, 0: P_2 + P_3 + P_4 = 5 + 6 + 6
    assert float(exact_tree_sum(terms)) == 17.0
    assert float(exact_tree_sum(torch.tensor([[1.0], [float("nan")]]))) == 1.0


def test_bad_ids_and_bags_raise_instead_of_reading_out_of_bounds():
    tables = [TableConfig("t", 3, 2, ("f",))]
    weights = make_weights(tables)
    with pytest.raises(ValueError, match=r"id 3 at values\[1\] is outside table 't' \(3 rows\)"):
        pool(tables, weights, JaggedBatch.from_bags({"f": [[0, 3]]}))
    with pytest.raises(ValueError, match=r"id -1 at values\[0\]"):
        pool(tables, weights, JaggedBatch.from_bags({"f": [[-1]]}))
    wraps = JaggedBatch(("f",), torch.tensor([0, 1]), torch.tensor([2**63 - 1, 2**63 - 1, 4]))
    with pytest.raises(ValueError, match=r"feature 'f', sample 0 \(lengths\[0\]\) does not fit the 2 ids"):
        pool(tables, weights, wraps)


def test_the_oracle_pools_with_the_fast_reference_and_the_problem_stays_untouched():
    tables = [TableConfig("t", 6, 3, ("f", "g"), Pooling.MEAN)]
    weights = make_weights(tables, seed=1)
    batch = validate_problem(tables, JaggedBatch.from_bags({"f": [[1, 2, 5], [0]], "g": [[], [3, 3]]}))
    before = (weights["t"].clone(), batch.values.clone(), batch.lengths.clone())
    oracle = Oracle.of(tables, weights, batch)
    assert torch.equal(oracle.reference.value, pool_loop(tables, weights, batch).value)
    assert oracle.reference.value.dtype == torch.float64 and oracle.bound.shape == (2, 6)
    assert all(
        torch.equal(a, b) for a, b in zip(before, (weights["t"], batch.values, batch.lengths), strict=True)
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_every_16_bit_pattern_widens_exactly(dtype):
    rows = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)[:, None]
    tables = [TableConfig("t", len(rows), 1, ("f",), Pooling.SUM, dtype)]
    batch = JaggedBatch(("f",), torch.arange(len(rows)), torch.ones(len(rows), dtype=torch.int64))
    got, want = pool(tables, {"t": rows}, batch).value, rows.double()
    assert bool(((got == want) | (torch.isnan(got) & torch.isnan(want))).all())


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and bool(((a == b) | (torch.isnan(a) & torch.isnan(b))).all())


@LOOP_SETTINGS
@given(problems(**SMALL))
def test_the_oracle_pass_gives_the_full_pass_value_and_tolerance(problem):
    full = pool(problem.tables, problem.weights, problem.batch)
    tolerance = full.tolerance()
    reference, fused = pool_with_tolerance(problem.tables, problem.weights, problem.batch)
    assert _same(reference.value, full.value) and _same(reference.bag_length, full.bag_length)
    assert _same(fused.classes, tolerance.classes)
    close = (fused.bound - tolerance.bound).abs() <= 1e-12 * tolerance.bound
    assert bool((close | (fused.bound == tolerance.bound) | torch.isnan(tolerance.bound)).all())
