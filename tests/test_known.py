"""Known discrepancies explain, they do not blind: each case's model is exact for its library, and
a fault planted inside a case's scope, in columns or behaviour its model does not explain, is
still a failure (the known-case precision test)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from harness.agreement import Oracle, Outcome, Verdict, check_problem, mark_known
from harness.cases import CaseError, case_from_json, load_cases
from harness.known import (
    PooledInDtype,
    round_to_bfloat16,
    round_to_float16,
    triton_interpreter_bfloat16_to_float32,
)
from harness.model import JaggedBatch, Pooling, Problem, TableConfig, output_columns
from impls.torch_embedding_bag import TorchEmbeddingBag

KNOWN = load_cases()
CASES = {c.name: c for c in KNOWN}
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
DTYPES = {"float32": F32, "float16": F16, "bfloat16": BF16}


# ---------------------------------------------------------------------------------------------
# Problems that reach each mechanism's corners.


def _values(
    rng: np.random.Generator, shape: tuple[int, int], dtype: torch.dtype, profile: str
) -> torch.Tensor:
    info = torch.finfo(dtype)
    if profile == "normal":
        v = rng.standard_normal(shape)
    elif profile == "integers":  # sums past the 16-bit types' 8 / 11 bits: ties and roundings
        v = rng.integers(-300, 301, shape).astype(np.float64) * 2.0 ** float(rng.integers(-4, 5))
    elif profile == "wide":  # every exponent of the dtype, subnormals included
        lo, hi = np.log2(float(info.smallest_normal)) - 10, np.log2(float(info.max))
        v = np.sign(rng.standard_normal(shape)) * 2.0 ** rng.uniform(lo, hi, shape)
    elif profile == "huge":  # sums overflow the dtype (and float32 for bfloat16)
        v = np.sign(rng.standard_normal(shape)) * float(info.max) * rng.uniform(0.3, 1.0, shape)
    elif profile == "tiny":  # around the smallest normal: subnormals
        v = np.sign(rng.standard_normal(shape)) * float(info.smallest_normal) * rng.uniform(0, 2, shape)
    else:  # "special": inf, -inf and NaN among normal values
        v = rng.standard_normal(shape)
        flat = v.reshape(-1)
        k = max(1, flat.size // 20)
        flat[rng.integers(0, flat.size, k)] = rng.choice([np.inf, -np.inf, np.nan], k)
    return torch.from_numpy(np.ascontiguousarray(v)).to(F32).to(dtype)


PROFILES = ("normal", "normal", "integers", "integers", "wide", "huge", "tiny", "special")


def stressed_problem(
    seed: int,
    *,
    dtypes: tuple[str, ...] = ("float32", "float16", "bfloat16"),
    dims: tuple[int, ...] = (1, 2, 3, 4, 8, 12, 16, 33),
    profiles: tuple[str, ...] = PROFILES,
    poolings: tuple[str, ...] = ("sum", "mean"),
    min_batch: int = 0,
    long_bags: bool = True,
) -> Problem:
    """A seeded problem aimed at the models' corners: sums that round and tie in 16-bit types,
    bags longer than 256 and 2048 ids (where the length itself rounds to bfloat16 / float16),
    overflow, inf and NaN, subnormals, per-sample weights beyond float16's range, int32 ids,
    interleaved (pooling, dtype) groups, shared tables and empty bags."""
    rng = np.random.default_rng(seed)
    weighted = bool(rng.random() < 0.3)
    tables, keys, weights = [], [], {}
    for t in range(int(rng.integers(1, 5))):
        features = tuple(f"t{t}f{i}" for i in range(int(rng.choice([1, 1, 2]))))
        pooling = Pooling.SUM if weighted else Pooling(str(rng.choice(poolings)))
        table = TableConfig(
            f"t{t}",
            int(rng.integers(1, 60)),
            int(rng.choice(dims)),
            features,
            pooling,
            DTYPES[str(rng.choice(dtypes))],
        )
        tables.append(table)
        keys += features
        shape = (table.num_embeddings, table.embedding_dim)
        weights[table.name] = _values(rng, shape, table.dtype, str(rng.choice(profiles)))
    rng.shuffle(keys)
    batch_size = int(rng.integers(min_batch, 7)) if rng.random() > 0.05 else 0
    rows = {f: t.num_embeddings for t in tables for f in t.feature_names}
    long = long_bags and rng.random() < 0.15
    lengths, ids = [], []
    for k in keys:
        for _ in range(batch_size):
            n = int(rng.integers(0, 13))
            if long and rng.random() < 0.5:
                n = int(rng.choice([257, 259, 300, 2049, 2051, 3001]))
            lengths.append(n)
            ids.append(rng.integers(0, rows[k], n))
    values = torch.from_numpy(np.concatenate(ids) if ids else np.zeros(0, np.int64)).to(torch.int64)
    if rng.random() < 0.2:
        values = values.to(torch.int32)
    per_sample = None
    if weighted:
        scale = float(rng.choice([1.0, 1.0, 1e5]))  # 1e5: past float16's range, inf once rounded
        per_sample = torch.from_numpy(rng.standard_normal(len(values)) * scale).to(F32)
    batch = JaggedBatch(tuple(keys), values, torch.tensor(lengths, dtype=torch.int64), per_sample)
    return Problem(tuple(tables), weights, batch, {"seed": seed})


def _judge(backend, problem: Problem, known=KNOWN) -> Verdict:
    (verdict,) = mark_known(check_problem([backend], problem), problem, known)
    return verdict


def _library_matches_its_models(backend, problems, expected_cases) -> dict[str, int]:
    """Every problem agrees or is explained by ``expected_cases`` only; returns the outcome counts."""
    counts: dict[str, int] = {}
    for problem in problems:
        v = _judge(backend, problem)
        assert not v.failed, f"seed {problem.metadata.get('seed')}: {v.outcome.value}: {v.detail}"
        if v.outcome is Outcome.KNOWN:
            assert set(v.known_cases) <= set(expected_cases), v.known_cases
            for name in v.known_cases:
                counts[name] = counts.get(name, 0) + 1
        counts[v.outcome.value] = counts.get(v.outcome.value, 0) + 1
    return counts


# ---------------------------------------------------------------------------------------------
# A backend with a fault planted in what a real library returns or raises.


class Planted:
    """``backend`` with ``fault(tables, batch, result) -> result`` applied to each result, under
    the backend's name (so that its known cases are tried); ``attributes`` override the wrapped
    backend's (which scopes see through ``.backend``)."""

    def __init__(self, backend, fault, name: str | None = None, **attributes) -> None:
        self.backend, self.fault = backend, fault
        self.name = name or backend.name
        for k, v in attributes.items():
            setattr(self, k, v)

    def supports(self, tables, batch):
        return self.backend.supports(tables, batch)

    def prepare(self, tables, weights):
        lookup = self.backend.prepare(tables, weights)
        return lambda batch: self.fault(tables, batch, lookup(batch))


