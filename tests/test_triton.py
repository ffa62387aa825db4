"""The ``triton`` backend under Triton's interpreter: agreement with the reference, bad input.

On a machine with a CUDA device the same tests run the compiled kernel on the GPU.
"""

from __future__ import annotations

import sys

import pytest
import torch

pytest.importorskip("triton")

from harness.agreement import Outcome, check_agreement  # noqa: E402
from harness.backend import BackendUnavailable, load_backend  # noqa: E402
from harness.generate import random_problem  # noqa: E402
from harness.model import JaggedBatch, Pooling, TableConfig  # noqa: E402
from harness.weights import make_weights  # noqa: E402
from impls.triton_fused import TritonFused, triton_interpreted  # noqa: E402


@pytest.fixture(scope="module")
def backend() -> TritonFused:
    return TritonFused()


def _assert_agrees(backend: TritonFused, tables, batch, weights=None) -> None:
    weights = make_weights(tables, seed=7) if weights is None else weights
    (verdict,) = check_agreement([backend], tables, weights, batch)
    assert verdict.outcome is Outcome.AGREE, verdict.detail


@pytest.mark.parametrize("seed", range(24))
def test_agrees_on_seeded_random_problems(backend: TritonFused, seed: int) -> None:
    p = random_problem(seed)
    (verdict,) = check_agreement([backend], p.tables, p.weights, p.batch)
    assert verdict.outcome is Outcome.AGREE, (seed, verdict.detail)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("id_dtype", [torch.int64, torch.int32])
def test_dtypes_empty_bags_and_mean(backend: TritonFused, dtype: torch.dtype, id_dtype: torch.dtype) -> None:
    tables = [
        TableConfig("a", 7, 5, ("x",), Pooling.MEAN, dtype),
        TableConfig("b", 3, 16, ("y",), Pooling.SUM, dtype),
    ]
    batch = JaggedBatch.from_bags({"x": [[0, 6, 6], [], [3]], "y": [[], [2, 2, 1, 0], []]}, id_dtype=id_dtype)
    _assert_agrees(backend, tables, batch)


def test_shared_table_keys_in_another_order_and_mixed_dtypes(backend: TritonFused) -> None:
    tables = [
        TableConfig("wide", 11, 300, ("u", "v"), Pooling.SUM, torch.bfloat16),
        TableConfig("one", 2, 1, ("w",), Pooling.MEAN, torch.float32),
        TableConfig("odd", 50, 33, ("z",), Pooling.SUM, torch.float16),
    ]
    batch = JaggedBatch.from_bags(
        {
            "z": [[49, 0], [1], [], [7, 7, 7]],
            "v": [[10], [], [0, 1, 2], [3]],
            "w": [[1, 1, 0], [0], [], [1]],
            "u": [[], [5, 4], [10, 10], [0]],
        }
    )
    _assert_agrees(backend, tables, batch)


def test_per_sample_weights(backend: TritonFused) -> None:
    tables = [
        TableConfig("a", 9, 24, ("x", "y"), Pooling.SUM, torch.float32),
        TableConfig("b", 4, 8, ("z",), Pooling.SUM, torch.float16),
    ]
    bags = {"x": [[1, 2], [], [8]], "y": [[0], [3, 3, 3], []], "z": [[3], [0, 1], [2, 2]]}
    per_sample = {
        "x": [[0.5, -2.0], [], [0.0]],
        "y": [[1.25], [1.0, -1.0, 3.0], []],
        "z": [[-0.75], [2.0, 0.5], [1.0, 1.0]],
    }
    _assert_agrees(backend, tables, JaggedBatch.from_bags(bags, per_sample))


def test_batch_size_zero(backend: TritonFused) -> None:
    tables = [TableConfig("a", 5, 4, ("x", "y"))]
    batch = JaggedBatch(("x", "y"), torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64))
    _assert_agrees(backend, tables, batch)
    out = backend.prepare(tables, make_weights(tables))(batch)
    assert tuple(out.shape) == (0, 8)


def test_more_bags_than_one_program_holds(backend: TritonFused) -> None:
    """Several sample blocks per feature, and bags of very different lengths in one block."""
    tables = [TableConfig("a", 40, 16, ("x",), Pooling.MEAN), TableConfig("b", 40, 4, ("y",))]
    g = torch.Generator().manual_seed(3)
    b = 150
    lengths = torch.randint(0, 4, (2 * b,), generator=g)
    lengths[5] = 30
    values = torch.randint(0, 40, (int(lengths.sum()),), generator=g)
    _assert_agrees(backend, tables, JaggedBatch(("x", "y"), values, lengths))


# Direct calls, not through the harness: malformed input is a clear ValueError, never a bad read.
# Ids are checked by the kernel and keys by the lookup's layout: triton's own, tested here. The
# structure and lengths checks are `harness.validate`'s (tests/test_validate.py; the rules it does not
# test are in tests/test_numba.py, which calls the same checks); two cases show that the lookup makes them.

TABLES = [TableConfig("a", 5, 4, ("x",), Pooling.MEAN), TableConfig("b", 3, 4, ("y",))]


@pytest.fixture(scope="module")
def lookup(backend: TritonFused):
    return backend.prepare(TABLES, make_weights(TABLES))


def _batch(values, lengths, weights=None, keys=("x", "y"), id_dtype=torch.int64) -> JaggedBatch:
    w = None if weights is None else torch.tensor(weights, dtype=torch.float32)
    return JaggedBatch(keys, torch.tensor(values, dtype=id_dtype), torch.tensor(lengths), w)


