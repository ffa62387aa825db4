"""The ``numba`` backend: agreement with the reference, bad-input errors, threads and the disk cache.

The kernel is compiled once per session (or loaded from numba's disk cache, ``impls/__pycache__``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from harness.agreement import Outcome, check_agreement
from harness.generate import random_problem
from harness.model import JaggedBatch, Pooling, TableConfig
from harness.weights import make_weights

pytest.importorskip("numba")

from impls import numba_fused  # noqa: E402
from impls.numba_fused import SERIAL_WORK, NumbaFused  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def backend() -> NumbaFused:
    return NumbaFused()


def assert_agrees(backend, tables, weights, batch) -> None:
    (verdict,) = check_agreement([backend], tables, weights, batch)
    assert verdict.outcome is Outcome.AGREE, verdict.detail


@pytest.mark.parametrize("seed", range(60))
def test_random_problems_agree(backend, seed):
    p = random_problem(seed)
    assert_agrees(backend, p.tables, p.weights, p.batch)


def table(name, rows, dim, features, pooling=Pooling.SUM, dtype=torch.float32) -> TableConfig:
    return TableConfig(name, rows, dim, tuple(features), pooling, dtype)


def bags_batch(tables, batch_size, seed, *, max_bag=6, id_dtype=torch.int64, weighted=False):
    gen = torch.Generator().manual_seed(seed)
    bags, weights = {}, {}
    for t in tables:
        for f in t.feature_names:
            bags[f] = [
                torch.randint(
                    0,
                    t.num_embeddings,
                    (int(torch.randint(0, max_bag + 1, (1,), generator=gen)),),
                    generator=gen,
                ).tolist()
                for _ in range(batch_size)
            ]
            weights[f] = [[float(x) for x in torch.randn(len(b), generator=gen)] for b in bags[f]]
    return JaggedBatch.from_bags(bags, weights if weighted else None, id_dtype=id_dtype)


EDGE_CASES = {
    "fp16": [table("a", 50, 8, ["x"], dtype=torch.float16)],
    "bf16 mean": [table("a", 50, 7, ["x"], Pooling.MEAN, torch.bfloat16)],
    "mixed dtypes and dims": [
        table("a", 30, 1, ["x"]),
        table("b", 40, 33, ["y", "z"], Pooling.MEAN, torch.float16),
        table("c", 20, 5, ["w"], dtype=torch.bfloat16),
    ],
    "dim 1": [table("a", 3, 1, ["x"])],
    "odd dim, shared table": [table("a", 11, 17, ["x", "y", "z"])],
    "one row": [table("a", 1, 4, ["x"], Pooling.MEAN)],
    "wide rows": [table("a", 9, 300, ["x"])],
}


@pytest.mark.parametrize("name", sorted(EDGE_CASES))
@pytest.mark.parametrize("id_dtype", [torch.int64, torch.int32], ids=["int64", "int32"])
@pytest.mark.parametrize("batch_size", [0, 1, 70])
def test_edge_cases_agree(backend, name, id_dtype, batch_size):
    tables = EDGE_CASES[name]
    batch = bags_batch(tables, batch_size, seed=batch_size, id_dtype=id_dtype)
    assert_agrees(backend, tables, make_weights(tables, seed=3), batch)


@pytest.mark.parametrize("name", sorted(EDGE_CASES))
def test_chunk_boundaries_agree(backend, name, monkeypatch):
    """Small chunks, so that a small batch spans many parallel work items and a ragged last one."""
    monkeypatch.setattr(numba_fused, "CHUNK", 7)
    monkeypatch.setattr(numba_fused, "SERIAL_WORK", 0)
    tables = EDGE_CASES[name]
    batch = bags_batch(tables, 30, seed=9, weighted=True)
    if any(t.pooling is Pooling.MEAN for t in tables):
        batch = JaggedBatch(batch.keys, batch.values, batch.lengths)
    assert_agrees(backend, tables, make_weights(tables, seed=4), batch)


@pytest.mark.parametrize("bag_major", [False, True], ids=["run-by-run", "bag-by-bag"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_every_column_block_agrees(backend, dtype, bag_major, monkeypatch):
    """Dims whose greedy split uses every generated block width (511 = 256 + 128 + ... + 1), with
    and without per-sample weights, SUM and MEAN: each width's loop reads its own columns, with
    every table pooled run by run and bag by bag (`impls.numba_kernels.pool`'s two orders)."""
    from impls.numba_codegen import block_widths

    monkeypatch.setattr(numba_fused, "BAG_MAJOR_DIM", 1 if bag_major else 1 << 62)

    assert sum(block_widths()) == 511
    tables = [
        table("a", 13, 511, ["x"], dtype=dtype),
        table("b", 6, 3, ["y"], dtype=dtype),
        table("c", 21, 300, ["z"], dtype=dtype),
    ]
    weights = make_weights(tables, seed=6)
    assert_agrees(backend, tables, weights, bags_batch(tables, 9, 2, weighted=True))
    mean = [
        table(t.name, t.num_embeddings, t.embedding_dim, t.feature_names, Pooling.MEAN, dtype) for t in tables
    ]
    assert_agrees(backend, mean, weights, bags_batch(mean, 9, 3))


def test_a_block_without_a_loop_raises_instead_of_leaving_output_unwritten(backend):
    """The generated dispatcher's default case (no loop for a storage kind) is an error, not a skip."""
    tables = [table("a", 5, 4, ["x"])]
    lookup = backend.prepare(tables, make_weights(tables, seed=1))
    lookup.table_kind = np.array([7], np.int64)
    with pytest.raises(RuntimeError, match="no generated loop for storage kind 7, column block 4"):
        lookup(bags_batch(tables, 3, seed=1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_per_sample_weights_agree(backend, dtype):
    tables = [table("a", 25, 9, ["x", "y"], dtype=dtype), table("b", 7, 16, ["z"])]
    assert_agrees(backend, tables, make_weights(tables, 1), bags_batch(tables, 40, 1, weighted=True))


def test_empty_bags_pool_to_zero_and_mean_divides_by_length(backend):
    tables = [table("a", 4, 2, ["x"], Pooling.MEAN)]
    weights = {"a": torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0]])}
    batch = JaggedBatch.from_bags({"x": [[], [0, 3], [], [2]]})
    out = backend.prepare(tables, weights)(batch)
    assert torch.equal(out, torch.tensor([[0.0, 0.0], [4.0, 5.0], [0.0, 0.0], [5.0, 6.0]]))


