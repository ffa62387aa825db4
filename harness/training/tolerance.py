"""The tolerance of a training step: what a correct float32 backend may return, derived per quantity.

A step returns three things; each is compared with the float64 reference
(`harness.reference.training`) under a bound derived here. The reference of a step starts from
the weights the backend itself returned after the previous step (the backend continues from its
own weights, which it reports), so each step's weights are judged against the exact update of
*those* weights; the optimizer state, which a backend does not report, is carried as an exact
float64 value plus a bound on how far the backend's own state may have drifted from it
(`moment_error`, below).

Assumptions
-----------
The backend computes in float32 (``u = 2**-24``) or wider, with round to nearest and gradual
underflow (no flush to zero), any order of the additions, and rounds each updated weight once to
the table's dtype (DESIGN.md). The learning rate, eps and weight decay are held in float32 or
wider (one rounding each: `harness.training.validate` keeps them in float32's normal range).
``eta = 2**-149`` bounds the absolute error of an operation whose result lands among float32's
subnormals. ``gamma(k) = k u / (1 - k u)`` bounds ``k`` relative roundings (Higham, Lemma 3.1).
A quantity ``x`` the backend computes as ``x^`` has ``|x^ - x| <= E_x``; the bounds below are
evaluated in float64 from the reference's values and multiplied by ``1 + 2**-12`` at the end, which
covers the reference's own float64 error (the same analysis with ``u = 2**-53``: at most ``2**-29``
of the float32 bound on linear paths, ``2**-14.5`` through a square root) and the evaluation of
the bound.

1. The forward output
---------------------
The step's pooled result, from the weights before the update: the forward bound of
`harness.tolerance` applies as it is.

2. The per-sample weight gradient
---------------------------------
The gradient of an occurrence is ``sum_c w_c g_c`` over its table's ``dim`` columns: a sum of
``dim`` products, each rounded once, in any order. That is the forward SUM bound with
``L = dim`` and terms ``w_c g_c`` (`per_sample_weight_tolerance`), overflow classes included.

3. The gradient sums G
----------------------
``G[r] = sum_i t_i`` over the ``n`` occurrences of row ``r``, ``t_i = s_i g_i`` (weighted),
``g_i / L_i`` (MEAN) or ``g_i``. A backend computes each term with at most two roundings (a
product with ``s``; or ``g / L``, or ``g * fl(1 / L)``) and at most one that can underflow
(MEAN excludes per-sample weights, so nothing multiplies an underflowed value); it may group
duplicates first (``(s_1 + s_2) g`` or ``k g``), which is a summation tree of the same terms.
So the forward derivation holds with ``gamma(2)`` per term instead of ``u``; with
``S = sum |t_i|``, ``D <= (n - 1) S`` and ``c = (1 + u)**n``:

    E_G = u c (1 + gamma(2)) n S + gamma(2) S + (n + u c n**2) eta + gamma64(n + 3) S

(the last term is the float64 reference's own error). This is `gradient_error`.

4. The updated weights
----------------------
With the exact values (reals) and the backend's computed ones:

- ``H = G + wd w`` ("l2"), else ``H = G``; its magnitude ``A = |G| + wd |w|`` ("l2"), else ``|G|``.
  ``E_H = (1 + u) (E_G + gamma(2) wd |w| + eta) + u |H|`` for "l2" (wd's rounding, the product
  and the sum), else ``E_G``.
- The state (adagrad kinds). ``q = H**2``: ``E_q = (1 + u) (2 |H| E_H + E_H**2) + u q + eta``.
  adagrad: ``m = m_prev + q``; rowwise: ``m = m_prev + mean_d q``, the mean being any summation
  tree of the ``dim`` values and one scaling by ``1 / dim`` (a division, or a product with the
  rounded reciprocal: two roundings; scaling each term first is the same class), so
  ``E_mean = ((1 + gamma(dim + 1)) sum_d E_q + gamma(dim + 1) sum_d q) / dim + eta``.
  Then ``E_m = (1 + u) (E_m_prev + E_q or E_mean) + u m``. ``E_m_prev`` is the bound carried
  from the previous step (0 at the first step, when the state is exactly 0): the state's error
  grows step after step, and a backend that continues from its own state is judged with it.
- The square root: ``m^ >= 0`` always (a sum of squares), so ``|sqrt(m^) - sqrt(m)| <=
  min(sqrt(E_m), E_m / sqrt(m))`` (``sqrt`` is 1/2-Hoelder; and ``|x - y| / (sqrt x + sqrt y)``),
  plus its rounding: ``E_r = e + u (sqrt(m) + e)``.
- The denominator ``b = sqrt(m) + eps``: ``E_b = (1 + u) (E_r + u eps) + u b``. The backend's
  ``b^ >= eps (1 - u)`` whatever ``m^`` is (both terms are non-negative and rounding is
  monotone), so ``b^ >= b_low = max(b - E_b, eps (1 - u))``: the division is always bounded,
  and steep where ``m`` is near 0 and eps small, as it should be.
- The scale ``s = lr / b`` (sgd: ``s = lr``): ``|lr^ / b^ - lr / b| <= s S_rel`` with
  ``S_rel = (u b + E_b) / b_low`` (sgd: ``S_rel = u``, the rounding of lr).
- The step ``Delta = s H``: the product of ``lr``, ``1 / b`` and ``H`` in any order
  (``lr * H / b``, ``(lr / b) * H``, ``lr * (H / b)``) with ``k`` roundings (sgd 1, adagrad kinds
  2, one more with "l2" for FBGEMM's form ``(1 - mu wd) w - mu G``, whose ``mu wd`` is a
  product of its own):

      E_Delta = s (1 + S_rel) E_H + s S_rel A + gamma(k) s (1 + S_rel) (A + E_H) + eta_Delta

  ``s S_rel A`` uses the magnitude ``A``, not ``|H|``: FBGEMM's "l2" form multiplies ``G`` and
  ``wd w`` by the rounded ``mu`` separately, so ``mu``'s error meets both even where they cancel.
  ``eta_Delta = eta (1 + u)**3 (2 + 1 / b_low + lr + A + E_H + 2 |w|)``: an underflowed
  intermediate (``lr H``, ``H / b``, ``lr / b``, ``mu wd``, ``lr wd``) is scaled by at most one
  of the remaining factors. With eps as small as float32's smallest normal, ``eta / b_low``
  reaches ``2**-23``: not negligible, so it is kept.
- The decay: "decoupled" keeps ``a w`` with ``a = 1 - lr wd``, computed as ``(1 - lr wd) w`` or
  ``w - (lr wd) w`` with at most five roundings: ``E_a = gamma(5) (1 + lr wd) |w|``. "l2" in
  FBGEMM's form rounds ``1 - mu wd`` and its product with ``w``:
  ``E_a = gamma(2) (1 + s (1 + S_rel) wd) |w|``. "none": 0.
- The result ``v = a w - Delta``, rounded: the subtraction in the working precision (``u``), then
  the rounding to the table's dtype (``u_X``: half an ulp of the stored type, ``2**-11`` float16,
  ``2**-8`` bfloat16, with ``eta_X`` half its smallest subnormal). For float32 tables these are
  one rounding, with at most ``u64`` more when the work is wider. With ``E_p = E_Delta + E_a``:

      E_w = E_p + R (|v| + E_p) + eta + eta_X,   R = u + 2 u64 (float32), u + u_X (1 + u) (others).

  An FMA (``fma(-s, H, w)``) rounds less and is inside the bound.
- Rows that do not occur in the batch must be bit-identical to the previous weights.

Where the analysis stops (overflow)
-----------------------------------
If any intermediate can reach float32's overflow threshold (its exact magnitude plus its error
bound: a term or partial sum of ``G``, ``wd w``, ``H``, ``H**2`` or the row's sum of them, ``m``,
``lr H``, ``H / b``, ``lr / b``, ``Delta``, ``a w``, ``v``), a float32 backend can legitimately
return anything there: an infinite ``m`` makes ``mu = 0`` and leaves a row unchanged, an infinite
``G`` gives NaN. Such an element is *unconstrained* (every value and class allowed; counted and
reported, never silently); for rowwise the state-related ones (``H``, ``H**2``, ``m``, ``lr / b``)
make the whole row unconstrained, and so does an unbounded state error carried from an earlier
step, which also keeps that row's state unbounded from then on. A value ``v`` beyond the table
dtype's range (float16's 65504) may round to ``+-inf``: those classes are allowed where
``v +- E_w`` reaches the dtype's overflow threshold.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numba
import numpy as np
import torch

from harness.tolerance import (
    ETA32,
    FINITE,
    NAN,
    NEG_INF,
    OVERFLOW32,
    POS_INF,
    U32,
    U64,
    Tolerance,
    tolerance_from,
)
from harness.training.contract import OptimizerConfig

ANY_CLASS = FINITE | POS_INF | NEG_INF | NAN
SLACK = 1.0 + 2.0**-12
"""Covers the float64 reference's own error and the evaluation of the bounds (module docstring)."""

