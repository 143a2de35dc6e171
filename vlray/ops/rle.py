"""COCO run-length encoding of binary masks, boxes and areas, batched.

The encoding is pycocotools': the mask is read in column-major (Fortran) order, the runs
alternate 0s and 1s starting with a (possibly empty) run of 0s, and the run lengths are packed
into the compressed ``counts`` string of ``rleToString`` (each count as a delta to the count two
places back from the fourth on, in 5-bit groups offset by 48). Run boundaries are found for the
whole batch at once with ``diff`` / ``nonzero`` on the device; the string packing is vectorized
over all runs of all masks with NumPy.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def rle_counts(masks: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Run lengths of a batch of masks, concatenated.

    Args:
        masks: bool (N, H, W), any device.

    Returns:
        ``counts`` int64 (R,), the run lengths of all masks one after the other (each mask's runs
        start with a run of 0s, empty when its first pixel in column-major order is set), and
        ``lengths`` int64 (N,), how many runs belong to each mask.
    """
    n, h, w = masks.shape
    device = masks.device
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    size = h * w
    flat = masks.to(torch.bool).transpose(1, 2).reshape(n, size)
    if size == 0:
        return np.zeros(n, np.int64), np.ones(n, np.int64)
    rows, cols = torch.nonzero(flat[:, 1:] != flat[:, :-1], as_tuple=True)
    changes = torch.bincount(rows, minlength=n)
    first_set = flat[:, 0].to(torch.int64)
    # Run boundaries of mask i: 0, another 0 when its first pixel is set, every change, h * w.
    lead = 1 + first_set
    bounds_per_mask = lead + changes + 1
    ends = torch.cumsum(bounds_per_mask, 0)
    starts = ends - bounds_per_mask
    bounds = torch.zeros(int(ends[-1]), dtype=torch.int64, device=device)
    change_start = torch.cumsum(changes, 0) - changes
    rank = torch.arange(rows.numel(), device=device) - change_start[rows]
    bounds[starts[rows] + lead[rows] + rank] = cols.to(torch.int64) + 1
    bounds[ends - 1] = size
    runs = bounds[1:] - bounds[:-1]
    keep = torch.ones(runs.numel(), dtype=torch.bool, device=device)
    keep[(ends - 1)[:-1]] = False  # the step from one mask's end to the next mask's start
    return runs[keep].cpu().numpy(), (bounds_per_mask - 1).cpu().numpy()