def test_columns_follow_table_order_not_batch_key_order(backend):
    tables = [table("a", 2, 1, ["x", "y"]), table("b", 2, 2, ["z"])]
    weights = {"a": torch.tensor([[1.0], [10.0]]), "b": torch.tensor([[100.0, 200.0], [300.0, 400.0]])}
    batch = JaggedBatch.from_bags({"z": [[1]], "y": [[1]], "x": [[0, 1]]})
    assert backend.prepare(tables, weights)(batch).tolist() == [[11.0, 10.0, 300.0, 400.0]]


def test_bf16_and_fp16_are_widened_exactly(backend):
    """Extreme and subnormal values survive the bit-level widening unchanged."""
    specials = [65504.0, -65504.0, 6.0e-8, 1.0e-5, -0.0, 1.5]
    for dtype in (torch.float16, torch.bfloat16):
        w = torch.tensor(specials, dtype=dtype).reshape(-1, 1)
        tables = [table("a", len(specials), 1, ["x"], dtype=dtype)]
        batch = JaggedBatch.from_bags({"x": [[i] for i in range(len(specials))]})
        out = backend.prepare(tables, {"a": w})(batch)
        assert torch.equal(out, w.to(torch.float32)), dtype


def test_big_batch_uses_the_parallel_path_and_agrees(backend):
    tables = [table("a", 1000, 512, ["x", "y"]), table("b", 500, 24, ["z"], Pooling.MEAN, torch.float16)]
    batch = bags_batch(tables, 160, seed=5, max_bag=30)
    assert len(batch.values) * 512 >= SERIAL_WORK
    assert_agrees(backend, tables, make_weights(tables, 2), batch)


# --- direct calls with malformed input: a clear ValueError, never an out-of-bounds read ---
# Lengths and ids are checked by the kernel, keys by the lookup's layout: numba's own, tested here.
# The structure checks (dtypes, shapes, weights against pooling) are `harness.validate`'s, shared by
# every backend and tested in tests/test_validate.py; the ones listed here are those it does not test.