_UNIT_ROUNDOFF = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
_HALF_SUBNORMAL = {torch.float32: 0.0, torch.float16: 2.0**-25, torch.bfloat16: 2.0**-134}
_THRESHOLD = OVERFLOW32 * (1.0 - 2.0**-20)
"""Float32's overflow threshold, a little lower: an intermediate whose bound reaches it may overflow."""

_KINDS = {"sgd": 0, "adagrad": 1, "rowwise_adagrad": 2}
_MODES = {"none": 0, "l2": 1, "decoupled": 2}
SGD, ADAGRAD, ROWWISE = 0, 1, 2
L2, DECOUPLED = 1, 2


def _overflow_threshold(dtype: torch.dtype) -> float:
    """The smallest magnitude that rounds to infinity in ``dtype``: its max plus half its last ulp."""
    info = torch.finfo(dtype)
    biggest = float(info.max)
    return biggest + 2.0 ** math.floor(math.log2(biggest)) * float(info.eps) / 2


# ---------------------------------------------------------------------------------------------
# The formulas of the module docstring, per element, on plain floats (compiled by numba).


@numba.njit(cache=True, nogil=True)
def gamma(k: float, u: float = U32) -> float:
    """``k u / (1 - k u)``: bounds ``k`` relative roundings of unit roundoff ``u``."""
    return k * u / (1.0 - k * u)


