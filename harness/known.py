"""Models of third-party libraries' known discrepancies: what a library computes instead of the contract.

A known-discrepancy case (`harness.cases`) names a backend, a scope and a **model**: the library's
behaviour written as data (the case file's ``"model"``). A disagreement of that backend counts as
*known* only when its actual result, or exception, is what the model predicts, element by element;
any other error in the same problem (another column, a value off by more than the modelled rounding,
another exception) is still a failure. `explain` makes that check; `harness.agreement.mark_known`
calls it.

Model kinds (``"kind"``) and their parameters:

``raises``: ``{"exception": "IndexError", "message": "tuple index out of range"}``
    the backend raises an exception of that class (or of a subclass: any class of its MRO with
    that name) whose message matches the regular expression ``message`` (``re.search``).
``pooled-in-dtype``: ``{"tables": ["float16"], "stored_as": null, "per_sample_weights":
"rounded-to-storage" | "float32", "sum_rounding": "nearest-even" | "nearest-away", "mean":
"rounded-sum-divided-by-rounded-length" | "sum-divided-by-length-then-rounded"}``
    the tables of those dtypes are pooled in a 16-bit type X (``stored_as``, else the table's own
    dtype): the table values are held in X (rounded to nearest even when ``stored_as`` differs from
    the table's dtype), per-sample weights are rounded to X first (``rounded-to-storage``), the bag
    is summed in float32 and the sum rounded to X by ``sum_rounding``; MEAN then either divides
    that rounded sum by the bag length rounded to X, in float32, and rounds to X again (torch's CPU
    kernel: ``apply_bag_size``), or divides the float32 sum by the length in float32 before the
    one rounding (torch's CUDA kernel). An empty bag divides by 1.
``divided-by-length-plus-eps``: ``{"eps": 1e-06}``
    when some table pools MEAN, every column is pooled as a float32 SUM and then divided, in
    float32, by ``fl32(n + fl32(eps))``, with ``n`` the bag length for a MEAN table and 1 for a SUM
    table (torchrec's row-wise ``_create_mean_pooling_divisor``); otherwise the contract.
``widened-wrongly``: ``{"dtype": "bfloat16", "conversion": "triton-interpreter-subnormals"}``
    values of the tables of that dtype reach the kernel converted by Triton's interpreter: a
    subnormal ``m * 2**-133`` (7-bit significand ``m``) becomes ``((m << (8 - m.bit_length()))
    & 0x7F) * 2**-133`` with its sign (``_convert_float`` renormalises the significand, then clamps
    the exponent at 0); normal values, zeros, inf and NaN are exact. Then the contract.
``columns-grouped``: ``{"by": ["pooling", "dtype"]}``
    the contract's values, but the columns come grouped by those table attributes: the groups in
    order of first appearance, tables in their order within a group (torchrec's fused EBC
    concatenates one FBGEMM module's output per ``(pooling, data_type)``).
``mean-pooled-as-sum``: ``{"tables": ["int8", "int4", "int2"]}``
    the MEAN tables of those dtypes are pooled as SUM: the bag's sum, not divided by its length
    (torch's quantized embedding-bag ops ignore ``mode``). The check is the contract's, on the
    problem with those tables' pooling set to SUM. Other tables are held to the contract.

How a value model is checked (the error analysis). `harness.tolerance` bounds a float32
accumulation of a bag: whatever the order, the float32 sum ``y`` satisfies ``|y - s| <= b`` with
``s`` the float64 reference and ``b`` its bound (the bound includes the reference's own error).
So ``y`` lies in ``Y = {float32 y : s - b <= y <= s + b}``. Every model above then applies to ``y``
a function ``g`` that is nondecreasing: rounding to nearest (ties to even or away) is
nondecreasing, and so is ``x -> fl(x / d)`` for ``d > 0``, and so is any composition of them.
Hence the library's output lies in ``g(Y)``, which is contained in
``[g(min Y), g(max Y)] ∩ (values g can produce)``; that is what is checked, per element. It is as
tight as a check can be without knowing ``y``: where ``g(min Y) == g(max Y)``, the usual case,
exactly one value is allowed. The model's problem is modified first (table values stored in X,
per-sample weights rounded, MEAN tables pooled as SUM), and ``s``, ``b`` are that problem's oracle.
Non-finite values follow `harness.tolerance`'s classes for the accumulator: where it allows
``+inf`` (some summation order overflows, or the reference is ``+inf``), ``-inf`` or NaN, the
result may be ``g`` of it (``g`` keeps infinities and NaN), and a finite ``g(y)`` may itself
overflow the 16-bit type to an infinity; a NaN reference allows only NaN. Columns the models do
not claim are held to the contract with `harness.tolerance.compare`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from harness.model import (
    TABLE_DTYPES,
    JaggedBatch,
    Pooling,
    Problem,
    TableConfig,
    dtype_from_name,
    dtype_name,
    output_columns,
)
from harness.tolerance import FINITE, NAN, NEG_INF, POS_INF, Tolerance, compare

MODEL_KINDS = (
    "raises",
    "pooled-in-dtype",
    "divided-by-length-plus-eps",
    "widened-wrongly",
    "columns-grouped",
    "mean-pooled-as-sum",
)
HALF_DTYPES = ("float16", "bfloat16")
SUM_ROUNDINGS = ("nearest-even", "nearest-away")
MEAN_RULES = ("rounded-sum-divided-by-rounded-length", "sum-divided-by-length-then-rounded")
PER_SAMPLE_WEIGHT_RULES = ("rounded-to-storage", "float32")
CONVERSIONS = ("triton-interpreter-subnormals",)
GROUP_ATTRIBUTES = ("pooling", "dtype")


class ModelError(ValueError):
    """A case's ``"model"`` that cannot be read; names the field."""


