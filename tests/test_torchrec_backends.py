"""torchrec and FBGEMM backends: agreement, faithful config mapping, exact weights, bounds check.

Skipped, with the reason, where torchrec / fbgemm-gpu-cpu are not installed.
"""

from __future__ import annotations

import random

import pytest
import torch

pytest.importorskip(
    "torchrec", reason="torchrec is not installed: the torchrec/FBGEMM backends are unavailable"
)
pytest.importorskip("fbgemm_gpu", reason="fbgemm-gpu-cpu is not installed")

from harness.agreement import Outcome, check_problem, mark_known  # noqa: E402
from harness.backend import load_backend  # noqa: E402
from harness.cases import load_cases  # noqa: E402
from harness.generate import random_problem  # noqa: E402
from harness.model import JaggedBatch, Pooling, Problem, TableConfig  # noqa: E402
from harness.weights import make_weights  # noqa: E402
from impls.fbgemm_tbe import FbgemmTBE, fbgemm_tbe_int32  # noqa: E402
from impls.torchrec_ebc import TorchrecEBC, TorchrecFusedEBC  # noqa: E402

NAMES = ("torchrec", "torchrec-fused", "fbgemm-tbe")
KNOWN = load_cases()


def _problem(tables, bags, per_sample=None, *, id_dtype=torch.int64, seed=0) -> Problem:
    if all(len(b) == 0 for b in bags.values()):
        batch = JaggedBatch(tuple(bags), torch.zeros(0, dtype=id_dtype), torch.zeros(0, dtype=torch.int64))
    else:
        batch = JaggedBatch.from_bags(bags, per_sample, id_dtype=id_dtype)
    return Problem(tuple(tables), make_weights(tables, seed), batch)


def _bags(rng: random.Random, n: int, batch: int, max_len: int) -> list[list[int]]:
    return [[rng.randrange(n) for _ in range(rng.randint(0, max_len))] for _ in range(batch)]


def edge_problems() -> dict[str, Problem]:
    """Hand-made problems for the corners the seeded generator rarely hits with dims % 4 == 0."""
    rng = random.Random(4)
    f32, f16, bf16 = torch.float32, torch.float16, torch.bfloat16
    out: dict[str, Problem] = {}
    for dtype in (f32, f16, bf16):
        for pooling in (Pooling.SUM, Pooling.MEAN):
            t = TableConfig("t", 50, 8, ("a", "b"), pooling, dtype)
            name = f"shared-{str(dtype)[6:]}-{pooling.value}"
            out[name] = _problem([t], {"b": _bags(rng, 50, 5, 6), "a": _bags(rng, 50, 5, 6)})
    out["empty-bags-mean"] = _problem(
        [TableConfig("t", 5, 4, ("a",), Pooling.MEAN)], {"a": [[], [1, 2], [], [4]]}
    )
    out["all-bags-empty"] = _problem([TableConfig("t", 5, 4, ("a",))], {"a": [[], [], []]})
    out["batch-size-0"] = _problem([TableConfig("t", 5, 4, ("a",))], {"a": []})
    out["int32-ids"] = _problem(
        [TableConfig("t", 30, 4, ("a",)), TableConfig("u", 20, 12, ("b", "c"))],
        {"c": _bags(rng, 20, 6, 5), "a": _bags(rng, 30, 6, 5), "b": _bags(rng, 20, 6, 5)},
        id_dtype=torch.int32,
    )
    for dtype in (f32, f16):
        bags = {"a": _bags(rng, 40, 6, 8), "b": _bags(rng, 40, 6, 8)}
        weights = {k: [[rng.uniform(-2, 2) for _ in b] for b in v] for k, v in bags.items()}
        out[f"weighted-{str(dtype)[6:]}"] = _problem(
            [TableConfig("t", 40, 8, ("a",), dtype=dtype), TableConfig("u", 40, 4, ("b",), dtype=dtype)],
            bags,
            weights,
        )
    out["long-bag-float16"] = _problem(
        [TableConfig("t", 1000, 4, ("a",), dtype=f16)], {"a": [list(range(1000)), [7] * 600]}
    )
    for dim in (1, 3, 33):
        out[f"dim-{dim}"] = _problem([TableConfig("t", 9, dim, ("a",))], {"a": _bags(rng, 9, 4, 4)})
    return out


EDGES = edge_problems()


def _verdicts(problem: Problem):
    backends = [load_backend(n) for n in NAMES] + [fbgemm_tbe_int32()]
    return mark_known(check_problem(backends, problem), problem, KNOWN)


def _groups_interleave(tables) -> bool:
    keys = [(t.pooling, t.dtype) for t in tables]
    return any(k in keys[:i] and keys[i - 1] != k for i, k in enumerate(keys) if i)


