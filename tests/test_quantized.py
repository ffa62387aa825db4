"""Row-wise quantized tables: the quantizer, packing, validation, reference and tolerance."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from harness.model import (
    SUPPORTED_DTYPES,
    JaggedBatch,
    Pooling,
    TableConfig,
    dtype_from_name,
    dtype_name,
    is_quantized,
)
from harness.quantized import (
    QUANTIZED_STORAGE,
    QuantizedTable,
    bits_of,
    dequantize,
    pack_codes,
    packed_dim,
    quantize_rows,
    row_bytes,
    scale_bias_bytes,
    unpack_codes,
)
from harness.validate import ProblemError, validate_problem
from harness.weights import make_weights


def _fbgemm():
    pytest.importorskip("fbgemm_gpu")
    return torch.ops.fbgemm


def _hard_rows(n: int, dim: int, gen: torch.Generator) -> torch.Tensor:
    """Rows of every kind the quantizer's corner cases hide in: normal, fp16-valued, narrow ranges
    around values fp16 rounds up or down (so ``range`` is tiny or negative), constant rows."""
    x = torch.randn(n, dim, generator=gen)
    k = n // 6
    x[k : 2 * k] = x[k : 2 * k].half().float()
    x[2 * k : 3 * k] = 0.3 + 1e-5 * x[2 * k : 3 * k]
    x[3 * k : 4 * k] = 0.1 + 1e-7 * x[3 * k : 4 * k]
    x[4 * k : 5 * k] = x[4 * k : 5 * k, :1]  # constant rows, mostly not fp16-representable
    x[5 * k :] = x[5 * k :].clamp(-4, 4) * 16_000  # ranges up to fp16's limit
    return x


@pytest.mark.parametrize("storage", QUANTIZED_STORAGE)
def test_the_quantizer_is_fbgemms_bit_for_bit(storage):
    ops = _fbgemm()
    bits = bits_of(storage)
    dim = 16  # FBGEMM's op needs whole fp16s of packed bytes: int2 dims of 8, int4 of 4
    x = _hard_rows(30_000, dim, torch.Generator().manual_seed(bits))
    ours = quantize_rows(x, storage)
    theirs = ops.FloatToFusedNBitRowwiseQuantizedSBHalf(x, bits)
    width = packed_dim(dim, storage)
    qparams = theirs[:, width:].contiguous().view(torch.int16)
    assert torch.equal(pack_codes(ours.codes, storage), theirs[:, :width])
    assert torch.equal(ours.scale.view(torch.int16), qparams[:, 0])
    assert torch.equal(ours.bias.view(torch.int16), qparams[:, 1])


def test_the_quantizer_multiplies_by_the_inverse_scale():
    # A row where (x - bias) / scale and (x - bias) * fp32(1 / scale) round to different codes.
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(100_000, 8, generator=gen).half().float()
    table = quantize_rows(x, "int8")
    bias, scale = table.bias.float()[:, None], table.scale.float()[:, None]
    divided = torch.round((x - bias) / scale).clamp(0, 255).to(torch.uint8)
    assert not torch.equal(divided, table.codes)  # the rules differ on this data...
    ops = _fbgemm()
    theirs = ops.FloatToFusedNBitRowwiseQuantizedSBHalf(x, 8)[:, :8]
    assert torch.equal(theirs, table.codes)  # ...and FBGEMM's is the inverse's


def test_quantizer_corner_cases():
    t = quantize_rows(torch.tensor([[0.25] * 4, [0.0] * 4, [0.3] * 4, [1.0, 1.0, 1.0, 1 + 1e-7]]), "int8")
    assert t.scale[:2].tolist() == [1.0, 1.0] and t.bias[:2].tolist() == [0.25, 0.0]
    assert t.codes[:2].eq(0).all()
    assert float(t.scale[2]) < 0  # fp16(0.3) > 0.3: the range is negative, so is the scale
    assert float(t.scale[3]) == 1.0 and t.codes[3].eq(0).all()  # range / 255 underflows fp16
    assert (dequantize(t)[2] - 0.3).abs().max() < 1e-4
    empty = quantize_rows(torch.zeros(0, 4), "int4")
    assert empty.codes.shape == (0, 4) and empty.scale.shape == (0,)


def test_the_quantizer_refuses_what_fp16_cannot_hold():
    with pytest.raises(ValueError, match=r"row 1: value inf at column 2 is not finite"):
        quantize_rows(torch.tensor([[0.0, 1, 2], [0, 1, float("inf")]]), "int8")
    with pytest.raises(ValueError, match=r"row 0: its range \[-70000.0, 1.0\] gives fp16 bias -inf"):
        quantize_rows(torch.tensor([[-7e4, 1.0]]), "int8")
    with pytest.raises(ValueError, match=r"row 0: .* scale inf"):
        quantize_rows(torch.tensor([[0.0, 3e38]]), "int2")


@pytest.mark.parametrize("storage", QUANTIZED_STORAGE)
def test_packing_is_lsb_first_and_round_trips(storage):
    bits = bits_of(storage)
    codes = torch.randint(0, 2**bits, (5, 8), dtype=torch.int32).to(torch.uint8)
    packed = pack_codes(codes, storage)
    assert packed.shape == (5, packed_dim(8, storage)) and packed.dtype == torch.uint8
    assert torch.equal(unpack_codes(packed, 8, storage), codes)
    per = 8 // bits
    byte0 = sum(int(codes[0, k]) << (k * bits) for k in range(per))
    assert int(packed[0, 0]) == byte0
    if storage == "int4":
        assert pack_codes(torch.tensor([[1, 2]], dtype=torch.uint8), storage).tolist() == [[0x21]]
    assert row_bytes(8, storage) == 8 * bits // 8 + 4


def test_scale_bias_bytes_are_fbgemms_front_of_row_layout():
    t = QuantizedTable(
        torch.zeros(1, 2, dtype=torch.uint8),
        torch.tensor([0x2C70], dtype=torch.int16).view(torch.float16),  # 0.0693
        torch.tensor([0xB931 - 0x10000], dtype=torch.int16).view(torch.float16),  # -0.649
        "int4",
    )
    assert scale_bias_bytes(t).tolist() == [[112, 44, 49, 185]]  # the research's TBE row dump


def test_dequantize_is_exact_in_float64():
    t = quantize_rows(_hard_rows(600, 8, torch.Generator().manual_seed(1)), "int8")
    exact = [
        [float(s) * int(q) + float(b) for q in row]  # Python floats: float64, one rounding each
        for row, s, b in zip(t.codes.tolist(), t.scale.tolist(), t.bias.tolist(), strict=True)
    ]
    assert torch.equal(dequantize(t), torch.tensor(exact, dtype=torch.float64))
    # exact: the float32 product s * q is exact too, so float64 must reproduce it bit for bit
    assert torch.equal(
        dequantize(t), (t.scale.float()[:, None] * t.codes.float()).double() + t.bias.double()[:, None]
    )


def test_model_names_and_seeded_weights():
    assert [dtype_from_name(dtype_name(s)) for s in QUANTIZED_STORAGE] == list(QUANTIZED_STORAGE)
    t = TableConfig("q", 10, 8, ("f",), dtype="int4")
    assert is_quantized(t) and not is_quantized(TableConfig("f", 1, 1, ("g",)))
    w = make_weights([t], seed=2)["q"]
    assert isinstance(w, QuantizedTable) and w.storage == "int4" and w.codes.shape == (10, 8)
    assert torch.equal(w.codes, make_weights([t], seed=2)["q"].codes)  # seeded
    assert int(w.codes.max()) <= 15


# ---------------------------------------------------------------------------------------------
# Validation


def _problem(dim=8, storage="int4", rows=4):
    t = TableConfig("q", rows, dim, ("f",), dtype=storage)
    w = quantize_rows(torch.randn(rows, dim, generator=torch.Generator().manual_seed(0)), storage)
    return [t], {"q": w}, JaggedBatch.from_bags({"f": [[0, 1], [3]]})


@pytest.mark.parametrize(("storage", "dim", "ok"), [("int8", 3, True), ("int4", 6, True), ("int4", 5, False),
                                                    ("int2", 4, True), ("int2", 6, False)])  # fmt: skip
def test_dims_the_packing_cannot_hold_are_rejected(storage, dim, ok):
    tables, weights, batch = _problem(dim, storage)
    if ok:
        validate_problem(tables, batch, weights)
        return
    with pytest.raises(ProblemError, match=rf"table 'q': {storage} packs .* multiple of .*got {dim}"):
        validate_problem(tables, batch, weights)


def test_codes_out_of_range_are_named():
    tables, weights, batch = _problem()
    codes = weights["q"].codes.clone()
    codes[2, 5] = 16
    bad = QuantizedTable(codes, weights["q"].scale, weights["q"].bias, "int4")
    with pytest.raises(ProblemError, match=r"table 'q', row 2, column 5 has code 16; int4 codes are 0..15"):
        validate_problem(tables, batch, {"q": bad})


@pytest.mark.parametrize("field", ["scale", "bias"])
@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_non_finite_scale_or_bias_is_named(field, value):
    tables, weights, batch = _problem()
    w = weights["q"].clone()
    getattr(w, field)[3] = value
    with pytest.raises(ProblemError, match=rf"non-finite {field}: table 'q', row 3 has {field} {value}"):
        validate_problem(tables, batch, {"q": w})


def test_wrong_tensors_and_kinds_are_named():
    tables, weights, batch = _problem()
    w = weights["q"]
    c, sc, b = w.codes, w.scale, w.bias
    cases = {
        r"codes .* uint8 tensor of shape \(4, 8\), got int64": QuantizedTable(c.long(), sc, b, "int4"),
        r"scale .* float16 tensor of shape \(4,\), got float32": QuantizedTable(c, sc.float(), b, "int4"),
        r"bias .* shape \(4,\), got float16 of shape \(3,\)": QuantizedTable(c, sc, b[:3], "int4"),
        r"codes .* shape \(4, 8\), got uint8 of shape \(4, 4\)": QuantizedTable(c[:, :4], sc, b, "int4"),
        "stored 'int8', but the table's dtype is 'int4'": QuantizedTable(c, sc, b, "int8"),
        "are a Tensor; a int4 table needs a harness.quantized.QuantizedTable": dequantize(w).float(),
    }
    for message, bad in cases.items():
        with pytest.raises(ProblemError, match=message):
            validate_problem(tables, batch, {"q": bad})
    float_table = [TableConfig("q", 4, 8, ("f",))]
    with pytest.raises(
        ProblemError, match=r"are a QuantizedTable \(int4\), but the table's dtype is float32"
    ):
        validate_problem(float_table, batch, {"q": w})


def test_per_sample_weights_on_quantized_tables_are_allowed_with_sum():
    tables, weights, batch = _problem()
    weighted = JaggedBatch.from_bags({"f": [[0, 1], [3]]}, weights={"f": [[0.5, -2.0], [3.0]]})
    validate_problem(tables, weighted, weights)
    mean = [TableConfig("q", 4, 8, ("f",), Pooling.MEAN, "int4")]
    with pytest.raises(ProblemError, match="per-sample weights require SUM pooling"):
        validate_problem(mean, weighted, weights)


# ---------------------------------------------------------------------------------------------
# Reference and tolerance against the libraries' arithmetic


def _adversarial_rows(storage: str, rows: int, dim: int, gen: torch.Generator) -> QuantizedTable:
    """Rows whose ``s q`` and ``b`` cancel (values near 0, bias -1000), wide rows (the whole fp16
    range), narrow and constant rows (tiny or negative scales) and ordinary ones, interleaved."""
    nlev = 2 ** bits_of(storage) - 1
    kinds = [
        lambda: torch.rand(dim, generator=gen) * 2 - 1,  # quantized below; stands for ordinary rows
        lambda: (torch.rand(dim, generator=gen) * 2 - 1) * 60_000,
        lambda: 0.3 + 1e-5 * torch.randn(dim, generator=gen),
        lambda: torch.full((dim,), float(torch.randn(1, generator=gen)) * 7),
    ]
    values = torch.stack([kinds[r % len(kinds)]() for r in range(rows)])
    table = quantize_rows(values, storage)
    cancel = torch.arange(rows) % 5 == 4  # bias -1000, top codes: values within a few scales of 0
    table.scale[cancel] = torch.tensor(1000.0 / nlev).half()
    table.bias[cancel] = -1000.0
    top = torch.randint(nlev - 2, nlev + 1, (int(cancel.sum()), dim), generator=gen, dtype=torch.int32)
    table.codes[cancel] = top.to(torch.uint8)
    return table


def _adversarial_problem(storage: str, pooling: Pooling, weighted: bool, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    tables = [
        TableConfig("a", 60, 8, ("f", "g"), pooling, storage),
        TableConfig("b", 40, 16, ("h",), pooling, storage),
    ]
    weights = {t.name: _adversarial_rows(storage, t.num_embeddings, t.embedding_dim, gen) for t in tables}
    rows = {"f": 60, "g": 60, "h": 40}
    lengths = [0, 1, 2, 3, 5, 8, 13, 40, 200]
    bags = {
        k: [torch.randint(0, n, (lengths[i % len(lengths)],), generator=gen).tolist() for i in range(18)]
        for k, n in rows.items()
    }
    sample_weights = None
    if weighted:
        sample_weights = {
            k: [
                (
                    torch.randn(len(b), generator=gen) * 10 ** torch.randint(-3, 4, (len(b),), generator=gen)
                ).tolist()
                for b in v
            ]
            for k, v in bags.items()
        }
    return tables, weights, JaggedBatch.from_bags(bags, weights=sample_weights)


def _fbgemm_emulated(tables, weights, batch) -> torch.Tensor:
    """FBGEMM's CPU arithmetic in numpy float32, per id: ``acc = fma(fl(w s), q, fl(acc + fl(w b)))``;
    MEAN multiplies by ``fl(1 / L)`` (research note: bit-exact to the library)."""
    import numpy as np

    out = []
    offsets = batch.offsets.tolist()
    b = batch.batch_size
    with np.errstate(all="ignore"):  # overflow to inf and inf * 0 are what the library does
        return _emulated(tables, weights, batch, offsets, b, out)


def _emulated(tables, weights, batch, offsets, b, out):
    import numpy as np

    for t in tables:
        w = weights[t.name]
        q, s, bias = w.codes.numpy().astype(np.float64), w.scale.float().numpy(), w.bias.float().numpy()
        for feature in t.feature_names:
            f = batch.keys.index(feature)
            block = np.zeros((b, t.embedding_dim), np.float32)
            for sample in range(b):
                start, end = offsets[f * b + sample], offsets[f * b + sample + 1]
                acc = np.zeros(t.embedding_dim, np.float32)
                for p in range(start, end):
                    i = int(batch.values[p])
                    weight = np.float32(1.0) if batch.weights is None else np.float32(batch.weights[p])
                    sc, bb = np.float32(weight * s[i]), np.float32(weight * bias[i])
                    acc = (np.float64(sc) * q[i] + (acc + bb).astype(np.float64)).astype(np.float32)
                if t.pooling is Pooling.MEAN and end > start:
                    acc = acc * (np.float32(1.0) / np.float32(end - start))
                block[sample] = acc
            out.append(torch.from_numpy(block))
    return torch.cat(out, dim=1)


def _tbe(tables, weights, batch, *, pack=pack_codes, qparams=scale_bias_bytes) -> torch.Tensor:
    """FBGEMM's IntNBit TBE on the CPU with float32 output, fed jagbench's codes (``pack`` and
    ``qparams`` make its rows: replaceable to plant an adapter's bug). Keys in table order."""
    pytest.importorskip("fbgemm_gpu")
    from fbgemm_gpu.split_embedding_configs import SparseType
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import (
        BoundsCheckMode,
        EmbeddingLocation,
        PoolingMode,
    )
    from fbgemm_gpu.split_table_batched_embeddings_ops_inference import (
        IntNBitTableBatchedEmbeddingBagsCodegen,
    )

    kinds = {"int8": SparseType.INT8, "int4": SparseType.INT4, "int2": SparseType.INT2}
    specs = [
        (t.name, t.num_embeddings, t.embedding_dim, kinds[t.dtype], EmbeddingLocation.HOST) for t in tables
    ]
    order = [f for t in tables for f in t.feature_names]
    assert list(batch.keys) == order
    feature_table_map = [i for i, t in enumerate(tables) for _ in t.feature_names]
    mean = tables[0].pooling is Pooling.MEAN
    tbe = IntNBitTableBatchedEmbeddingBagsCodegen(
        specs,
        feature_table_map=feature_table_map,
        pooling_mode=PoolingMode.MEAN if mean else PoolingMode.SUM,
        device="cpu",
        bounds_check_mode=BoundsCheckMode.FATAL,
        output_dtype=SparseType.FP32,
    )
    tbe.initialize_weights()
    for (codes, scale_bias), t in zip(tbe.split_embedding_weights(), tables, strict=True):
        codes.copy_(pack(weights[t.name].codes, t.dtype))
        scale_bias.copy_(qparams(weights[t.name]))
    return tbe(batch.values, batch.offsets, batch.weights)


def _float_style_bound(tables, weights, batch, ref) -> torch.Tensor:
    """The float tables' bound applied as if the dequantized value were the term: ``S = sum |w x|``
    over ``L`` terms (what the quantized term count replaces)."""
    from harness.tolerance import error_bound

    magnitude = torch.zeros_like(ref.value)
    offsets, b = batch.offsets.tolist(), batch.batch_size
    col = 0
    for t in tables:
        x = dequantize(weights[t.name])
        for feature in t.feature_names:
            f = batch.keys.index(feature)
            for sample in range(b):
                start, end = offsets[f * b + sample], offsets[f * b + sample + 1]
                for p in range(start, end):
                    w = 1.0 if batch.weights is None else float(batch.weights[p])
                    magnitude[sample, col : col + t.embedding_dim] += (x[int(batch.values[p])] * w).abs()
                if t.pooling is Pooling.MEAN and end > start:
                    magnitude[sample, col : col + t.embedding_dim] /= end - start
            col += t.embedding_dim
    return error_bound(magnitude, ref.bag_length, ref.is_mean)


ADVERSARIAL = [
    (s, p, w)
    for s in QUANTIZED_STORAGE
    for p, w in [(Pooling.SUM, False), (Pooling.SUM, True), (Pooling.MEAN, False)]
]


def _ids(case) -> str:
    return f"{case[0]}-{case[1].value}{'-weighted' if case[2] else ''}"


@pytest.mark.parametrize("case", ADVERSARIAL, ids=_ids)
def test_fbgemm_arithmetic_is_within_the_quantized_bound_and_beyond_the_float_one(case):
    from harness.agreement import Oracle
    from harness.tolerance import compare

    tables, weights, batch = _adversarial_problem(*case)
    validate_problem(tables, batch, weights)
    oracle = Oracle.of(tables, weights, batch)
    emulated = _fbgemm_emulated(tables, weights, batch)
    verdict = compare(emulated, oracle.reference.value, oracle.tolerance)
    assert verdict.agree, verdict.describe()
    # The cancelling rows need the two-term count: with S = sum |w x| FBGEMM is out of bounds.
    float_style = _float_style_bound(tables, weights, batch, oracle.reference)
    error = (emulated.double() - oracle.reference.value).abs()
    assert bool((error > float_style).any())


@pytest.mark.parametrize("case", ADVERSARIAL, ids=_ids)
def test_the_real_int_n_tbe_is_within_the_quantized_bound(case):
    from harness.agreement import Oracle
    from harness.tolerance import compare

    tables, weights, batch = _adversarial_problem(*case, seed=1)
    oracle = Oracle.of(tables, weights, batch)
    got = _tbe(tables, weights, batch)
    verdict = compare(got, oracle.reference.value, oracle.tolerance)
    assert verdict.agree, verdict.describe()
    assert torch.equal(got, _fbgemm_emulated(tables, weights, batch))  # the emulation is the library's


def _nibbles_swapped(codes: torch.Tensor, storage: str) -> torch.Tensor:
    per = 8 // bits_of(storage)
    return pack_codes(codes.reshape(codes.shape[0], -1, per).flip(2).reshape(codes.shape), storage)


def _bias_first(table: QuantizedTable) -> torch.Tensor:
    return torch.stack([table.bias, table.scale], dim=1).contiguous().view(torch.uint8)


def _bias_ignored(table: QuantizedTable) -> torch.Tensor:
    return torch.stack([table.scale, torch.zeros_like(table.bias)], dim=1).contiguous().view(torch.uint8)


def _codes_off_by_one(codes: torch.Tensor, storage: str) -> torch.Tensor:
    nlev = 2 ** bits_of(storage) - 1
    shifted = torch.where(codes < nlev, codes.int() + 1, codes.int() - 1).to(torch.uint8)
    return pack_codes(shifted, storage)


PLANTED = {
    "nibble order swapped": {"pack": _nibbles_swapped},
    "scale and bias swapped": {"qparams": _bias_first},
    "bias ignored": {"qparams": _bias_ignored},
    "codes off by one": {"pack": _codes_off_by_one},
}


@pytest.mark.parametrize("storage", QUANTIZED_STORAGE)
@pytest.mark.parametrize("bug", PLANTED)
def test_a_wrong_dequantization_in_the_tbe_adapter_is_caught(storage, bug):
    from harness.agreement import Oracle
    from harness.tolerance import compare

    if bug == "nibble order swapped" and storage == "int8":
        pytest.skip("int8 has one code a byte")
    tables, weights, batch = _adversarial_problem(storage, Pooling.SUM, True, seed=2)
    oracle = Oracle.of(tables, weights, batch)
    assert compare(_tbe(tables, weights, batch), oracle.reference.value, oracle.tolerance).agree
    wrong = _tbe(tables, weights, batch, **PLANTED[bug])
    assert not compare(wrong, oracle.reference.value, oracle.tolerance).agree


# ---------------------------------------------------------------------------------------------
# Case files, strategies, coverage, workloads, robustness inputs, the minimiser


def test_a_case_file_stores_the_codes_scale_and_bias_exactly(tmp_path):
    import json

    from harness.cases import problem_from_json, problem_to_json
    from harness.model import Problem

    tables, weights, batch = _adversarial_problem("int4", Pooling.SUM, True, seed=3)
    text = json.dumps(problem_to_json(Problem(tables, weights, batch)))
    back = problem_from_json(json.loads(text))
    for t in tables:
        a, b = weights[t.name], back.weights[t.name]
        assert isinstance(b, QuantizedTable) and b.storage == a.storage == t.dtype
        assert torch.equal(a.codes, b.codes)
        assert torch.equal(a.scale.view(torch.int16), b.scale.view(torch.int16))
        assert torch.equal(a.bias.view(torch.int16), b.bias.view(torch.int16))
    assert back.tables == tuple(tables)
    seeded = problem_to_json(Problem(tables, weights, batch), weight_seeds={"a": (5, 1.0)})
    assert seeded["weights"]["a"] == {"seed": 5, "scale": 1.0}
    assert torch.equal(
        problem_from_json(seeded).weights["a"].codes, make_weights(tables[:1], seed=5)["a"].codes
    )


def test_quantizing_in_blocks_is_quantizing_at_once():
    from harness import quantized

    x = torch.randn(70_000, 4, generator=torch.Generator().manual_seed(4))
    whole = quantize_rows(x, "int2")
    parts = [
        quantize_rows(x[: quantized._BLOCK_ROWS], "int2"),
        quantize_rows(x[quantized._BLOCK_ROWS :], "int2"),
    ]
    assert whole.num_rows == 70_000 > quantized._BLOCK_ROWS
    assert torch.equal(whole.codes, torch.cat([p.codes for p in parts]))
    assert torch.equal(whole.scale, torch.cat([p.scale for p in parts]))
    x[quantized._BLOCK_ROWS + 5, 1] = float("nan")
    with pytest.raises(ValueError, match=rf"row {quantized._BLOCK_ROWS + 5}: value nan at column 1"):
        quantize_rows(x, "int2")


def test_quantized_table_indexes_like_its_values():
    t = quantize_rows(torch.randn(6, 8, generator=torch.Generator().manual_seed(5)), "int4")
    rows = t[torch.tensor([4, 1])]
    assert torch.equal(dequantize(rows), dequantize(t)[[4, 1]])
    assert torch.equal(dequantize(t[:, torch.tensor([0, 3])]), dequantize(t)[:, [0, 3]])
    assert torch.equal(dequantize(t[2:5]), dequantize(t)[2:5]) and len(t[2:5]) == 3
    assert t[3].num_rows == 1 and t.numel() == 48


@pytest.mark.parametrize("storage", QUANTIZED_STORAGE)
def test_every_value_profile_makes_valid_tables_with_the_ranges_it_promises(storage):
    from harness.fuzz.problem_spec import WEIGHT_PROFILES, make_profile_weights
    from harness.validate import validate_weights

    found = {}
    for profile in WEIGHT_PROFILES:
        t = TableConfig("t", 3000, 8, ("f",), dtype=storage)
        w = make_profile_weights(t, profile, seed=7)
        validate_weights([t], {"t": w})  # every profile gives a valid stored table
        assert torch.equal(w.codes, make_profile_weights(t, profile, seed=7).codes)  # deterministic
        found[profile] = w
    spread = {p: (w.scale.float().abs() * levels(storage)) for p, w in found.items()}
    assert float(spread["wide"].min()) < 1e-4 and float(spread["wide"].max()) > 1e3  # narrow and wide rows
    assert bool((found["tiny"].scale < 0).any()) and bool((found["tiny"].scale == 1).any())
    assert bool((found["wide"].codes == 0).all(dim=1).any())  # constant rows
    assert float(found["huge"].bias.float().abs().max()) > 6e4
    subnormal = found["subnormal"].scale.float().abs()
    assert bool((subnormal < 2.0**-14).all()) and bool((subnormal > 0).all())
    cancel = found["cancel"]
    s, b = cancel.scale.double().abs(), cancel.bias.double().abs()
    near_zero = dequantize(cancel).abs().amax(dim=1) <= 2.01 * s  # within two scales of 0 ...
    assert bool((near_zero & (b > 100) & (b >= 0.99 * levels(storage) * s)).any())  # ... with b large


def levels(storage: str) -> int:
    return 2 ** bits_of(storage) - 1


def test_quantized_tables_are_opt_in_and_then_a_steady_share():
    """`problems()` draws float tables only; with every table dtype (what the fuzzer draws for
    numba, triton, torch: `harness.backend.table_dtypes`) quantized ones are a steady minority."""
    from hypothesis import HealthCheck, given, settings

    from harness.backend import load_backend, table_dtypes
    from harness.fuzz.strategies import problems
    from harness.model import TABLE_DTYPES

    assert table_dtypes(load_backend("numba")) == TABLE_DTYPES
    assert table_dtypes(object()) == SUPPORTED_DTYPES
    floats = []

    @settings(
        max_examples=60,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(problems(max_cost=20_000))
    def draw_floats(problem):
        floats.append(any(is_quantized(t) for t in problem.tables))

    draw_floats()
    assert len(floats) == 60 and not any(floats)

    seen = []

    @settings(
        max_examples=150,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(problems(max_cost=20_000, dtypes=TABLE_DTYPES))
    def draw(problem):
        validate_problem(problem.tables, problem.batch, problem.weights)
        seen.append({t.dtype for t in problem.tables if is_quantized(t)})

    draw()
    share = sum(bool(s) for s in seen) / len(seen)
    assert 0.05 < share < 0.5, share
    storages = []

    @settings(
        max_examples=60,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(problems(max_cost=20_000, dtypes=QUANTIZED_STORAGE))
    def draw_quantized(problem):
        storages.extend(t.dtype for t in problem.tables)

    draw_quantized()
    assert set(storages) == set(QUANTIZED_STORAGE)  # every storage is drawn


def test_a_backend_declaring_its_table_dtypes_is_fuzzed_on_them():
    from hypothesis import HealthCheck, given, settings

    from harness.fuzz.driver import default_strategy

    class QuantizedOnly:
        table_dtypes = ("int8", "int4")

    seen = set()

    @settings(
        max_examples=30,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(default_strategy(QuantizedOnly()))
    def draw(problem):
        seen.update(t.dtype for t in problem.tables)

    draw()
    assert seen == {"int8", "int4"}


def test_coverage_buckets_name_the_quantized_storage():
    from harness.fuzz.coverage import DIMENSIONS, buckets
    from harness.model import Problem

    tables, weights, batch = _adversarial_problem("int2", Pooling.SUM, False)
    found = buckets(Problem(tables, weights, batch))
    assert found["quantized"] == "int2" and found["dtypes"] == "none"
    labels = dict(DIMENSIONS)
    assert found["quantized"] in labels["quantized"] and found["dtypes"] in labels["dtypes"]
    mixed = (tables[0], TableConfig("c", 3, 4, ("z",), Pooling.SUM, "int8"), TableConfig("d", 3, 4, ("y",)))
    w = {**weights, "c": quantize_rows(torch.ones(3, 4), "int8"), "d": torch.ones(3, 4)}
    b = JaggedBatch.from_bags({"f": [[0]], "g": [[1]], "z": [[2]], "y": [[0]]})
    found = buckets(Problem(mixed, w, b))
    assert found["quantized"] == "several" and found["dtypes"] == "float32"


def test_the_byte_model_counts_packed_rows_with_scale_and_bias():
    from harness.bench.metrics import byte_model
    from harness.bench.workloads import get_workloads

    tables = [TableConfig("a", 5, 6, ("f",), dtype="int8"), TableConfig("b", 5, 8, ("g",), dtype="int2")]
    batch = JaggedBatch.from_bags({"f": [[0, 1], [2]], "g": [[4], []]})
    # int8 dim 6: 6 + 4 bytes, 3 ids; int2 dim 8: 2 + 4 bytes, 1 id; output 2 x 14 x 4
    assert byte_model(tables, batch)["rows_read_bytes"] == 3 * 10 + 1 * 6
    by_name = {w.name: w for w in get_workloads(["quantized"])}
    for shape in ("dlrm-like", "wide", "many-small", "cache-resident"):
        (float_w,) = get_workloads([shape])
        for storage, bits in (("int8", 8), ("int4", 4)):
            w = by_name[f"{shape}-{storage}"]
            assert [t.dtype for t in w.tables] == [storage] * len(float_w.tables)
            assert [(t.num_embeddings, t.embedding_dim) for t in w.tables] == [
                (t.num_embeddings, t.embedding_dim) for t in float_w.tables
            ]
            rows = sum(t.num_embeddings * (t.embedding_dim * bits // 8 + 4) for t in w.tables)
            assert w.weights_bytes == rows and w.parameters()["dtype"] == storage
    problem = by_name["cache-resident-int4"].problem()
    validate_problem(problem.tables, problem.batch, problem.weights)


def test_robustness_inputs_cover_quantized_tables():
    from harness.robustness.inputs import READINGS, build_input, load_catalogue

    catalogue = load_catalogue()
    names = {i.name for i in catalogue.inputs}
    assert {"q4-code-out-of-range", "q-scale-nan", "q4-odd-dim", "q-id-minus-one-in-mean"} <= names
    item = catalogue.input("q4-code-out-of-range")
    p = build_input(catalogue, item)
    assert int(p.weights["q4"].codes[3, 1]) == 16
    assert int(READINGS["codes-masked"](p).weights["q4"].codes[3, 1]) == 0
    assert int(READINGS["codes-clamped"](p).weights["q4"].codes[3, 1]) == 15
    mean = build_input(catalogue, catalogue.input("q-id-minus-one-in-mean"))
    zero_rows = READINGS["bad-ids-as-zero-rows"](mean)
    t = {t.name: t for t in zero_rows.tables}["q8"]
    assert t.num_embeddings == 8 and zero_rows.batch.bag("f2", 2).tolist() == [7, 3, 5]  # -1 -> the zero row
    assert float(dequantize(zero_rows.weights["q8"])[7].abs().max()) == 0.0


def test_the_minimiser_simplifies_a_quantized_counterexample():
    from harness.fuzz.driver import fuzz_backend
    from harness.reference.forward import pool

    class NibblesSwapped:
        """Reads int4 codes with the nibbles of each byte swapped."""

        name = "nibbles-swapped"
        table_dtypes = ("int4",)

        def supports(self, tables, batch):
            return None

        def prepare(self, tables, weights):
            def swapped(w):
                codes = w.codes.reshape(w.num_rows, -1, 2).flip(2).reshape(w.codes.shape)
                return QuantizedTable(codes, w.scale, w.bias, w.storage)

            wrong = {k: swapped(v) for k, v in weights.items()}
            return lambda batch: pool(tables, wrong, batch).value.float()

    stats, failure = fuzz_backend(
        NibblesSwapped(), max_examples=100, seed=2, save_dir=None, known=[], shrink_budget=30
    )
    assert failure is not None
    p = failure.problem  # the minimised problem
    assert len(p.tables) == 1 and p.tables[0].embedding_dim == 2 and len(p.batch.values) == 1
    w = p.weights[p.tables[0].name]
    assert w.scale.tolist() == [1.0] and w.bias.tolist() == [0.0]


def _one_row_problem(codes, scale, bias, weights, storage="int8"):
    dim = len(codes)
    table = QuantizedTable(
        torch.tensor([codes], dtype=torch.uint8),
        torch.tensor([scale], dtype=torch.float16),
        torch.tensor([bias], dtype=torch.float16),
        storage,
    )
    tables = [TableConfig("t", 1, dim, ("f",), Pooling.SUM, storage)]
    batch = JaggedBatch.from_bags({"f": [[0] * len(weights)]}, weights={"f": [weights]})
    return tables, {"t": table}, batch


def _judged(tables, weights, batch, got):
    from harness.agreement import Oracle
    from harness.tolerance import compare

    validate_problem(tables, batch, weights)
    oracle = Oracle.of(tables, weights, batch)
    return compare(got, oracle.reference.value, oracle.tolerance)


def test_a_subnormal_w_times_s_times_a_code_is_within_the_quantized_subnormal_slack():
    # fl(w s) lands among float32's subnormals; its error is then multiplied by the code 255.
    weights = [3.1e-39, -2.7e-39, 1.3e-39]
    problem = _one_row_problem([255, 254, 3, 0], 0.0010004, 0.0, weights)
    emulated = _fbgemm_emulated(*problem)
    verdict = _judged(*problem, emulated)
    assert verdict.agree, verdict.describe()
    assert verdict.worst_bound < 1e-40 and float((emulated.double() - 0).abs().max()) > 0
    from harness.agreement import Oracle
    from harness.tolerance import ETA32

    error = (emulated.double() - Oracle.of(*problem).reference.value).abs().max()
    assert float(error) > 100 * ETA32  # the float tables' slack for 6 terms is (6 + 3) eta
    if importlib.util.find_spec("fbgemm_gpu"):
        assert torch.equal(_tbe(*problem), emulated)


def test_an_overflowing_w_times_s_times_a_zero_code_may_be_nan():
    problem = _one_row_problem([0, 1, 2, 3], 2.0, 0.0, [3e38])
    emulated = _fbgemm_emulated(*problem)
    assert torch.isnan(emulated[0, 0]) and emulated[0, 1] == float("inf")  # fl(w s) = inf; inf * 0
    verdict = _judged(*problem, emulated)
    assert verdict.agree, verdict.describe()
    if importlib.util.find_spec("fbgemm_gpu"):
        got = _tbe(*problem)
        assert _judged(*problem, got).agree and torch.isnan(got[0, 0])
    nan_elsewhere = emulated.clone()
    nan_elsewhere[0, 1] = float("nan")  # code 1: the term is w s, +inf, never NaN alone
    assert not _judged(*problem, nan_elsewhere).agree
