"""The ``triton`` backend's training step (`impls.triton_training`, kernel
`impls.triton_training_kernels`) judged by `harness.training.check.check_training` against the
float64 reference: every optimizer and weight-decay mode, every float dtype, several steps, per-sample
weights, MEAN, shared tables, duplicates, bad input, what it declines, and an ahead-of-time compile
for sm_90 (what the interpreter cannot check).

Here it runs under Triton's interpreter; on a machine with a CUDA device the same tests run the
compiled kernels on the GPU.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from hypothesis import HealthCheck, given, settings  # noqa: E402

from harness.agreement import Outcome  # noqa: E402
from harness.fuzz.strategies import table_configs  # noqa: E402
from harness.model import SUPPORTED_DTYPES, JaggedBatch, Pooling, TableConfig  # noqa: E402
from harness.training.check import check_training, keep_result  # noqa: E402
from harness.training.contract import OptimizerConfig  # noqa: E402
from harness.training.problem import TrainingProblem  # noqa: E402
from harness.training.strategies import training_problems  # noqa: E402
from impls.triton_fused import TritonFused, triton_interpreted  # noqa: E402

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
KINDS = ["sgd", "adagrad", "rowwise_adagrad"]
MODES = ["none", "l2", "decoupled"]


@pytest.fixture(scope="module")
def backend() -> TritonFused:
    return TritonFused()


def _agrees(backend: TritonFused, problem: TrainingProblem) -> None:
    verdict = check_training(backend, problem)
    assert verdict.outcome is Outcome.AGREE, verdict.detail


SMALL = table_configs(
    max_tables=3, max_features_per_table=2, max_dim=40, max_num_embeddings=300, dtypes=SUPPORTED_DTYPES
)


@settings(
    max_examples=25, derandomize=True, deadline=None, database=None, suppress_health_check=list(HealthCheck)
)
@given(training_problems(tables=SMALL, max_batch_size=12, max_bag_length=6, max_long_bag_length=30))
def test_generated_training_problems_agree(problem: TrainingProblem) -> None:
    """The training strategy's problems (every kind and mode, 1-3 steps, grad_output of every
    profile, weighted or not, shared tables), kept small for the interpreter."""
    verdict = check_training(TritonFused(), problem)
    assert verdict.outcome in (Outcome.AGREE, Outcome.UNSUPPORTED), verdict.detail


def _mixed_tables() -> list[TableConfig]:
    return [
        TableConfig("s", 9, 8, ("a", "b"), Pooling.SUM, F32),  # shared by two features
        TableConfig("m", 7, 12, ("c",), Pooling.MEAN, F16),
        TableConfig("h", 6, 5, ("d",), Pooling.SUM, BF16),  # odd dim: no vector loads
    ]


def _weights(tables: list[TableConfig], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {t.name: torch.randn(t.num_embeddings, t.embedding_dim, generator=g).to(t.dtype) for t in tables}
    if "h" in out:  # bfloat16 subnormals, which the interpreter's own conversion gets wrong
        out["h"][2, :3] = torch.tensor([9.18355e-41, -8.99988e-39, 1e-39]).to(BF16)
    return out


def _batches() -> list[JaggedBatch]:
    """Duplicates within a bag, across bags and across the features of the shared table."""
    first = JaggedBatch.from_bags(
        {
            "a": [[1, 1, 3], [2], [], [8]],
            "b": [[1], [], [0, 1, 1], [8]],
            "c": [[4, 4, 6], [0], [4], []],
            "d": [[2, 2], [5], [0, 1, 2], [2]],
        }
    )
    second = JaggedBatch.from_bags(
        {"b": [[5, 5], [0], []], "a": [[3], [1, 5], [1]], "d": [[], [2], [3, 3]], "c": [[], [6, 4], [4]]}
    )
    return [first, first, second]


def _three_steps(optimizer: OptimizerConfig) -> TrainingProblem:
    tables = _mixed_tables()
    g = torch.Generator().manual_seed(5)
    steps = [(b, torch.randn(b.batch_size, 8 * 2 + 12 + 5, generator=g)) for b in _batches()]
    return TrainingProblem.of(tables, _weights(tables, 1), optimizer, steps)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", KINDS)
def test_every_optimizer_and_mode_over_three_steps(backend: TritonFused, kind: str, mode: str) -> None:
    """float32, float16 and bfloat16 tables in one step (a launch each), MEAN, a shared table,
    duplicates; the same batch twice, then another (the state meets rows it has seen)."""
    decay = 0.0 if mode == "none" else 0.05
    _agrees(backend, _three_steps(OptimizerConfig(kind, 0.3, 1e-3, decay, mode)))


@pytest.mark.parametrize("kind", KINDS)
def test_per_sample_weights_and_their_gradient(backend: TritonFused, kind: str) -> None:
    tables = [
        TableConfig("s", 9, 24, ("x", "y"), Pooling.SUM, F32),
        TableConfig("z16", 4, 8, ("z",), Pooling.SUM, F16),
    ]
    bags = {"x": [[1, 2], [], [8, 1]], "y": [[0], [1, 1, 3], []], "z": [[3], [0, 1], [2, 2]]}
    per_sample = {
        "x": [[0.5, -2.0], [], [0.0, 3.0]],
        "y": [[1.25], [1.0, -1.0, 3.0], []],
        "z": [[-0.75], [2.0, 0.5], [1.0, 1.0]],
    }
    batch = JaggedBatch.from_bags(bags, per_sample)
    g = torch.Generator().manual_seed(2)
    steps = [(batch, torch.randn(3, 56, generator=g)) for _ in range(2)]
    optimizer = OptimizerConfig(kind, 0.1, 1e-2, 0.01, "l2")
    _agrees(backend, TrainingProblem.of(tables, _weights(tables, 3), optimizer, steps))


def test_many_rows_per_program_and_a_hot_row(backend: TritonFused) -> None:
    """Several programs, rows of two tables in one program, and a row read 37 times (an odd count,
    more than one unrolled iteration) beside rows read once."""
    tables = [
        TableConfig("a", 300, 4, ("x",), Pooling.SUM, F32),
        TableConfig("b", 50, 3, ("y",), Pooling.MEAN, F32),
    ]
    g = torch.Generator().manual_seed(4)
    x = [list(range(10 + i * 19, 25 + i * 19)) + [7] * (i % 3 + 1) for i in range(15)]
    x[4] += [7] * 7
    y = [[int(v) for v in torch.randint(0, 50, (i % 5,), generator=g)] for i in range(15)]
    batch = JaggedBatch.from_bags({"x": x, "y": y})
    assert sum(bag.count(7) for bag in x) == 37
    steps = [(batch, torch.randn(15, 7, generator=g)) for _ in range(2)]
    _agrees(
        backend,
        TrainingProblem.of(tables, _weights(tables, 5), OptimizerConfig("rowwise_adagrad", 0.5), steps),
    )


def test_empty_batches_change_nothing(backend: TritonFused) -> None:
    tables = [TableConfig("a", 5, 4, ("x", "y"))]
    no_samples = JaggedBatch(("x", "y"), torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64))
    empty_bags = JaggedBatch.from_bags({"x": [[], []], "y": [[], []]})
    steps = [(no_samples, torch.zeros(0, 8)), (empty_bags, torch.ones(2, 8))]
    problem = TrainingProblem.of(
        tables, _weights(tables, 6), OptimizerConfig("adagrad", 0.1, 0.1, 0.5, "decoupled"), steps
    )
    _agrees(backend, problem)


def _run(backend: TritonFused, problem: TrainingProblem):
    step = backend.prepare_training(problem.tables, problem.weights, problem.optimizer)
    return [keep_result(step(s.batch, s.grad_output), problem.tables) for s in problem.steps]


def test_the_step_is_deterministic(backend: TritonFused) -> None:
    """No atomics: two runs give the same bits (on a GPU too, whatever the schedule)."""
    problem = _three_steps(OptimizerConfig("adagrad", 0.3, 1e-3, 0.05, "l2"))
    first, second = _run(backend, problem), _run(backend, problem)

    def bits(t: torch.Tensor) -> torch.Tensor:
        return t.view(torch.int16 if t.element_size() == 2 else torch.int32)

    for a, b in zip(first, second, strict=True):
        assert torch.equal(bits(a.output), bits(b.output))
        for name in a.weights:
            assert torch.equal(bits(a.weights[name]), bits(b.weights[name]))


def test_a_bad_id_raises_and_changes_nothing(backend: TritonFused) -> None:
    """A direct call (no harness validation) with an id outside its table raises a ValueError
    naming it, before any weight or state changes: the next good step is a first step."""
    problem = _three_steps(OptimizerConfig("rowwise_adagrad", 0.3, 1e-3))
    good = problem.steps[0]
    bad = JaggedBatch(good.batch.keys, good.batch.values.clone(), good.batch.lengths)
    bad.values[3] = 9  # feature "a", table "s" of 9 rows
    step = backend.prepare_training(problem.tables, problem.weights, problem.optimizer)
    with pytest.raises(ValueError, match=r"id out of range: feature 'a', sample 1, .* id 9; table 's'"):
        step(bad, good.grad_output)
    after = keep_result(step(good.batch, good.grad_output), problem.tables)
    fresh = _run(backend, TrainingProblem.of(problem.tables, problem.weights, problem.optimizer, [good]))[0]
    for name in after.weights:
        assert torch.equal(after.weights[name], fresh.weights[name])
    with pytest.raises(ValueError, match=r"grad_output has shape \(4, 20\), expected \(4, 33\)"):
        step(good.batch, torch.zeros(4, 20))


def test_declines_what_it_cannot_do() -> None:
    backend = triton_interpreted()
    adagrad = OptimizerConfig("adagrad", 0.1)
    wide = [TableConfig("w", 3, 5000, ("x",))]
    batch = JaggedBatch.from_bags({"x": [[0, 1]]})
    assert "dim 5000" in backend.supports_training(wide, batch, adagrad)
    quantized = [TableConfig("q", 3, 8, ("x",), dtype="int8")]
    assert "only float tables" in backend.supports_training(quantized, batch, adagrad)
    assert "unknown optimizer kind" in backend.supports_training(
        [TableConfig("t", 3, 8, ("x",))], batch, OptimizerConfig("adam", 0.1)
    )
    # Under the interpreter: the forward's limits, and the update's (one row read 2000 times).
    small = [TableConfig("t", 10, 8, ("x",))]
    hot = JaggedBatch(("x",), torch.zeros(2000, dtype=torch.int64), torch.full((40,), 50))
    assert "training update" in backend.supports_training(small, hot, adagrad)
    big = JaggedBatch(("x",), torch.zeros(20000, dtype=torch.int64), torch.tensor([20000]))
    assert "interpreter" in backend.supports_training([TableConfig("t", 10, 128, ("x",))], big, adagrad)
    assert backend.supports_training(small, batch, adagrad) is None


@pytest.mark.parametrize(
    ("weights", "constants", "vector"),
    [
        (
            "*fp32",
            {"KIND": 2, "DECAY": 0, "STORE": 0, "HAS_WEIGHTS": False, "HAS_SCALE": False, "VEC": 4},
            ".v4.",
        ),
        (
            "*fp32",
            {"KIND": 1, "DECAY": 1, "STORE": 0, "HAS_WEIGHTS": True, "HAS_SCALE": True, "VEC": 4},
            ".v4.",
        ),
        (
            "*bf16",
            {"KIND": 0, "DECAY": 2, "STORE": 2, "HAS_WEIGHTS": False, "HAS_SCALE": True, "VEC": 4},
            ".v2.",
        ),
        (
            "*fp16",
            {"KIND": 2, "DECAY": 1, "STORE": 1, "HAS_WEIGHTS": True, "HAS_SCALE": True, "VEC": 1},
            None,
        ),
    ],
    ids=[
        "rowwise-fp32",
        "adagrad-l2-weighted-fp32",
        "sgd-decoupled-mean-bf16",
        "rowwise-l2-weighted-fp16-odd-dim",
    ],
)
def test_training_kernel_compiles_for_a_hopper_gpu(weights: str, constants: dict, vector: str | None) -> None:
    """Compiled ahead of time for sm_90 (no GPU needed): vector loads of rows and grad_output where
    dims allow, IEEE division and square root (compiled ``/`` and ``tl.sqrt`` are approximate),
    and no atomics."""
    import re

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from impls.triton_training import ELEMENTS_PER_THREAD
    from impls.triton_training_kernels import OPTIMIZER_KIND, kernel

    int64 = ("order", "occ_grad", "seg_start", "seg_count", "seg_key", "seg_table", "tab_base", "tab_dim")
    signature = {n: "*i64" for n in (*int64, "tab_key0", "tab_state")}
    signature.update({n: "*fp32" for n in ("occ_scale", "grad", "moments", "psw_grad", "hyper")})
    signature.update(weights=weights, first="i64", end="i64")
    kind = next(k for k, v in OPTIMIZER_KIND.items() if v == constants["KIND"])
    constants = {"BLOCK_D": 128, "BLOCK_R": 128 * ELEMENTS_PER_THREAD[kind] // 128, "UNROLL": 2, **constants}
    fn = kernel(False)
    signature = {name: signature.get(name, "constexpr") for name in fn.arg_names}
    aligned = {
        (i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names) if signature[n].startswith("*")
    }
    compiled = triton.compile(
        ASTSource(fn, signature, constants, aligned),
        target=GPUTarget("cuda", 90, 32),
        options={"num_warps": 4, "enable_fp_fusion": True},
    )
    ptx = compiled.asm["ptx"]
    if vector:
        assert re.search(r"ld\.global(\.[a-z]+)*" + re.escape(vector), ptx), "no vector loads"
    assert not re.search(r"\b(atom|red)\.", ptx), "atomics"
    assert "div.full" not in ptx and "sqrt.approx" not in ptx
    if constants["KIND"] != 0:
        assert "sqrt.rn.f32" in ptx and "div.rn.f32" in ptx
