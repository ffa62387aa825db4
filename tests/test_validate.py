"""Every malformed problem is rejected before any backend runs, with a message naming what and where."""

import contextlib
import signal

import pytest
import torch

from harness.agreement import check_agreement
from harness.model import JaggedBatch, Pooling, TableConfig
from harness.validate import ProblemError, check_lookup_batch, validate_problem
from harness.weights import make_weights


def tables(**kw):
    base = dict(name="t", num_embeddings=10, embedding_dim=4, feature_names=("f",), pooling=Pooling.SUM)
    base.update(kw)
    return [TableConfig(**base)]


def batch(values=(1, 2, 3), lengths=(1, 2), keys=("f",), weights=None, id_dtype=torch.int64):
    return JaggedBatch(keys, torch.tensor(values, dtype=id_dtype), torch.tensor(lengths), weights)


def rejects(match, tbls, b, weights=None, **kw):
    with pytest.raises(ProblemError, match=match):
        validate_problem(tbls, b, weights, **kw)


def test_a_valid_problem_passes_unchanged():
    b = batch()
    assert validate_problem(tables(), b, make_weights(tables())) is b


def test_id_out_of_range_names_feature_sample_position_value_and_table_size():
    rejects(
        r"id out of range: feature 'f', sample 1, position 1 in its bag \(position 2 of the "
        r"feature's ids\) has id 10; table 't' has num_embeddings 10",
        tables(),
        batch((1, 2, 10)),
    )


def test_negative_id_is_named():
    rejects(r"negative id: feature 'f', sample 0, position 0 .* has id -1", tables(), batch((-1, 2, 3)))


def test_id_in_second_feature_is_located_within_that_feature():
    t = [TableConfig("a", 10, 4, ("f",)), TableConfig("b", 3, 4, ("g",))]
    b = JaggedBatch.from_bags({"f": [[9], [9]], "g": [[0, 1], [2, 3]]})
    rejects(r"feature 'g', sample 1, position 1 .* has id 3; table 'b' has num_embeddings 3", t, b)


def test_ids_valid_for_their_own_table_pass_whatever_the_other_tables_sizes():
    t = [TableConfig("a", 3, 4, ("f",)), TableConfig("b", 100, 4, ("g", "h"))]
    b = JaggedBatch.from_bags({"h": [[99], []], "f": [[2], [0, 1]], "g": [[50, 3], [98]]})
    assert validate_problem(t, b) is b
    hashed = validate_problem(
        t, JaggedBatch.from_bags({"g": [[150]], "h": [[-1]], "f": [[4, 5]]}), id_policy="modulo"
    )
    assert hashed.values.tolist() == [50, 99, 1, 2]


def test_negative_length():
    rejects(r"negative length -1 for feature 'f', sample 1 \(lengths\[1\]\)", tables(), batch((1,), (2, -1)))


def test_lengths_do_not_add_up():
    rejects(r"sum\(lengths\) = 4 but values has 3 ids", tables(), batch(lengths=(2, 2)))


WRAPPING = dict(values=(1, 2), lengths=(2**63 - 1, 2**63 - 1, 4, 0), keys=("a", "b"))  # int64 sum: 2


def test_lengths_whose_int64_sum_wraps_around_are_rejected():
    rejects(
        r"length 9223372036854775807 for feature 'a', sample 0 \(lengths\[0\]\) is larger than the 2 ids",
        tables(feature_names=("a", "b")),
        batch(**WRAPPING),
    )