@dataclass(frozen=True)
class Observation:
    """What a backend did on a problem, kept so that a model can be checked against it.

    ``result`` is what the lookup returned; ``error_types`` the class names of its exception's MRO
    (most derived first) and ``error_message`` its message, when it raised; ``backend`` the backend
    object (scopes may test its attributes, e.g. ``interpret``); ``problem`` the problem the result
    is for as the backend saw it (validated: ids already hashed under the "modulo" policy; a
    benchmark's sampled rows), and ``oracle`` its reference and tolerance, when already computed.
    """

    result: Any = None
    error_types: tuple[str, ...] = ()
    error_message: str = ""
    backend: object | None = None
    problem: Problem | None = None
    oracle: Any = None

    @classmethod
    def of_exception(cls, error: BaseException, backend: object | None = None) -> Observation:
        names = tuple(k.__name__ for k in type(error).__mro__)
        return cls(error_types=names, error_message=str(error), backend=backend)


@dataclass(frozen=True)
class Explanation:
    """Whether the models explain an observation; ``detail`` says how, or why not; ``cases`` names
    the cases whose models were needed (claimed a table, reordered the columns, matched the
    exception)."""

    explained: bool
    detail: str
    cases: tuple[str, ...] = ()


class _OracleLike(Protocol):
    reference: Any
    tolerance: Tolerance


OracleOf = Callable[[Sequence[TableConfig], Mapping[str, torch.Tensor], JaggedBatch], _OracleLike]


# ---------------------------------------------------------------------------------------------
# Rounding primitives, on numpy float32 arrays (finite values and infinities; NaN is never passed).


def round_to_float16(x: np.ndarray) -> np.ndarray:
    """float32 -> float16, round to nearest, ties to even (IEEE; numpy's conversion), as float32."""
    with np.errstate(over="ignore"):
        return x.astype(np.float16).astype(np.float32)


def round_to_bfloat16(x: np.ndarray, ties: str = "nearest-even") -> np.ndarray:
    """float32 -> bfloat16 on the bits, as float32: ties to even, or away from zero (FBGEMM's
    ``cpu_float2bfloat16``: ``(bits + 0x8000) >> 16``). Both are nondecreasing in the value."""
    bits = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    if ties == "nearest-even":
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
    elif ties == "nearest-away":
        bits = bits + 0x8000
    else:
        raise ValueError(f"ties {ties!r} is not one of {SUM_ROUNDINGS}")
    return (((bits >> 16) & 0xFFFF) << 16).astype(np.uint32).view(np.float32)


