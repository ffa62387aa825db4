"""The quantized lookup backends (int8 / int4 / int2 rows with an fp16 scale and bias).

``fbgemm-tbe-int-n`` (and its bounds-check variants), ``torchrec-quant``, ``torch`` (its quantized
ops), ``numba`` and ``triton`` (under Triton's interpreter here): agreement with the reference on
generated quantized problems within the tolerance; the row layouts (nibble order, where the scale
and bias sit, odd byte counts); what each FBGEMM bounds-check mode does with a bad id; and torch's
MEAN finding, which its known case's model explains, and nothing else does.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from harness.agreement import Outcome, check_agreement, check_backend, mark_known
from harness.backend import backend_statuses, load_backend
from harness.cases import load_case, load_cases
from harness.model import JaggedBatch, Pooling, Problem, TableConfig
from harness.quantized import QUANTIZED_STORAGE, QuantizedTable, dequantize, levels_of, quantize_rows

pytest.importorskip("fbgemm_gpu")
pytest.importorskip("torchrec")

QUANTIZED_BACKENDS = ("fbgemm-tbe-int-n", "torchrec-quant", "torch", "numba", "triton")
TORCH_MEAN_CASE = "torch-quantized-mean-pooled-as-sum"
KNOWN = load_cases()


@pytest.fixture(scope="module")
def backends() -> dict[str, object]:
    return {name: load_backend(name) for name in QUANTIZED_BACKENDS}


# ---------------------------------------------------------------------------------------------
# Generated problems: rows of every kind a quantized table holds.


def _rows(rng: np.random.Generator, storage: str, rows: int, dim: int, profile: str) -> QuantizedTable:
    """Codes, scales and biases of one profile: "quantized" (float values through FBGEMM's rule,
    wide and narrow ranges per row), "cancel" (bias -1000 under a tiny scale: values near 0 made of
    big terms), "extreme" (fp16 scales and biases of every exponent, up to 65504), "constant"."""
    nlev = levels_of(storage)
    if profile == "quantized":
        spread = 10.0 ** rng.uniform(-4, 3, (rows, 1))
        centre = rng.normal(0, 100, (rows, 1))
        return quantize_rows(torch.from_numpy(centre + spread * rng.standard_normal((rows, dim))), storage)
    codes = torch.from_numpy(rng.integers(0, nlev + 1, (rows, dim)).astype(np.uint8))
    if profile == "cancel":
        scale = np.full(rows, 2000.0 / nlev) * rng.uniform(0.9, 1.1, rows)
        bias = np.full(rows, -1000.0) + rng.uniform(-1, 1, rows)
    elif profile == "extreme":
        scale = 2.0 ** rng.uniform(-24, 15.9, rows)
        bias = np.sign(rng.standard_normal(rows)) * 2.0 ** rng.uniform(-24, 15.99, rows)
    else:  # constant rows: scale 1, codes 0
        codes.zero_()
        scale, bias = np.ones(rows), rng.normal(0, 10, rows)
    as_fp16 = lambda x: torch.from_numpy(np.asarray(x, np.float64)).to(torch.float16)  # noqa: E731
    return QuantizedTable(codes, as_fp16(scale), as_fp16(bias), storage)


PROFILES = ("quantized", "cancel", "extreme", "constant")


def quantized_problem(seed: int, storage: str, *, weighted: bool, max_bag: int = 12) -> Problem:
    """Two tables of ``storage`` (one shared by two features) and one of another storage, seeded;
    MEAN on one table when unweighted."""
    rng = np.random.default_rng(seed)
    other = QUANTIZED_STORAGE[(QUANTIZED_STORAGE.index(storage) + 1 + seed % 2) % 3]
    unit = {"int8": 1, "int4": 2, "int2": 4}
    dims = [unit[storage] * int(rng.integers(1, 20)), unit[storage] * int(rng.integers(1, 9))]
    mean = Pooling.SUM if weighted else Pooling.MEAN
    tables = (
        TableConfig("a", int(rng.integers(1, 40)), dims[0], ("x", "y"), mean, storage),
        TableConfig("b", int(rng.integers(1, 40)), dims[1], ("z",), Pooling.SUM, storage),
        TableConfig("c", int(rng.integers(1, 10)), 4 * int(rng.integers(1, 5)), ("w",), Pooling.SUM, other),
    )
    weights = {
        t.name: _rows(rng, t.dtype, t.num_embeddings, t.embedding_dim, PROFILES[(seed + i) % len(PROFILES)])
        for i, t in enumerate(tables)
    }
    batch_size = int(rng.integers(1, 6))
    bags: dict[str, list[list[int]]] = {}
    for t in tables:
        for f in t.feature_names:
            bags[f] = [
                rng.integers(0, t.num_embeddings, int(rng.integers(0, max_bag + 1))).tolist()
                for _ in range(batch_size)
            ]
    per_sample = None
    if weighted:
        per_sample = {k: [rng.normal(0, 2, len(b)).tolist() for b in v] for k, v in bags.items()}
    keys = list(bags)
    rng.shuffle(keys)  # the batch's key order is the caller's, not the tables'
    batch = JaggedBatch.from_bags({k: bags[k] for k in keys}, None if per_sample is None else
                                  {k: per_sample[k] for k in keys})  # fmt: skip
    return Problem(tables, weights, batch)


def verdicts_of(backend: object, problem: Problem):
    verdicts = check_agreement([backend], problem.tables, problem.weights, problem.batch)
    return mark_known(verdicts, problem, KNOWN)


@pytest.mark.parametrize("name", QUANTIZED_BACKENDS)
@pytest.mark.parametrize("storage", QUANTIZED_STORAGE)
def test_each_backend_agrees_with_the_reference_on_generated_problems(backends, name, storage):
    """Within the tolerance on every generated problem, or (torch, MEAN) the known case's model."""
    seeds = range(4) if name == "triton" else range(10)
    agreed = 0
    for seed in seeds:
        for weighted in (False, True):
            problem = quantized_problem(
                seed, storage, weighted=weighted, max_bag=6 if name == "triton" else 12
            )
            (v,) = verdicts_of(backends[name], problem)
            if v.outcome is Outcome.KNOWN:
                assert name == "torch" and v.known_cases == (TORCH_MEAN_CASE,), v.detail
                continue
            assert v.outcome is Outcome.AGREE, f"seed {seed}, weighted {weighted}: {v.detail}"
            agreed += 1
    assert agreed >= len(seeds)