def expected_known(backend: str, problem: Problem) -> tuple[set[str], bool]:
    """The known cases that may explain ``backend`` on ``problem``, and whether one must.

    Outside those mechanisms a backend must agree. A `Outcome.KNOWN` verdict is explained by its
    cases' models (`mark_known` checks them), so a broken library fails here.
    """
    b = problem.batch
    half = any(t.dtype != torch.float32 for t in problem.tables)
    if backend == "torchrec":
        if b.batch_size == 0:
            return {"torchrec-kjt-batch-size-0-raises"}, True
        if half and b.weights is not None:
            return {"torchrec-half-table-weighted-raises"}, True
        return (
            ({"torchrec-float16-pooled-output", "torchrec-bfloat16-table-stored-as-float16"}, False)
            if half
            else (
                set(),
                False,
            )
        )
    if backend == "torchrec-fused":
        if b.batch_size == 0:
            return {"torchrec-fused-kjt-batch-size-0-raises"}, True
        interleaved = _groups_interleave(problem.tables) and b.batch_size > 0 and len(b.values) > 0
        return ({"torchrec-fused-groups-out-of-order"}, False) if interleaved else (set(), False)
    return set(), False


def assert_expected(v, problem: Problem, label: str) -> None:
    assert not v.failed, f"{label}: {v.backend}: {v.outcome.value}: {v.detail}"
    if v.outcome is Outcome.UNSUPPORTED:
        return
    allowed, required = expected_known(v.backend, problem)
    if v.outcome is Outcome.KNOWN:
        assert set(v.known_cases) <= allowed, (
            f"{label}: {v.backend}: known by {v.known_cases}, expected {allowed}"
        )
    else:
        assert not required, f"{label}: {v.backend}: {v.outcome.value}, expected known by {allowed}"


@pytest.mark.parametrize("seed", range(60))
def test_seeded_problems_agree_or_are_known(seed):
    problem = random_problem(seed)
    for v in _verdicts(problem):
        assert_expected(v, problem, f"seed {seed}")