def round_to(x: np.ndarray, dtype: str, ties: str = "nearest-even") -> np.ndarray:
    """float32 values rounded to ``dtype`` ("float16", "bfloat16" or "float32"), as float32."""
    if dtype == "float32":
        return x.astype(np.float32)
    if dtype == "float16":
        if ties != "nearest-even":
            raise ValueError("float16 rounding is modelled with ties to even only")
        return round_to_float16(x)
    if dtype == "bfloat16":
        return round_to_bfloat16(x, ties)
    raise ValueError(f"dtype {dtype!r} is not float16, bfloat16 or float32")


def representable(x: np.ndarray, dtype: str) -> np.ndarray:
    """Which float64 values are exactly values of ``dtype`` (infinities are; NaN is not)."""
    with np.errstate(over="ignore", invalid="ignore"):
        x32 = x.astype(np.float32)
        ok = x32.astype(np.float64) == x
        if dtype == "float32":
            return ok
        return ok & (round_to(x32, dtype) == x32)


def _ceil32(x: np.ndarray) -> np.ndarray:
    """The smallest float32 >= x (float64 in), as float32."""
    with np.errstate(over="ignore"):
        f = x.astype(np.float32)
    return np.where(f.astype(np.float64) < x, np.nextafter(f, np.float32(np.inf)), f)


def _floor32(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        f = x.astype(np.float32)
    return np.where(f.astype(np.float64) > x, np.nextafter(f, np.float32(-np.inf)), f)


@dataclass(frozen=True)
class AccumulatorRange:
    """What a bag's float32 accumulation may end at, per element (see the module docstring).

    A finite value in ``[lo, hi]`` (float32 arrays) where ``finite`` is set, ``+inf`` where
    ``pos_inf``, ``-inf`` where ``neg_inf``, NaN where ``nan``: `harness.tolerance`'s classes.
    """

    lo: np.ndarray
    hi: np.ndarray
    finite: np.ndarray
    pos_inf: np.ndarray
    neg_inf: np.ndarray
    nan: np.ndarray


def accumulator_range(reference: torch.Tensor, tolerance: Tolerance) -> AccumulatorRange:
    """``{float32 y : |y - reference| <= bound}`` and the allowed non-finite values, per element."""
    s = reference.detach().cpu().to(torch.float64).numpy()
    b = tolerance.bound.detach().cpu().to(torch.float64).numpy()
    classes = tolerance.classes.detach().cpu().numpy()
    big = float(np.finfo(np.float32).max)
    with np.errstate(invalid="ignore", over="ignore"):
        # Outward by one float64 ulp (s - b was itself rounded), then inward to float32 values.
        lo = _ceil32(np.nextafter(s - b, -np.inf))
        hi = _floor32(np.nextafter(s + b, np.inf))
        lo = np.maximum(lo, np.float32(-big))
        hi = np.minimum(hi, np.float32(big))
        finite = ((classes & FINITE) != 0) & np.isfinite(s) & np.isfinite(b) & (lo <= hi)
    zero = np.zeros_like(lo)
    return AccumulatorRange(
        lo=np.where(finite, lo, zero).astype(np.float32),
        hi=np.where(finite, hi, zero).astype(np.float32),
        finite=finite,
        pos_inf=(classes & POS_INF) != 0,
        neg_inf=(classes & NEG_INF) != 0,
        nan=(classes & NAN) != 0,
    )


def _divide32(x: np.ndarray, d: np.ndarray) -> np.ndarray:
    """IEEE float32 division (numpy), infinities kept."""
    with np.errstate(over="ignore", under="ignore", invalid="ignore", divide="ignore"):
        return (x.astype(np.float32) / d.astype(np.float32)).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# The models.


@dataclass(frozen=True)
class TableTransform:
    """How a value model changes one table before the float32 accumulation, and what follows it.

    ``values``: the table's values as the library holds them (``None``: unchanged), and the dtype
    they then have. ``per_sample_weights``: the dtype the bag's per-sample weights are rounded to
    (``None``: as given). ``pool_as_sum``: the float32 accumulation is a SUM even for a MEAN table
    (the model divides itself). ``output``: the nondecreasing function of the float32 accumulator
    and the bag length (``None``: the contract applies to this table, on the changed values), with
    the dtype whose values it produces.
    """

    values: Callable[[torch.Tensor], torch.Tensor] | None = None
    values_dtype: torch.dtype | None = None
    per_sample_weights: torch.dtype | None = None
    pool_as_sum: bool = False
    output: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None
    output_dtype: str = "float32"


class Model:
    """A library's behaviour as data; subclasses are the kinds listed in the module docstring."""

    kind: str = ""

    def describe(self) -> str:
        raise NotImplementedError

    def to_json(self) -> dict[str, Any]:
        raise NotImplementedError

    def explains_exception(self, observation: Observation) -> str | None:
        """``None`` when the exception is the modelled one, else why not (value models: never)."""
        return f"model {self.kind!r} predicts a result, not an exception"

    def table_transforms(self, problem: Problem) -> dict[str, TableTransform]:
        """The tables this model claims on ``problem``, and what it does to each (raise models: none)."""
        return {}

    def column_order(self, problem: Problem) -> list[int] | None:
        """The contract's column indices in the order the library emits them (``None``: unchanged)."""
        return None


@dataclass(frozen=True)
class Raises(Model):
    exception: str
    message: str = ""
    kind: str = field(default="raises", init=False)

    def describe(self) -> str:
        pattern = f", message matching {self.message!r}" if self.message else ""
        return f"raises {self.exception}{pattern}"

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "exception": self.exception, "message": self.message}

    def explains_exception(self, observation: Observation) -> str | None:
        if not observation.error_types:
            return "no exception was recorded for this verdict"
        got = f"{observation.error_types[0]}: {observation.error_message}"
        if self.exception not in observation.error_types:
            return f"it raised {got}, the model says {self.exception}"
        if self.message and re.search(self.message, observation.error_message) is None:
            return f"it raised {got}, whose message does not match {self.message!r}"
        return None