BAD_TABLES = [table("a", 10, 4, ["x", "y"]), table("b", 5, 3, ["z"], Pooling.MEAN)]


@pytest.fixture(scope="module")
def bad_lookup(backend):
    return backend.prepare(BAD_TABLES, make_weights(BAD_TABLES, 0))


def good_batch(**change) -> JaggedBatch:
    fields = {
        "keys": ("x", "y", "z"),
        "values": torch.tensor([1, 2, 3, 9, 4, 0, 4]),
        "lengths": torch.tensor([2, 1, 2, 0, 1, 1]),
        "weights": None,
    }
    fields.update(change)
    return JaggedBatch(**fields)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"values": torch.tensor([1, 2, 3, 9, 10, 0, 4])},
            r"id out of range: feature 'y', sample 0, position 1 .* id 10; table 'a' has num_embeddings 10",
        ),
        (
            {"values": torch.tensor([1, 2, 3, 9, 4, 0, 5])},
            r"id out of range: feature 'z', sample 1, position 0 .*values\[6\]\) has id 5; table 'b'",
        ),
        (
            {"values": torch.tensor([1, -2, 3, 9, 4, 0, 4])},
            r"negative id: feature 'x', sample 0, position 1 .* id -2",
        ),
        ({"values": torch.tensor([1, 2, 3, 9, 4, 0, 2**40])}, r"id out of range: .* id 1099511627776"),
        (
            {"values": torch.tensor([1, 2, 3, 9, 4, 0, -1], dtype=torch.int32)},
            r"negative id: feature 'z'.* id -1",
        ),
        ({"lengths": torch.tensor([2, 1, 2, 0, 1, 2])}, r"sum\(lengths\) = 8 but values has 7 ids"),
        ({"lengths": torch.tensor([2, 1, 2, 0, 1, 0])}, r"sum\(lengths\) = 6 but values has 7 ids"),
        (
            {"lengths": torch.tensor([2, 1, 4, -2, 1, 1])},
            r"negative length -2 for feature 'y', sample 1 \(lengths\[3\]\)",
        ),
        (
            {"lengths": torch.tensor([2**62, 2**62, 2**62, 2**62 + 1, 1, 1])},
            r"length larger than the 7 ids of the batch: 4611686018427387904 for feature 'x', sample 0",
        ),
        ({"weights": [1.0] * 7}, r"per-sample weights must be a float32 CPU tensor, got a list"),
        ({"keys": ("x", "y", "w")}, r"missing \['z'\], not a feature \['w'\]"),
        ({"keys": ("x", "y")}, r"missing \['z'\], not a feature \[\], repeated \[\]"),
        ({"keys": ("x", "x", "z")}, r"repeated \['x'\]"),
        ({"keys": ()}, r"batch has no keys; the tables' features are \['x', 'y', 'z'\]"),
        ({"lengths": torch.tensor([2.0, 1, 2, 0, 1, 1])}, r"lengths must be int64 or int32, got float32"),
        (
            {"values": torch.tensor([[1, 2, 3, 9, 4, 0, 4]])},
            r"ids \(values\) must be a 1-D CPU tensor, got int64 of shape \(1, 7\) on cpu",
        ),
        ({"lengths": [2, 1, 2, 0, 1, 1]}, r"lengths must be a 1-D CPU tensor, got a list"),
    ],
)
def test_malformed_batch_raises_a_clear_error(bad_lookup, change, message):
    batch = good_batch(**change)
    before = [t.clone() for t in (batch.values, batch.lengths) if isinstance(t, torch.Tensor)]
    with pytest.raises(ValueError, match=message):
        bad_lookup(batch)
    after = [t for t in (batch.values, batch.lengths) if isinstance(t, torch.Tensor)]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))


def test_the_good_batch_of_the_error_tests_is_accepted(bad_lookup):
    assert bad_lookup(good_batch()).shape == (2, 4 + 4 + 3)


