"""Conversion to and from torchrec's KeyedJaggedTensor (skipped, with the reason, without torchrec)."""

import pytest
import torch

from harness.model import JaggedBatch

jt = pytest.importorskip("torchrec.sparse.jagged_tensor", reason="torchrec is not installed")


def test_round_trip_through_keyed_jagged_tensor():
    batch = JaggedBatch(
        ("product", "user"),
        torch.tensor([1, 2, 1, 5, 2, 3, 4, 1]),
        torch.tensor([3, 1, 2, 2]),
        torch.arange(8, dtype=torch.float32),
    )
    kjt = batch.to_kjt()
    assert isinstance(kjt, jt.KeyedJaggedTensor)
    assert kjt.keys() == ["product", "user"]
    assert kjt["user"].values().tolist() == [2, 3, 4, 1]
    back = JaggedBatch.from_kjt(kjt)
    assert back.keys == batch.keys
    assert torch.equal(back.values, batch.values) and torch.equal(back.lengths, batch.lengths)
    assert torch.equal(back.weights, batch.weights)
    assert torch.equal(kjt.offsets(), batch.offsets)


def test_a_kjt_with_a_variable_stride_per_key_is_rejected_naming_each_keys_batch_size():
    kjt = jt.KeyedJaggedTensor(
        keys=["a", "b"],
        values=torch.tensor([1, 2, 3, 4]),
        lengths=torch.tensor([1, 1, 2]),
        stride_per_key_per_rank=[[1], [2]],
    )
    with pytest.raises(ValueError, match=r"variable stride per key \(batch sizes 'a': 1, 'b': 2"):
        JaggedBatch.from_kjt(kjt)


def test_a_kjt_whose_keys_all_have_the_same_variable_stride_is_a_batch():
    kjt = jt.KeyedJaggedTensor(
        keys=["a", "b"],
        values=torch.tensor([1, 2, 3, 4]),
        lengths=torch.tensor([1, 1, 2, 0]),
        stride_per_key_per_rank=[[2], [2]],
    )
    batch = JaggedBatch.from_kjt(kjt)
    assert batch.batch_size == 2 and batch.bag("b", 0).tolist() == [3, 4]