def _mean_length(length: np.ndarray, dtype: str) -> np.ndarray:
    """max(L, 1) converted to ``dtype`` (via float32, ties to even), as float32."""
    return round_to(np.maximum(length, 1).astype(np.float32), dtype)


@dataclass(frozen=True)
class PooledInDtype(Model):
    tables: tuple[str, ...]
    stored_as: str | None = None
    per_sample_weights: str = "rounded-to-storage"
    sum_rounding: str = "nearest-even"
    mean: str = "rounded-sum-divided-by-rounded-length"
    kind: str = field(default="pooled-in-dtype", init=False)

    def describe(self) -> str:
        which = "/".join(self.tables)
        store = f" stored as {self.stored_as} (ties to even), then" if self.stored_as else ""
        x = self.stored_as or ("the table's dtype" if len(self.tables) > 1 else self.tables[0])
        ties = "ties to even" if self.sum_rounding == "nearest-even" else "ties away from zero"
        if self.mean == "rounded-sum-divided-by-rounded-length":
            mean = f"MEAN = that / L rounded to {x}, in float32, rounded to {x} again"
        else:
            mean = f"MEAN = the float32 sum / L in float32, then rounded to {x}"
        psw = (
            f"; per-sample weights rounded to {x} first"
            if self.per_sample_weights == "rounded-to-storage"
            else ""
        )
        return f"{which} tables:{store} the float32 sum is rounded to {x} ({ties}); {mean}{psw}"

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "tables": list(self.tables),
            "stored_as": self.stored_as,
            "per_sample_weights": self.per_sample_weights,
            "sum_rounding": self.sum_rounding,
            "mean": self.mean,
        }

    def table_transforms(self, problem: Problem) -> dict[str, TableTransform]:
        out = {}
        for t in problem.tables:
            own = dtype_name(t.dtype)
            if own not in self.tables:
                continue
            x = self.stored_as or own
            store = dtype_from_name(x)
            mean_first = self.mean == "sum-divided-by-length-then-rounded"
            out[t.name] = TableTransform(
                values=None if x == own else (lambda w, store=store: w.to(store)),
                values_dtype=store,
                per_sample_weights=store if self.per_sample_weights == "rounded-to-storage" else None,
                pool_as_sum=True,
                output=_pooled_output(x, self.sum_rounding, t.pooling is Pooling.MEAN, mean_first),
                output_dtype=x,
            )
        return out


def _pooled_output(
    x: str, ties: str, is_mean: bool, mean_first: bool
) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    def sum_rounded(y: np.ndarray, length: np.ndarray) -> np.ndarray:
        return round_to(y, x, ties)

    def rounded_sum_divided(y: np.ndarray, length: np.ndarray) -> np.ndarray:
        return round_to(_divide32(round_to(y, x, ties), _mean_length(length, x)), x)

    def divided_then_rounded(y: np.ndarray, length: np.ndarray) -> np.ndarray:
        return round_to(_divide32(y, np.maximum(length, 1).astype(np.float32)), x, ties)

    if not is_mean:
        return sum_rounded
    return divided_then_rounded if mean_first else rounded_sum_divided