def _columns_of(tables, dtype=None, pooling=None) -> list[int]:
    by_name = {t.name: t for t in tables}
    out = []
    for table, _, first, dim in output_columns(tables):
        t = by_name[table]
        if (dtype is None or t.dtype == dtype) and (pooling is None or t.pooling is pooling):
            out += range(first, first + dim)
    return out


def _ulps(x: torch.Tensor, dtype: torch.dtype, k: int) -> torch.Tensor:
    """``x`` (values of ``dtype``) moved ``k`` steps up through ``dtype``'s values."""
    y = x.to(dtype)
    for _ in range(k):
        y = torch.nextafter(y, torch.full_like(y, float("inf")))
    return y.to(F32)


def mixed_torch_problem(pooling: Pooling = Pooling.SUM) -> Problem:
    """A float16, a float32 and a bfloat16 table, short one-sign bags: each 16-bit column allows
    one value (or two), so any fault of a step or more is visible."""
    tables = (
        TableConfig("h", 5, 4, ("a",), pooling, F16),
        TableConfig("f", 5, 4, ("b", "c"), Pooling.SUM, F32),
        TableConfig("g", 5, 4, ("d",), pooling, BF16),
    )
    base = torch.arange(1, 21, dtype=torch.float64).reshape(5, 4) / 7 + 1
    weights = {t.name: (base * (i + 1)).to(F32).to(t.dtype) for i, t in enumerate(tables)}
    bags = [[0, 1, 2], [3, 4], [1, 1, 4]]
    batch = JaggedBatch.from_bags({k: bags for k in ("d", "b", "a", "c")})
    return Problem(tables, weights, batch)


