"""uint8 resize to a target shape, with the reference processors' filter and antialiasing."""

from __future__ import annotations

import warnings

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as tvF

# Decoded arrays are read-only views of PIL buffers; torchvision only reads them.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")


def resize_uint8(
    pixels: np.ndarray,
    size: tuple[int, int],
    interpolation: InterpolationMode,
) -> np.ndarray:
    """Resizes an RGB image in uint8 exactly as transformers' TorchvisionBackend.resize does.

    The reference calls ``torchvision.transforms.v2.functional.resize(antialias=True)`` on a uint8
    (3, H, W) tensor; the same call on a channels-last view of the HWC array gives the same
    values (tested) and skips a copy, which torchvision's uint8 kernels prefer. A 4-channel
    input (PIL's RGBX buffer, :func:`vlray.ops.decode.rgb_pixels`) is faster still: the kernel
    works on 4 channels internally and otherwise unpacks a 3-channel source into a 4-channel
    copy first; the pad channel is resized along and dropped by :func:`pack_rgb`.

    Args:
        pixels: (H, W, 3) or (H, W, 4) uint8, values in [0, 255]; channels 0-2 are RGB.
        size: target (height, width).
        interpolation: torchvision interpolation mode.

    Returns:
        (height, width, 3) uint8 C-contiguous array (read-only when it was packed from 4
        channels: it shares the packer's bytes).
    """
    if pixels.ndim != 3 or pixels.shape[2] not in (3, 4):
        raise ValueError(f"expected (H, W, 3) or (H, W, 4) pixels, got shape {pixels.shape}")
    if pixels.shape[:2] == tuple(size):
        out = torch.from_numpy(pixels)
    else:
        chw = torch.from_numpy(pixels).permute(2, 0, 1)
        resized = tvF.resize(chw, list(size), interpolation=interpolation, antialias=True)
        out = resized.permute(1, 2, 0)
    if out.shape[2] == 4:
        return pack_rgb(out.numpy())
    return out.contiguous().numpy()


def pack_rgb(rgbx: np.ndarray) -> np.ndarray:
    """(H, W, 4) uint8, channels 0-2 RGB -> (H, W, 3) packed RGB.

    Pillow's packer (``tobytes("raw", "RGB")`` of the buffer mapped as an RGBX image) drops the
    pad byte in one tight loop: 2-3x faster than a strided torch or NumPy copy, whose inner
    loop is 3 elements long (``bench/preprocess.py`` times the variants). Non-contiguous input
    falls back to torch's strided copy.
    """
    height, width = rgbx.shape[:2]
    if not rgbx.flags.c_contiguous or rgbx.dtype != np.uint8 or rgbx.shape[2] != 4:
        return torch.from_numpy(np.ascontiguousarray(rgbx))[..., :3].contiguous().numpy()
    image = Image.frombuffer("RGBX", (width, height), rgbx, "raw", "RGBX", 0, 1)
    return np.frombuffer(image.tobytes("raw", "RGB"), np.uint8).reshape(height, width, 3)
