"""The tolerance: what a correct float32 backend may return for each output element, derived.

Everything below follows from the standard model of IEEE arithmetic (Higham, "Accuracy and
Stability of Numerical Algorithms", ch. 2-4): round to nearest, ``fl(a op b) = (a op b)(1 + e)``
with ``|e| <= u`` when the result is normal, gradual underflow below that.

The operation
-------------
A bag holds ``L`` ids with stored rows ``x_i`` and per-sample weights ``w_i`` (1 when unweighted).
Widening float16 / bfloat16 / float32 storage to float32 or float64 is exact, so storage rounding
is not an error of the lookup: the reference and the backend see the same numbers. The terms are
``t_i = w_i x_i`` and ``a_i = |t_i|``, ``S = sum_i a_i``; the exact result is ``s = sum_i t_i``
(SUM) or ``s / L`` (MEAN). A backend accumulates in float32 (``u = 2**-24``) or wider, in ANY
order: sequential, reversed, pairwise, SIMD lanes, blocks, a tree over threads. Every such order
is a full binary tree whose ``L`` leaves are the terms and whose ``L - 1`` internal nodes are the
additions. It may also round each product (weighted), round once at the end (a wider
accumulator stored as float32), and for MEAN divide by ``L``, multiply by a rounded ``1 / L``, or
scale every term by a rounded ``1 / L`` before adding (with or without an FMA).

The finite bound
----------------
Node ``v`` of the tree computes ``fl(c_a + c_b)`` from its children's computed values, with error
at most ``u |c_a + c_b|`` (an addition whose result is subnormal is exact). The root's error is
the sum of the nodes' errors. By induction, a node's computed value is at most ``(1 + u)**h`` times
the sum of the ``|computed terms|`` below it (``h`` its height, at most ``L - 1``), and a computed
term is at most ``(1 + u) a_i + eta`` (``eta = 2**-149`` bounds the error of a product or quotient
that lands among float32's subnormals). So, with ``c = (1 + u)**L`` (evaluated as ``exp(L u)``,
which is larger):

    |tree error| <= u c (1 + u) sum over internal nodes v of T_v,   T_v = sum of a_i below v.

``sum_v T_v = sum_i a_i depth_i``. Over all full binary trees with ``L`` leaves it is largest for
the *caterpillar* (sequential summation) that puts the largest ``a_i`` deepest:

    D = sum_{k=2..L} P_k,     P_k = the sum of the k largest a_i.

Proof by induction on ``L``: the root splits the leaves into ``A`` (``p`` leaves) and ``B``
(``q = L - p``); ``sum_v T_v = S + (A's sum) + (B's sum) <= S + sum_{k=2..p} P_k(A) +
sum_{j=2..q} P_j(B)``. Since ``P_k(A) <= P_k`` and ``P_j(B) <= P_j <= P_{j+p-1}``, the terms of A
map into ``P_2..P_p`` and those of B into ``P_{p+1}..P_{L-1}``, so the whole is at most
``S + sum_{k=2..L-1} P_k = D``; the caterpillar attains it. (``tests/test_tolerance.py`` also checks
it by brute force over every tree for small ``L``.) ``D <= (L - 1) S``, the classic
``gamma(L - 1) S`` bound; for similar magnitudes ``D`` is about half of that.

Adding the other roundings, all at most ``u`` relative (Higham's ``gamma``-style accounting):

    SUM:  |r - s|     <= u c (1 + u)   (D + S) + u S                 + (L + 1 + u L**2) eta
    MEAN: |r - s / L| <= u c (1 + u)**2 (D + S) / L + (2u + u**2) c S / L + (L + 3 + u L**2) eta

The ``+ S`` inside is the final rounding of a wider accumulator; ``u S`` the products' rounding;
MEAN's ``(2u + u**2)`` the division (or the rounded reciprocal and the product with it), its
``(1 + u)**2`` the scaled terms of a backend that scales first. ``u L**2 eta`` covers the
subnormal slack of the terms inside the tree.

The reference is computed in float64 (``u64 = 2**-53``): products of two float32 numbers are
exact there, its sequential sum is off by at most ``gamma64(L + 3) S`` (MEAN: over ``L``), and that
is added. The bound is evaluated in float64 and inflated by ``1 + 4 gamma64(L + 3) + 2**-40`` to
cover its own evaluation (``S``, ``D`` are float64 sums).

Computing ``D`` exactly needs a sort per column. Where it matters (bags of at least `LONG_BAG`
ids) the fast reference bounds it from two running sums per column, ``S`` and ``Q = sum a_i**2``
(`tree_sum_bound`): ``P_k - k S / L`` is the sum of ``k`` deviations from the mean, so by
Cauchy-Schwarz on the subset and on its complement ``P_k <= k S / L + sqrt(k (L - k) V / L)`` with
``V = Q - S**2 / L``. Summed over ``k`` (``sum_k sqrt(k (L - k)) <= pi L**2 / 8``: the trapezoid rule
under-estimates a concave integral), the lesser of that and ``(L - 1) S`` is used. It is exact
(but for float64 slack) for equal magnitudes and 5-45% above ``D`` on the spread-out profiles
tested; a running maximum would add ``P_k <= k M``, worth 10% on two-valued data only, and cost
more than half the pass's time. Shorter bags use ``(L - 1) S``. The readable loop reference
computes ``D`` exactly; a test checks the fast estimate is never below it.

What the tightening buys. A result rounded to float16 moves by up to half a float16 ulp,
``2**-11 2**e`` for ``2**e <= |s| < 2**(e+1)``: ``2**-11`` relative at the bottom of a binade, half
that at its top. The bound is about ``u (D + 2 S)``. So the rounding shows where
``2**13 |s| / (D + 2 S)`` exceeds 1 for some column (times ``2**e / |s|``). On one-sign data
(``|s| = S``) with the classic ``D = (L - 1) S`` that holds up to ``L`` between 4 000 and 8 000
(where the sums fall in their binades); the tightened ``D``, 0.5 to 0.8 of the classic one on
spread-out data, takes it 1.3 to 2 times further. The tests check ``L`` = 1000, 2000, 4096 on
one-sign data and ``L = 8400`` on near-equal terms, where only the tightened bound catches it. With
random signs ``S`` is about ``sqrt(L) |s|``, and no bound that holds for every order can see a
float16 rounding of a long bag: the order that adds all positive terms first really can lose that
much. A float16 *accumulator* (``2**-11`` per addition, ``2**13`` times float32's) is caught on
long one-sign bags too (tested at the same lengths).

Quantized tables: two terms per id
----------------------------------
A row of a quantized table (`harness.quantized`) holds codes ``q`` and an fp16 scale ``s`` and
bias ``b``; its value ``x = s q + b`` is exact in float64, and the reference dequantizes so. The
libraries do not round ``x`` first: FBGEMM's kernels (torchrec's and torch's lookups run them)
compute per id ``acc = fma(fl(w s), q, fl(acc + fl(w b)))`` in float32, whose intermediate values
are of size ``|w| (|s q| + |b|)``. Where ``s q`` and ``b`` cancel (a row of values near 0 with a
bias of -1000) that is far above ``|w x|``, and the bound above, with ``S = sum |w x|``, does not
hold for it.

So each id counts as two terms, ``w b`` and ``w (s q)``. Both ``b`` and ``s q`` are float32
numbers (``s q`` is exact in float32: an 11-bit significand times an integer below 2**8, between
2**-24 and 65504 * 255 in magnitude, or 0), so a quantized bag of ``L`` ids is, for this analysis,
a float32 bag of ``n = 2 L`` terms ``w_k y_k``, with every freedom above: any summation tree over
the ``2 L`` terms, each product rounded or not, MEAN dividing by ``L`` in any of the ways listed.
FBGEMM's order is such a tree (its FMA rounds once where the tree allows two roundings). So is a
backend that dequantizes first: ``fl(w fl(s q + b))`` adds the two exact terms ``w b`` and
``w s q`` (the addition's error, ``u |w x|`` scaled out of ``fl(s q + b)``, is at most ``u T_v``
of that node), then rounds the product, an error of at most ``u |w x| <= u (|w b| + |w s q|)``:
within the products' share ``u S`` of those two terms, which as exact products used none of it.

Every formula above therefore holds with ``2 L`` terms: ``S = sum_i |w_i| (|s_i q_i| + |b_i|)``,
``D`` over the ``2 L`` terms, ``c = (1 + u)**(2 L)``, the subnormal slack and the reference's
``gamma64`` over ``2 L``; ``P`` and ``N`` sum the positive and the negative of the ``2 L`` terms.
MEAN's divisor stays ``L`` (only the ``/ L`` of the formulas is the divisor; every other ``L``
counts terms). The float64 reference rounds ``w x`` once (``x`` has up to 49 significant bits),
``u64 |w x|`` per id, which ``gamma64(2 L + 3) S`` covers for ``L >= 1``. `bound_coefficients`,
`overflow_reach` and `tolerance_from` take the terms per id (1, or 2 for a quantized table). A
term that is NaN (an infinite weight times ``b = 0`` or ``s q = 0``) makes that split sum NaN,
whatever the order, while the dequantized value is infinite: it counts as ``+inf`` in both ``P``
and ``N``, so NaN is allowed there.

Two more consequences of computing ``fl(w s)`` before multiplying by each code (FBGEMM's order).
First, where ``fl(w s)`` lands among float32's subnormals its error, up to ``eta / 2``, is then
multiplied by ``q <= 255``: the subnormal slack of a quantized table's terms is ``256 eta``
(`QUANTIZED_ETA`). Second, where ``|w s|`` reaches the overflow threshold, ``fl(w s)`` is
infinite and a code of 0 gives ``inf * 0 = NaN``: that term counts as NaN (above) although
``w s q = 0``. (With a code above 0 the term is at least ``|w s|`` and overflows by the rules below.)

Non-finite results (the overflow rules)
---------------------------------------
Once a node overflows, IEEE arithmetic keeps it non-finite: ``inf + finite = inf``,
``inf - inf = NaN``, ``NaN`` absorbs. So a *finite* result means no node overflowed, and the finite
bound holds for it; any finite value must be within it, also where some order could overflow.
Let ``P`` and ``N`` be the sums of the positive terms and of the negatives' magnitudes. By the same
induction every computed partial sum lies in ``[-c' N, c' P]`` (``c' = (1 + u) c``), and a node
rounds to ``+inf`` only when its exact sum reaches float32's overflow threshold
``2**128 - 2**103``. So:

- ``+inf`` is allowed only where ``c' P`` reaches the threshold, ``-inf`` only where ``c' N`` does;
- NaN only where both do (an ``inf - inf`` needs both), or where the reference is NaN;
- where the reference is NaN (a NaN term, or ``+inf`` and ``-inf`` terms), only NaN: the NaN or
  the two infinities meet at some node whatever the order;
- where the reference is ``+inf`` (an infinite term), ``+inf``, or NaN where ``c' N`` reaches the
  threshold; ``-inf`` likewise;
- where the exact sum itself is beyond float32's range, a finite value is more than the bound away
  and so rejected: only the overflowed values (and NaN where both signs overflow) remain.

A MEAN that divides after summing overflows exactly when its sum does; one that scales first has
partial sums ``L`` times smaller, which only overflow where the unscaled ones would. A float32
result of an empty bag must be exactly zero.

A backend that flushes subnormals to zero may exceed the bound by more than ``eta``: a real
deviation from IEEE float32 accumulation, reported, not tolerated. Compensated (Kahan) summation
is within the finite bound (its error is at most ``(2u + O(L u**2)) S``), but where a partial sum
overflows its correction term becomes ``inf - inf``: NaN where every plain order gives ``inf``,
reported too.

For modelled results (a library known to round its float32 result to float16, say) see
`rounded_once`: the tolerance of the same computation followed by one rounding to another dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numba
import numpy as np
import torch

U32 = 2.0**-24
U64 = 2.0**-53
ETA32 = 2.0**-149
QUANTIZED_ETA = 256 * ETA32
"""The subnormal slack per term of a quantized table (two terms per id): ``fl(w s)``'s error times a
code of at most 255 ("Quantized tables" above)."""
FLOAT32_MAX = float(torch.finfo(torch.float32).max)
OVERFLOW32 = 2.0**128 - 2.0**103
"""Round to nearest gives ``inf`` for an exact value of at least this (half an ulp above the max)."""

LONG_BAG = 32
"""Bags of at least this many ids get the tightened tree term (`tree_sum_bound`); shorter ones use
``(L - 1) S``, which for them costs little and needs no extra statistics."""

# The classes of values an element may take, as bits of `Tolerance.classes`.
FINITE = 1
POS_INF = 2
NEG_INF = 4
NAN = 8


def gamma(n: torch.Tensor, u: float) -> torch.Tensor:
    """``n u / (1 - n u)``, infinite where ``n u >= 1``: bounds ``|prod (1 + e_i)**(+-1) - 1|``
    over ``n`` factors with ``|e_i| <= u`` (Higham, Lemma 3.1)."""
    nu = n.to(torch.float64) * u
    # The factor makes up for the two roundings of the float64 evaluation (the lemma is tight at n = 1).
    return torch.where(nu < 1, nu / (1 - nu) * (1 + 2.0**-50), torch.full_like(nu, float("inf")))


# ---------------------------------------------------------------------------------------------
# The formulas, per element, on plain floats: readable, compiled by numba (and callable from Python).


@numba.njit(cache=True, nogil=True)
def _gamma64(n: float) -> float:
    return n * U64 / (1.0 - n * U64)


@numba.njit(cache=True, nogil=True)
def _evaluation_slack(n: float) -> float:
    """The factor that covers the float64 evaluation of a bound over ``n`` terms."""
    return 1.0 + 4.0 * _gamma64(n + 3.0) + 2.0**-40


@numba.njit(cache=True, nogil=True)
def _growth(n: float) -> float:
    """An upper bound on ``(1 + u)**n`` (``exp(n u)`` is larger; the factor covers ``exp``'s error)."""
    return math.exp(n * U32) * (1.0 + 2.0**-50)


@numba.njit(cache=True, nogil=True)
def tree_sum_bound(magnitude: float, square: float, n: int) -> float:
    """An upper bound on ``D = sum_{k=2..n} P_k`` from ``S = sum a`` and ``Q = sum a**2``.

    Both are float64 sums of ``n`` terms (so within ``gamma64`` of exact). The least of
    ``(n - 1) S`` and the Cauchy-Schwarz bound of the module docstring.
    """
    if n < 2:
        return 0.0
    count = float(n)
    slack = 4.0 * _gamma64(count + 3.0)
    s = magnitude * (1.0 + slack)
    classic = (count - 1.0) * s
    if not (classic < math.inf and square < math.inf):  # inf or NaN terms: nothing tighter to say
        return classic
    low = magnitude * (1.0 - slack)
    spread = max(0.0, square * (1.0 + slack) - low * low / count)
    linear = s * (count * (count + 1.0) / 2.0 - 1.0) / count
    best = min(classic, linear + math.sqrt(spread / count) * (math.pi / 8.0) * count * count)
    return best * (1.0 + 2.0**-40)


@numba.njit(cache=True, nogil=True)
def bound_coefficients(n: int, is_mean: bool, terms_per_id: int = 1) -> tuple[float, float, float]:
    """``(A, B, C)`` with `element_bound` ``= A (tree_sum + magnitude) + B magnitude + C`` for a bag
    of ``n`` ids: the module docstring's bound, its factors depending on the number of terms
    ``n * terms_per_id`` only (2 per id for a quantized table, whose subnormal slack is then
    `QUANTIZED_ETA` per term)."""
    if n == 0:
        return 0.0, 0.0, 0.0
    count = float(n * terms_per_id)
    c = _growth(count)
    slack = _evaluation_slack(count)
    eta = (count + 3.0 + U32 * count * count) * (QUANTIZED_ETA if terms_per_id == 2 else ETA32)
    reference = _gamma64(count + 3.0)
    if is_mean:
        tree = U32 * c * (1.0 + U32) ** 2
        plain = (2.0 * U32 + U32 * U32) * c + reference
    else:
        tree = U32 * c * (1.0 + U32)
        plain = U32 + reference
    return tree * slack, plain * slack, eta * slack


@numba.njit(cache=True, nogil=True)
def element_bound(magnitude: float, tree_sum: float, n: int, is_mean: bool, terms_per_id: int = 1) -> float:
    """The finite bound on ``|result - reference|`` of one element (module docstring).

    ``magnitude`` is ``S`` and ``tree_sum`` an upper bound of ``D``, both divided by ``n`` for MEAN,
    as the reference returns them; ``n`` is the bag's length, ``terms_per_id`` 2 for a quantized
    table. 0 for an empty bag.
    """
    tree, plain, eta = bound_coefficients(n, is_mean, terms_per_id)
    return tree * (tree_sum + magnitude) + plain * magnitude + eta


@numba.njit(cache=True, nogil=True)
def overflow_reach(n: int, is_mean: bool, terms_per_id: int = 1) -> float:
    """``c'``: how far above the sum of its positive terms a partial sum may get, for a bag of ``n``
    ids of ``terms_per_id`` terms each; times ``n`` for MEAN, whose ``positive`` and ``negative``
    are divided by ``n``."""
    count = float(n * terms_per_id)
    scale = float(n) if is_mean and n > 0 else 1.0
    return scale * _growth(count + 2.0) * _evaluation_slack(count)


@numba.njit(cache=True, nogil=True)
def classes_within_reach(value: float, positive: float, negative: float, reach: float) -> int:
    """`element_classes` with its bag's `overflow_reach` given."""
    if math.isnan(value):
        return NAN
    up = not positive * reach < OVERFLOW32
    down = not negative * reach < OVERFLOW32
    if value == math.inf:
        return POS_INF | (NAN if down else 0)
    if value == -math.inf:
        return NEG_INF | (NAN if up else 0)
    classes = FINITE
    if up:
        classes |= POS_INF
    if down:
        classes |= NEG_INF
    if up and down:
        classes |= NAN
    return classes


@numba.njit(cache=True, nogil=True)
def element_classes(
    value: float, positive: float, negative: float, n: int, is_mean: bool, terms_per_id: int = 1
) -> int:
    """Which of `FINITE`, `POS_INF`, `NEG_INF`, `NAN` a correct element may be (module docstring).

    ``value`` is the float64 reference; ``positive`` and ``negative`` the sums of the positive
    terms and of the negative terms' magnitudes, divided by ``n`` for MEAN like ``value``.
    """
    return classes_within_reach(value, positive, negative, overflow_reach(n, is_mean, terms_per_id))


@numba.njit(cache=True, nogil=True)
def _tolerance_kernel(
    value, magnitude, tree_sum, positive, negative, bag_length, is_mean, terms_per_id, bound, classes
):
    last_n, last_mean, last_k = -1, False, -1
    tree, plain, eta, reach = 0.0, 0.0, 0.0, 0.0
    for i in range(value.shape[0]):
        n, mean, k = bag_length[i], is_mean[i], terms_per_id[i]
        if n != last_n or mean != last_mean or k != last_k:  # elements of one bag are adjacent
            tree, plain, eta = bound_coefficients(n, mean, k)
            reach = overflow_reach(n, mean, k)
            last_n, last_mean, last_k = n, mean, k
        bound[i] = tree * (tree_sum[i] + magnitude[i]) + plain * magnitude[i] + eta
        classes[i] = classes_within_reach(value[i], positive[i], negative[i], reach)


# ---------------------------------------------------------------------------------------------
# Tensors


@dataclass(frozen=True, eq=False)
class Tolerance:
    """Per element: the finite ``bound`` (float64) and the allowed ``classes`` (uint8 bits).

    A finite result is accepted where `FINITE` is allowed and it is within ``bound`` of the
    reference; ``+inf`` where `POS_INF` is, ``-inf`` where `NEG_INF` is, NaN where `NAN` is.
    """

    bound: torch.Tensor
    classes: torch.Tensor

    @classmethod
    def strict(cls, bound: torch.Tensor, reference: torch.Tensor) -> Tolerance:
        """A bare bound: finite values within it, and a non-finite reference matched exactly."""
        classes = torch.full(reference.shape, FINITE, dtype=torch.uint8)
        classes[torch.isnan(reference)] = NAN
        classes[reference == math.inf] = POS_INF
        classes[reference == -math.inf] = NEG_INF
        return cls(bound.to(torch.float64), classes)

    @property
    def may_overflow(self) -> torch.Tensor:
        """Where a finite reference still allows a non-finite result (some order overflows)."""
        return (self.classes & FINITE).bool() & (self.classes != FINITE)


def error_bound(
    magnitude: torch.Tensor,
    bag_length: torch.Tensor,
    is_mean: torch.Tensor,
    tree_sum: torch.Tensor | None = None,
    terms_per_id: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-element float64 finite bound (`element_bound`); ``tree_sum`` defaults to ``(n - 1) S``
    over the ``n = L * terms_per_id`` terms (``terms_per_id`` 1 unless given: 2 for quantized)."""
    k = _terms(terms_per_id, magnitude.shape)
    if tree_sum is None:
        tree_sum = (bag_length.to(torch.float64) * k - 1).clamp(min=0) * magnitude
    shape = magnitude.shape
    m, t = magnitude.to(torch.float64), tree_sum.to(torch.float64)
    n = bag_length.to(torch.int64)
    bound = torch.empty(shape, dtype=torch.float64)
    classes = torch.empty(shape, dtype=torch.uint8)
    zeros = torch.zeros(shape, dtype=torch.float64)
    _run_tolerance(zeros, m, t, zeros, zeros, n, is_mean.to(torch.bool), k, bound, classes)
    return bound


def tolerance_from(
    value: torch.Tensor,
    magnitude: torch.Tensor,
    tree_sum: torch.Tensor,
    positive: torch.Tensor,
    negative: torch.Tensor,
    bag_length: torch.Tensor,
    is_mean: torch.Tensor,
    terms_per_id: torch.Tensor | None = None,
) -> Tolerance:
    """The `Tolerance` of every element, from the reference's bound inputs (all the same shape;
    ``terms_per_id`` is 1 where not given, 2 for a quantized table's elements)."""
    bound = torch.empty(value.shape, dtype=torch.float64)
    classes = torch.empty(value.shape, dtype=torch.uint8)
    k = _terms(terms_per_id, value.shape)
    _run_tolerance(value, magnitude, tree_sum, positive, negative, bag_length, is_mean, k, bound, classes)
    return Tolerance(bound, classes)


def _terms(terms_per_id: torch.Tensor | None, shape: torch.Size) -> torch.Tensor:
    if terms_per_id is None:
        return torch.ones(shape, dtype=torch.int64)
    return terms_per_id.to(torch.int64).expand(shape)


def _flat(t: torch.Tensor) -> np.ndarray:
    return t.detach().contiguous().reshape(-1).numpy()


def _run_tolerance(
    value, magnitude, tree_sum, positive, negative, bag_length, is_mean, terms_per_id, bound, classes
):
    _tolerance_kernel(
        _flat(value.to(torch.float64)),
        _flat(magnitude.to(torch.float64)),
        _flat(tree_sum.to(torch.float64)),
        _flat(positive.to(torch.float64)),
        _flat(negative.to(torch.float64)),
        _flat(bag_length.to(torch.int64)),
        _flat(is_mean.to(torch.bool)),
        _flat(terms_per_id),
        bound.view(-1).numpy(),
        classes.view(-1).numpy(),
    )


_UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
_SMALLEST_SUBNORMAL = {torch.float32: 2.0**-149, torch.float16: 2.0**-24, torch.bfloat16: 2.0**-133}


def rounded_once(tolerance: Tolerance, reference: torch.Tensor, dtype: torch.dtype) -> Tolerance:
    """The tolerance of a result that is correct under ``tolerance``, then rounded once to ``dtype``.

    For modelling a library that pools in float32 and rounds the result to float16 or bfloat16
    (and back, which is exact). A value ``r`` within ``b`` of the exact ``s`` rounds to within
    ``u_X |r| + eta_X <= u_X (|s| + b) + eta_X`` of ``r`` (``u_X`` the dtype's unit roundoff,
    ``eta_X`` half its smallest subnormal, taken whole), and rounds to ``+-inf`` where ``|r|`` can
    reach the dtype's overflow threshold, i.e. where ``s + b`` (``s - b``) reaches it. A non-finite
    class stays allowed (rounding keeps infinities and NaN). ``reference`` is the float64 value.
    """
    if dtype not in _UNIT_ROUNDOFF:
        raise ValueError(f"rounded_once: no rounding model for {dtype}")
    u = _UNIT_ROUNDOFF[dtype]
    info = torch.finfo(dtype)
    biggest = float(info.max)
    threshold = biggest + 2.0 ** math.floor(math.log2(biggest)) * u  # max + half its ulp
    ref = reference.to(torch.float64)
    finite = torch.isfinite(ref) & (tolerance.classes & FINITE).bool()
    safe_ref = torch.where(finite, ref, torch.zeros_like(ref))
    bound = torch.where(
        finite,
        (tolerance.bound + u * (safe_ref.abs() + tolerance.bound) + _SMALLEST_SUBNORMAL[dtype])
        * (1 + 2.0**-40),
        tolerance.bound,
    )
    classes = tolerance.classes.clone()
    up = finite & (safe_ref + tolerance.bound >= threshold)
    down = finite & (safe_ref - tolerance.bound <= -threshold)
    classes |= torch.where(up, POS_INF, 0).to(torch.uint8)
    classes |= torch.where(down, NEG_INF, 0).to(torch.uint8)
    classes |= torch.where(up & down, NAN, 0).to(torch.uint8)
    return Tolerance(bound, classes)


# ---------------------------------------------------------------------------------------------
# The comparison


@dataclass(frozen=True)
class Comparison:
    """How a backend's result compares with the reference under the tolerance.

    ``worst_ratio`` is ``|value - reference| / bound`` of the worst element (``inf`` for a value of
    a class the element may not take); ``may_overflow`` counts the elements where some summation
    order overflows, so non-finite values are allowed there too.
    """

    agree: bool
    problem: str | None
    worst_index: tuple[int, ...] | None
    worst_value: float | None
    worst_reference: float | None
    worst_bound: float | None
    worst_ratio: float
    may_overflow: int
    worst_classes: int | None = None

    def describe(self) -> str:
        if self.problem is not None:
            return self.problem
        if self.worst_index is None:
            return "no elements"
        text = (
            f"worst element {list(self.worst_index)}: got {self.worst_value!r}, reference "
            f"{self.worst_reference!r}, bound {self.worst_bound:.3g} "
            f"(error / bound = {self.worst_ratio:.3g})"
        )
        if self.worst_ratio > 1 and self.worst_classes not in (None, FINITE):
            text += f"; this element may be {describe_classes(self.worst_classes)}"
        elif self.worst_ratio > 1 and self.worst_value is not None and not math.isfinite(self.worst_value):
            text += "; this element may only be finite (no summation order overflows)"
        return text


def describe_classes(classes: int) -> str:
    """``"finite (within the bound), +inf or NaN"``: the values an element may take, in words."""
    words = []
    if classes & FINITE:
        words.append("finite (within the bound)")
    if classes & POS_INF:
        words.append("+inf")
    if classes & NEG_INF:
        words.append("-inf")
    if classes & NAN:
        words.append("NaN")
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]


@numba.njit(cache=True, nogil=True)
def _class_of(x):
    if math.isnan(x):
        return NAN
    if x == math.inf:
        return POS_INF
    if x == -math.inf:
        return NEG_INF
    return FINITE


@numba.njit(cache=True, nogil=True)
def _ratio(r, v, b, c):
    """``|r - v| / b`` for a finite value where finite values are allowed; 0 for a non-finite
    value of an allowed class, ``inf`` for a value of any other class."""
    kind = _class_of(r)
    if not c & kind:
        return math.inf
    if kind != FINITE:
        return 0.0
    err = abs(r - v)
    if err == 0.0:
        return 0.0
    return err / b if b > 0.0 else math.inf


@numba.njit(cache=True, nogil=True)
def _compare_kernel(got, reference, bound, classes):
    """The first element of the largest ratio, that ratio, and the count of elements that may
    overflow. A finite value where finite values are allowed (the usual case) costs no division
    unless its ratio beats the worst so far."""
    worst = 0.0
    at = 0
    overflow = 0
    for i in range(got.shape[0]):
        c = classes[i]
        r = np.float64(got[i])
        if c & FINITE:
            if c != FINITE:
                overflow += 1
            if abs(r) < math.inf:
                err = abs(r - reference[i])
                if err > worst * bound[i]:
                    ratio = err / bound[i] if bound[i] > 0.0 else math.inf
                    if ratio > worst:
                        worst = ratio
                        at = i
                continue
        ratio = _ratio(r, reference[i], bound[i], c)
        if ratio > worst:
            worst = ratio
            at = i
    return at, worst, overflow


def _as_tolerance(tolerance: Tolerance | torch.Tensor, reference: torch.Tensor) -> Tolerance:
    if isinstance(tolerance, Tolerance):
        return tolerance
    return Tolerance.strict(tolerance, reference)


def malformed(result: object, shape: tuple[int, ...]) -> str | None:
    """What is wrong with a result before any value is read: not a tensor, not of ``shape``, not
    float32 (`compare`'s first checks); None when nothing is."""
    if not isinstance(result, torch.Tensor):
        return f"result is a {type(result).__name__}, not a tensor"
    if tuple(result.shape) != tuple(shape):
        return f"result has shape {tuple(result.shape)}, expected {tuple(shape)}"
    if result.dtype != torch.float32:
        return f"result is {result.dtype}, expected torch.float32"
    return None


def compare(result: object, reference: torch.Tensor, tolerance: Tolerance | torch.Tensor) -> Comparison:
    """Check type, shape, dtype, then every element against ``reference`` under ``tolerance``.

    ``tolerance`` is a `Tolerance` (the oracle's), or a bare bound tensor (`Tolerance.strict`).
    """

    problem = malformed(result, tuple(reference.shape))
    if problem is not None:
        return Comparison(False, problem, None, None, None, None, float("inf"), 0)
    tol = _as_tolerance(tolerance, reference)
    if result.numel() == 0:
        return Comparison(True, None, None, None, None, None, 0.0, 0)
    arrays = [
        _flat(t) for t in (result.detach().to("cpu"), reference.to(torch.float64), tol.bound, tol.classes)
    ]
    flat, worst, overflow = _compare_kernel(*arrays)
    got, ref, bound, classes = (float(a[flat]) for a in arrays)
    return Comparison(
        agree=worst <= 1.0,
        problem=None,
        worst_index=tuple(int(i) for i in np.unravel_index(int(flat), tuple(result.shape))),
        worst_value=got,
        worst_reference=ref,
        worst_bound=bound,
        worst_ratio=float(worst),
        may_overflow=int(overflow),
        worst_classes=int(classes),
    )


@numba.njit(cache=True, nogil=True)
def _first_apart_kernel(a, e, bound, classes):
    for i in range(a.shape[0]):
        x = a[i]
        y = e[i]
        c = classes[i]
        if not c & _class_of(x) or not c & _class_of(y):
            return i  # a value of a class this element may not take
        if math.isfinite(x) and math.isfinite(y) and abs(x - y) > 2.0 * bound[i]:
            return i
    return -1


def first_apart(got: torch.Tensor, expected: torch.Tensor, tolerance: Tolerance | torch.Tensor) -> int:
    """The flat index of the first element where two results of one backend cannot both be correct.

    Both must be of an allowed class; where both are finite they may differ by ``2 * bound`` (each is
    within ``bound`` of the exact value); a finite and a non-finite value may both be correct where
    the element may overflow. -1 when no element is apart. Same shapes assumed.
    """
    a = got.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    tol = _as_tolerance(tolerance, e)
    return int(_first_apart_kernel(_flat(a), _flat(e), _flat(tol.bound), _flat(tol.classes)))