# ---------------------------------------------------------------------------------------------
# Layouts: exact values from rows whose every element, scale and bias differ.


def _layout_table(storage: str, dim: int, rows: int = 6) -> QuantizedTable:
    """Codes that differ within each byte (a nibble or crumb swap changes them), power-of-two
    scales and half-integer biases that differ per row (a scale/bias swap or shift changes them):
    every value ``s q + b`` is exact in float32, so a single-id bag returns it exactly."""
    nlev = levels_of(storage)
    codes = torch.tensor([[(3 * r + 5 * c + 1) % (nlev + 1) for c in range(dim)] for r in range(rows)])
    scale = torch.tensor([2.0 ** (r % 4 - 1) for r in range(rows)], dtype=torch.float16)
    bias = torch.tensor([-(r + 1) - 0.5 for r in range(rows)], dtype=torch.float16)
    return QuantizedTable(codes.to(torch.uint8), scale, bias, storage)


# Odd byte counts: int8 dims 3 and 5, int4 dims 2 and 6 (1 and 3 bytes), int2 dims 4 and 12.
LAYOUT_DIMS = [("int8", 3), ("int8", 5), ("int8", 64), ("int4", 2), ("int4", 6), ("int4", 34),
               ("int2", 4), ("int2", 12), ("int2", 68)]  # fmt: skip