# ---------------------------------------------------------------------------------------------
# Rounding primitives and the Triton conversion, against known values.


def test_bfloat16_rounding_ties_away_or_to_even():
    x = np.array([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 1 + 2**-9, 3.4e38], dtype=np.float32)
    assert round_to_bfloat16(x, "nearest-away").tolist() == [1 + 2**-7, 1 + 2**-6, -(1 + 2**-7), 1.0, np.inf]
    assert round_to_bfloat16(x, "nearest-even").tolist()[:4] == [1.0, 1 + 2**-6, -1.0, 1.0]
    even = round_to_bfloat16(np.arange(-300, 300, 0.37, dtype=np.float32), "nearest-even")
    assert np.array_equal(
        even, torch.from_numpy(np.arange(-300, 300, 0.37, dtype=np.float32)).to(BF16).float().numpy()
    )
    assert round_to_float16(np.array([1 + 2**-11, 65520.0], dtype=np.float32)).tolist() == [1.0, np.inf]


def test_triton_interpreter_widening_of_bfloat16():
    bits = torch.tensor([98, 0x8000 | 98, 1, 0x7F, 0x3F80, 0x0080, 0, 0x8000], dtype=torch.int32).to(
        torch.int16
    )
    got = triton_interpreter_bfloat16_to_float32(bits.view(BF16)).tolist()
    unit = 2.0**-133
    assert got[:4] == [68 * unit, -68 * unit, 0.0, (0x7E & 0x7F) * unit]  # 0x7F: bit_length 7, shift 1
    assert got[4:6] == [1.0, 2.0**-126] and got[6] == 0.0 and str(got[7]) == "-0.0"


# ---------------------------------------------------------------------------------------------
# Each real library matches its models across many generated in-scope problems.

TORCH_CASES = ("torch-float16-pooled-output", "torch-bfloat16-pooled-output")


def test_torch_matches_its_models_on_generated_problems():
    counts = _library_matches_its_models(
        TorchEmbeddingBag(), [stressed_problem(s) for s in range(120)], TORCH_CASES
    )
    assert counts.get("torch-float16-pooled-output", 0) > 20, counts
    assert counts.get("torch-bfloat16-pooled-output", 0) > 20, counts


def test_the_models_are_exact_not_merely_loose():
    """Other plausible mechanisms do not explain torch: MEAN divided before the one rounding (its
    CUDA kernel's order) fails on bags past float16's 2048 / bfloat16's 256, and per-sample
    weights kept in float32 fail once they pass float16's range."""
    be = TorchEmbeddingBag()
    for dtype, length in ((F16, 2051), (BF16, 259)):
        t = TableConfig("t", 4, 2, ("f",), Pooling.MEAN, dtype)
        w = {"t": torch.tensor([[1.0, 3.0], [1.0, 0.5], [2.0, 0.25], [1.5, 7.0]]).to(dtype)}
        ids = torch.randint(0, 4, (length,), generator=torch.Generator().manual_seed(length))
        problem = Problem((t,), w, JaggedBatch(("f",), ids, torch.tensor([length])))
        name = str(dtype).removeprefix("torch.")
        cpu = dataclasses.replace(CASES[f"torch-{name}-pooled-output"])
        assert _judge(be, problem, [cpu]).outcome is Outcome.KNOWN
        other = dataclasses.replace(
            cpu, model=dataclasses.replace(cpu.model, mean="sum-divided-by-length-then-rounded")
        )
        v = _judge(be, problem, [other])
        assert v.outcome is Outcome.DISAGREE and "are not what" in v.detail, v.detail
    t = TableConfig("t", 2, 2, ("f",), Pooling.SUM, F16)
    rows = torch.tensor([[0.0, 0.0], [1.0, 2.0]], dtype=F16)
    problem = Problem((t,), {"t": rows}, JaggedBatch.from_bags({"f": [[0, 1]]}, {"f": [[1e5, 1.0]]}))
    case = CASES["torch-float16-pooled-output"]
    assert _judge(be, problem, [case]).outcome is Outcome.KNOWN  # 1e5 is inf in float16: inf * 0 = NaN
    as_given = dataclasses.replace(case, model=dataclasses.replace(case.model, per_sample_weights="float32"))
    assert _judge(be, problem, [as_given]).outcome is Outcome.DISAGREE