@dataclass(frozen=True)
class DividedByLengthPlusEps(Model):
    eps: float = 1e-6
    kind: str = field(default="divided-by-length-plus-eps", init=False)

    def describe(self) -> str:
        return (
            f"when a table pools MEAN, every column = the float32 SUM / fl32(n + {self.eps:g}) in float32, "
            "n = the bag length for MEAN tables, 1 for SUM tables"
        )

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "eps": self.eps}

    def table_transforms(self, problem: Problem) -> dict[str, TableTransform]:
        if not any(t.pooling is Pooling.MEAN for t in problem.tables):
            return {}
        eps32 = np.float32(self.eps)

        def divided(is_mean: bool) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
            def g(y: np.ndarray, length: np.ndarray) -> np.ndarray:
                n = length.astype(np.float32) if is_mean else np.ones_like(y, dtype=np.float32)
                return _divide32(y, (n + eps32).astype(np.float32))

            return g

        return {
            t.name: TableTransform(pool_as_sum=True, output=divided(t.pooling is Pooling.MEAN))
            for t in problem.tables
        }


def triton_interpreter_bfloat16_to_float32(w: torch.Tensor) -> torch.Tensor:
    """bfloat16 values as Triton 3.9's interpreter widens them (see `WidenedWrongly`), as float32."""
    bits = w.detach().cpu().contiguous().view(torch.int16).numpy().astype(np.uint32) & 0xFFFF
    exponent = (bits >> 7) & 0xFF
    m = bits & 0x7F
    subnormal = (exponent == 0) & (m != 0)
    # The significand shifted left until its leading 1 leaves the 7-bit field (renormalised), with
    # the exponent left at 0: the float32 subnormal with that significand.
    bit_length = sum(((m >> k) > 0).astype(np.int64) for k in range(7))
    renormalised = ((m.astype(np.int64) << (8 - bit_length)) & 0x7F).astype(np.uint32)
    out_bits = np.where(subnormal, (bits & 0x8000) | renormalised, bits) << 16
    return torch.from_numpy(out_bits.astype(np.uint32).view(np.float32).copy()).reshape(w.shape)


@dataclass(frozen=True)
class WidenedWrongly(Model):
    dtype: str = "bfloat16"
    conversion: str = "triton-interpreter-subnormals"
    kind: str = field(default="widened-wrongly", init=False)

    def describe(self) -> str:
        return (
            f"{self.dtype} subnormals read as Triton's interpreter widens them "
            "(m·2^-133 -> ((m << (8 - bit_length(m))) & 0x7F)·2^-133), then the contract"
        )

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "dtype": self.dtype, "conversion": self.conversion}

    def table_transforms(self, problem: Problem) -> dict[str, TableTransform]:
        return {
            t.name: TableTransform(values=triton_interpreter_bfloat16_to_float32, values_dtype=torch.float32)
            for t in problem.tables
            if dtype_name(t.dtype) == self.dtype
        }


@dataclass(frozen=True)
class ColumnsGrouped(Model):
    by: tuple[str, ...] = GROUP_ATTRIBUTES
    kind: str = field(default="columns-grouped", init=False)

    def describe(self) -> str:
        return (
            f"columns grouped by ({', '.join(self.by)}): groups in order of first appearance, tables in "
            "order within a group; values per the contract"
        )

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "by": list(self.by)}

    def column_order(self, problem: Problem) -> list[int] | None:
        groups: dict[tuple[str, ...], list[TableConfig]] = {}
        for t in problem.tables:
            groups.setdefault(tuple(str(getattr(t, a)) for a in self.by), []).append(t)
        first = {}
        start = 0
        for t in problem.tables:
            first[t.name] = start
            start += t.embedding_dim * len(t.feature_names)
        order = []
        for tables in groups.values():
            for t in tables:
                order.extend(range(first[t.name], first[t.name] + t.embedding_dim * len(t.feature_names)))
        return order