@pytest.mark.parametrize("name", QUANTIZED_BACKENDS)
@pytest.mark.parametrize(("storage", "dim"), LAYOUT_DIMS, ids=lambda x: str(x))
def test_each_backend_reads_the_row_layout_exactly(backends, name, storage, dim):
    q = _layout_table(storage, dim)
    tables = [TableConfig("t", q.num_rows, dim, ("f",), Pooling.SUM, storage)]
    batch = JaggedBatch.from_bags({"f": [[r] for r in range(q.num_rows)] + [[]]})
    out = backends[name].prepare(tables, {"t": q})(batch)
    want = torch.cat([dequantize(q), torch.zeros(1, dim, dtype=torch.float64)]).to(torch.float32)
    assert out.dtype == torch.float32
    assert torch.equal(out, want), (out - want).abs().max()


@pytest.mark.parametrize("name", ["numba", "triton", "torch"])
def test_quantized_and_float_tables_in_one_problem(backends, name):
    """Our kernels and torch pool float and quantized tables of mixed dims in one lookup."""
    rng = np.random.default_rng(3)
    tables = [
        TableConfig("q8", 9, 5, ("a",), Pooling.SUM, "int8"),
        TableConfig("f32", 7, 6, ("b", "c"), Pooling.SUM, torch.float32),
        TableConfig("q4", 11, 14, ("d",), Pooling.SUM, "int4"),
        TableConfig("bf", 5, 3, ("e",), Pooling.SUM, torch.bfloat16),
        TableConfig("q2", 6, 8, ("g",), Pooling.SUM, "int2"),
    ]
    weights = {
        t.name: _rows(rng, t.dtype, t.num_embeddings, t.embedding_dim, "quantized")
        if isinstance(t.dtype, str)
        else torch.from_numpy(rng.standard_normal((t.num_embeddings, t.embedding_dim))).to(t.dtype)
        for t in tables
    }
    bags = {
        f: [rng.integers(0, t.num_embeddings, 5).tolist() for _ in range(3)]
        for t in tables
        for f in t.feature_names
    }
    (v,) = verdicts_of(backends[name], Problem(tuple(tables), weights, JaggedBatch.from_bags(bags)))
    if name == "torch":  # its bfloat16 columns are rounded (a known case); every other column agrees
        assert v.outcome is Outcome.KNOWN and v.known_cases == ("torch-bfloat16-pooled-output",), v.detail
    else:
        assert v.outcome is Outcome.AGREE, v.detail


def test_numba_every_quantized_column_block_agrees(backends):
    """Dims whose greedy split uses every quantized loop's width (int8 511 = 256 + ... + 1, int4
    510, int2 508), SUM, MEAN and weighted."""
    from impls.numba_codegen import KIND_I2, KIND_I4, KIND_I8, quantized_widths

    assert sum(quantized_widths(KIND_I8)) == 511
    assert sum(quantized_widths(KIND_I4)) == 510 and sum(quantized_widths(KIND_I2)) == 508
    rng = np.random.default_rng(5)
    for pooling, weighted in ((Pooling.SUM, True), (Pooling.MEAN, False)):
        tables = [
            TableConfig("a", 13, 511, ("x",), pooling, "int8"),
            TableConfig("b", 6, 510, ("y",), pooling, "int4"),
            TableConfig("c", 21, 508, ("z",), pooling, "int2"),
        ]
        weights = {
            t.name: _rows(rng, t.dtype, t.num_embeddings, t.embedding_dim, "quantized") for t in tables
        }
        bags = {
            f: [rng.integers(0, t.num_embeddings, 4).tolist() for _ in range(5)]
            for t in tables
            for f in t.feature_names
        }
        per_sample = (
            {k: [rng.normal(size=len(b)).tolist() for b in v] for k, v in bags.items()} if weighted else None
        )
        problem = Problem(tuple(tables), weights, JaggedBatch.from_bags(bags, per_sample))
        (v,) = verdicts_of(backends["numba"], problem)
        assert v.outcome is Outcome.AGREE, v.detail