# ---------------------------------------------------------------------------------------------
# The precision test: planted faults inside a known case's scope are caught.


def test_torch_unmodified_is_known_by_both_half_cases():
    v = _judge(TorchEmbeddingBag(), mixed_torch_problem())
    assert v.outcome is Outcome.KNOWN and set(v.known_cases) == set(TORCH_CASES), v.detail


@pytest.mark.parametrize("pooling", [Pooling.SUM, Pooling.MEAN], ids=lambda p: p.value)
@pytest.mark.parametrize(
    "fault",
    ["float32 column", "float16 two steps", "bfloat16 one step", "float16 as bfloat16", "bfloat16 unrounded"],
)
def test_torch_fault_inside_the_half_cases_scope_is_caught(fault, pooling):
    problem = mixed_torch_problem(pooling)

    def plant(tables, batch, out):
        out = out.clone()
        if fault == "float32 column":
            c = _columns_of(tables, F32)[5]
            out[:, c] *= 1 + 1e-4
        elif fault == "float16 two steps":
            c = _columns_of(tables, F16)[1]
            out[1, c] = _ulps(out[1, c], F16, 2)
        elif fault == "bfloat16 one step":
            c = _columns_of(tables, BF16)[2]
            out[0, c] = _ulps(out[0, c], BF16, 1)
        elif fault == "float16 as bfloat16":
            c = _columns_of(tables, F16)
            out[:, c] = out[:, c].to(BF16).to(F32)
        else:  # the bfloat16 columns as the contract computes them, not rounded
            ref = Oracle.of(problem.tables, problem.weights, problem.batch).reference.value
            c = _columns_of(tables, BF16)
            out[:, c] = ref[:, c].to(F32)
        return out

    v = _judge(Planted(TorchEmbeddingBag(), plant), problem)
    assert v.outcome is Outcome.DISAGREE, v.detail
    assert "not explained by known case(s)" in v.detail and "torch-float16-pooled-output" in v.detail


def test_a_mutated_input_or_another_exception_is_never_known():
    problem = mixed_torch_problem()

    def boom(tables, batch, out):
        raise RuntimeError("something else entirely")

    v = _judge(Planted(TorchEmbeddingBag(), boom), problem)
    assert v.outcome is Outcome.RAISED and "predicts a result, not an exception" in v.detail, v.detail


def test_a_case_never_reproduced_silences_nothing():
    """torch-cuda's cases were written by analogy: a "torch-cuda" that returns exactly what their
    model predicts still disagrees, until the case is marked reproduced."""
    problem = mixed_torch_problem()
    stand_in = TorchEmbeddingBag(device="cpu", name="torch-cuda")  # SUM: what the CUDA model predicts
    v = _judge(stand_in, problem)
    assert v.outcome is Outcome.DISAGREE and "never reproduced" in v.detail, v.detail
    reproduced = [dataclasses.replace(c, reproduced=True) for c in KNOWN if c.backend == "torch-cuda"]
    assert _judge(stand_in, problem, reproduced).outcome is Outcome.KNOWN  # only the flag held it back


def test_observation_is_kept_out_of_repr_and_equality():
    problem = mixed_torch_problem()
    (v,) = check_problem([TorchEmbeddingBag()], problem)
    assert v.observed is not None and torch.is_tensor(v.observed.result)
    bare = Verdict(v.backend, v.outcome, v.detail, v.comparison)
    assert v == bare and repr(v) == repr(bare)


# ---------------------------------------------------------------------------------------------
# The case file format.


def _case_json(**changes) -> dict:
    d = json.loads(CASES["torch-float16-pooled-output"].path.read_text())
    d.update(changes)
    return d