@dataclass(frozen=True)
class MeanPooledAsSum(Model):
    tables: tuple[str, ...]
    kind: str = field(default="mean-pooled-as-sum", init=False)

    def describe(self) -> str:
        return f"{'/'.join(self.tables)} tables that pool MEAN are pooled as SUM (the bag's sum, not divided)"

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "tables": list(self.tables)}

    def table_transforms(self, problem: Problem) -> dict[str, TableTransform]:
        return {
            t.name: TableTransform(pool_as_sum=True, output=_unchanged)
            for t in problem.tables
            if t.pooling is Pooling.MEAN and dtype_name(t.dtype) in self.tables
        }


def _unchanged(y: np.ndarray, length: np.ndarray) -> np.ndarray:
    """The float32 accumulator itself (nondecreasing, trivially)."""
    return y


def _choice(d: Mapping[str, Any], key: str, allowed: Sequence[str], default: str | None = None) -> str:
    value = d.get(key, default)
    if value not in allowed:
        raise ModelError(f"model {key!r} is {value!r}, expected one of {list(allowed)}")
    return value


def model_from_json(d: Mapping[str, Any]) -> Model:
    """A `Model` from a case file's ``"model"`` object; `ModelError` names a bad field."""
    if not isinstance(d, Mapping):
        raise ModelError(f"model must be an object, got {type(d).__name__}")
    kind = _choice(d, "kind", MODEL_KINDS)
    if kind == "raises":
        if not isinstance(d.get("exception"), str) or not d["exception"]:
            raise ModelError("model 'raises' needs 'exception', an exception class name")
        message = d.get("message", "")
        try:
            re.compile(message)
        except re.error as e:
            raise ModelError(f"model 'message' {message!r} is not a regular expression: {e}") from e
        return Raises(d["exception"], message)
    if kind == "pooled-in-dtype":
        tables = d.get("tables")
        if not tables or any(t not in HALF_DTYPES for t in tables):
            raise ModelError(f"model 'tables' is {tables!r}, expected a list drawn from {list(HALF_DTYPES)}")
        stored_as = d.get("stored_as")
        if stored_as is not None and stored_as not in HALF_DTYPES:
            raise ModelError(
                f"model 'stored_as' is {stored_as!r}, expected null or one of {list(HALF_DTYPES)}"
            )
        model = PooledInDtype(
            tables=tuple(tables),
            stored_as=stored_as,
            per_sample_weights=_choice(
                d, "per_sample_weights", PER_SAMPLE_WEIGHT_RULES, "rounded-to-storage"
            ),
            sum_rounding=_choice(d, "sum_rounding", SUM_ROUNDINGS, "nearest-even"),
            mean=_choice(d, "mean", MEAN_RULES, MEAN_RULES[0]),
        )
        x = {stored_as} if stored_as else set(tables)
        if model.sum_rounding == "nearest-away" and "float16" in x:
            raise ModelError("model 'sum_rounding' nearest-away is modelled for bfloat16 only")
        return model
    if kind == "divided-by-length-plus-eps":
        eps = d.get("eps", 1e-6)
        if not isinstance(eps, (int, float)) or not eps > 0:
            raise ModelError(f"model 'eps' must be a positive number, got {eps!r}")
        return DividedByLengthPlusEps(float(eps))
    if kind == "widened-wrongly":
        return WidenedWrongly(_choice(d, "dtype", ("bfloat16",)), _choice(d, "conversion", CONVERSIONS))
    if kind == "mean-pooled-as-sum":
        tables = d.get("tables")
        allowed = [dtype_name(t) for t in TABLE_DTYPES]
        if not tables or not isinstance(tables, list) or any(t not in allowed for t in tables):
            raise ModelError(f"model 'tables' is {tables!r}, expected a list drawn from {allowed}")
        return MeanPooledAsSum(tuple(tables))
    by = d.get("by", list(GROUP_ATTRIBUTES))
    if not by or any(a not in GROUP_ATTRIBUTES for a in by):
        raise ModelError(f"model 'by' is {by!r}, expected attributes drawn from {list(GROUP_ATTRIBUTES)}")
    return ColumnsGrouped(tuple(by))


# ---------------------------------------------------------------------------------------------
# Checking a backend's result against the models.