def test_first_bad_id_is_reported_in_a_big_batch(backend):
    tables = [table("a", 100, 64, ["x"])]
    batch = bags_batch(tables, 3000, seed=1, max_bag=20)
    values = batch.values.clone()
    values[-5] = 100
    values[len(values) // 2] = -7
    lookup = backend.prepare(tables, make_weights(tables, 0))
    with pytest.raises(ValueError, match=rf"negative id: .*values\[{len(values) // 2}\]\) has id -7"):
        lookup(JaggedBatch(batch.keys, values, batch.lengths))


@pytest.mark.parametrize("dim", [64, 256], ids=["run-by-run", "bag-by-bag"])
def test_first_bad_id_is_reported_whichever_order_the_rows_are_pooled_in(backend, dim):
    """The first bad position is found however the kernel walks the bags (a table of dim 256 is pooled
    bag by bag), with many bad ids in many parallel work items."""
    assert (dim >= numba_fused.BAG_MAJOR_DIM) == (dim == 256)
    tables = [table("a", 50, dim, ["x", "y"])]
    batch = bags_batch(tables, 3000, seed=2, max_bag=12)
    values = batch.values.clone()
    first = len(values) // 3
    values[first + 1 :: 97] = 50
    values[first] = 50
    lookup = backend.prepare(tables, make_weights(tables, 0))
    with pytest.raises(ValueError, match=rf"values\[{first}\]\) has id 50"):
        lookup(JaggedBatch(batch.keys, values, batch.lengths))


def test_bad_tables_and_weights_raise_in_prepare(backend):
    tables = [table("a", 10, 4, ["x"])]
    with pytest.raises(ValueError, match=r"weights of table 'a' have shape \(10, 3\), expected \(10, 4\)"):
        backend.prepare(tables, {"a": torch.zeros(10, 3)})
    with pytest.raises(
        ValueError, match=r"weights of table 'a' are float16, but the table's dtype is float32"
    ):
        backend.prepare(tables, {"a": torch.zeros(10, 4, dtype=torch.float16)})
    with pytest.raises(ValueError, match=r"no weights for table 'a'"):
        backend.prepare(tables, {})


def test_inputs_are_not_mutated_and_non_contiguous_weights_are_read_right(backend):
    tables = [table("a", 20, 6, ["x", "y"]), table("b", 9, 5, ["z"], dtype=torch.bfloat16)]
    base = make_weights(tables, 4)
    weights = {"a": base["a"].t().contiguous().t(), "b": base["b"]}  # "a" is column-major
    batch = bags_batch(tables, 30, seed=2, weighted=True)
    copies = {k: v.clone() for k, v in weights.items()}
    values, lengths, per_sample = batch.values.clone(), batch.lengths.clone(), batch.weights.clone()
    assert_agrees(backend, tables, weights, batch)
    assert all(torch.equal(weights[k], copies[k]) for k in weights)
    assert weights["a"].stride() == (1, 20)
    assert torch.equal(batch.values, values) and torch.equal(batch.lengths, lengths)
    assert torch.equal(batch.weights, per_sample)


# --- threads and the disk cache, in a fresh process ---

CHILD = textwrap.dedent("""
    import json, hashlib
    import numba, torch
    from harness.model import JaggedBatch, TableConfig
    from harness.weights import make_weights
    from impls import numba_kernels
    from impls.numba_fused import NumbaFused

    tables = [TableConfig("a", 1000, 64, ("x", "y")), TableConfig("b", 300, 8, ("z",), dtype=torch.bfloat16)]
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(0, 40, (3 * 2000,), generator=gen)
    values = torch.randint(0, 300, (int(lengths.sum()),), generator=gen)
    lookup = NumbaFused().prepare(tables, make_weights(tables, 0))
    out = lookup(JaggedBatch(("x", "y", "z"), values, lengths))
    stats = numba_kernels.pool.stats
    print(json.dumps({
        "threads": numba.get_num_threads(),
        "cache_hits": sum(stats.cache_hits.values()),
        "cache_misses": sum(stats.cache_misses.values()),
        "sha": hashlib.sha256(out.numpy().tobytes()).hexdigest(),
    }))
""")


def start_child(threads: int | None) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_NUM_THREADS"}
    if threads is not None:
        env["NUMBA_NUM_THREADS"] = str(threads)
    return subprocess.Popen(
        [sys.executable, "-c", CHILD],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def child_result(child: subprocess.Popen) -> dict:
    stdout, stderr = child.communicate(timeout=120)
    assert child.returncode == 0, stderr
    return json.loads(stdout.strip().splitlines()[-1])


@pytest.mark.usefixtures("backend")
def test_fresh_process_loads_from_the_disk_cache_and_honours_numba_num_threads(backend):
    backend.prepare(BAD_TABLES, make_weights(BAD_TABLES, 0))  # compiled and cached by now
    children = start_child(threads=1), start_child(threads=None)  # side by side: half the wall time
    one, default = (child_result(c) for c in children)
    assert one["threads"] == 1
    assert default["threads"] == os.cpu_count()
    for child in (one, default):
        assert child["cache_misses"] == 0 and child["cache_hits"] >= 1, child
    assert one["sha"] == default["sha"]  # each bag is summed in the same order on any thread count


@pytest.mark.parametrize("module", ["numba_kernels", "numba_training"])
def test_the_cached_kernels_name_the_exact_text_of_the_modules_they_inline(module):
    """numba keys its disk cache on the defining file's text only; `GENERATED_FROM` makes an edit of
    an inlined module an edit of the kernel's file, so a stale build is never loaded."""
    import hashlib
    import importlib

    kernels = importlib.import_module(f"impls.{module}")
    folder = Path(kernels.__file__).parent
    for name, recorded in kernels.GENERATED_FROM.items():
        actual = hashlib.sha256((folder / name).read_bytes()).hexdigest()
        assert actual == recorded, f"{name} changed: set GENERATED_FROM[{name!r}] in {module}.py to {actual}"


def test_serial_path_restores_the_thread_count(backend):
    numba = pytest.importorskip("numba")
    before = numba.get_num_threads()
    lookup = backend.prepare(BAD_TABLES, make_weights(BAD_TABLES, 0))
    lookup(good_batch())
    with pytest.raises(ValueError):
        lookup(good_batch(values=torch.tensor([1, 2, 3, 9, 4, 0, 99])))
    assert numba.get_num_threads() == before


def test_large_tables_are_read_from_huge_page_copies_and_agree(backend, monkeypatch):
    """With the size limit at 0 every table, float or quantized, is read from its own copy on huge
    pages (`impls.huge_pages`): the lookups agree, and no caller tensor is what the kernel reads."""
    from harness.quantized import quantize_rows
    from impls import huge_pages

    monkeypatch.setattr(huge_pages, "MIN_TABLE_BYTES", 0)
    for seed in range(12):
        p = random_problem(seed)
        assert_agrees(backend, p.tables, p.weights, p.batch)
    tables = [
        table("a", 40, 24, ["x"], dtype=torch.float16),
        table("q", 30, 8, ["y"], dtype="int8"),
        table("b", 10, 300, ["z"]),
    ]
    weights = make_weights([tables[0], tables[2]], seed=5)
    weights["q"] = quantize_rows(torch.randn(30, 8, generator=torch.Generator().manual_seed(1)), "int8")
    batch = bags_batch(tables, 9, seed=2)
    assert_agrees(backend, tables, weights, batch)
    lookup = numba_fused.NumbaLookup(tables, weights)
    for stored, t in zip(lookup.storage, tables, strict=True):
        assert stored.data_ptr() % huge_pages.HUGE_PAGE_BYTES == 0, t.name
    assert lookup.storage[0].data_ptr() != weights["a"].data_ptr()
    assert torch.equal(lookup.storage[0], weights["a"]) and torch.equal(lookup.storage[2], weights["b"])


def test_small_float_tables_are_read_in_place(backend):
    tables = [table("a", 40, 24, ["x"])]
    weights = make_weights(tables, seed=5)
    assert numba_fused.NumbaLookup(tables, weights).storage[0].data_ptr() == weights["a"].data_ptr()


def test_the_trainer_updates_the_huge_page_copies_its_lookup_reads(monkeypatch):
    """A trainer's tables on huge pages: the step's result agrees with the contract, and the
    weights it returns are the ones its lookup reads (not a stale copy)."""
    from harness.training.check import check_training
    from harness.training.contract import OptimizerConfig
    from harness.training.problem import TrainingProblem
    from impls import huge_pages

    monkeypatch.setattr(huge_pages, "MIN_TABLE_BYTES", 0)
    tables = (table("t0", 6, 4, ["f0", "f1"]), table("t1", 5, 4, ["f2"]))
    batch = JaggedBatch.from_bags({"f0": [[1, 1], [3]], "f1": [[2], []], "f2": [[0, 4], [4]]})
    g = torch.Generator().manual_seed(0)
    weights = {t.name: torch.randn(t.num_embeddings, 4, generator=g) for t in tables}
    steps = [(batch, torch.randn(2, 12, generator=g)) for _ in range(3)]
    problem = TrainingProblem.of(tables, weights, OptimizerConfig("rowwise_adagrad", 0.1), steps)
    verdict = check_training(NumbaFused(), problem)
    assert verdict.outcome is Outcome.AGREE, verdict.detail
    trainer = NumbaFused().prepare_training(tables, weights, OptimizerConfig("sgd", 0.5))
    result = trainer(batch, torch.ones(2, 12))
    for t, stored in zip(tables, trainer.lookup.storage, strict=True):
        assert stored.data_ptr() == result.weights[t.name].data_ptr()
        assert stored.data_ptr() % huge_pages.HUGE_PAGE_BYTES == 0


def test_released_outputs_are_reused_and_outputs_still_held_are_not(monkeypatch):
    """`impls.output_buffers`: an output's memory serves a later call only once the output and
    its views are gone, and every element of a reused buffer is written again (stale values from
    the last batch, empty bags now, must not survive)."""
    from impls import output_buffers

    tables = [table("a", 50, 12, ["x", "y"]), table("b", 30, 300, ["z"], Pooling.MEAN, torch.float16)]
    weights = make_weights(tables, 3)
    full = bags_batch(tables, 64, seed=1, max_bag=8)
    empty = JaggedBatch(full.keys, torch.zeros(0, dtype=torch.int64), torch.zeros_like(full.lengths))
    batches = [full, empty, *(bags_batch(tables, 64, seed=s, max_bag=s % 9) for s in range(2, 8))]
    fresh = numba_fused.NumbaLookup(tables, weights)
    expected = [fresh(b) for b in batches]  # under MIN_BYTES: plain torch.empty outputs
    monkeypatch.setattr(output_buffers, "MIN_BYTES", 0)
    lookup = numba_fused.NumbaLookup(tables, weights)
    first = lookup(full)
    kept = first.clone()
    second = lookup(full)
    assert second.data_ptr() != first.data_ptr()
    assert torch.equal(first, kept) and torch.equal(second, kept)
    row = first[1]
    addresses = {first.data_ptr(), second.data_ptr()}
    del first
    assert lookup._outputs.free_bytes() == 0, "a view still holds the output's memory"
    del row, second
    assert lookup._outputs.free_bytes() == 2 * kept.numel() * 4
    for batch, want in zip(batches, expected, strict=True):
        out = lookup(batch)
        assert out.data_ptr() in addresses, "a released buffer was not reused"
        assert torch.equal(out, want)
        del out


def test_the_trainers_forward_output_reuses_released_memory_and_is_written_in_full(monkeypatch):
    """The trainer's fused forward takes its output from the lookup's pool, as the lookup does, and
    no value of the step before survives in a reused buffer, empty bags included. A zero
    grad_output keeps the weights (SGD), so every step is judged against the same tables' float64
    reference (the trainer sums a bag's distinct rows in its own order, within tolerance)."""
    from harness.agreement import Oracle
    from harness.tolerance import compare
    from harness.training.contract import OptimizerConfig
    from impls import output_buffers

    tables = [table("a", 50, 12, ["x", "y"]), table("b", 30, 40, ["z"], Pooling.MEAN)]
    weights = make_weights(tables, 4)
    full = bags_batch(tables, 64, seed=1, max_bag=8)
    empty = JaggedBatch(full.keys, torch.zeros(0, dtype=torch.int64), torch.zeros_like(full.lengths))
    batches = [full, empty, full, *(bags_batch(tables, 64, seed=s, max_bag=s % 5) for s in range(2, 6))]
    monkeypatch.setattr(output_buffers, "MIN_BYTES", 0)
    trainer = NumbaFused().prepare_training(tables, weights, OptimizerConfig("sgd", 0.5))
    addresses = set()
    for batch in batches:
        out = trainer(batch, torch.zeros(64, 12 * 2 + 40)).output
        addresses.add(out.data_ptr())
        oracle = Oracle.of(tables, weights, batch)
        comparison = compare(out, oracle.reference.value, oracle.tolerance)
        assert comparison.agree, comparison.describe()
        del out
        assert trainer.lookup._outputs.free_bytes() > 0, "the output did not return to the pool"
    assert len(addresses) <= 2, "released outputs were not reused"