def test_numba_reads_fbgemms_row_layout_in_place_of_a_float_table():
    """The kernel's quantized storage is FBGEMM's row: fp16 scale, fp16 bias, packed codes."""
    from impls.numba_fused import quantized_rows

    q = _layout_table("int4", 6, rows=2)
    rows = quantized_rows(q)
    assert rows.dtype == torch.uint8 and rows.shape == (2, 4 + 3)
    assert torch.equal(rows[:, :2].contiguous().view(torch.float16).reshape(-1), q.scale)
    assert torch.equal(rows[:, 2:4].contiguous().view(torch.float16).reshape(-1), q.bias)
    first = q.codes[0].tolist()
    assert rows[0, 4].item() == first[0] | first[1] << 4  # element 0 in the low nibble


# ---------------------------------------------------------------------------------------------
# supports(): what each backend declines, and why.


def test_the_int_n_backends_decline_float_tables_and_the_float_ones_decline_quantized_tables(backends):
    floats = [TableConfig("f", 4, 8, ("x",))]
    batch = JaggedBatch.from_bags({"x": [[0]]})
    for name in ("fbgemm-tbe-int-n", "torchrec-quant"):
        assert "float tables ['f']" in backends[name].supports(floats, batch)
    quantized = [TableConfig("q", 4, 8, ("x",), Pooling.SUM, "int4")]
    for name in ("fbgemm-tbe", "torchrec", "torchrec-fused"):
        assert "quantized tables ['q']" in load_backend(name).supports(quantized, batch), name
    assert backends["torch"].supports(quantized, batch) is None


def test_dims_the_libraries_refuse_are_declined_not_raised(backends):
    """Direct calls (validation takes int4 dims even and int2 dims multiples of 4, as they do)."""
    batch = JaggedBatch.from_bags({"x": [[0]]})
    for storage, dim in (("int4", 5), ("int2", 6)):
        tables = [TableConfig("q", 4, dim, ("x",), Pooling.SUM, storage)]
        for name in ("fbgemm-tbe-int-n", "torchrec-quant", "torch"):
            reason = backends[name].supports(tables, batch)
            assert reason is not None and f"{storage} dim {dim}" in reason, (name, reason)


def test_fbgemm_mixed_poolings_get_one_module_each_in_the_contract_column_order(backends):
    rng = np.random.default_rng(2)
    tables = [
        TableConfig("s1", 8, 4, ("a",), Pooling.SUM, "int8"),
        TableConfig("m", 8, 8, ("b", "c"), Pooling.MEAN, "int4"),
        TableConfig("s2", 8, 4, ("d",), Pooling.SUM, "int2"),
    ]
    weights = {t.name: _rows(rng, t.dtype, 8, t.embedding_dim, "quantized") for t in tables}
    bags = {f: [rng.integers(0, 8, 3).tolist(), []] for t in tables for f in t.feature_names}
    problem = Problem(tuple(tables), weights, JaggedBatch.from_bags(bags))
    for name in ("fbgemm-tbe-int-n", "torchrec-quant"):
        (v,) = verdicts_of(backends[name], problem)
        assert v.outcome is Outcome.AGREE, (name, v.detail)


def test_registered_and_listed_as_available():
    statuses = {s.name: s for s in backend_statuses()}
    for name in (
        *QUANTIZED_BACKENDS,
        "fbgemm-tbe-int-n-warning",
        "fbgemm-tbe-int-n-ignore",
        "fbgemm-tbe-int-n-none",
    ):
        assert statuses[name].available, (name, statuses[name].reason)
    assert load_backend("fbgemm-tbe-int-n-none").bounds_check_mode == "NONE"


# ---------------------------------------------------------------------------------------------
# Bounds-check modes with bad ids (direct calls: the harness rejects such batches first).


