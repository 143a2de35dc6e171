"""Preprocess a list of decoded images for a family outside the pipeline (queries, benchmarks).

The pipeline splits the same steps over Ray stages (uint8 resize in the decode actors, grouping
and ``family.preprocess`` in the encoder); this is the in-process equivalent: resize each image
to its target shape in uint8 (over a thread pool: torch's resize kernels release the GIL), group
same-shape images and run one ``family.preprocess`` per group. (The resize is ``family.fit``:
the uint8 resize and, for families with one, the centre crop to the target shape.)
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image

from vlray.families.base import Family
from vlray.ops.decode import rgb_pixels


def preprocess_images(
    family: Family,
    images: Sequence[Image.Image | np.ndarray],
    pool: ThreadPoolExecutor | None = None,
) -> list[tuple[list[int], dict[str, torch.Tensor]]]:
    """Decoded images -> model inputs, one entry per same-shape group.

    Args:
        family: the model family (its ``target_size``, ``fit`` and ``preprocess``).
        images: RGB PIL images or (H, W, 3|4) uint8 arrays (channels 0-2 RGB).
        pool: threads for the per-image resizes; None resizes in the calling thread.

    Returns:
        ``[(indices, inputs)]``: the positions in ``images`` of each group, in order, and the
        group's model inputs (values bit-identical to the reference processor's).

    Raises:
        vlray.families.UnsupportedImage: an image the family rejects.
    """
    pixels = [rgb_pixels(i) if isinstance(i, Image.Image) else i for i in images]
    sizes = [family.target_size(*p.shape[:2]) for p in pixels]
    groups: dict[tuple[int, int], list[int]] = {}
    for index, size in enumerate(sizes):
        groups.setdefault(size, []).append(index)

    def resize(index: int) -> np.ndarray:
        return family.fit(pixels[index], pack=family.packed_groups)

    # every resize first, then every group's preprocess: alternating pool and torch work
    # per group left torch's OpenMP threads spinning against the pool's (siglip2, 128
    # photos, 9 groups, 2 threads: 152 -> 116 ms, bench/preprocess.py)
    order = [index for indices in groups.values() for index in indices]
    resized = dict(
        zip(order, pool.map(resize, order) if pool is not None else map(resize, order), strict=True)
    )
    out = []
    for (height, width), indices in groups.items():
        # packed RGB where the family's normalization reads it faster (see
        # Family.packed_groups); else PIL's 4-byte pixels stay 4 channels up to the
        # normalization's uint8 -> float copy, which reads the RGB channels directly
        channels = 3 if family.packed_groups else max(pixels[i].shape[2] for i in indices)
        batch = np.empty((len(indices), height, width, channels), dtype=np.uint8)
        for slot, index in enumerate(indices):
            array = resized.pop(index)
            batch[slot, ..., : array.shape[2]] = array
        group = torch.from_numpy(batch).permute(0, 3, 1, 2)[:, :3]
        out.append((indices, family.preprocess(group)))
    return out