def test_a_format_1_known_case_still_loads_and_explains_nothing():
    d = _case_json(format="jagbench-case/1")
    d.pop("model"), d.pop("reproduced")
    old = case_from_json(d)
    assert old.model is None and not old.can_silence
    assert old.to_json()["format"] == "jagbench-case/1" and case_from_json(old.to_json()).model is None
    v = _judge(TorchEmbeddingBag(), mixed_torch_problem(), [old])
    assert v.outcome is Outcome.DISAGREE and "never reproduced" in v.detail


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"model": {"kind": "pooled-in-dtype", "tables": ["float32"]}}, "model 'tables'"),
        ({"model": {"kind": "rounded"}}, "model 'kind'"),
        ({"model": {"kind": "raises", "exception": "E", "message": "("}}, "not a regular expression"),
        ({"reproduced": "yes"}, "'reproduced' must be true or false"),
    ],
)
def test_a_bad_model_is_a_clear_case_error(changes, message):
    with pytest.raises(CaseError, match=message):
        case_from_json(_case_json(**changes))
    d = _case_json()
    d.pop("model")
    with pytest.raises(CaseError, match="needs 'model'"):
        case_from_json(d)


def test_models_round_trip_through_the_case_file():
    for case in KNOWN:
        if case.kind == "known-discrepancy":
            again = case_from_json(json.loads(json.dumps(case.to_json())))
            assert again.model == case.model and again.reproduced == case.reproduced
            assert again.model.describe() and "\n" not in again.model.describe()
    assert isinstance(CASES["torch-float16-pooled-output"].model, PooledInDtype)


# ---------------------------------------------------------------------------------------------
# torchrec: the EBC (float16 pooling, bfloat16 stored as float16, two exceptions) and the fused EBC
# (columns grouped by (pooling, dtype), batch 0).

TORCHREC_CASES = (
    "torchrec-float16-pooled-output",
    "torchrec-bfloat16-table-stored-as-float16",
    "torchrec-half-table-weighted-raises",
    "torchrec-kjt-batch-size-0-raises",
)


@pytest.fixture(scope="module")
def torchrec_backends():
    pytest.importorskip("torchrec", reason="torchrec is not installed")
    pytest.importorskip("fbgemm_gpu", reason="fbgemm-gpu-cpu is not installed")
    from impls.torchrec_ebc import TorchrecEBC, TorchrecFusedEBC

    return TorchrecEBC(), TorchrecFusedEBC()


def test_torchrec_matches_its_models_on_generated_problems(torchrec_backends):
    ebc, _ = torchrec_backends
    counts = _library_matches_its_models(ebc, [stressed_problem(s) for s in range(90)], TORCHREC_CASES)
    for name in TORCHREC_CASES:
        assert counts.get(name, 0) > 0, counts


def test_torchrec_fused_matches_its_models_on_generated_problems(torchrec_backends):
    _, fused = torchrec_backends
    problems = [stressed_problem(s, dims=(4, 8, 12, 16)) for s in range(90)]
    expected = ("torchrec-fused-groups-out-of-order", "torchrec-fused-kjt-batch-size-0-raises")
    counts = _library_matches_its_models(fused, problems, expected)
    assert counts.get(expected[0], 0) > 10 and counts.get(expected[1], 0) > 0, counts


def _interleaved_problem() -> Problem:
    tables = tuple(
        TableConfig(n, 4, 4, (f"f{n}",), p, d)
        for n, p, d in (
            ("a", Pooling.SUM, F32),
            ("b", Pooling.MEAN, F32),
            ("c", Pooling.SUM, F32),
            ("d", Pooling.SUM, F16),
        )
    )
    weights = {t.name: (torch.arange(16.0).reshape(4, 4) / 3 + i).to(t.dtype) for i, t in enumerate(tables)}
    bags = [[0, 1], [2], [3, 3, 0]]
    return Problem(tables, weights, JaggedBatch.from_bags({f"f{n}": bags for n in "abcd"}))


def test_torchrec_fused_groups_permuted_and_one_value_wrong_is_caught(torchrec_backends):
    _, fused = torchrec_backends
    problem = _interleaved_problem()
    assert _judge(fused, problem).outcome is Outcome.KNOWN

    def one_wrong(tables, batch, out):
        out = out.clone()
        out[2, 5] += 1e-3
        return out

    v = _judge(Planted(fused, one_wrong), problem)
    assert v.outcome is Outcome.DISAGREE, v.detail
    assert "in the column order 'torchrec-fused-groups-out-of-order' models disagree" in v.detail, v.detail

    def regrouped_by_pooling_only(tables, batch, out):  # the groups as (pooling) alone would give
        order = dataclasses.replace(CASES["torchrec-fused-groups-out-of-order"].model, by=("pooling",))
        contract = torch.empty_like(out)
        contract[:, CASES["torchrec-fused-groups-out-of-order"].model.column_order(problem)] = out
        return contract[:, order.column_order(problem)]

    v = _judge(Planted(fused, regrouped_by_pooling_only), problem)
    assert v.outcome is Outcome.DISAGREE, v.detail


