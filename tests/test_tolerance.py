"""The tolerance: sound for every summation order, and tight enough to catch what it must."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction
from functools import cache

import numpy as np
import pytest
import torch

from harness.agreement import Oracle, Outcome, check_agreement
from harness.fuzz.metamorphic import within
from harness.fuzz.strategies import make_profile_weights
from harness.model import JaggedBatch, Pooling, TableConfig
from harness.reference.forward import exact_tree_sum, pool, pool_loop
from harness.tolerance import (
    FINITE,
    NAN,
    NEG_INF,
    POS_INF,
    U32,
    Tolerance,
    compare,
    error_bound,
    gamma,
    rounded_once,
    tree_sum_bound,
)
from harness.weights import make_weights

F32_MAX = float(np.finfo(np.float32).max)
TINY = float(np.finfo(np.float32).tiny)


# ---------------------------------------------------------------------------------------------
# The building blocks


@pytest.mark.parametrize("u", [U32, 2.0**-4])
def test_gamma_bounds_every_product_of_n_roundings_exactly(u):
    """|prod (1 + d_i)**(+-1) - 1| <= gamma(n) for |d_i| <= u (Higham, Lemma 3.1), in exact rationals,
    at the extremes (each d_i = +-u, each factor or its inverse), which is where the maximum is."""
    ur = Fraction(u)
    n_max = 7 if u > 2**-10 else 40
    for n in range(1, n_max + 1):
        g = Fraction(float(gamma(torch.tensor(n), u)))
        worst = Fraction(0)
        for ups in range(n + 1):  # ups factors (1 + u), the rest (1 - u), each possibly inverted
            for inverted in range(n + 1):
                for factors in _extreme_products(ur, n, ups, inverted):
                    worst = max(worst, abs(factors - 1))
        assert worst <= g, (n, float(worst), float(g))
    assert float(gamma(torch.tensor(int(1 / u)), u)) == math.inf


def _extreme_products(u: Fraction, n: int, ups: int, inverted: int):
    downs = n - ups
    for inv_up in range(min(ups, inverted) + 1):
        inv_down = inverted - inv_up
        if inv_down > downs:
            continue
        yield (
            (1 + u) ** (ups - inv_up)
            / (1 + u) ** inv_up
            * (1 - u) ** (downs - inv_down)
            / (1 - u) ** inv_down
        )


@cache
def _worst_tree(values: tuple[float, ...]) -> float:
    """max over full binary trees with these leaves of the sum over internal nodes of |leaves below|."""
    if len(values) == 1:
        return 0.0
    best = 0.0
    first, rest = values[0], values[1:]
    for r in range(len(rest)):  # the subtree holding the first leaf takes r of the others
        for others in itertools.combinations(range(len(rest)), r):
            left = (first,) + tuple(rest[i] for i in others)
            right = tuple(rest[i] for i in range(len(rest)) if i not in others)
            best = max(best, _worst_tree(left) + _worst_tree(right))
    return sum(values) + best


@pytest.mark.parametrize("n", range(1, 9))
def test_the_caterpillar_with_the_largest_terms_deepest_is_the_worst_tree(n):
    rng = np.random.default_rng(n)
    for trial in range(6):
        a = rng.integers(0, 9, n) if trial % 2 else rng.random(n)
        values = tuple(float(x) for x in a)
        exact = float(exact_tree_sum(torch.tensor(values, dtype=torch.float64)[:, None]))
        assert _worst_tree(values) == pytest.approx(exact, rel=1e-12, abs=1e-12)


DISTRIBUTIONS = {
    "equal": lambda rng, n: np.full(n, 1.5),
    "two-valued": lambda rng, n: np.where(rng.random(n) < 0.1, 9.0, 1.0),
    "uniform": lambda rng, n: rng.random(n),
    "near-equal": lambda rng, n: 1 + 1e-9 * rng.random(n),
    "half-normal": lambda rng, n: abs(rng.standard_normal(n)),
    "log-normal": lambda rng, n: rng.lognormal(0, 2, n),
    "one-big": lambda rng, n: np.r_[1e6, np.ones(n - 1)],
    "with-zeros": lambda rng, n: np.where(rng.random(n) < 0.5, 0.0, rng.random(n)),
    "huge": lambda rng, n: F32_MAX * rng.random(n),
    "subnormal": lambda rng, n: 2.0**-149 * rng.integers(0, 100, n),
}


@pytest.mark.parametrize("name", sorted(DISTRIBUTIONS))
@pytest.mark.parametrize("n", [2, 3, 32, 33, 500, 4096])
def test_the_tree_sum_estimate_is_never_below_the_exact_worst_tree(name, n):
    rng = np.random.default_rng(n)
    a = DISTRIBUTIONS[name](rng, n)
    exact = float(exact_tree_sum(torch.tensor(a, dtype=torch.float64)[:, None]))
    s, q = float(np.sum(a)), float(np.sum(a * a))
    estimate = tree_sum_bound(s, q, n)
    assert exact <= estimate <= (n - 1) * s * (1 + 1e-9)
    if name in ("equal", "near-equal"):  # the estimate is tight on uniform data
        assert estimate <= exact * (1 + 1e-5)  # float64 slack only
    else:
        assert estimate <= exact * 1.5


# ---------------------------------------------------------------------------------------------
# Float32 results in many orders never exceed the bound


def _pairwise(t: list[np.ndarray]) -> np.ndarray:
    if len(t) == 1:
        return t[0]
    h = len(t) // 2
    return _pairwise(t[:h]) + _pairwise(t[h:])


def _sequential(t) -> np.ndarray:
    acc = np.zeros_like(t[0])
    for x in t:
        acc = acc + x
    return acc


def _lanes(t, k: int, combine) -> np.ndarray:
    lanes = [_sequential(t[i::k]) for i in range(min(k, len(t)))]
    return combine(lanes)


def _blocked(t, k: int) -> np.ndarray:
    return _sequential([_sequential(t[i : i + k]) for i in range(0, len(t), k)])


def _random_tree(t, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    items = list(t)
    while len(items) > 1:
        i, j = sorted(rng.choice(len(items), 2, replace=False))
        b = items.pop(j)
        a = items.pop(i)
        items.append(a + b)
    return items[0]


def _kahan(t) -> np.ndarray:
    s = np.zeros_like(t[0])
    c = np.zeros_like(t[0])
    for x in t:
        y = x - c
        tt = s + y
        c = (tt - s) - y
        s = tt
    return s


def _by_column(terms: np.ndarray, key: np.ndarray) -> list[np.ndarray]:
    order = np.argsort(key, axis=0, kind="stable")
    return list(np.take_along_axis(terms, order, axis=0))


def float32_sums(terms: np.ndarray) -> dict[str, np.ndarray]:
    """float32 ``[dim]`` sums of float32 ``[L, dim]`` terms in many orders.

    Compensated (Kahan) summation is a sum of more than the terms: where a partial sum overflows,
    its correction is ``inf - inf``, NaN, where every plain order gives ``inf``. It is included
    only where no partial sum can overflow (`harness.tolerance` covers it there).
    """
    rows = list(terms)
    with np.errstate(over="ignore", invalid="ignore"):
        sums = {
            "sequential": _sequential(rows),
            "reversed": _sequential(rows[::-1]),
            "ascending": _sequential(_by_column(terms, terms)),
            "descending": _sequential(_by_column(terms, -terms)),
            "small-first": _sequential(_by_column(terms, np.abs(terms))),
            "large-first": _sequential(_by_column(terms, -np.abs(terms))),
            "positives-first": _sequential(_by_column(terms, -np.sign(terms))),
            "pairwise": _pairwise(rows),
            "lanes-8": _lanes(rows, 8, _sequential),
            "lanes-16-pairwise": _lanes(rows, 16, _pairwise),
            "blocked-32": _blocked(rows, 32),
            "tree-1": _random_tree(rows, 1),
            "tree-2": _random_tree(rows, 2),
            "wide": terms.astype(np.float64).sum(0).astype(np.float32),
        }
        if np.abs(terms.astype(np.float64)).sum() < F32_MAX / 2:
            sums["kahan"] = _kahan(rows)
    return sums


def _rows(profile: str, n: int, dim: int, rng) -> np.ndarray:
    shape = (n, dim)
    sign = rng.choice([-1.0, 1.0], shape)
    if profile == "one-sign":
        x = np.ldexp(1 + rng.random(shape), rng.integers(-2, 2, shape))
    elif profile == "mixed":
        x = rng.standard_normal(shape)
    elif profile == "cancel":
        x = np.ldexp(rng.standard_normal(shape), 10)
        x[1::2] = -x[0::2][: n // 2] * (1 + np.ldexp(rng.random((n // 2, dim)), -8))
    elif profile == "huge":
        x = sign * F32_MAX * (0.125 + 0.875 * rng.random(shape))
    elif profile == "huge-one-sign":
        x = F32_MAX * (0.125 + 0.875 * rng.random(shape))
    elif profile == "tiny":
        x = sign * TINY * (1 + 7 * rng.random(shape))
    elif profile == "subnormal":
        x = sign * TINY * rng.random(shape)
    elif profile == "absorbed":  # 1, then terms just under half an ulp of 1: each addition loses one
        x = np.full(shape, 2.0**-24 * (1 - 2.0**-10))
        x[0] = 1.0
    elif profile == "greedy":  # terms near 1, each making the sequential sum round down by ~half an ulp
        return _greedy_rows(n, dim)
    else:  # integers
        x = rng.integers(-4, 5, shape).astype(np.float64)
    return np.clip(x, -F32_MAX, F32_MAX).astype(np.float32)


def _greedy_rows(n: int, dim: int) -> np.ndarray:
    """Terms near 1 chosen one by one so that adding each to the float32 sequential sum lands just
    below the midpoint between two float32 numbers: close to the worst error per addition."""
    x = np.empty((n, dim), np.float32)
    s = np.zeros(dim, np.float32)
    for k in range(n):
        g = (s.astype(np.float64) + 1.0).astype(np.float32)
        half_ulp = np.spacing(g).astype(np.float64) / 2 * (1 - 2.0**-8) * (1 + np.arange(dim) / (4 * dim))
        x[k] = (g.astype(np.float64) - s.astype(np.float64) + np.minimum(half_ulp, 0.49)).astype(np.float32)
        s = s + x[k]
    return x


def _problem(x: np.ndarray, pooling: Pooling, per_sample: np.ndarray | None):
    n, dim = x.shape
    tables = [TableConfig("t", n, dim, ("f",), pooling)]
    weights = {"t": torch.from_numpy(x.copy())}
    w = None if per_sample is None else [[float(v) for v in per_sample]]
    batch = JaggedBatch.from_bags({"f": [list(range(n))]}, weights=None if w is None else {"f": w})
    return tables, weights, batch


def _assert_all_agree(results: dict[str, np.ndarray], oracle: Oracle) -> None:
    for order, r in results.items():
        c = compare(
            torch.from_numpy(np.asarray(r, np.float32))[None], oracle.reference.value, oracle.tolerance
        )
        assert c.agree, f"{order}: {c.describe()}"


PROFILES = [
    "one-sign",
    "mixed",
    "cancel",
    "huge",
    "huge-one-sign",
    "tiny",
    "subnormal",
    "integers",
    "absorbed",
    "greedy",
]
LENGTHS = [1, 2, 3, 5, 31, 32, 33, 100, 1000, 4096]


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("n", LENGTHS)
def test_float32_sums_in_every_order_are_within_the_tolerance(profile, n):
    rng = np.random.default_rng(n)
    x = _rows(profile, n, 6, rng)
    oracle = Oracle.of(*_problem(x, Pooling.SUM, None))
    _assert_all_agree(float32_sums(x), oracle)


WEIGHTS = {
    "mixed": lambda rng, n: rng.standard_normal(n),
    "tiny": lambda rng, n: np.ldexp(1 + rng.random(n), rng.integers(-140, -120, n)),  # products underflow
    "wide": lambda rng, n: np.ldexp(1 + rng.random(n), rng.integers(-60, 60, n)) * rng.choice([-1, 1], n),
}


@pytest.mark.parametrize("profile", ["one-sign", "mixed", "huge", "tiny"])
@pytest.mark.parametrize("weight_profile", sorted(WEIGHTS))
@pytest.mark.parametrize("n", [1, 3, 33, 1000])
def test_weighted_float32_sums_with_rounded_products_or_wide_products_are_within(profile, weight_profile, n):
    rng = np.random.default_rng(n)
    x = _rows(profile, n, 6, rng)
    w = np.clip(WEIGHTS[weight_profile](rng, n), -F32_MAX, F32_MAX).astype(np.float32)
    oracle = Oracle.of(*_problem(x, Pooling.SUM, w))
    with np.errstate(over="ignore", invalid="ignore", under="ignore"):
        products = x * w[:, None]  # float32 products, each rounded
        results = float32_sums(products)
        exact = x.astype(np.float64) * w.astype(np.float64)[:, None]
        fma = np.zeros(x.shape[1], np.float32)
        for row in exact:  # one rounding per step, as a fused multiply-add
            fma = (fma.astype(np.float64) + row).astype(np.float32)
        results["fma"] = fma
        results["wide-products"] = exact.sum(0).astype(np.float32)
    _assert_all_agree(results, oracle)


@pytest.mark.parametrize(
    "profile", ["one-sign", "mixed", "huge", "huge-one-sign", "tiny", "subnormal", "greedy"]
)
@pytest.mark.parametrize("n", [1, 3, 7, 33, 1000, 4096])
def test_float32_means_divided_multiplied_or_scaled_first_are_within(profile, n):
    rng = np.random.default_rng(n)
    x = _rows(profile, n, 6, rng)
    oracle = Oracle.of(*_problem(x, Pooling.MEAN, None))
    inverse = np.float32(1) / np.float32(n)
    results = {}
    with np.errstate(over="ignore", invalid="ignore", under="ignore"):
        for order, s in float32_sums(x).items():
            results[f"{order}/L"] = s / np.float32(n)
            results[f"{order}*(1/L)"] = s * inverse
        for order, s in float32_sums(x * inverse).items():
            results[f"scaled-first {order}"] = s
    _assert_all_agree(results, oracle)


def test_float16_storage_widens_exactly():
    rng = np.random.default_rng(0)
    x = _rows("mixed", 300, 5, rng).astype(np.float16)
    tables = [TableConfig("t", 300, 5, ("f",), Pooling.SUM, torch.float16)]
    weights = {"t": torch.from_numpy(x)}
    oracle = Oracle.of(tables, weights, JaggedBatch.from_bags({"f": [list(range(300))]}))
    _assert_all_agree(float32_sums(x.astype(np.float32)), oracle)


# ---------------------------------------------------------------------------------------------
# Non-finite results: only what IEEE float32 arithmetic allows


def _oracle_of_rows(rows: list[list[float]], pooling: Pooling = Pooling.SUM) -> Oracle:
    x = torch.tensor(rows, dtype=torch.float32)
    return Oracle.of(*_problem(x.numpy(), pooling, None))


def _agrees(oracle: Oracle, *values: float) -> bool:
    return compare(
        torch.tensor([list(values)], dtype=torch.float32), oracle.reference.value, oracle.tolerance
    ).agree


def test_all_zeros_on_the_huge_profile_fails_at_eight_ids():
    table = TableConfig("t", 50, 16, ("f",))
    weights = {"t": make_profile_weights(table, "huge", 3)}
    batch = JaggedBatch.from_bags({"f": [[1, 9, 17, 4, 30, 2, 41, 8], [5, 6, 7, 8, 9, 10, 11, 12]]})
    oracle = Oracle.of([table], weights, batch)
    assert bool(oracle.tolerance.may_overflow.any())  # the case that used to accept anything
    c = compare(torch.zeros(2, 16), oracle.reference.value, oracle.tolerance)
    assert not c.agree and c.worst_ratio > 1e6


def test_infinities_only_on_the_side_that_can_overflow():
    big = F32_MAX
    only_negatives_overflow = _oracle_of_rows([[-big], [-big], [1.0]])
    assert _agrees(only_negatives_overflow, float("-inf"))
    assert not _agrees(only_negatives_overflow, float("inf"))
    assert not _agrees(only_negatives_overflow, float("nan"))
    both = _oracle_of_rows([[big], [big], [-big], [-big]])
    for v in (float("inf"), float("-inf"), float("nan"), 0.0):
        assert _agrees(both, v), v
    assert not _agrees(both, big)  # finite: within the bound of the exact 0, not anything
    neither = _oracle_of_rows([[big / 2], [-big / 2], [1.0]])  # every partial sum stays finite
    assert _agrees(neither, 1.0) and not _agrees(neither, float("inf")) and not _agrees(neither, float("nan"))


def test_an_exact_sum_beyond_float32_allows_only_the_overflowed_value():
    oracle = _oracle_of_rows([[F32_MAX], [F32_MAX], [F32_MAX], [F32_MAX]])
    assert _agrees(oracle, float("inf"))
    for v in (F32_MAX, float("-inf"), float("nan")):
        assert not _agrees(oracle, v), v
    c = compare(torch.tensor([[F32_MAX]]), oracle.reference.value, oracle.tolerance)
    assert "this element may be finite (within the bound) or +inf" in c.describe()
    c = compare(torch.tensor([[float("nan")]]), oracle.reference.value, oracle.tolerance)
    assert c.worst_ratio == math.inf and "may be finite (within the bound) or +inf" in c.describe()
    one = _oracle_of_rows([[1.0]])
    assert (
        "may only be finite"
        in compare(torch.tensor([[float("inf")]]), one.reference.value, one.tolerance).describe()
    )


def test_a_nan_or_infinite_reference_allows_what_any_order_gives():
    nan_row = _oracle_of_rows([[float("nan")], [1.0]])
    assert _agrees(nan_row, float("nan")) and not _agrees(nan_row, 1.0) and not _agrees(nan_row, float("inf"))
    both_infinities = _oracle_of_rows([[float("inf")], [float("-inf")]])
    assert _agrees(both_infinities, float("nan")) and not _agrees(both_infinities, float("inf"))
    plus_inf = _oracle_of_rows([[float("inf")], [-1.0]])
    assert _agrees(plus_inf, float("inf"))
    for v in (float("-inf"), float("nan"), 5.0):
        assert not _agrees(plus_inf, v), v
    plus_inf_big_negatives = _oracle_of_rows([[float("inf")], [-F32_MAX], [-F32_MAX]])
    assert _agrees(plus_inf_big_negatives, float("nan"))  # -MAX + -MAX = -inf, then inf - inf
    assert not _agrees(plus_inf_big_negatives, float("-inf"))


def test_metamorphic_within_follows_the_same_classes():
    both = _oracle_of_rows([[F32_MAX], [F32_MAX], [-F32_MAX], [-F32_MAX]])
    one_side = _oracle_of_rows([[F32_MAX], [F32_MAX], [1.0]])
    t = lambda v: torch.tensor([[v]], dtype=torch.float32)  # noqa: E731
    assert within(t(float("nan")), t(0.0), both.tolerance)[0]
    assert within(t(float("-inf")), t(float("inf")), both.tolerance)[0]
    assert within(t(float("inf")), t(F32_MAX), one_side.tolerance)[0]
    ok, detail = within(t(float("nan")), t(float("inf")), one_side.tolerance)
    assert not ok and "may be finite (within the bound) or +inf" in detail
    assert not within(t(float("-inf")), t(float("inf")), one_side.tolerance)[0]
    plain = _oracle_of_rows([[1.0], [2.0]])
    assert within(t(3.0), t(3.0), plain.tolerance)[0]
    assert not within(t(3.0), t(3.001), plain.tolerance)[0]
    assert not within(t(float("inf")), t(3.0), plain.tolerance)[0]


def test_empty_bag_must_be_exactly_zero():
    bound = error_bound(
        torch.zeros(1, 1, dtype=torch.float64),
        torch.zeros(1, 1, dtype=torch.int64),
        torch.zeros(1, 1, dtype=torch.bool),
    )
    assert float(bound) == 0.0
    ref = torch.zeros(1, 1, dtype=torch.float64)
    assert compare(torch.zeros(1, 1), ref, bound).agree
    assert not compare(torch.full((1, 1), 1e-45), ref, bound).agree


# ---------------------------------------------------------------------------------------------
# Tight enough: a float16 rounding or accumulation of a long one-sign bag is caught


def _one_sign_problem(n: int, dim: int = 64, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = _rows("one-sign", n, dim, rng)
    return x, Oracle.of(*_problem(x, Pooling.SUM, None))


@pytest.mark.parametrize("n", [1000, 2000, 4096])
def test_a_result_rounded_through_float16_is_caught_on_long_one_sign_bags(n):
    x, oracle = _one_sign_problem(n)
    exact32 = x.astype(np.float64).sum(0).astype(np.float32)
    assert _agrees(oracle, *exact32)
    c = compare(torch.from_numpy(exact32).half().float()[None], oracle.reference.value, oracle.tolerance)
    assert not c.agree, c.describe()


@pytest.mark.parametrize("n", [1000, 2000, 4096])
def test_a_float16_accumulator_is_caught_on_long_one_sign_bags(n):
    x, oracle = _one_sign_problem(n)
    acc = np.zeros(x.shape[1], np.float16)
    for row in x.astype(np.float16):
        acc = acc + row
    assert not _agrees(oracle, *acc.astype(np.float32))


def test_the_tightened_tree_term_is_what_catches_float16_on_near_equal_terms():
    """Near-equal terms: D is half of (L - 1) S. At L = 8400 with sums just above 2**13, a float16
    rounding (up to 4) is below the classic bound (about 4.2) and above the tightened one (2.1)."""
    n, dim = 8400, 64
    rng = np.random.default_rng(4)
    x = (0.9955 + 3e-5 * np.arange(dim) + 1e-6 * rng.random((n, dim))).astype(np.float32)
    oracle = Oracle.of(*_problem(x, Pooling.SUM, None))
    rounded = torch.from_numpy(x.astype(np.float64).sum(0).astype(np.float32)).half().float()[None]
    assert not compare(rounded, oracle.reference.value, oracle.tolerance).agree
    ref = pool(*_problem(x, Pooling.SUM, None))
    classic = error_bound(ref.magnitude, ref.bag_length, ref.is_mean)  # (L - 1) S
    assert compare(rounded, ref.value, classic).agree
    _assert_all_agree(float32_sums(x), oracle)


# ---------------------------------------------------------------------------------------------
# A modelled result: float32 pooling rounded once to another dtype


def test_rounded_once_accepts_one_rounding_to_float16_and_its_overflow():
    rng = np.random.default_rng(2)
    x = _rows("one-sign", 1000, 16, rng)
    oracle = Oracle.of(*_problem(x, Pooling.SUM, None))
    rounded = torch.from_numpy(x.astype(np.float64).sum(0).astype(np.float32)).half().float()[None]
    ref = oracle.reference.value
    modelled = rounded_once(oracle.tolerance, ref, torch.float16)
    assert compare(rounded, ref, modelled).agree
    assert not compare(rounded, ref, oracle.tolerance).agree
    assert not compare(rounded * (1 + 2.0**-9), ref, modelled).agree  # more than one rounding off
    big = _oracle_of_rows([[40000.0], [30000.0]])  # 70000 rounds to inf in float16
    to_half = rounded_once(big.tolerance, big.reference.value, torch.float16)
    assert compare(torch.tensor([[float("inf")]]), big.reference.value, to_half).agree
    assert not compare(torch.tensor([[float("inf")]]), big.reference.value, big.tolerance).agree
    assert not compare(torch.tensor([[float("-inf")]]), big.reference.value, to_half).agree


# ---------------------------------------------------------------------------------------------
# The comparison and the agreement check


def test_shape_dtype_and_type_are_checked():
    ref = torch.zeros(2, 3, dtype=torch.float64)
    bound = torch.zeros(2, 3, dtype=torch.float64)
    assert "shape (3, 2)" in compare(torch.zeros(3, 2), ref, bound).describe()
    assert "torch.float64" in compare(torch.zeros(2, 3, dtype=torch.float64), ref, bound).describe()
    assert "not a tensor" in compare([[0.0]], ref, bound).describe()


def test_a_bare_bound_matches_non_finite_references_exactly():
    ref = torch.tensor([[float("nan"), float("inf"), 1.0]], dtype=torch.float64)
    tol = Tolerance.strict(torch.tensor([[0.0, 0.0, 0.5]]), ref)
    assert tol.classes.tolist() == [[NAN, POS_INF, FINITE]]
    assert compare(torch.tensor([[float("nan"), float("inf"), 1.4]]), ref, tol).agree
    assert not compare(torch.tensor([[float("nan"), float("-inf"), 1.0]]), ref, tol).agree
    assert NEG_INF & int(Tolerance.strict(ref, -ref).classes[0, 1])


def test_the_fast_and_the_loop_reference_give_the_same_verdicts():
    tables = [TableConfig("t", 50, 8, ("f",), Pooling.MEAN)]
    weights = make_weights(tables, seed=2)
    batch = JaggedBatch.from_bags({"f": [list(range(40)), [1, 2], []]})
    fast, loop = pool(tables, weights, batch), pool_loop(tables, weights, batch)
    result = fast.value.float()
    assert (
        compare(result, fast.value, fast.tolerance()).agree
        and compare(result, loop.value, loop.tolerance()).agree
    )


class Float16Accumulator:
    """A plausible bug: pooling in the storage precision."""

    name = "fp16-acc"

    def supports(self, tables, batch):
        return None

    def prepare(self, tables, weights):
        from impls.torch_embedding_bag import TorchEmbeddingBag

        half = {k: w.half() for k, w in weights.items()}
        lookup = TorchEmbeddingBag().prepare(tables, half)
        return lookup


def test_agreement_reports_the_worst_element_of_a_float16_accumulator():
    tables = [TableConfig("t", 50, 8, ("f",), Pooling.SUM)]
    weights = make_weights(tables, seed=2)
    batch = JaggedBatch.from_bags({"f": [list(range(40)), [1, 2]]})
    (verdict,) = check_agreement([Float16Accumulator()], tables, weights, batch)
    assert verdict.outcome is Outcome.DISAGREE
    assert "worst element" in verdict.detail and "bound" in verdict.detail
    assert verdict.comparison.worst_ratio > 1


class Mutating:
    name = "mutating"

    def supports(self, tables, batch):
        return None

    def prepare(self, tables, weights):
        def lookup(batch):
            batch.values[0] = 0
            return pool_loop(tables, weights, batch).value.float()

        return lookup


class Raising:
    name = "raising"

    def supports(self, tables, batch):
        return None

    def prepare(self, tables, weights):
        raise RuntimeError("kernel exploded")


class Declining:
    name = "declining"

    def supports(self, tables, batch):
        return "bfloat16 tables are not supported"

    def prepare(self, tables, weights):
        raise AssertionError("never prepared")


def test_each_outcome_is_reported_with_its_detail():
    tables = [TableConfig("t", 5, 2, ("f",))]
    weights = make_weights(tables)
    batch = JaggedBatch.from_bags({"f": [[1, 2]]})
    verdicts = {
        v.backend: v for v in check_agreement([Mutating(), Raising(), Declining()], tables, weights, batch)
    }
    assert verdicts["mutating"].outcome is Outcome.MUTATED and "batch values" in verdicts["mutating"].detail
    assert verdicts["raising"].outcome is Outcome.RAISED and "kernel exploded" in verdicts["raising"].detail
    assert verdicts["declining"].outcome is Outcome.UNSUPPORTED
    assert verdicts["declining"].detail == "bfloat16 tables are not supported"
