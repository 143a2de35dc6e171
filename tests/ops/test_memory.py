"""empty_huge: torch.empty semantics, with large CPU buffers advised as huge-page memory."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from vlray.ops.memory import HUGE_PAGE, MIN_ADVISED_BYTES, empty_huge


def _vm_flags(address: int) -> list[str]:
    """VmFlags of the mapping holding ``address`` in /proc/self/smaps."""
    inside, flags = False, []
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(v, 16) for v in head.split("-"))
            inside = lo <= address < hi
        elif inside and line.startswith("VmFlags:"):
            flags = line.split()[1:]
    return flags


def test_same_semantics_as_torch_empty():
    small = empty_huge((3, 5), torch.int64)
    assert small.shape == (3, 5) and small.dtype == torch.int64 and small.is_contiguous()
    big = empty_huge((MIN_ADVISED_BYTES // 4 + 7,))
    big.fill_(1.5)
    assert big.dtype == torch.float32 and float(big.sum()) == 1.5 * big.numel()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise is Linux's")
def test_large_buffers_are_advised_small_ones_not():
    big = empty_huge((4 * MIN_ADVISED_BYTES // 4,))
    middle = (big.data_ptr() + big.numel() * 2) & ~(HUGE_PAGE - 1)
    assert "hg" in _vm_flags(middle), "MADV_HUGEPAGE not applied to a large buffer"
    big.zero_()  # touching it is fine, whatever the kernel's THP mode
    assert float(big.abs().max()) == 0.0
