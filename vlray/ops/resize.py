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
    pixels: np.ndarray, size: tuple[int, int], interpolation: InterpolationMode
) -> np.ndarray:
    """Resizes an RGB image in uint8 exactly as transformers' TorchvisionBackend.resize does.

    The reference calls ``torchvision.transforms.v2.functional.resize(antialias=True)`` on a uint8
    (3, H, W) tensor; the same call on a channels-last view of the HWC array gives the same
    values (tested) and skips a copy, which torchvision's uint8 kernels prefer.

    Args:
        pixels: (H, W, 3) uint8, values in [0, 255].
        size: target (height, width).
        interpolation: torchvision interpolation mode.

    Returns:
        (height, width, 3) uint8 C-contiguous array.
    """
    if pixels.shape[:2] == tuple(size):
        return np.ascontiguousarray(pixels)
    chw = torch.from_numpy(pixels).permute(2, 0, 1)
    out = tvF.resize(chw, list(size), interpolation=interpolation, antialias=True)
    return np.ascontiguousarray(out.permute(1, 2, 0).numpy())