@numba.njit(cache=True, nogil=True)
def _inf_if_nan(x: float) -> float:
    return math.inf if math.isnan(x) else x


@numba.njit(cache=True, nogil=True)
def gradient_bound(magnitude: float, n: int) -> float:
    """``E_G`` (3.) of a gradient sum of ``n`` terms whose magnitudes add up to ``magnitude``."""
    count = float(n)
    c = math.exp(count * U32) * (1.0 + 2.0**-50)
    g2 = gamma(2.0)
    return (
        U32 * c * (1.0 + g2) * count * magnitude
        + g2 * magnitude
        + (count + U32 * c * count * count) * ETA32
        + gamma(count + 3.0, U64) * magnitude
    )


@numba.njit(cache=True, nogil=True)
def _decayed_gradient(mode: int, wd: float, w: float, g: float, e_g: float) -> tuple[float, float, float]:
    """``H``, its magnitude ``A`` and ``E_H`` (4., first item)."""
    if mode == L2:
        h = g + wd * w
        return h, abs(g) + wd * abs(w), (1.0 + U32) * (e_g + gamma(2.0) * wd * abs(w) + ETA32) + U32 * abs(h)
    return g, abs(g), e_g


@numba.njit(cache=True, nogil=True)
def _scale(lr: float, eps: float, m: float, e_m: float) -> tuple[float, float, float, bool]:
    """From the state ``m`` (bound ``e_m``): ``s = lr / (sqrt(m) + eps)``, ``S_rel``, ``b_low`` and
    whether ``m``, ``lr / b`` or an unbounded state may overflow (4., the square root to the scale)."""
    u = U32
    e_m = _inf_if_nan(e_m)
    r = math.sqrt(m)
    e_root = 0.0
    if e_m > 0.0:
        e_root = math.sqrt(e_m)
        if m > 0.0:
            e_root = min(e_root, e_m / r)
    e_r = e_root + u * (r + e_root)
    b = r + eps
    e_b = _inf_if_nan((1.0 + u) * (e_r + u * eps) + u * b)
    b_low = max(b - e_b - 2.0**-50 * (b + e_b), eps * (1.0 - u) * (1.0 - 2.0**-50))
    s_rel = _inf_if_nan((u * b + e_b) / b_low)
    flag = m + e_m >= _THRESHOLD or lr * (1.0 + u) / b_low >= _THRESHOLD or not math.isfinite(e_m)
    return lr / b, s_rel, b_low, flag