class _Raising:
    def __init__(self, name: str, error: BaseException) -> None:
        self.name, self.error = name, error

    def supports(self, tables, batch):
        return None

    def prepare(self, tables, weights):
        def lookup(batch):
            raise self.error

        return lookup


def test_torchrec_another_exception_in_an_exception_cases_scope_is_caught(torchrec_backends):
    ebc, _ = torchrec_backends
    empty = Problem(
        (TableConfig("t", 3, 4, ("f",)),),
        {"t": torch.ones(3, 4)},
        JaggedBatch(("f",), torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)),
    )
    assert _judge(ebc, empty).outcome is Outcome.KNOWN
    for error in (ValueError("tuple index out of range"), IndexError("list index out of range")):
        v = _judge(_Raising("torchrec", error), empty)
        assert v.outcome is Outcome.RAISED and "torchrec-kjt-batch-size-0-raises" in v.detail, v.detail
    weighted = mixed_torch_problem()
    weighted = Problem(
        weighted.tables,
        weighted.weights,
        dataclasses.replace(weighted.batch, weights=torch.ones(len(weighted.batch.values))),
    )
    assert _judge(ebc, weighted).outcome is Outcome.KNOWN
    v = _judge(_Raising("torchrec", RuntimeError("Expected all tensors to be on the same device")), weighted)
    assert v.outcome is Outcome.RAISED, v.detail


def test_torchrec_float16_column_off_is_caught(torchrec_backends):
    ebc, _ = torchrec_backends
    problem = mixed_torch_problem(Pooling.MEAN)
    assert _judge(ebc, problem).outcome is Outcome.KNOWN

    def plant(tables, batch, out):
        out = out.clone()
        c = _columns_of(tables, BF16)[0]  # bfloat16 stored as float16: one float16 step off
        out[2, c] = _ulps(out[2, c], F16, 2)
        return out

    v = _judge(Planted(ebc, plant), problem)
    assert v.outcome is Outcome.DISAGREE and "torchrec-bfloat16-table-stored-as-float16" in v.detail, v.detail


# ---------------------------------------------------------------------------------------------
# torchrec row-wise sharding: every column divided by (n + 1e-6) when a table pools MEAN.


@pytest.fixture(scope="module")
def sharded_rw():
    pytest.importorskip("torchrec", reason="torchrec is not installed")
    from impls import torchrec_sharded

    try:
        backend = torchrec_sharded.sharded_rw()
    except Exception as e:  # noqa: BLE001 - unavailable here: say why
        pytest.skip(f"torchrec-sharded-rw: {e}")
    yield backend
    torchrec_sharded.shutdown_pools()


def test_torchrec_sharded_rw_matches_its_model_on_generated_problems(sharded_rw):
    problems = [stressed_problem(s, dtypes=("float32", "float16"), min_batch=2) for s in range(16)]
    counts = _library_matches_its_models(
        sharded_rw, problems, ("torchrec-sharded-rw-mean-divides-by-length-plus-eps",)
    )
    assert counts.get("torchrec-sharded-rw-mean-divides-by-length-plus-eps", 0) > 5, counts


def test_torchrec_sharded_rw_sum_columns_are_divided_too_and_a_fault_is_caught(sharded_rw):
    full = mixed_torch_problem(Pooling.MEAN)  # h: float16 MEAN, f: float32 SUM (g is bfloat16: declined)
    bags = [[0, 1, 2], [3, 4], [1, 1, 4]]
    problem = Problem(
        full.tables[:2],
        {k: full.weights[k] for k in ("h", "f")},
        JaggedBatch.from_bags({k: bags for k in ("b", "a", "c")}),
    )
    v = _judge(sharded_rw, problem)
    assert v.outcome is Outcome.KNOWN, v.detail
    raw = check_problem([sharded_rw], problem)[0]
    sum_cols = _columns_of(problem.tables, pooling=Pooling.SUM)
    ref = Oracle.of(problem.tables, problem.weights, problem.batch).reference.value
    ratio = raw.observed.result[:, sum_cols].double() / ref[:, sum_cols]
    d = float(np.float32(1) + np.float32(1e-6))  # fl32(1 + fl32(1e-6)) = 1.00000095...
    assert ((1 - ratio) > 5e-7).all() and ((ratio - 1 / d).abs() < 3e-7).all(), ratio

    def undivided_sum_columns(tables, batch, out):
        out = out.clone()
        cols = _columns_of(tables, pooling=Pooling.SUM)
        out[:, cols] = (out[:, cols].double() * (1 + 1e-6)).float()
        return out

    v = _judge(Planted(sharded_rw, undivided_sum_columns), problem)
    assert v.outcome is Outcome.DISAGREE and "torchrec-sharded-rw-mean-divides-by-length-plus-eps" in v.detail


