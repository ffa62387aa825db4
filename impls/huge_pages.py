"""Copies of large tables in memory backed by transparent huge pages, for the ``numba`` lookup.

Why: a random row of a table far larger than the TLB's reach (a few MiB of 4 KiB pages) costs a
page-table walk as well as a cache miss, and the kernel's prefetch does not hide the walk. With
2 MiB pages the walks all but vanish: the ``wide`` workload (2 x 2,000,000 x 256 float32) is
read 1.18x faster, ``dlrm-like`` 1.15x, ``wide-int8`` 1.32x (docs/numba.md, "Huge pages").

The memory is a private anonymous mapping advised ``MADV_HUGEPAGE``: Linux backs it with huge
pages when transparent huge pages are ``always`` or ``madvise`` (the usual default), and with
ordinary pages otherwise; where ``mmap`` cannot ask (no ``MADV_HUGEPAGE``) the copy is an ordinary
tensor. Either way it holds the same bytes; only the speed differs.
"""

from __future__ import annotations

import mmap

import numpy as np
import torch

HUGE_PAGE_BYTES = 2 << 20

# Tables smaller than this are read where they are: they are within the TLB's reach.
MIN_TABLE_BYTES = 16 << 20


def advised_bytes(n_bytes: int) -> np.ndarray:
    """``n_bytes`` writable bytes starting on a huge-page boundary (the array keeps its mapping
    alive, and a tensor made from it keeps the array alive)."""
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        return np.empty(n_bytes, np.uint8)
    mapping = mmap.mmap(-1, n_bytes + HUGE_PAGE_BYTES, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        mapping.madvise(mmap.MADV_HUGEPAGE)
    except OSError:
        pass  # the kernel refuses the advice (huge pages compiled out): ordinary pages, same bytes
    whole = np.frombuffer(mapping, dtype=np.uint8)
    skip = -whole.ctypes.data % HUGE_PAGE_BYTES
    return whole[skip : skip + n_bytes]


def huge_page_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of ``tensor`` (any dtype and shape) in memory advised to huge pages."""
    source = tensor.detach().contiguous()
    n_bytes = source.numel() * source.element_size()
    copy = torch.from_numpy(advised_bytes(n_bytes)).view(source.dtype).view(source.shape)
    copy.copy_(source)
    return copy


def worth_huge_pages(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is large enough (`MIN_TABLE_BYTES`) that reading it from huge pages pays."""
    return tensor.numel() * tensor.element_size() >= MIN_TABLE_BYTES