@numba.njit(cache=True, nogil=True)
def _weight_bound(
    kind: int,
    mode: int,
    lr: float,
    wd: float,
    final: float,
    eta_x: float,
    w: float,
    h: float,
    a: float,
    e_h: float,
    s: float,
    s_rel: float,
    b_low: float,
    v: float,
) -> tuple[float, bool]:
    """``E_w`` of one updated weight (4., the step to the result) and whether ``lr H``, ``H / b``,
    ``Delta``, ``a w`` or ``v`` may overflow."""
    u = U32
    k = (1.0 if kind == SGD else 2.0) + (1.0 if mode == L2 else 0.0)
    w_abs = abs(w)
    h_most = a + e_h
    grow = 1.0 + s_rel
    most = s * grow * h_most
    e_delta = s * grow * e_h + s * s_rel * a + gamma(k) * most
    e_delta += ETA32 * (1.0 + u) ** 3 * (2.0 + 1.0 / b_low + lr + h_most + 2.0 * w_abs)
    if mode == DECOUPLED:
        e_decay = gamma(5.0) * (1.0 + lr * wd) * w_abs
        kept = (1.0 + lr * wd) * w_abs * (1.0 + gamma(5.0))
    elif mode == L2:
        e_decay = gamma(2.0) * (1.0 + s * grow * wd) * w_abs
        kept = (1.0 + s * grow * wd) * w_abs * (1.0 + gamma(3.0))
    else:
        e_decay = 0.0
        kept = w_abs
    e_pre = _inf_if_nan(e_delta + e_decay)
    bound = _inf_if_nan((e_pre + final * (abs(v) + e_pre) + ETA32 + eta_x) * SLACK)
    flag = (
        most * (1.0 + gamma(k)) >= _THRESHOLD
        or lr * (1.0 + u) ** 2 * h_most >= _THRESHOLD
        or h_most / b_low * (1.0 + u) >= _THRESHOLD
        or kept >= _THRESHOLD
        or abs(v) + e_pre >= _THRESHOLD
    )
    return bound, flag