# ---------------------------------------------------------------------------------------------
# Triton's interpreter and bfloat16 subnormals: the interpreter only, rows the batch reads only.


@pytest.fixture(scope="module")
def triton_interpreted():
    pytest.importorskip("triton", reason="Triton is not installed")
    from impls.triton_fused import triton_interpreted

    return triton_interpreted()


def _every_bfloat16_problem() -> Problem:
    """All 65,536 bfloat16 bit patterns as a 256 x 256 table, each row a bag of its own."""
    rows = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(BF16).reshape(256, 256)
    t = TableConfig("t", 256, 256, ("f",), Pooling.SUM, BF16)
    return Problem(
        (t,), {"t": rows}, JaggedBatch(("f",), torch.arange(256), torch.ones(256, dtype=torch.int64))
    )


def test_triton_interpreter_reads_every_bfloat16_value_as_modelled(triton_interpreted):
    v = _judge(triton_interpreted, _every_bfloat16_problem())
    assert v.outcome is Outcome.KNOWN and v.known_cases == ("triton-interpreter-bfloat16-subnormal",), (
        v.detail
    )


@pytest.mark.filterwarnings(
    "ignore:overflow encountered:RuntimeWarning", "ignore:invalid value:RuntimeWarning"
)
def test_triton_interpreter_matches_its_model_on_generated_problems(triton_interpreted):
    problems = [
        stressed_problem(
            s, dtypes=("bfloat16", "float32"), profiles=("tiny", "tiny", "wide", "normal"), long_bags=False
        )
        for s in range(16)
    ]
    counts = _library_matches_its_models(
        triton_interpreted, problems, ("triton-interpreter-bfloat16-subnormal",)
    )
    assert counts.get("triton-interpreter-bfloat16-subnormal", 0) > 3, counts


def _subnormal_problem(read: bool) -> Problem:
    t = TableConfig("t", 3, 2, ("f",), Pooling.SUM, BF16)
    u = TableConfig("u", 2, 2, ("g",), Pooling.SUM, F32)
    rows = torch.tensor([[1.0, 2.0], [-8.99988e-39, 3.0], [4.0, 5.0]]).to(BF16)
    bags = {"f": [[1] if read else [0, 2]], "g": [[1]]}
    return Problem((t, u), {"t": rows, "u": torch.ones(2, 2)}, JaggedBatch.from_bags(bags))


def test_triton_subnormal_case_covers_the_interpreter_only_and_rows_read_only(triton_interpreted):
    problem = _subnormal_problem(read=True)
    assert _judge(triton_interpreted, problem).outcome is Outcome.KNOWN
    compiled = Planted(
        triton_interpreted, lambda tables, batch, out: out, interpret=False
    )  # a CUDA kernel this wrong
    v = _judge(compiled, problem)
    assert v.outcome is Outcome.DISAGREE and "not explained" not in v.detail, v.detail

    def other_table_off(tables, batch, out):
        out = out.clone()
        out[0, 2] += 0.5
        return out

    v = _judge(Planted(triton_interpreted, other_table_off), problem)
    assert v.outcome is Outcome.DISAGREE and "triton-interpreter-bfloat16-subnormal" in v.detail, v.detail

    def zeroed(tables, batch, out):
        return torch.zeros_like(out)

    unread = _subnormal_problem(read=False)
    v = _judge(Planted(triton_interpreted, zeroed), unread)
    assert v.outcome is Outcome.DISAGREE and "triton-interpreter-bfloat16-subnormal" not in v.detail, v.detail