@pytest.mark.parametrize(
    ("batch", "message"),
    [
        (_batch([0, 5, 1], [2, 1]), r"id out of range: feature 'x', sample 0, position 1 .* id 5; table 'a'"),
        (_batch([0, 1, -1], [2, 1]), r"negative id: feature 'y', sample 0, position 0 .* id -1"),
        (_batch([0, 1, 3], [2, 1]), r"id out of range: feature 'y'.* id 3; table 'b' has num_embeddings 3"),
        (_batch([0, 1], [1, 1], keys=("x", "q")), r"missing \['y'\], not a feature \['q'\]"),
        (
            JaggedBatch(("x", "y"), torch.tensor([[0, 1]]), torch.tensor([1, 1])),
            r"ids \(values\) must be a 1-D tensor, got int64 of shape \(1, 2\) on cpu",
        ),
        (
            JaggedBatch(("x", "y"), torch.tensor([0, 1]), torch.tensor([1, 1]), torch.tensor([1, 2])),
            r"per-sample weights must be a float32 tensor, got int64 of shape \(2,\) on cpu",
        ),
    ],
)
def test_direct_call_rejects_bad_input(lookup, batch: JaggedBatch, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        lookup(batch)


def test_prepare_rejects_weights_that_do_not_match_the_tables(backend: TritonFused) -> None:
    weights = make_weights(TABLES)
    weights["b"] = weights["b"][:2]
    with pytest.raises(ValueError, match=r"weights of table 'b' have shape \(2, 4\), expected \(3, 4\)"):
        backend.prepare(TABLES, weights)


def test_interpreter_refuses_benchmark_sized_problems() -> None:
    tables = [TableConfig("a", 10, 128, ("x",))]
    batch = JaggedBatch(("x",), torch.zeros(20000, dtype=torch.int64), torch.tensor([20000]))
    assert "interpreter" in triton_interpreted().supports(tables, batch)


def test_unavailable_without_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "triton", None)
    with pytest.raises(BackendUnavailable, match="Triton is not installed"):
        TritonFused()


def test_registered_as_triton() -> None:
    assert load_backend("triton").name == "triton"


def test_fuzz_driver_finds_no_disagreement(tmp_path) -> None:
    """The fuzz driver on ``triton``, kept small: the interpreter runs each program in Python."""
    from harness.fuzz.driver import fuzz_backend
    from harness.fuzz.strategies import problems, table_configs

    small = problems(
        tables=table_configs(max_tables=3, max_features_per_table=2, max_dim=40, max_num_embeddings=2000),
        max_batch_size=12,
        max_bag_length=6,
        max_long_bag_length=40,
    )
    stats, failure = fuzz_backend(TritonFused(), max_examples=25, seed=0, save_dir=tmp_path, strategy=small)
    assert failure is None, failure.verdict.detail
    assert stats.examples == 25 and stats.agreed + stats.known == 25


@pytest.mark.parametrize(
    ("ids", "weights", "constants"),
    [
        (
            "*i64",
            {"w_a": "*fp32", "w_b": "*fp32", "w_c": "*fp32"},
            {"HAS_WEIGHTS": False, "HAS_MEAN": False, "ONLY_KIND": 0, "VEC": 4},
        ),
        (
            "*i32",
            {"w_a": "*fp32", "w_b": "*fp16", "w_c": "*bf16"},
            {"HAS_WEIGHTS": True, "HAS_MEAN": True, "ONLY_KIND": -1, "VEC": 1},
        ),
    ],
    ids=["fp32-int64", "mixed-int32-weighted-mean"],
)
def test_kernel_compiles_for_a_hopper_gpu_with_vector_loads(ids: str, weights: dict, constants: dict) -> None:
    """Compiled ahead of time for sm_90 (no GPU needed): what the interpreter cannot check."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from impls.triton_kernels import kernel

    pointers = ["offsets", "per_sample", "feat_base", "feat_dim", "feat_col", "feat_mean", "feat_kind"]
    signature = {"values": ids, **{p: "*i64" for p in pointers}, **weights}
    signature.update({"per_sample": "*fp32", "feat_rows": "*i64", "error": "*i64", "out": "*fp32"})
    signature.update({"w_q": "*u8", "w_s": "*fp16", "feat_qrow": "*i64"})  # quantized tables (none here)
    signature.update({"batch": "i32", "out_stride": "i32"})
    constants = {"BLOCK_B": 16, "BLOCK_D": 128, "UNROLL": 2, "EXACT_BF16": False, **constants}
    fn = kernel(False)
    signature = {name: signature.get(name, "constexpr") for name in fn.arg_names}
    aligned = {
        (i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names) if signature[n].startswith("*")
    }
    compiled = triton.compile(
        ASTSource(fn, signature, constants, aligned),
        target=GPUTarget("cuda", 90, 32),
        options={"num_warps": 4},
    )
    ptx = compiled.asm["ptx"]
    assert ".v4." in ptx if constants["VEC"] > 1 else "ld.global" in ptx


@pytest.mark.slow
def test_fuzz_driver_on_the_default_strategy(tmp_path) -> None:
    """The fuzz driver's own problem space, 150 examples: 20 s on an idle machine, minutes on a busy one."""
    from harness.fuzz.driver import fuzz_backend

    stats, failure = fuzz_backend(TritonFused(), max_examples=150, seed=1, save_dir=tmp_path)
    assert failure is None, failure.verdict.detail
    assert stats.failed == 0 and stats.agreed > 0
