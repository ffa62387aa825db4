"""Quantized tables in the fuzz strategies: their value profiles, their dims, their share of draws.

A quantized table (dtype ``"int8"``, ``"int4"``, ``"int2"``, `harness.quantized`) follows one of
the weight profiles of `harness.fuzz.problem_spec.WEIGHT_PROFILES` by name, with a meaning made
for row-wise quantization, where what matters is each row's range. Most rows are float values
quantized by FBGEMM's rule (`harness.quantized.quantize_rows`: what a library would store); the
profiles marked *direct* draw codes, scale and bias themselves, which reaches stored rows that no
quantizer makes but every lookup must read right (subnormal or huge scales, exact cancellation):

- ``unit``: standard normal values;
- ``integers``: integers in [-4, 4] (scale 1/nlev-exact sums show any misplaced code);
- ``positive``: one sign, magnitudes in [1/4, 4);
- ``wide``: a range per row from 2^-30 to the whole fp16 range, centred anywhere from 2^-24 to
  2^15 (mostly not fp16-representable minima), one row in eight constant;
- ``huge``: ranges up to fp16's limit (a row spanning [-65504, 65504], rows crowded near +-65504),
  and one row in four *direct* with a scale up to 65504 (values up to 65504 * 255);
- ``tiny``: narrow ranges around a value fp16 cannot hold (``v (1 + 2^-k noise)``, k 10..30), so
  the fp16 scale is tiny, subnormal, negative (fp16 rounded the minimum up) or 1 (underflow), and
  one row in eight constant;
- ``subnormal``: *direct*, fp16-subnormal scales and biases of either sign, codes uniform;
- ``cancel``: *direct*, a bias ``-B`` with a scale ``B / nlev`` and codes at the top, so values lie
  a few scales from 0 while ``s q`` and ``b`` are ``B`` large (``B`` up to 2^15), either sign.

`quantized_profile_weights` builds one table from a profile and raw random words (the caller's
deterministic stream), vectorised. `packable` fits a drawn dim to a storage; `dtype_options`
is what a table kind's dtype is drawn from, quantized storages a steady minority (`DTYPE_WEIGHTS`).
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from harness.fuzz.words import normal, sign, small, unit
from harness.model import TableConfig, TableDtype, is_quantized
from harness.quantized import QuantizedTable, bits_of, levels_of, quantize_rows

ROW_WORDS = 4
"""Random words per row beyond one per element: what `quantized_profile_weights` needs."""

DTYPE_WEIGHTS: dict[TableDtype, int] = {
    torch.float32: 8,
    torch.float16: 8,
    torch.bfloat16: 8,
    "int8": 1,
    "int4": 1,
    "int2": 1,
}
"""Relative weights of a table kind's dtype among those allowed: a kind is quantized one time in
nine when all are allowed (about a fifth of problems then hold a quantized table)."""

FP16_MAX = 65504.0


@functools.cache
def dtype_options(dtypes: tuple[TableDtype, ...]) -> tuple[TableDtype, ...]:
    """What a table kind's dtype is drawn from, uniformly: ``dtypes`` when none is quantized (as
    before quantized tables existed), else each repeated by `DTYPE_WEIGHTS`, the first allowed
    first (shrinking aims at it)."""
    if not any(is_quantized(d) for d in dtypes):
        return tuple(dtypes)
    return tuple(d for d in dtypes for _ in range(DTYPE_WEIGHTS[d]))


def packable(dim: int, dtype: TableDtype, cap: int) -> tuple[int, TableDtype]:
    """``(dim, dtype)`` with the dim rounded up to whole bytes of packed codes (int4: even, int2: a
    multiple of 4; at most ``cap``, else down), or the storage made int8 when ``cap`` holds no such
    dim. Float dtypes pass unchanged."""
    if not is_quantized(dtype):
        return dim, dtype
    per_byte = 8 // bits_of(dtype)
    up = -(-dim // per_byte) * per_byte
    if up <= cap:
        return up, dtype
    down = cap // per_byte * per_byte
    return (down, dtype) if down else (dim, "int8")


def _pow2(e: np.ndarray) -> np.ndarray:
    return np.ldexp(1.0, e.astype(np.int32))


def _values(profile: str, elem: np.ndarray, row: np.ndarray) -> np.ndarray:
    """float64 values of the quantized-by-rule profiles, within fp16's finite range."""
    rows, dim = elem.shape
    r0, r1, r2 = row[:, 0], row[:, 1], row[:, 2]
    if profile == "unit":
        return normal(elem)
    if profile == "integers":
        return small(elem, 9).astype(np.float64) - 4
    if profile == "positive":
        return (1 + unit(elem)) * _pow2(small(elem, 4) - 2)
    if profile == "wide":
        centre = sign(r0) * (1 + unit(r0)) * _pow2(small(r0, 40) - 24)
        width = _pow2(np.minimum(small(r1, 47) - 30, 16))
        x = centre[:, None] + width[:, None] * (unit(elem) - 0.5)
        x[small(r2, 8) == 0] = centre[small(r2, 8) == 0, None]
        return np.clip(x, -FP16_MAX, FP16_MAX)
    if profile == "huge":
        kind = small(r2, 3)
        span = FP16_MAX * (2 * unit(elem) - 1)
        near = sign(r0)[:, None] * FP16_MAX * (1 - 2.0**-7 * unit(elem))
        return np.where((kind == 0)[:, None], span, near)
    if profile == "tiny":
        centre = sign(r0) * (1 + unit(r0)) * _pow2(small(r0, 25) - 14)
        k = 10 + small(r1, 21)
        x = centre[:, None] * (1 + _pow2(-k)[:, None] * (unit(elem) - 0.5))
        x[small(r2, 8) == 0] = centre[small(r2, 8) == 0, None]
        return x
    raise ValueError(f"no quantized values for profile {profile!r}")


