"""uint8 resize to a target shape, with the reference processors' filter and antialiasing."""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as tvF

# Decoded arrays are read-only views of PIL buffers; torchvision only reads them.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")


def resize_uint8(
    pixels: np.ndarray,
    size: tuple[int, int],
    interpolation: InterpolationMode,
    keep_pad: bool = False,
) -> np.ndarray:
    """Resizes an RGB image in uint8 exactly as transformers' TorchvisionBackend.resize does.

    The reference calls ``torchvision.transforms.v2.functional.resize(antialias=True)`` on a uint8
    (3, H, W) tensor; the same call on a channels-last view of the HWC array gives the same
    values (tested) and skips a copy, which torchvision's uint8 kernels prefer. A 4-channel
    input (PIL's RGBX buffer, :func:`vlray.ops.decode.rgb_pixels`) is faster still: the kernel
    works on 4 channels internally and otherwise unpacks a 3-channel source into a 4-channel
    copy first; the pad channel is resized along and dropped, RGB values are the same.

    Args:
        pixels: (H, W, 3) or (H, W, 4) uint8, values in [0, 255]; channels 0-2 are RGB.
        size: target (height, width).
        interpolation: torchvision interpolation mode.
        keep_pad: return a 4-channel input's pad channel too, (height, width, 4), instead of
            packing RGB (a strided copy; callers that copy the values anyway can skip it).

    Returns:
        (height, width, 3) uint8 C-contiguous array; (height, width, C) with ``keep_pad``.
    """
    if pixels.ndim != 3 or pixels.shape[2] not in (3, 4):
        raise ValueError(f"expected (H, W, 3) or (H, W, 4) pixels, got shape {pixels.shape}")
    if pixels.shape[:2] == tuple(size):
        out = torch.from_numpy(pixels)
    else:
        chw = torch.from_numpy(pixels).permute(2, 0, 1)
        resized = tvF.resize(chw, list(size), interpolation=interpolation, antialias=True)
        out = resized.permute(1, 2, 0)
    if not keep_pad:
        out = out[..., :3]
    # torch's strided copy is ~2x faster than numpy's for the 4 -> 3 channel pack
    return out.contiguous().numpy()