def tbe_friendly(seed: int) -> Problem:
    """``random_problem(seed)`` reshaped into what one FBGEMM TBE module runs: dims rounded up to a
    multiple of 4, the first table's pooling for all, one dtype (float32 or float16) for all."""
    p = random_problem(seed)
    dtype = (torch.float32, torch.float16)[seed % 2]
    tables = tuple(
        TableConfig(
            t.name,
            t.num_embeddings,
            -(-t.embedding_dim // 4) * 4,
            t.feature_names,
            p.tables[0].pooling,
            dtype,
        )
        for t in p.tables
    )
    return Problem(tables, make_weights(tables, seed), p.batch)


@pytest.mark.parametrize("seed", range(40))
def test_tbe_friendly_seeded_problems_agree_or_are_known(seed):
    problem = tbe_friendly(seed)
    verdicts = _verdicts(problem)
    assert all(v.outcome is not Outcome.UNSUPPORTED for v in verdicts), verdicts
    for v in verdicts:
        assert_expected(v, problem, f"seed {seed}")


@pytest.mark.parametrize("name", sorted(EDGES))
def test_edge_cases_agree_or_are_known(name):
    for v in _verdicts(EDGES[name]):
        assert_expected(v, EDGES[name], name)


MIXED = (
    TableConfig("a", 7, 4, ("fa",), Pooling.SUM, torch.float32),
    TableConfig("b", 5, 8, ("fb1", "fb2"), Pooling.MEAN, torch.float16),
    TableConfig("c", 3, 12, ("fc",), Pooling.SUM, torch.bfloat16),
)


def test_torchrec_configs_mirror_the_tables():
    from torchrec.modules.embedding_configs import DataType, PoolingType

    from impls.torchrec_ebc import embedding_bag_configs

    got = [
        (c.name, c.num_embeddings, c.embedding_dim, list(c.feature_names), c.pooling, c.data_type)
        for c in embedding_bag_configs(MIXED)
    ]
    assert got == [
        ("a", 7, 4, ["fa"], PoolingType.SUM, DataType.FP32),
        ("b", 5, 8, ["fb1", "fb2"], PoolingType.MEAN, DataType.FP16),
        ("c", 3, 12, ["fc"], PoolingType.SUM, DataType.BF16),
    ]


@pytest.mark.parametrize("backend", [TorchrecEBC(), TorchrecFusedEBC()], ids=lambda b: b.name)
def test_torchrec_modules_hold_the_weights(backend):
    """Read back: the fused module (FBGEMM, FP32 storage) holds every table exactly; the EBC holds
    FP32 and FP16 tables exactly and a BF16 table as float16 (known case
    torchrec-bfloat16-table-stored-as-float16)."""
    weights = make_weights(MIXED, seed=3)
    for is_weighted in (False, True):
        module = backend.build(MIXED, weights, is_weighted=is_weighted)
        assert module.is_weighted() is is_weighted
        for t in MIXED:
            held = module.embedding_bags[t.name].weight
            stored_as = torch.float16 if backend.name == "torchrec" and t.dtype == torch.bfloat16 else None
            expected = weights[t.name] if stored_as is None else weights[t.name].to(stored_as)
            assert held.shape == (t.num_embeddings, t.embedding_dim)
            assert torch.equal(held.detach().to(torch.float64), expected.to(torch.float64)), t.name


def test_fbgemm_module_mirrors_the_tables_and_holds_the_weights():
    from fbgemm_gpu.split_embedding_configs import SparseType
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import BoundsCheckMode, PoolingMode

    tables = (
        TableConfig("a", 7, 4, ("fa",), Pooling.MEAN, torch.float16),
        TableConfig("b", 5, 8, ("fb1", "fb2"), Pooling.MEAN, torch.float16),
    )
    weights = make_weights(tables, seed=5)
    tbe = FbgemmTBE().build(tables, weights)
    assert tbe.feature_table_map == [0, 1, 1]
    assert tbe.pooling_mode == PoolingMode.MEAN
    assert tbe.weights_precision == SparseType.FP16
    assert tbe.bounds_check_mode_int == BoundsCheckMode.FATAL.value
    for t, held in zip(tables, tbe.split_embedding_weights(), strict=True):
        assert held.dtype == t.dtype and torch.equal(held, weights[t.name]), t.name


def test_fbgemm_names_what_it_cannot_run():
    batch = JaggedBatch.from_bags({"fa": [[0]], "fb1": [[1]], "fb2": [[2]], "fc": [[0]]})
    assert "mixed poolings" in FbgemmTBE().supports(MIXED[:2], batch)
    same_pooling = (MIXED[0], TableConfig("b", 5, 8, ("fb1", "fb2"), Pooling.SUM, torch.float16))
    assert "mixed table dtypes" in FbgemmTBE().supports(same_pooling, batch)
    bf16 = (TableConfig("c", 3, 12, ("fc",), Pooling.SUM, torch.bfloat16),)
    assert "bfloat16" in FbgemmTBE().supports(bf16, JaggedBatch.from_bags({"fc": [[0]]}))
    odd = (TableConfig("c", 3, 6, ("fc",)),)
    assert "% 4" in FbgemmTBE().supports(odd, JaggedBatch.from_bags({"fc": [[0]]}))


def test_fbgemm_default_bounds_check_rejects_a_bad_id_called_directly():
    """The harness validates ids first, so call the module directly: FATAL raises, leaves ids alone."""
    tables = (TableConfig("t", 10, 4, ("f",)),)
    tbe = FbgemmTBE().build(tables, make_weights(tables))
    for bad in (10, 1_000_000):
        ids = torch.tensor([1, bad, 3])
        with pytest.raises(RuntimeError, match="idx < num_rows"):
            tbe(ids, torch.tensor([0, 2, 3]))
        assert ids.tolist() == [1, bad, 3]


def test_fbgemm_warning_mode_zeroes_a_bad_id_in_the_callers_tensor():
    """What the documentation says about WARNING: no exception, the bad id becomes row 0, in place."""
    tables = (TableConfig("t", 10, 4, ("f",)),)
    weights = make_weights(tables)
    tbe = FbgemmTBE("WARNING").build(tables, weights)
    ids = torch.tensor([1, 10, 3])
    out = tbe(ids, torch.tensor([0, 2, 3])).detach()
    assert ids.tolist() == [1, 0, 3]
    assert torch.equal(out[0], weights["t"][1] + weights["t"][0])


def test_bounds_check_mode_is_in_the_name_and_checked():
    assert FbgemmTBE().name == "fbgemm-tbe" and FbgemmTBE("none").name == "fbgemm-tbe-none"
    with pytest.raises(ValueError, match="unknown bounds_check_mode 'strict'"):
        FbgemmTBE("strict")


@pytest.mark.parametrize("name", NAMES + ("fbgemm-tbe-int32", "fbgemm-tbe-none"))
def test_inputs_are_not_mutated(name):
    """Shuffled keys (the TBE permutes them), per-sample weights and int32 ids: inputs stay as given."""
    tables = (TableConfig("t", 20, 4, ("a", "b")), TableConfig("u", 9, 8, ("c",)))
    rng = random.Random(7)
    bags = {k: _bags(rng, 9, 5, 4) for k in ("c", "b", "a")}
    per_sample = {k: [[rng.uniform(-1, 1) for _ in b] for b in v] for k, v in bags.items()}
    problem = _problem(tables, bags, per_sample, id_dtype=torch.int32)
    b, w = problem.batch, problem.weights
    before = [t.clone() for t in (b.values, b.lengths, b.weights, w["t"], w["u"])]
    load_backend(name).prepare(tables, w)(b)
    after = (b.values, b.lengths, b.weights, w["t"], w["u"])
    assert all(torch.equal(x, y) and x.dtype == y.dtype for x, y in zip(before, after, strict=True))
