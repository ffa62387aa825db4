"""Row-wise quantized tables: codes with an fp16 scale and bias per row, as FBGEMM stores them.

A row of a quantized table holds ``dim`` codes ``q`` of ``bits`` bits each and an fp16 ``scale``
and ``bias``; its values are ``scale * q + bias``. jagbench keeps the codes unpacked, one uint8 per
element (`QuantizedTable`), so every backend packs them its own way; `pack_codes` packs them the
way every library here does (element ``j`` in byte ``j // (8 // bits)`` at bit
``(j % (8 // bits)) * bits``: for int4 the even element is the low nibble).

`quantize_rows` makes a table from float values by FBGEMM's rule
(``FloatToFusedNBitRowwiseQuantizedSBHalf``, also torch's 4/2-bit prepack and torchrec's
``from_float``), bit for bit. `dequantize` gives the stored values exactly, in float64: every
fp16 number is a multiple of 2**-24, so ``scale * q`` and ``bias`` are too, and their sum is
below 2**25 in magnitude (65504 * 255 + 65504); it needs at most 49 significant bits of float64's
53.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

QUANTIZED_STORAGE: tuple[str, ...] = ("int8", "int4", "int2")
_BITS = {"int8": 8, "int4": 4, "int2": 2}
QPARAM_BYTES = 4
"""Bytes of a row's fp16 scale and fp16 bias."""


def bits_of(storage: str) -> int:
    """Bits per code of a quantized storage type: ``"int4"`` -> 4."""
    try:
        return _BITS[storage]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown quantized storage {storage!r}; expected one of {list(QUANTIZED_STORAGE)}"
        ) from None


def levels_of(storage: str) -> int:
    """The largest code: ``2**bits - 1``."""
    return (1 << bits_of(storage)) - 1