def _modified_problem(problem: Problem, transforms: Mapping[str, TableTransform]) -> Problem:
    """The problem as the library computes it before its float32 accumulation."""
    tables = []
    weights = dict(problem.weights)
    for t in problem.tables:
        tr = transforms.get(t.name)
        if tr is None:
            tables.append(t)
            continue
        dtype = tr.values_dtype or t.dtype
        if tr.values is not None:
            weights[t.name] = tr.values(problem.weights[t.name])
        pooling = Pooling.SUM if tr.pool_as_sum else t.pooling
        tables.append(TableConfig(t.name, t.num_embeddings, t.embedding_dim, t.feature_names, pooling, dtype))
    batch = problem.batch
    if batch.weights is not None:
        per_sample = batch.weights.clone()
        table_of = {f: t for t in problem.tables for f in t.feature_names}
        for key in batch.keys:
            tr = transforms.get(table_of[key].name)
            if tr is not None and tr.per_sample_weights is not None:
                part = batch.feature_slice(key)
                per_sample[part] = per_sample[part].to(tr.per_sample_weights).to(torch.float32)
        batch = JaggedBatch(batch.keys, batch.values, batch.lengths, per_sample)
    return Problem(tuple(tables), weights, batch, problem.metadata)


def _where(problem: Problem, column: int) -> str:
    for table, feature, first, dim in output_columns(problem.tables):
        if first <= column < first + dim:
            return f"feature {feature!r} (table {table!r}), element {column - first}"
    return f"column {column}"


def _check_output(
    got: torch.Tensor,
    reference: torch.Tensor,
    tolerance: Tolerance,
    length: torch.Tensor,
    g: Callable[[np.ndarray, np.ndarray], np.ndarray],
    codomain: str,
) -> tuple[int, tuple[int, int] | None, str]:
    """How many elements are not in ``g(accumulator range)`` (module docstring), and the first."""
    acc = accumulator_range(reference, tolerance)
    n = length.detach().cpu().numpy()
    r = got.detach().cpu().to(torch.float64).numpy()
    lo = g(acc.lo, n).astype(np.float64)
    hi = g(acc.hi, n).astype(np.float64)
    with np.errstate(invalid="ignore"):
        finite = acc.finite & np.isfinite(r) & (lo <= r) & (r <= hi) & representable(r, codomain)
        pos = (r == np.inf) & (acc.pos_inf | (acc.finite & (hi == np.inf)))
        neg = (r == -np.inf) & (acc.neg_inf | (acc.finite & (lo == -np.inf)))
    ok = finite | pos | neg | (np.isnan(r) & acc.nan)
    bad = np.argwhere(~ok)
    if len(bad) == 0:
        return 0, None, ""
    i, j = (int(x) for x in bad[0])
    allowed = []
    if acc.finite[i, j]:
        allowed.append(f"[{float(lo[i, j])!r}, {float(hi[i, j])!r}] ({codomain} values)")
    allowed += [
        name for name, m in (("+inf", acc.pos_inf), ("-inf", acc.neg_inf), ("NaN", acc.nan)) if m[i, j]
    ]
    why = f"got {float(r[i, j])!r}, the model allows {' or '.join(allowed) or 'nothing'}"
    return len(bad), (i, j), f"{why} (reference {float(reference[i, j])!r})"


def _columns(tolerance: Tolerance, idx: torch.Tensor) -> Tolerance:
    return Tolerance(tolerance.bound[:, idx], tolerance.classes[:, idx])


def _changes_nothing(problem: Problem, transforms: Mapping[str, TableTransform]) -> bool:
    """The modified problem would be ``problem`` itself (so its oracle can be reused)."""
    pooling = {t.name: t.pooling for t in problem.tables}
    return all(
        tr.values is None
        and (tr.per_sample_weights is None or problem.batch.weights is None)
        and (not tr.pool_as_sum or pooling[name] is Pooling.SUM)
        for name, tr in transforms.items()
    )