def _bad_id_lookup(name: str, pooling: Pooling = Pooling.SUM, rows: int = 5):
    """A lookup of one int8 table of ``rows`` rows, row r = [r + 1] * 4 (scale 1, bias r + 1)."""
    q = QuantizedTable(
        torch.zeros(rows, 4, dtype=torch.uint8),
        torch.ones(rows, dtype=torch.float16),
        torch.arange(1, rows + 1, dtype=torch.float16),
        "int8",
    )
    return load_backend(name).prepare([TableConfig("t", rows, 4, ("f",), pooling, "int8")], {"t": q})


def _one_bag(*ids: int) -> JaggedBatch:
    return JaggedBatch(("f",), torch.tensor(ids, dtype=torch.int64), torch.tensor([len(ids)]))


@pytest.mark.parametrize("name", ["fbgemm-tbe-int-n", "torchrec-quant"])
def test_fatal_bounds_check_raises_on_an_id_outside_the_table(name):
    with pytest.raises(RuntimeError, match=r"idx < num_rows"):
        _bad_id_lookup(name)(_one_bag(2, 5))


def test_torchrec_quant_sets_every_tbe_to_fatal():
    from impls.torchrec_quant import TorchrecQuantEBC

    tables = [
        TableConfig("s", 4, 4, ("a",), Pooling.SUM, "int8"),
        TableConfig("m", 4, 4, ("b",), Pooling.MEAN, "int4"),
    ]
    weights = {t.name: quantize_rows(torch.randn(4, 4), t.dtype) for t in tables}
    module = TorchrecQuantEBC().build(tables, weights, is_weighted=False)
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import BoundsCheckMode

    modes = [m.bounds_check_mode_int for m in module.modules() if hasattr(m, "bounds_check_mode_int")]
    assert modes == [BoundsCheckMode.FATAL.value] * 2  # one TBE per pooling, both set


@pytest.mark.parametrize("name", ["fbgemm-tbe-int-n-warning", "fbgemm-tbe-int-n-ignore"])
def test_warning_and_ignore_replace_a_bad_id_by_row_0(name):
    out = _bad_id_lookup(name)(_one_bag(2, 5, 1000))
    assert out.tolist() == [[3.0 + 1.0 + 1.0] * 4]  # row 2 = 3, and two bad ids as row 0 = 1


def test_none_reads_the_tables_padding_and_raises_past_it():
    """NONE leaves the check to the kernel, whose row count is the table's block (padded to 128
    bytes) over the row size: a 5-row int8 table of 8-byte rows has 16 such rows."""
    lookup = _bad_id_lookup("fbgemm-tbe-int-n-none")
    assert lookup(_one_bag(2, 5, 15)).tolist() == [[3.0] * 4]  # ids 5..15 read zero padding
    with pytest.raises(RuntimeError, match=r"out of bounds"):
        lookup(_one_bag(2, 16))


@pytest.mark.parametrize("name", ["fbgemm-tbe-int-n", "fbgemm-tbe-int-n-warning", "fbgemm-tbe-int-n-none"])
def test_minus_one_is_skipped_in_every_mode_but_counts_in_the_mean(name):
    assert _bad_id_lookup(name, Pooling.MEAN)(_one_bag(3, -1)).tolist() == [[2.0] * 4]  # (4 + 0) / 2


# ---------------------------------------------------------------------------------------------
# torch's quantized ops ignore ``mode``: the known case and its model.


def test_torch_mean_finding_reproduces_and_its_model_explains_it():
    from harness.fuzz.replay import replay

    case = load_case("cases/known/" + TORCH_MEAN_CASE + ".json")
    (result,) = replay([case])
    assert result.verdict.outcome is Outcome.DISAGREE and result.explanation.explained, result.verdict.detail
    out = load_backend("torch").prepare(case.problem.tables, case.problem.weights)(case.problem.batch)
    assert out.tolist() == [[4.0, 4.0, 4.0, 0.0] * 3]  # the SUM of rows [1,2,3,0] + [3,2,1,0], three ops


class _Wrong:
    """A backend whose lookup is torch's result changed by ``how``; it claims to be ``torch``."""

    name = "torch"

    def __init__(self, how) -> None:
        self.how = how

    def supports(self, tables, batch):
        return None

    def prepare(self, tables, weights):
        inner = load_backend("torch").prepare(tables, weights)
        return lambda batch: self.how(inner(batch), tables, batch)