@contextlib.contextmanager
def _alarm(seconds: int):
    """Raise TimeoutError in this thread after ``seconds`` (a hung lookup fails the test)."""

    def expired(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_triton_lookup_called_directly_rejects_lengths_whose_sum_wraps():
    pytest.importorskip("triton")
    from impls.triton_fused import triton_interpreted

    t = tables(feature_names=("a", "b"))
    lookup = triton_interpreted().prepare(t, make_weights(t))
    with (
        _alarm(20),
        pytest.raises(ProblemError, match=r"length 9223372036854775807 for feature 'a', sample 0"),
    ):
        lookup(batch(**WRAPPING))


def test_lengths_not_a_multiple_of_keys():
    t = [TableConfig("t", 10, 4, ("f", "g"))]
    rejects(
        r"lengths has 3 entries, not a multiple of the 2 keys", t, batch(lengths=(1, 1, 1), keys=("f", "g"))
    )


def test_weights_of_wrong_length():
    rejects(r"per-sample weights have shape \(2,\), expected \(3,\)", tables(), batch(weights=torch.ones(2)))


def test_weights_of_wrong_dtype():
    rejects(
        r"per-sample weights must be a float32 CPU tensor, got float64 of shape \(3,\) on cpu",
        tables(),
        batch(weights=torch.ones(3, dtype=torch.float64)),
    )


def test_ids_that_are_not_integers():
    b = JaggedBatch(("f",), torch.tensor([1.0, 2.0]), torch.tensor([2]))
    rejects(r"ids \(values\) must be int64 or int32, got float32 \(ids are not integers\)", tables(), b)


def test_a_batch_off_the_cpu_is_rejected_unless_the_lookup_moves_it():
    on_meta = JaggedBatch(
        ("f",), torch.zeros(3, dtype=torch.int64, device="meta"), torch.zeros(2, dtype=torch.int64)
    )
    rejects(r"ids \(values\) must be a 1-D CPU tensor, got int64 of shape \(3,\) on meta", tables(), on_meta)
    with pytest.raises(ProblemError, match=r"got int64 of shape \(3,\) on meta"):
        check_lookup_batch(on_meta, tables(), device="cpu")
    check_lookup_batch(on_meta, tables(), device=None)


def test_a_lookup_check_scans_the_tables_for_mean_unless_told():
    weighted = batch(weights=torch.ones(3))
    with pytest.raises(ProblemError, match=r"but table 't' \(features \['f'\]\) pools MEAN"):
        check_lookup_batch(weighted, tables(pooling=Pooling.MEAN), device="cpu")
    check_lookup_batch(weighted, tables(), device="cpu")
    check_lookup_batch(weighted, tables(pooling=Pooling.MEAN), device="cpu", has_mean=False)


def test_int32_ids_are_accepted_and_int16_are_not():
    validate_problem(tables(), batch(id_dtype=torch.int32))
    rejects(r"must be int64 or int32, got int16", tables(), batch(id_dtype=torch.int16))


def test_batch_key_no_table_declares():
    t = [TableConfig("t", 10, 4, ("f",))]
    rejects(r"batch key 'g' is not a feature of any table", t, batch(lengths=(1, 1, 1, 0), keys=("f", "g")))


def test_table_feature_missing_from_batch():
    rejects(r"feature 'g' of table 't' is missing from the batch", tables(feature_names=("f", "g")), batch())


def test_feature_declared_by_two_tables():
    t = [TableConfig("a", 10, 4, ("f",)), TableConfig("b", 10, 4, ("f",))]
    rejects(r"feature 'f' is declared by tables 'a' and 'b'", t, batch())


def test_duplicate_table_names():
    t = [TableConfig("a", 10, 4, ("f",)), TableConfig("a", 10, 4, ("g",))]
    rejects(r"duplicate table name 'a' \(tables\[1\]\)", t, batch())


@pytest.mark.parametrize("field", ["num_embeddings", "embedding_dim"])
@pytest.mark.parametrize("value", [0, -3])
def test_non_positive_sizes(field, value):
    rejects(rf"table 't': {field} must be a positive integer, got {value}", tables(**{field: value}), batch())


def test_unsupported_dtype():
    rejects(
        r"table 't': unsupported dtype torch.float64; supported: float32, float16, bfloat16",
        tables(dtype=torch.float64),
        batch(),
    )


def test_per_sample_weights_with_mean_pooling():
    rejects(
        r"per-sample weights require SUM pooling, but table 't' \(features \['f'\]\) pools MEAN",
        tables(pooling=Pooling.MEAN),
        batch(weights=torch.ones(3)),
    )


def test_table_weights_of_wrong_shape_or_dtype():
    t = tables()
    rejects(
        r"weights of table 't' have shape \(10, 3\), expected \(10, 4\)",
        t,
        batch(),
        {"t": torch.zeros(10, 3)},
    )
    rejects(
        r"weights of table 't' are float16, but the table's dtype is float32",
        t,
        batch(),
        {"t": torch.zeros(10, 4, dtype=torch.float16)},
    )
    rejects(r"no weights for table 't'", t, batch(), {})


def test_no_tables():
    rejects(r"no tables", [], batch())


def test_modulo_policy_hashes_ids_into_a_new_batch_without_touching_the_input():
    b = batch((12, -1, 3))
    before = b.values.clone()
    hashed = validate_problem(tables(), b, id_policy="modulo")
    assert hashed.values.tolist() == [2, 9, 3]
    assert torch.equal(b.values, before)
    assert hashed is not b


def test_unknown_id_policy():
    rejects(r"unknown id policy 'wrap'", tables(), batch(), id_policy="wrap")


class Exploding:
    name = "exploding"

    def supports(self, tables, batch):
        raise AssertionError("a backend was called on a malformed problem")

    def prepare(self, tables, weights):
        raise AssertionError("a backend was called on a malformed problem")


def test_no_backend_runs_on_a_malformed_problem():
    t = tables()
    with pytest.raises(ProblemError, match="id out of range"):
        check_agreement([Exploding()], t, make_weights(t), batch((1, 2, 99)))