def _fp16(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64)).to(torch.float16)


def _direct(profile: str, storage: str, elem: np.ndarray, row: np.ndarray, table: QuantizedTable) -> None:
    """Overwrite the direct rows of ``table`` (in place) for the profiles that have them."""
    nlev = levels_of(storage)
    r0, r1, r2, r3 = row[:, 0], row[:, 1], row[:, 2], row[:, 3]
    codes = torch.from_numpy(small(elem, nlev + 1).astype(np.uint8))
    if profile == "subnormal":
        which = np.ones(len(row), dtype=bool)
        scale = sign(r0) * (1 + small(r0, 1023)) * 2.0**-24
        bias = sign(r1) * small(r1, 1024) * 2.0**-24
    elif profile == "cancel":
        which = np.ones(len(row), dtype=bool)
        big = (1 + unit(r0)) * _pow2(small(r0, 15))
        signs = sign(r1)
        scale = signs * big / nlev * (1 + 2.0**-8 * (unit(r2) - 0.5))
        bias = -signs * big
        top = torch.from_numpy((nlev - small(elem, 3)).clip(0).astype(np.uint8))
        codes = torch.where(torch.from_numpy(small(r3, 4) < 3)[:, None], top, codes)
    elif profile == "huge":
        which = small(r3, 4) == 3
        scale = sign(r0) * FP16_MAX * unit(r1)
        bias = sign(r2) * FP16_MAX * unit(r2)
    else:
        return
    mask = torch.from_numpy(which)
    table.codes[mask] = codes[mask]
    table.scale[mask] = _fp16(scale)[mask]
    table.bias[mask] = _fp16(bias)[mask]


def quantized_profile_weights(table: TableConfig, profile: str, words: np.ndarray) -> QuantizedTable:
    """The `QuantizedTable` of a quantized table following ``profile`` (module docstring).

    ``words`` is uint64 ``[rows, embedding_dim + ROW_WORDS]`` from the caller's random stream;
    a table of more rows repeats those rows (as the float profiles repeat their block).
    """
    storage = table.dtype
    n, dim = table.num_embeddings, table.embedding_dim
    if words.shape[1] != dim + ROW_WORDS or not 1 <= words.shape[0] <= n:
        raise ValueError(f"need words of shape [1..{n}, {dim + ROW_WORDS}], got {list(words.shape)}")
    elem, row = words[:, :dim], words[:, dim:]
    if profile in ("subnormal", "cancel"):
        base = quantize_rows(torch.zeros(len(row), dim), storage)
    else:
        base = quantize_rows(torch.from_numpy(_values(profile, elem, row)).to(torch.float32), storage)
    _direct(profile, storage, elem, row, base)
    if len(row) < n:
        repeat = -(-n // len(row))
        base = QuantizedTable(
            base.codes.repeat(repeat, 1)[:n].contiguous(),
            base.scale.repeat(repeat)[:n].contiguous(),
            base.bias.repeat(repeat)[:n].contiguous(),
            storage,
        )
    return base
