"""The problem model and the worked examples of the seed tutorial this project started from."""

import pytest
import torch

from harness.agreement import Outcome, check_agreement
from harness.backend import load_backend
from harness.model import JaggedBatch, Pooling, TableConfig, output_columns, total_dim
from harness.weights import make_weights


@pytest.mark.parametrize("pooling", [Pooling.SUM, Pooling.MEAN])
def test_the_reference_pools_a_bags_rows_by_sum_or_mean(pooling):
    # The tutorial's example (ids 1 and 3 of a 10-row table), through our problem model and oracle.
    tables = [TableConfig("t", 10, 4, ("f",), pooling)]
    weights = {"t": torch.arange(40, dtype=torch.float32).reshape(10, 4)}
    batch = JaggedBatch.from_bags({"f": [[1, 3], []]})
    out = load_backend("reference").prepare(tables, weights)(batch)
    rows = weights["t"][1] + weights["t"][3]
    expected = rows / 2 if pooling is Pooling.MEAN else rows
    assert out.tolist() == [expected.tolist(), [0.0] * 4]


def test_offsets_derive_from_lengths_and_split_values_into_bags():
    batch = JaggedBatch(("f",), torch.tensor([5, 7, 1]), torch.tensor([1, 2]))
    assert batch.offsets.tolist() == [0, 1, 3]
    assert batch.bag("f", 0).tolist() == [5]
    assert batch.bag("f", 1).tolist() == [7, 1]
    assert batch.batch_size == 2


def test_two_features_combine_feature_major():
    batch = JaggedBatch.from_bags({"product": [[1, 2, 1], [5]], "user": [[2, 3], [4, 1]]})
    assert batch.lengths.tolist() == [3, 1, 2, 2]
    assert batch.values.tolist() == [1, 2, 1, 5, 2, 3, 4, 1]
    assert batch.keys == ("product", "user")


def test_two_tables_pool_to_product_columns_first():
    tables = [
        TableConfig("product_table", 4096, 64, ("product",), Pooling.SUM),
        TableConfig("user_table", 4096, 64, ("user",), Pooling.SUM),
    ]
    weights = make_weights(tables, seed=1)
    # The batch lists "user" first: columns still follow the tables' order.
    batch = JaggedBatch.from_bags({"user": [[2, 3], [4, 1]], "product": [[1, 2, 1], [5]]})
    out = load_backend("torch").prepare(tables, weights)(batch)
    assert out.shape == (2, 128) and out.dtype == torch.float32
    product, user = weights["product_table"], weights["user_table"]
    assert torch.allclose(out[0, :64], product[1] + product[2] + product[1])
    assert torch.allclose(out[1, :64], product[5])
    assert torch.allclose(out[0, 64:], user[2] + user[3])
    assert total_dim(tables) == 128
    assert [c[:3] for c in output_columns(tables)] == [
        ("product_table", "product", 0),
        ("user_table", "user", 64),
    ]


def test_shared_table_columns_follow_feature_names_order():
    tables = [TableConfig("t", 5, 2, ("a", "b"), Pooling.MEAN)]
    weights = {"t": torch.arange(10, dtype=torch.float32).reshape(5, 2)}
    batch = JaggedBatch.from_bags({"b": [[4]], "a": [[0, 1]]})
    out = load_backend("reference").prepare(tables, weights)(batch)
    assert out.tolist() == [[1.0, 2.0, 8.0, 9.0]]


def test_weights_are_seeded_per_table():
    t1 = TableConfig("a", 7, 3, ("x",), dtype=torch.bfloat16)
    t2 = TableConfig("b", 7, 3, ("y",))
    one = make_weights([t1], seed=3)
    both = make_weights([t1, t2], seed=3)
    assert torch.equal(one["a"], both["a"]) and one["a"].dtype == torch.bfloat16
    assert not torch.equal(make_weights([t1], seed=4)["a"], one["a"])


def test_pooling_accepts_its_string_value():
    assert TableConfig("t", 1, 1, ["f"], "mean").pooling is Pooling.MEAN


def test_agreement_check_on_empty_batch_and_empty_bags():
    tables = [TableConfig("t", 3, 5, ("f", "g"), Pooling.MEAN)]
    weights = make_weights(tables)
    backends = [load_backend("torch")]
    for bags in ({"f": [], "g": []}, {"f": [[], [1]], "g": [[2, 2], []]}):
        verdicts = check_agreement(backends, tables, weights, JaggedBatch.from_bags(bags))
        assert [v.outcome for v in verdicts] == [Outcome.AGREE], verdicts


def test_select_samples_takes_every_features_bags_of_those_samples():
    bags = {"a": [[1, 2], [], [3], [4, 5, 6]], "b": [[7], [8, 9], [], [0]]}
    weights = {
        k: [[float(10 * i + j) for j in range(len(bag))] for i, bag in enumerate(v)] for k, v in bags.items()
    }
    batch = JaggedBatch.from_bags(bags, weights)
    part = batch.select_samples(1, 3)
    expected = JaggedBatch.from_bags(
        {k: v[1:3] for k, v in bags.items()}, {k: v[1:3] for k, v in weights.items()}
    )
    assert part.keys == batch.keys and part.batch_size == 2
    for got, want in ((part.values, expected.values), (part.lengths, expected.lengths)):
        assert got.tolist() == want.tolist() and got.dtype == want.dtype
    assert part.weights.tolist() == expected.weights.tolist()
    halves = [batch.select_samples(0, 2), batch.select_samples(2, 4)]
    assert [h.bag(k, s).tolist() for h in halves for k in ("a", "b") for s in (0, 1)] == [
        bags[k][s] for h in (0, 2) for k in ("a", "b") for s in (h, h + 1)
    ]
    part.values[0] = 99  # new tensors, not views of the batch's
    assert batch.values.tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9, 0]


def test_select_samples_of_nothing_and_out_of_range():
    batch = JaggedBatch.from_bags({"a": [[1], [2, 3]]})
    empty = batch.select_samples(1, 1)
    assert empty.batch_size == 0 and empty.values.tolist() == [] and empty.weights is None
    with pytest.raises(ValueError, match=r"samples \[1, 3\) are not within a batch of 2 samples"):
        batch.select_samples(1, 3)
