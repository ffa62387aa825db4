"""Raw 64-bit random words (`stream_words`), and values made from them with integer and exact
floating-point arithmetic.

Each formula is written once, on one word (``numba``-compiled), and is used two ways: as a numpy
ufunc over an array of words (`unit`, `sign`, `small`, `scaled`, `normal`), and inside
`profile_values`, which makes a whole float table of a weight profile in one compiled call
instead of a dozen numpy passes (most of the cost of building the small tables of a typical
fuzz example). Both give the same numbers to the last bit: the arithmetic is IEEE double, no
fast-math. The bits of a word are shared out so that the helpers read apart: `unit` the top
53, `sign` bit 10, `small` the low 10; `normal` sums all four 16-bit parts.
"""

from __future__ import annotations

import math

import numba
import numpy as np

_U = numba.uint64


@numba.njit(cache=True, nogil=True, inline="always")
def _unit(w):
    return np.float64(w >> _U(11)) * 2.0**-53


@numba.njit(cache=True, nogil=True, inline="always")
def _sign(w):
    return 1.0 - 2.0 * np.float64((w >> _U(10)) & _U(1))


@numba.njit(cache=True, nogil=True, inline="always")
def _small(w, m):
    return np.int64((w & _U(0x3FF)) % _U(m))


@numba.njit(cache=True, nogil=True, inline="always")
def _scaled(w, low, high):
    return (1.0 + _unit(w)) * math.ldexp(1.0, low + _small(w, high - low + 1))


@numba.njit(cache=True, nogil=True, inline="always")
def _normal(w):
    parts = (w & _U(0xFFFF)) + ((w >> _U(16)) & _U(0xFFFF)) + ((w >> _U(32)) & _U(0xFFFF)) + (w >> _U(48))
    return (np.float64(parts) - 2 * 65535) * (3.0**0.5 / 65536)


# Explicit signatures: compiled (or loaded from numba's cache) at import, not inside the first
# example of a fuzz run's time budget.
@numba.njit("Tuple((uint64[::1], uint64))(uint64, int64)", cache=True, nogil=True)
def stream_words(state, n):
    """The next ``n`` words of a SplitMix64 stream (Steele, Lea and Flood, 2014) at ``state``, and
    its state after them."""
    out = np.empty(n, np.uint64)
    x = _U(state)
    for i in range(n):
        x += _U(0x9E3779B97F4A7C15)
        z = (x ^ (x >> _U(30))) * _U(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> _U(27))) * _U(0x94D049BB133111EB)
        out[i] = z ^ (z >> _U(31))
    return out, x


unit = numba.vectorize(["float64(uint64)"], cache=True)(_unit.py_func)
"""Doubles uniform in [0, 1) from a word's top 53 bits."""

sign = numba.vectorize(["float64(uint64)"], cache=True)(_sign.py_func)
"""+-1.0 from a word's bit 10 (apart from `unit`'s and `small`'s bits)."""

small = numba.vectorize(["int64(uint64, int64)"], cache=True)(_small.py_func)
"""Integers in [0, m) (m <= 1024) from a word's low 10 bits."""

scaled = numba.vectorize(["float64(uint64, int64, int64)"], cache=True)(_scaled.py_func)
"""``(1 + u) * 2^e`` with u from `unit` and e uniform in [low, high] from `small` (exact while the
result stays normal)."""

normal = numba.vectorize(["float64(uint64)"], cache=True)(_normal.py_func)
"""Approximately standard normal doubles: the sum of a word's four 16-bit parts (Irwin-Hall),
centred and scaled to unit variance; within +-3.46."""

PROFILE_CODES = {
    "unit": 0,
    "integers": 1,
    "positive": 2,
    "wide": 3,
    "huge": 4,
    "tiny": 5,
    "subnormal": 6,
    "cancel": 7,
}


@numba.njit("float64[:, ::1](uint64[:, ::1], int64, float64, float64, int64, int64)", cache=True, nogil=True)
def profile_values(words, profile, tiny, big, low, high):
    """float64 ``[rows, dim]`` values of weight profile ``profile`` (a `PROFILE_CODES` value) from
    ``words`` of that shape; ``tiny`` and ``big`` are the dtype's smallest normal and largest
    finite values, ``[low, high]`` the exponents of ``wide``. See
    `harness.fuzz.problem_spec.WEIGHT_PROFILES` for what each profile means."""
    rows, dim = words.shape
    out = np.empty((rows, dim))
    for r in range(rows):
        for d in range(dim):
            w = words[r, d]
            if profile == 0:
                x = _normal(w)
            elif profile == 1:
                x = np.float64(_small(w, 9)) - 4.0
            elif profile == 2:
                x = _scaled(w, -2, 1)
            elif profile == 3:
                x = min(max(_sign(w) * _scaled(w, low, high), -big), big)
            elif profile == 4:
                x = _sign(w) * big * (0.125 + 0.875 * _unit(w))
            elif profile == 5:
                x = _sign(w) * tiny * (1.0 + 7.0 * _unit(w))
            elif profile == 6:
                x = _sign(w) * tiny * _unit(w)
            elif r % 2 == 0:  # cancel: a large row, then its negation times (1 + small)
                x = _normal(w) * 1024.0
            else:
                x = -(_normal(words[r - 1, d]) * 1024.0) * (1.0 + _unit(w) * 2.0**-8)
            out[r, d] = x
    return out
