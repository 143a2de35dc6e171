"""Large output buffers backed by transparent huge pages, where Linux offers them.

A preprocessed group is written once into fresh memory: a SAM group of 16 frames is 192 MiB,
above glibc's largest mmap threshold (32 MiB), so every call gets new pages from the kernel and
takes one page fault per 4 KiB page while it writes them. Advising the buffer as huge-page
memory before its first write (``madvise(MADV_HUGEPAGE)``; the kernel's THP mode ``madvise``
or ``always``) takes one fault per 2 MiB instead: 2x faster writing 192 MiB here
(``bench/preprocess.py`` what-ifs). The memory stays torch's: only the advice is added, and
anywhere the call is unavailable (other systems, THP ``never``) the buffer is a plain one.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from collections.abc import Callable

import torch

HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14  # linux/mman.h
# below this many bytes an allocation is usually recycled from glibc's heap (pages already
# mapped), and advising is a wasted system call
MIN_ADVISED_BYTES = 8 * HUGE_PAGE


def _madvise() -> Callable[[int, int, int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_MADVISE = _madvise()


def empty_huge(
    shape: tuple[int, ...],
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """``torch.empty(shape, dtype, device)``, advised as huge-page memory when large and on the CPU.

    Same tensor semantics as ``torch.empty`` (uninitialized, contiguous, owned by torch's
    allocator); only the whole 2 MiB pages inside it are advised, before any of them is touched.
    """
    out = torch.empty(shape, dtype=dtype, device=device)
    if out.device.type != "cpu":
        return out
    nbytes = out.numel() * out.element_size()
    if _MADVISE is not None and nbytes >= MIN_ADVISED_BYTES:
        begin = out.data_ptr()
        start = (begin + HUGE_PAGE - 1) & ~(HUGE_PAGE - 1)
        end = (begin + nbytes) & ~(HUGE_PAGE - 1)
        if end > start:
            _MADVISE(start, end - start, _MADV_HUGEPAGE)  # advice only: failure changes nothing
    return out