def _halved_mean_columns(out, tables, batch):  # MEAN of a bag of 2, wrongly divided twice
    return out / 4


def _sum_a_little_off(out, tables, batch):  # the SUM times 1 + 2**-12: beyond the SUM's bound
    return out * (1 + 2.0**-12)


@pytest.mark.parametrize("how", [_halved_mean_columns, _sum_a_little_off])
def test_the_mean_model_explains_torchs_sum_and_nothing_else(how):
    case = load_case("cases/known/" + TORCH_MEAN_CASE + ".json")
    p = case.problem
    problem = Problem(p.tables, p.weights, p.batch)
    from harness.agreement import Oracle

    oracle = Oracle.of(p.tables, p.weights, p.batch)
    wrong = check_backend(_Wrong(how), p.tables, p.weights, p.batch, oracle)
    (v,) = mark_known([wrong], problem, KNOWN)
    assert v.outcome is Outcome.DISAGREE and "not explained" in v.detail, v.detail
    right = check_backend(load_backend("torch"), p.tables, p.weights, p.batch, oracle)
    assert right.outcome is Outcome.DISAGREE  # without the case: a real discrepancy
    (known,) = mark_known([right], problem, KNOWN)
    assert known.outcome is Outcome.KNOWN and known.known_cases == (TORCH_MEAN_CASE,)


def test_the_mean_model_claims_only_mean_tables_of_its_dtypes():
    """torch's SUM tables and float MEAN tables stay held to the contract."""
    from harness.known import MeanPooledAsSum, model_from_json

    model = model_from_json({"kind": "mean-pooled-as-sum", "tables": ["int8", "int4", "int2"]})
    assert model == MeanPooledAsSum(("int8", "int4", "int2"))
    tables = (
        TableConfig("a", 2, 4, ("x",), Pooling.MEAN, "int8"),
        TableConfig("b", 2, 4, ("y",), Pooling.SUM, "int4"),
        TableConfig("c", 2, 4, ("z",), Pooling.MEAN, torch.float32),
    )
    claimed = model.table_transforms(
        Problem(tables, {}, JaggedBatch.from_bags({"x": [[0]], "y": [[0]], "z": [[0]]}))
    )
    assert set(claimed) == {"a"}


# ---------------------------------------------------------------------------------------------
# triton: the compiled path, which the interpreter cannot check.


@pytest.mark.parametrize("only_kind", [3, 4, 5, -1], ids=["int8", "int4", "int2", "mixed"])
def test_triton_kernel_compiles_for_a_hopper_gpu_with_quantized_rows(only_kind):
    pytest.importorskip("triton")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from impls.triton_kernels import kernel

    fn = kernel(False)
    pointers = [
        "offsets",
        "feat_base",
        "feat_dim",
        "feat_col",
        "feat_mean",
        "feat_kind",
        "feat_rows",
        "feat_qrow",
        "error",
    ]
    signature = {"values": "*i64", **{p: "*i64" for p in pointers}, "per_sample": "*fp32", "out": "*fp32"}
    signature.update({"w_a": "*fp32", "w_b": "*fp16", "w_c": "*bf16", "w_q": "*u8", "w_s": "*fp16"})
    signature.update({"batch": "i32", "out_stride": "i32"})
    signature = {name: signature.get(name, "constexpr") for name in fn.arg_names}
    constants = {"BLOCK_B": 16, "BLOCK_D": 64, "UNROLL": 2, "HAS_WEIGHTS": True, "HAS_MEAN": True,
                 "ONLY_KIND": only_kind, "VEC": 4}  # fmt: skip
    aligned = {
        (i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names) if signature[n].startswith("*")
    }
    compiled = triton.compile(ASTSource(fn, signature, constants, aligned), target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": 4})  # fmt: skip
    assert "ld.global" in compiled.asm["ptx"]
