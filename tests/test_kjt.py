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
