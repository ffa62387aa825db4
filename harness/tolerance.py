"""The tolerance: a rounding-error bound per output element, derived rather than chosen.

Error analysis (standard model of floating-point arithmetic, Higham, "Accuracy and Stability of
Numerical Algorithms", ch. 2-4). Let a bag hold ``L`` ids with stored rows ``x_i`` and per-sample
weights ``w_i`` (1 when unweighted). Widening a float16 / bfloat16 / float32 storage value to
float32 or float64 is exact, so storage rounding is *not* an error of the lookup: the reference and
the backend see the same numbers. The exact pooled value is ``s = sum_i w_i x_i`` (SUM) or
``s / L`` (MEAN).

A backend that accumulates in float32 (unit roundoff ``u = 2**-24``) performs, per element:
one multiplication per term when weighted, ``L - 1`` additions in *any* order (sequential,
pairwise, SIMD lanes, blocked: every summation tree has depth at most ``L - 1``), and possibly one
final rounding when it accumulates wider and stores float32. With ``gamma(n) = n u / (1 - n u)``:

    SUM:   |s_hat - s|     <= gamma(L + 1) * sum_i |w_i x_i|             + (L + 1) * eta
    MEAN:  |m_hat - s / L| <= gamma(L + 3) * sum_i |w_i x_i| / L         + (L + 3) * eta

MEAN adds two roundings: a division by ``L``, or a multiplication by a rounded ``1 / L``.
``eta = 2**-149`` covers gradual underflow: a product or quotient that lands among float32's
subnormals is off by at most half the smallest subnormal (additions there are exact). A backend
that flushes subnormals to zero may therefore exceed the bound; that is a real deviation from
IEEE float32 accumulation, reported, not tolerated.

The reference itself is computed in float64 (``u64 = 2**-53``); its own error, at most
``gamma64(L + 3) * sum |w_i x_i|``, is added to the bound so that the comparison with the float64
value stays rigorous.

An empty bag must pool to exactly zero (bound 0). When ``sum |w_i x_i|`` times ``1 + gamma``
reaches float32's largest finite value, a float32 partial sum may overflow in some orders: such an
element is *unbounded* and any value is accepted; the comparison counts these elements so a report
can say how many there were. Where the reference is not finite (inf or NaN in the inputs) the
backend must give the same non-finite value.

A float16 accumulator (``u = 2**-11``) or a float16 result breaks the bound by a factor of about
``2**13 / L``, which is what lets the fuzzer catch it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

U32 = 2.0**-24
U64 = 2.0**-53
ETA32 = 2.0**-149
FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def gamma(n: torch.Tensor, u: float) -> torch.Tensor:
    """``n u / (1 - n u)``, infinite where ``n u >= 1``."""
    nu = n.to(torch.float64) * u
    return torch.where(nu < 1, nu / (1 - nu), torch.full_like(nu, float("inf")))


def error_bound(magnitude: torch.Tensor, bag_length: torch.Tensor, is_mean: torch.Tensor) -> torch.Tensor:
    """Per-element float64 bound on ``|backend - reference|``; ``inf`` where unbounded.

    ``magnitude`` is ``sum |w_i x_i|`` (divided by ``L`` for MEAN), as the reference returns it.
    """
    ops = bag_length + torch.where(is_mean, 3, 1)
    bound = (gamma(ops, U32) + gamma(ops, U64)) * magnitude + ops.to(torch.float64) * ETA32
    total_magnitude = torch.where(is_mean, magnitude * bag_length.to(torch.float64), magnitude)
    overflow = total_magnitude * (1 + gamma(ops, U32)) >= FLOAT32_MAX
    bound = torch.where(overflow, torch.full_like(bound, float("inf")), bound)
    return torch.where(bag_length == 0, torch.zeros_like(bound), bound)


@dataclass(frozen=True)
class Comparison:
    """How a backend's result compares with the reference under the bound."""

    agree: bool
    problem: str | None
    worst_index: tuple[int, ...] | None
    worst_value: float | None
    worst_reference: float | None
    worst_bound: float | None
    worst_ratio: float
    unbounded: int

    def describe(self) -> str:
        if self.problem is not None:
            return self.problem
        if self.worst_index is None:
            return "no elements"
        return (
            f"worst element {list(self.worst_index)}: got {self.worst_value!r}, reference "
            f"{self.worst_reference!r}, bound {self.worst_bound:.3g} "
            f"(error / bound = {self.worst_ratio:.3g})"
        )


def compare(result: object, reference: torch.Tensor, bound: torch.Tensor) -> Comparison:
    """Check type, shape, dtype, then every element against ``reference +- bound``."""

    def bad(problem: str) -> Comparison:
        return Comparison(False, problem, None, None, None, None, float("inf"), 0)

    if not isinstance(result, torch.Tensor):
        return bad(f"result is a {type(result).__name__}, not a tensor")
    if tuple(result.shape) != tuple(reference.shape):
        return bad(f"result has shape {tuple(result.shape)}, expected {tuple(reference.shape)}")
    if result.dtype != torch.float32:
        return bad(f"result is {result.dtype}, expected torch.float32")
    got = result.detach().to("cpu", torch.float64)
    unbounded = int(torch.isinf(bound).sum())
    if got.numel() == 0:
        return Comparison(True, None, None, None, None, None, 0.0, unbounded)

    finite_ref = torch.isfinite(reference)
    err = (got - reference).abs()
    ratio = torch.where(err == 0, torch.zeros_like(err), err / bound)
    ratio = torch.where(torch.isnan(ratio), torch.full_like(ratio, float("inf")), ratio)
    ratio = torch.where(torch.isinf(bound) & finite_ref, torch.zeros_like(ratio), ratio)
    same_nonfinite = (got == reference) | (torch.isnan(got) & torch.isnan(reference))
    ratio = torch.where(~finite_ref, torch.where(same_nonfinite, 0.0, float("inf")), ratio)

    flat = int(torch.argmax(ratio))
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), ratio.shape))
    worst = float(ratio[index])
    return Comparison(
        agree=worst <= 1.0,
        problem=None,
        worst_index=index,
        worst_value=float(got[index]),
        worst_reference=float(reference[index]),
        worst_bound=float(bound[index]),
        worst_ratio=worst,
        unbounded=unbounded,
    )