@numba.njit(cache=True, nogil=True)
def _update_kernel(
    kind, mode, lr, eps, wd, final, eta_x, threshold_x,
    before, gradient, magnitude, occurrences, after, moment_after, moment_error_before,
    bound, classes, unconstrained, moment_error_after,
):  # fmt: skip
    """Every touched row of one table (``moment_*`` are ``[n, 1]`` for rowwise, unused for sgd)."""
    n, dim = before.shape
    u = U32
    g2 = gamma(2.0)
    for i in range(n):
        count = occurrences[i]
        sum_eq = 0.0
        sum_q = 0.0
        sum_h2 = 0.0
        row_flag = False
        for j in range(dim):
            w = before[i, j]
            e_g = gradient_bound(magnitude[i, j], count)
            h, a, e_h = _decayed_gradient(mode, wd, w, gradient[i, j], e_g)
            h_most = a + e_h
            flag = (
                magnitude[i, j] * (1.0 + gamma(count + 2.0)) >= _THRESHOLD
                or h_most * (1.0 + g2) >= _THRESHOLD
                or wd * abs(w) * (1.0 + g2) >= _THRESHOLD
            )
            if kind == SGD:
                bound[i, j], extra = _weight_bound(
                    kind, mode, lr, wd, final, eta_x, w, h, a, e_h, lr, u, 1.0, after[i, j]
                )
                unconstrained[i, j] = flag or extra
                continue
            q = h * h
            e_q = (1.0 + u) * (2.0 * abs(h) * e_h + e_h * e_h) + u * q + ETA32
            flag = flag or h_most * h_most * (1.0 + g2) >= _THRESHOLD
            if kind == ADAGRAD:
                m = moment_after[i, j]
                e_m = (1.0 + u) * (moment_error_before[i, j] + e_q) + u * m
                s, s_rel, b_low, state_flag = _scale(lr, eps, m, e_m)
                bound[i, j], extra = _weight_bound(
                    kind, mode, lr, wd, final, eta_x, w, h, a, e_h, s, s_rel, b_low, after[i, j]
                )
                unconstrained[i, j] = flag or state_flag or extra
                moment_error_after[i, j] = math.inf if unconstrained[i, j] else _inf_if_nan(e_m)
            else:
                sum_eq += e_q
                sum_q += q
                sum_h2 += h_most * h_most
                row_flag = row_flag or flag
        if kind == ROWWISE:
            g_dim = gamma(dim + 1.0)
            e_mean = ((1.0 + g_dim) * sum_eq + g_dim * sum_q) / dim + ETA32
            m = moment_after[i, 0]
            e_m = (1.0 + u) * (moment_error_before[i, 0] + e_mean) + u * m
            s, s_rel, b_low, state_flag = _scale(lr, eps, m, e_m)
            row_flag = row_flag or state_flag or sum_h2 * (1.0 + gamma(dim + 2.0)) >= _THRESHOLD
            for j in range(dim):
                w = before[i, j]
                e_g = gradient_bound(magnitude[i, j], count)
                h, a, e_h = _decayed_gradient(mode, wd, w, gradient[i, j], e_g)
                bound[i, j], extra = _weight_bound(
                    kind, mode, lr, wd, final, eta_x, w, h, a, e_h, s, s_rel, b_low, after[i, j]
                )
                unconstrained[i, j] = row_flag or extra
                row_flag = row_flag or extra
            if row_flag:  # one element's overflow reaches the row's state through m
                for j in range(dim):
                    unconstrained[i, j] = True
            moment_error_after[i, 0] = math.inf if row_flag else _inf_if_nan(e_m)
        for j in range(dim):
            if unconstrained[i, j] or not math.isfinite(bound[i, j]):
                unconstrained[i, j] = True
                bound[i, j] = math.inf
                classes[i, j] = ANY_CLASS
                continue
            c = FINITE
            if after[i, j] + bound[i, j] >= threshold_x:
                c |= POS_INF
            if after[i, j] - bound[i, j] <= -threshold_x:
                c |= NEG_INF
            classes[i, j] = c


@numba.njit(cache=True, nogil=True)
def _gradient_kernel(magnitude, occurrences, out):
    for i in range(magnitude.shape[0]):
        for j in range(magnitude.shape[1]):
            out[i, j] = gradient_bound(magnitude[i, j], occurrences[i])


# ---------------------------------------------------------------------------------------------
# Tensors