def _check_values(
    models: Sequence[tuple[str, Model]],
    problem: Problem,
    result: Any,
    oracle_of: OracleOf,
    known_oracle: _OracleLike | None = None,
) -> Explanation:
    if not isinstance(result, torch.Tensor):
        return Explanation(False, f"the result is a {type(result).__name__}, not a tensor")
    width = sum(t.embedding_dim * len(t.feature_names) for t in problem.tables)
    want = (problem.batch.batch_size, width)
    if tuple(result.shape) != want or result.dtype != torch.float32:
        return Explanation(
            False, f"the result is {result.dtype} {tuple(result.shape)}; every model keeps float32 {want}"
        )
    claims: dict[str, tuple[str, TableTransform]] = {}
    order: tuple[str, list[int]] | None = None
    for name, model in models:
        for table, tr in model.table_transforms(problem).items():
            claims.setdefault(table, (name, tr))
        columns = model.column_order(problem)
        if order is None and columns is not None:
            order = (name, columns)
    got = result.detach().cpu()
    if order is not None:
        unpermuted = torch.empty_like(got)
        unpermuted[:, order[1]] = got
        got = unpermuted
    transforms = {t: tr for t, (_, tr) in claims.items()}
    if known_oracle is not None and _changes_nothing(problem, transforms):
        oracle = known_oracle
    else:
        changed = _modified_problem(problem, transforms)
        oracle = oracle_of(changed.tables, changed.weights, changed.batch)
    value, tolerance, length = oracle.reference.value, oracle.tolerance, oracle.reference.bag_length
    columns_of: dict[str, list[int]] = {}
    for table, _, first, dim in output_columns(problem.tables):
        columns_of.setdefault(table, []).extend(range(first, first + dim))
    contract: list[int] = []
    failures = []
    for t in problem.tables:
        cols = columns_of[t.name]
        name, tr = claims.get(t.name, ("", TableTransform()))
        if tr.output is None:
            contract += cols
            continue
        idx = torch.tensor(cols, dtype=torch.long)
        count, at, why = _check_output(
            got[:, idx], value[:, idx], _columns(tolerance, idx), length[:, idx], tr.output, tr.output_dtype
        )
        if at is not None:
            failures.append(
                f"{count} element(s) of table {t.name!r} are not what {name!r} models; the first: sample "
                f"{at[0]}, {_where(problem, cols[at[1]])}: {why}"
            )
    if contract:
        idx = torch.tensor(contract, dtype=torch.long)
        comparison = compare(got[:, idx], value[:, idx], _columns(tolerance, idx))
        if not comparison.agree:
            where = ""
            if comparison.worst_index is not None:
                i, j = comparison.worst_index
                where = f" at sample {i}, {_where(problem, contract[j])}"
                comparison = dataclasses.replace(comparison, worst_index=(i, contract[j]))
            held = "the contract"
            modelled_here = sorted({n for n, tr in claims.values() if tr.output is None})
            if modelled_here:
                held += f" on the values {' + '.join(map(repr, modelled_here))} model(s)"
            if order is not None:
                held += f", in the column order {order[0]!r} models"
            failures.append(f"columns held to {held} disagree{where}: {comparison.describe()}")
    if failures:
        return Explanation(False, "; ".join(failures))
    used = tuple(n for n, _ in models if n in {c for c, _ in claims.values()} or (order and n == order[0]))
    if not used:
        return Explanation(False, "no model applies to this problem, and the contract does not hold")
    return Explanation(True, f"every element is what {' + '.join(map(repr, used))} model(s)", used)


def explain(
    models: Sequence[tuple[str, Model]],
    problem: Problem,
    observation: Observation,
    oracle_of: OracleOf,
) -> Explanation:
    """Whether the named models, together, explain what the backend did on ``problem``.

    An exception is explained by any one ``raises`` model that matches it. A result is explained
    when every column is as the models predict: each claimed table by the model that claims it
    (the first, if several do), every other column by the contract, after undoing a modelled
    column order. ``oracle_of`` computes the reference and bound (``harness.agreement.Oracle.of``).
    """
    if not models:
        return Explanation(False, "no known case to try")
    if observation.error_types:
        reasons = []
        for name, model in models:
            why = model.explains_exception(observation)
            if why is None:
                return Explanation(
                    True, f"the exception is the one {name!r} models ({model.describe()})", (name,)
                )
            reasons.append(f"{name!r}: {why}")
        return Explanation(False, "; ".join(reasons))
    values = [(n, m) for n, m in models if not isinstance(m, Raises)]
    if not values:
        names = ", ".join(repr(n) for n, _ in models)
        return Explanation(False, f"{names} model(s) an exception, but the backend returned a result")
    known_oracle = observation.oracle if observation.problem is problem else None
    return _check_values(values, problem, observation.result, oracle_of, known_oracle)