def packed_dim(dim: int, storage: str) -> int:
    """Bytes that ``dim`` packed codes take (rounded up to whole bytes)."""
    per_byte = 8 // bits_of(storage)
    return -(-dim // per_byte)


def row_bytes(dim: int, storage: str) -> int:
    """Bytes of one stored row: the packed codes plus the fp16 scale and bias (no alignment padding)."""
    return packed_dim(dim, storage) + QPARAM_BYTES


@dataclass(frozen=True, eq=False)
class QuantizedTable:
    """A quantized table's exact stored data.

    ``codes`` is uint8 ``[rows, dim]``, one code per element (unpacked), each in
    ``0 .. 2**bits - 1``; ``scale`` and ``bias`` are float16 ``[rows]``; ``storage`` is one of
    `QUANTIZED_STORAGE`. Row ``r``'s values are ``scale[r] * codes[r] + bias[r]``.
    The constructor only stores; ``harness.validate`` checks.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    bias: torch.Tensor
    storage: str

    @property
    def bits(self) -> int:
        return bits_of(self.storage)

    @property
    def shape(self) -> torch.Size:
        """``[rows, dim]``, the shape of the values it stands for."""
        return self.codes.shape

    @property
    def num_rows(self) -> int:
        return int(self.codes.shape[0])

    @property
    def dim(self) -> int:
        return int(self.codes.shape[1])

    def __len__(self) -> int:
        """Its rows, as ``len`` of a values tensor."""
        return self.num_rows

    def numel(self) -> int:
        """The elements (codes) it stands for, ``rows * dim``."""
        return self.codes.numel()

    def clone(self) -> QuantizedTable:
        """A deep copy (new tensors)."""
        return QuantizedTable(self.codes.clone(), self.scale.clone(), self.bias.clone(), self.storage)

    def select_rows(self, rows: torch.Tensor | slice) -> QuantizedTable:
        """The table of the chosen rows, as new tensors."""
        return self[rows].clone()

    def __getitem__(self, index: object) -> QuantizedTable:
        """Rows (and columns) chosen as a values tensor's would be: ``t[rows]`` or
        ``t[rows, columns]`` (each an int, slice, index or boolean tensor; columns pick codes, the
        row keeps its scale and bias; an int picks a one-row table). The result shares storage where
        torch indexing does."""
        rows, columns = index if isinstance(index, tuple) else (index, slice(None))
        if isinstance(rows, int):
            rows = slice(rows, rows + 1 if rows != -1 else None)
        codes = self.codes[rows]
        if isinstance(columns, int):
            columns = slice(columns, columns + 1 if columns != -1 else None)
        return QuantizedTable(codes[:, columns], self.scale[rows], self.bias[rows], self.storage)


def concat_rows(tables: Sequence[QuantizedTable]) -> QuantizedTable:
    """One table holding the rows of ``tables`` (of one storage) in order, as new tensors."""
    storages = {t.storage for t in tables}
    if len(storages) != 1:
        raise ValueError(f"cannot concatenate quantized tables of storages {sorted(storages)}")
    return QuantizedTable(
        torch.cat([t.codes for t in tables]),
        torch.cat([t.scale for t in tables]),
        torch.cat([t.bias for t in tables]),
        storages.pop(),
    )


def quantize_rows(values: torch.Tensor, storage: str) -> QuantizedTable:
    """Quantize ``[rows, dim]`` float values row by row, bit-exactly as FBGEMM does.

    The values are first rounded to float32 (FBGEMM's quantizer reads float32). Then per row::

        bias  = fp16(min)                              # rounded to nearest
        range = max - float(bias)                      # float32; may be < 0 when fp16 rounded min up
        scale = 1 if range == 0 else fp16(range / (2**bits - 1))
        scale = 1 if scale == 0 or 1/scale is inf      # fp16 underflow
        q     = clamp(rint((x - bias) * fp32(1/scale)), 0, 2**bits - 1)   # times the inverse, half-even

    Multiplying by the float32 inverse, not dividing by the scale, is what FBGEMM does; dividing
    gives some codes one apart. Raises `ValueError` for a non-finite value or a row whose bias
    or scale would not fit in fp16 (the stored row could not stand for it).
    """
    nlev = levels_of(storage)
    if values.dim() != 2:
        raise ValueError(f"values must be [rows, dim]; got shape {list(values.shape)}")
    x = values.detach().to(torch.float32)
    rows, dim = x.shape
    codes = torch.empty(rows, dim, dtype=torch.uint8)
    scale, bias = torch.empty(rows, dtype=torch.float16), torch.empty(rows, dtype=torch.float16)
    if dim == 0:
        return QuantizedTable(codes, scale.fill_(1.0), bias.zero_(), storage)
    for lo in range(0, rows, _BLOCK_ROWS):  # in blocks: the temporaries stay small for big tables
        hi = min(rows, lo + _BLOCK_ROWS)
        _quantize_block(x[lo:hi], nlev, lo, codes[lo:hi], scale[lo:hi], bias[lo:hi])
    return QuantizedTable(codes, scale, bias, storage)


_BLOCK_ROWS = 1 << 16


def _quantize_block(
    x: torch.Tensor, nlev: int, first: int, codes: torch.Tensor, scale16: torch.Tensor, bias16: torch.Tensor
) -> None:
    """`quantize_rows` of rows ``first, first + 1, ...`` into the given outputs."""
    bad = ~torch.isfinite(x)
    if bool(bad.any()):
        r, c = (int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"cannot quantize row {first + r}: value {float(x[r, c])} at column {c} is not finite"
        )
    bias16.copy_(x.min(dim=1).values.to(torch.float16))
    bias = bias16.to(torch.float32)
    spread = x.max(dim=1).values - bias
    one = torch.ones_like(spread)
    scale = torch.where(spread == 0, one, spread / nlev).to(torch.float16).to(torch.float32)
    scale = torch.where(scale == 0, one, scale)
    inverse = one / scale
    overflow = torch.isinf(inverse)
    scale = torch.where(overflow, one, scale)
    inverse = torch.where(overflow, one, inverse)
    unfit = ~(torch.isfinite(bias) & torch.isfinite(scale))
    if bool(unfit.any()):
        r = int(unfit.nonzero()[0])
        raise ValueError(
            f"cannot quantize row {first + r}: its range [{float(x[r].min())}, {float(x[r].max())}] gives "
            f"fp16 bias {float(bias[r])} and scale {float(scale[r])}; fp16 holds at most 65504"
        )
    scale16.copy_(scale.to(torch.float16))
    codes.copy_(torch.round((x - bias[:, None]) * inverse[:, None]).clamp_(0, nlev))


def dequantize(table: QuantizedTable) -> torch.Tensor:
    """The table's values ``scale * q + bias`` as float64 ``[rows, dim]``, exactly (see the module doc)."""
    return table.scale.double()[:, None] * table.codes.double() + table.bias.double()[:, None]


def pack_codes(codes: torch.Tensor, storage: str) -> torch.Tensor:
    """uint8 ``[rows, dim]`` codes packed LSB-first into uint8 ``[rows, packed_dim]``.

    Element ``j`` goes into byte ``j // (8 // bits)`` at bit offset ``(j % (8 // bits)) * bits``;
    a last partial byte is zero-filled. int8 returns a copy.
    """
    bits = bits_of(storage)
    rows, dim = codes.shape
    if bits == 8:
        return codes.to(torch.uint8).clone()
    per_byte = 8 // bits
    width = packed_dim(dim, storage)
    padded = torch.zeros(rows, width * per_byte, dtype=torch.int32)
    padded[:, :dim] = codes.to(torch.int32)
    grouped = padded.view(rows, width, per_byte)
    out = torch.zeros(rows, width, dtype=torch.int32)
    for k in range(per_byte):
        out |= grouped[:, :, k] << (k * bits)
    return out.to(torch.uint8)


def unpack_codes(packed: torch.Tensor, dim: int, storage: str) -> torch.Tensor:
    """The inverse of `pack_codes`: uint8 ``[rows, dim]`` codes from packed bytes."""
    bits = bits_of(storage)
    if bits == 8:
        return packed[:, :dim].to(torch.uint8).clone()
    per_byte = 8 // bits
    mask = (1 << bits) - 1
    p = packed.to(torch.int32)
    parts = [(p >> (k * bits)) & mask for k in range(per_byte)]
    return torch.stack(parts, dim=2).reshape(p.shape[0], -1)[:, :dim].to(torch.uint8)


def scale_bias_bytes(table: QuantizedTable) -> torch.Tensor:
    """uint8 ``[rows, 4]``: each row's fp16 scale then fp16 bias, little-endian, as FBGEMM's TBE
    reads them at the front of its rows."""
    return torch.stack([table.scale, table.bias], dim=1).contiguous().view(torch.uint8)


def exact_values(weights: torch.Tensor | QuantizedTable) -> torch.Tensor:
    """A table's values as float64 ``[rows, dim]``: widened (a float tensor) or `dequantize` d, both exact."""
    if isinstance(weights, QuantizedTable):
        return dequantize(weights)
    return weights.detach().to(torch.float64)