def gradient_error(magnitude: torch.Tensor, occurrences: torch.Tensor) -> torch.Tensor:
    """``E_G`` (3.) of ``[n, dim]`` gradient sums with ``magnitude`` ``S`` and ``occurrences``
    terms per row (``[n]``)."""
    out = np.empty(tuple(magnitude.shape))
    _gradient_kernel(_numpy(magnitude), occurrences.to(torch.int64).numpy(), out)
    return torch.from_numpy(out)


@dataclass(frozen=True, eq=False)
class UpdateTolerance:
    """The tolerance of one table's touched rows after a step (``[n, dim]``), the bound on the
    backend's state error after it (``[n, dim]`` adagrad, ``[n]`` rowwise, None for sgd), and
    where the analysis stops (``unconstrained``, bool ``[n, dim]``: any value allowed)."""

    tolerance: Tolerance
    moment_error: torch.Tensor | None
    unconstrained: torch.Tensor


def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float64).contiguous().numpy()


def update_tolerance(
    optimizer: OptimizerConfig,
    dtype: torch.dtype,
    before: torch.Tensor,
    gradient: torch.Tensor,
    gradient_magnitude: torch.Tensor,
    occurrences: torch.Tensor,
    after: torch.Tensor,
    moment_after: torch.Tensor | None,
    moment_error_before: torch.Tensor | None,
) -> UpdateTolerance:
    """The tolerance of the updated rows (4.), from float64 values on the touched rows.

    ``before`` / ``after``: the rows before and after the exact update (``[n, dim]``); ``gradient``
    G, ``gradient_magnitude`` S and ``occurrences`` (``[n]``) of each row's sum;
    ``moment_after`` the exact state after the update and ``moment_error_before`` the bound on the
    backend's state error before it (``[n, dim]`` adagrad, ``[n]`` rowwise, None for sgd).
    """
    kind = _KINDS[optimizer.kind]
    n, dim = before.shape
    if dtype == torch.float32:
        final = U32 + 2 * U64
    else:
        final = U32 + _UNIT_ROUNDOFF[dtype] * (1 + U32)
    if kind == SGD:
        moments = errors = np.zeros((n, 1))
    else:
        width = dim if kind == ADAGRAD else 1
        moments = _numpy(moment_after).reshape(n, width)
        errors = _numpy(moment_error_before).reshape(n, width)
    bound = np.empty((n, dim))
    classes = np.empty((n, dim), np.uint8)
    unconstrained = np.empty((n, dim), np.bool_)
    moment_error = np.empty_like(moments)
    _update_kernel(
        kind, _MODES[optimizer.weight_decay_mode], float(optimizer.learning_rate), float(optimizer.eps),
        float(optimizer.weight_decay), final, _HALF_SUBNORMAL[dtype], _overflow_threshold(dtype),
        _numpy(before), _numpy(gradient), _numpy(gradient_magnitude), occurrences.to(torch.int64).numpy(),
        _numpy(after), moments, errors, bound, classes, unconstrained, moment_error,
    )  # fmt: skip
    state_error = None
    if kind != SGD:
        state_error = torch.from_numpy(moment_error).reshape(moment_after.shape)
    tolerance = Tolerance(torch.from_numpy(bound), torch.from_numpy(classes))
    return UpdateTolerance(tolerance, state_error, torch.from_numpy(unconstrained))


def per_sample_weight_tolerance(
    value: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor, dims: torch.Tensor
) -> Tolerance:
    """The tolerance of per-sample weight gradients (2.): the forward SUM bound of ``dims``
    products per id (``dims``: each id's table dim), with their positive and negative sums."""
    magnitude = positive + negative
    n = dims.to(torch.int64)
    tree = (n.to(torch.float64) - 1).clamp(min=0) * magnitude
    return tolerance_from(
        value, magnitude, tree, positive, negative, n, torch.zeros(n.shape, dtype=torch.bool)
    )