def _pack_counts(counts: np.ndarray, lengths: np.ndarray) -> list[str]:
    """pycocotools' ``rleToString`` for many masks at once (see the module docstring)."""
    if len(lengths) == 0:
        return []
    starts = np.cumsum(lengths) - lengths
    seg = np.repeat(np.arange(len(lengths)), lengths)
    pos = np.arange(len(counts)) - starts[seg]
    x = counts.astype(np.int64)
    delta = pos > 2
    x[delta] -= counts[np.nonzero(delta)[0] - 2]
    # Most counts need one or two 5-bit groups: emit group k only for counts that still need it.
    groups: list[tuple[np.ndarray, np.ndarray]] = []  # (indices of counts, their k-th char)
    n_groups = np.zeros(len(x), np.int64)
    index = np.arange(len(x))
    while index.size:
        c = x & 0x1F
        x = x >> 5
        more = np.where(c & 0x10, x != -1, x != 0)
        groups.append((index, (c | np.where(more, 0x20, 0)) + 48))
        n_groups[index] += 1
        index, x = index[more], x[more]
    offsets = np.cumsum(n_groups) - n_groups
    chars = np.empty(int(n_groups.sum()), np.uint8)
    for k, (idx, group) in enumerate(groups):
        chars[offsets[idx] + k] = group
    data = chars.tobytes()
    char_lengths = np.bincount(seg, weights=n_groups, minlength=len(lengths)).astype(np.int64)
    bounds = np.concatenate([[0], np.cumsum(char_lengths)])
    return [data[a:b].decode("ascii") for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def masks_to_rle(masks: torch.Tensor) -> list[dict[str, Any]]:
    """Encodes binary masks as COCO compressed RLE, as ``pycocotools.mask.encode`` does.

    Args:
        masks: bool (N, H, W), any device.

    Returns:
        N dicts ``{"size": [H, W], "counts": str}``; the string equals pycocotools' (decoded).
    """
    _, h, w = masks.shape
    counts, lengths = rle_counts(masks)
    return [{"size": [h, w], "counts": s} for s in _pack_counts(counts, lengths)]


def _unpack_counts(counts: str | bytes) -> np.ndarray:
    """pycocotools' ``rleFrString``: the counts string -> run lengths int64 (R,)."""
    raw = counts.encode("ascii") if isinstance(counts, str) else bytes(counts)
    c = np.frombuffer(raw, dtype=np.uint8).astype(np.int64) - 48
    if c.size == 0:
        return np.zeros(0, np.int64)
    last = (c & 0x20) == 0
    ends = np.nonzero(last)[0]
    starts = np.concatenate([[0], ends[:-1] + 1])
    group = np.arange(c.size) - np.repeat(starts, ends - starts + 1)
    x = np.zeros(len(ends), np.int64)
    np.add.at(x, np.repeat(np.arange(len(ends)), ends - starts + 1), (c & 0x1F) << (5 * group))
    n_groups = ends - starts + 1
    negative = (c[ends] & 0x10) != 0
    x[negative] |= -1 << (5 * n_groups[negative])
    # counts[i] = x[i] + counts[i - 2] for i > 2: two interleaved cumulative sums.
    x[1::2] = np.cumsum(x[1::2])
    x[2::2] = np.cumsum(x[2::2])
    return x


def rle_to_mask(rle: dict[str, Any]) -> np.ndarray:
    """Decodes a COCO RLE (compressed string or uncompressed list of counts).

    Args:
        rle: ``{"size": [H, W], "counts": str | bytes | list[int]}``.

    Returns:
        bool (H, W) array.
    """
    h, w = (int(v) for v in rle["size"])
    counts = rle["counts"]
    runs = (
        np.asarray(counts, dtype=np.int64)
        if isinstance(counts, list | tuple | np.ndarray)
        else _unpack_counts(counts)
    )
    if int(runs.sum()) != h * w:
        raise ValueError(f"RLE counts sum to {int(runs.sum())}, expected {h} * {w} = {h * w}")
    values = np.arange(len(runs)) % 2 == 1
    return np.repeat(values, runs).reshape(w, h).T


def mask_to_bbox_xywh(masks: torch.Tensor) -> torch.Tensor:
    """COCO boxes of binary masks, as pycocotools' ``toBbox``.

    Args:
        masks: bool (N, H, W), any device.

    Returns:
        float32 (N, 4) ``[x, y, w, h]`` on the masks' device, in pixels: ``x``, ``y`` the first set
        column / row, ``w`` = last - first + 1 (so a one-pixel mask is 1 x 1); zeros for empty masks.
    """
    n, h, w = masks.shape
    if n == 0 or h == 0 or w == 0:
        return torch.zeros(n, 4, dtype=torch.float32, device=masks.device)
    rows = masks.any(dim=2).to(torch.uint8)  # (N, H)
    cols = masks.any(dim=1).to(torch.uint8)  # (N, W)
    y0 = rows.argmax(dim=1)
    y1 = h - 1 - rows.flip(1).argmax(dim=1)
    x0 = cols.argmax(dim=1)
    x1 = w - 1 - cols.flip(1).argmax(dim=1)
    boxes = torch.stack([x0, y0, x1 - x0 + 1, y1 - y0 + 1], dim=1).to(torch.float32)
    return boxes * rows.any(dim=1, keepdim=True)


def mask_area(masks: torch.Tensor) -> torch.Tensor:
    """Set pixels per mask.

    Args:
        masks: bool (N, H, W), any device.

    Returns:
        int64 (N,) on the masks' device.
    """
    return masks.flatten(1).sum(dim=1, dtype=torch.int64)
