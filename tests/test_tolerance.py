"""The error bound and the comparison: what they accept and what they must reject."""

import torch

from harness.agreement import Outcome, check_agreement
from harness.model import JaggedBatch, Pooling, TableConfig
from harness.reference.forward import reference_pool
from harness.tolerance import U32, compare, error_bound, gamma
from harness.weights import make_weights


def test_gamma_matches_its_definition_and_saturates():
    assert float(gamma(torch.tensor(3), U32)) == 3 * U32 / (1 - 3 * U32)
    assert float(gamma(torch.tensor(2**24), U32)) == float("inf")


def test_empty_bag_must_be_exactly_zero():
    bound = error_bound(
        torch.zeros(1, 1, dtype=torch.float64),
        torch.zeros(1, 1, dtype=torch.int64),
        torch.zeros(1, 1, dtype=torch.bool),
    )
    assert float(bound) == 0.0
    ref = torch.zeros(1, 1, dtype=torch.float64)
    assert compare(torch.zeros(1, 1), ref, bound).agree
    assert not compare(torch.full((1, 1), 1e-45), ref, bound).agree


def test_float32_sequential_sum_is_within_the_bound_and_float16_is_not():
    torch.manual_seed(0)
    x = torch.randn(1000, 8, dtype=torch.float32)
    ref = x.double().sum(0, keepdim=True)
    mag = x.double().abs().sum(0, keepdim=True)
    bound = error_bound(mag, torch.full((1, 8), 1000), torch.zeros(1, 8, dtype=torch.bool))
    seq = torch.zeros(8, dtype=torch.float32)
    seq16 = torch.zeros(8, dtype=torch.float16)
    for row in x:
        seq = seq + row
        seq16 = seq16 + row.half()
    assert compare(seq[None], ref, bound).agree
    assert not compare(seq16.float()[None], ref, bound).agree


def test_shape_dtype_and_type_are_checked():
    ref = torch.zeros(2, 3, dtype=torch.float64)
    bound = torch.zeros(2, 3, dtype=torch.float64)
    assert "shape (3, 2)" in compare(torch.zeros(3, 2), ref, bound).describe()
    assert "torch.float64" in compare(torch.zeros(2, 3, dtype=torch.float64), ref, bound).describe()
    assert "not a tensor" in compare([[0.0]], ref, bound).describe()


def test_overflowing_partial_sums_are_unbounded_and_nan_reference_must_match():
    big = torch.finfo(torch.float32).max
    tables = [TableConfig("t", 2, 1, ("f",), Pooling.SUM)]
    weights = {"t": torch.tensor([[big], [-big]])}
    batch = JaggedBatch.from_bags({"f": [[0, 0, 1]]})
    ref = reference_pool(tables, weights, batch)
    bound = error_bound(ref.magnitude, ref.bag_length, ref.is_mean)
    assert torch.isinf(bound).all()
    assert compare(torch.tensor([[float("inf")]]), ref.value, bound).unbounded == 1
    nan_weights = {"t": torch.tensor([[float("nan")], [1.0]])}
    ref = reference_pool(tables, nan_weights, batch)
    bound = error_bound(ref.magnitude, ref.bag_length, ref.is_mean)
    assert compare(torch.tensor([[float("nan")]]), ref.value, bound).agree
    assert not compare(torch.tensor([[1.0]]), ref.value, bound).agree


class Float16Accumulator:
    """A plausible bug: pooling in the storage precision."""

    name = "fp16-acc"

    def supports(self, tables, batch):
        return None

    def prepare(self, tables, weights):
        from impls.torch_embedding_bag import TorchEmbeddingBag

        half = {k: w.half() for k, w in weights.items()}
        lookup = TorchEmbeddingBag().prepare(tables, half)
        return lookup


def test_agreement_reports_the_worst_element_of_a_float16_accumulator():
    tables = [TableConfig("t", 50, 8, ("f",), Pooling.SUM)]
    weights = make_weights(tables, seed=2)
    batch = JaggedBatch.from_bags({"f": [list(range(40)), [1, 2]]})
    (verdict,) = check_agreement([Float16Accumulator()], tables, weights, batch)
    assert verdict.outcome is Outcome.DISAGREE
    assert "worst element" in verdict.detail and "bound" in verdict.detail
    assert verdict.comparison.worst_ratio > 1


class Mutating:
    name = "mutating"

    def supports(self, tables, batch):
        return None

    def prepare(self, tables, weights):
        def lookup(batch):
            batch.values[0] = 0
            return reference_pool(tables, weights, batch).value.float()

        return lookup


class Raising:
    name = "raising"

    def supports(self, tables, batch):
        return None

    def prepare(self, tables, weights):
        raise RuntimeError("kernel exploded")


class Declining:
    name = "declining"

    def supports(self, tables, batch):
        return "bfloat16 tables are not supported"

    def prepare(self, tables, weights):
        raise AssertionError("never prepared")


def test_each_outcome_is_reported_with_its_detail():
    tables = [TableConfig("t", 5, 2, ("f",))]
    weights = make_weights(tables)
    batch = JaggedBatch.from_bags({"f": [[1, 2]]})
    verdicts = {
        v.backend: v for v in check_agreement([Mutating(), Raising(), Declining()], tables, weights, batch)
    }
    assert verdicts["mutating"].outcome is Outcome.MUTATED and "batch values" in verdicts["mutating"].detail
    assert verdicts["raising"].outcome is Outcome.RAISED and "kernel exploded" in verdicts["raising"].detail
    assert verdicts["declining"].outcome is Outcome.UNSUPPORTED
    assert verdicts["declining"].detail == "bfloat16 tables are not supported"
