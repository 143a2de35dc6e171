"""uint8 resize to a target shape, with the reference processors' filter and antialiasing."""

from __future__ import annotations

import platform
import warnings
from collections.abc import Callable
from functools import cache

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as tvF


def tensor_view(pixels: np.ndarray) -> torch.Tensor:
    """``torch.from_numpy`` of an array that may be read-only, without torch's warning.

    Decoded arrays are read-only views of PIL buffers and every caller here only reads them,
    so a copy to make them writable would be wasted. The warning is silenced for this call
    only (torch emits it once per process anyway); the global warning filters stay as they
    were (a module-level ``filterwarnings`` would change them for every library).
    """
    if pixels.flags.writeable:
        return torch.from_numpy(pixels)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(pixels)


def resize_uint8(
    pixels: np.ndarray,
    size: tuple[int, int],
    interpolation: InterpolationMode,
    pack: bool = True,
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
        pack: drop a 4-channel input's pad channel (:func:`pack_rgb`); False returns
            (height, width, 4) for callers whose next copy reads the RGB channels anyway.

    Returns:
        (height, width, 3) uint8 C-contiguous array (read-only when it was packed from 4
        channels: it shares the packer's bytes); (height, width, 4) with ``pack=False`` and a
        4-channel input.
    """
    if pixels.ndim != 3 or pixels.shape[2] not in (3, 4):
        raise ValueError(f"expected (H, W, 3) or (H, W, 4) pixels, got shape {pixels.shape}")
    if pixels.shape[:2] == tuple(size):
        out = tensor_view(pixels)
    else:
        out = _resize_hwc(tensor_view(pixels), (int(size[0]), int(size[1])), interpolation)
    if out.shape[2] == 4 and pack:
        return pack_rgb(out.numpy())
    return out.contiguous().numpy()


def _resize_hwc(
    hwc: torch.Tensor, size: tuple[int, int], interpolation: InterpolationMode
) -> torch.Tensor:
    """(H, W, C) uint8 -> (height, width, C) uint8, torchvision's ``resize(antialias=True)``.

    Where torchvision itself runs torch's native uint8 antialiased kernel (bilinear on AVX2 /
    AVX-512 / ARM, bicubic everywhere), the kernel is called directly with the same arguments:
    the same values (tested against ``tvF.resize``) without the Python dispatch of
    ``tvF.resize`` and ``F.interpolate``: 70 us of a 120 us 64x64 -> 32x32 resize on the 2-core
    AMD EPYC of docs/BENCHMARKS.md, 126 us of 595 us for 640x480 -> 144x112.
    """
    height, width, channels = hwc.shape
    kernel = _native_kernel(interpolation)
    if kernel is None:
        chw = hwc.permute(2, 0, 1)
        return tvF.resize(chw, list(size), interpolation=interpolation, antialias=True).permute(
            1, 2, 0
        )
    # a channels-last (1, C, H, W) view with the batch stride torchvision's resize_image gives
    # it, so torch allocates the output channels-last too (pytorch issue 68430)
    strides = hwc.stride()
    image = hwc.as_strided(
        (1, channels, height, width), (hwc.numel(), strides[2], strides[0], strides[1])
    )
    return kernel(image, list(size), False, None)[0].permute(1, 2, 0)


@cache
def _native_kernel(interpolation: InterpolationMode) -> Callable[..., torch.Tensor] | None:
    """torch's uint8 antialiased kernel torchvision would call for ``interpolation``, or None
    where torchvision converts to float instead (its ``_do_native_uint8_resize_on_cpu``)."""
    if interpolation == InterpolationMode.BICUBIC:
        return torch._C._nn._upsample_bicubic2d_aa
    if interpolation == InterpolationMode.BILINEAR and (
        torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
        or platform.machine() in ("aarch64", "arm64")
    ):
        return torch._C._nn._upsample_bilinear2d_aa
    return None


def pack_rgb(rgbx: np.ndarray) -> np.ndarray:
    """(H, W, 4) uint8, channels 0-2 RGB -> (H, W, 3) packed RGB.

    Pillow's packer (``tobytes("raw", "RGB")`` of the buffer mapped as an RGBX image) drops the
    pad byte in one tight loop: 2-3x faster than a strided torch or NumPy copy, whose inner
    loop is 3 elements long (``bench/preprocess.py`` times the variants). Non-contiguous input
    falls back to torch's strided copy.
    """
    height, width = rgbx.shape[:2]
    if not rgbx.flags.c_contiguous or rgbx.dtype != np.uint8 or rgbx.shape[2] != 4:
        return tensor_view(np.ascontiguousarray(rgbx))[..., :3].contiguous().numpy()
    image = Image.frombuffer("RGBX", (width, height), rgbx, "raw", "RGBX", 0, 1)
    return np.frombuffer(image.tobytes("raw", "RGB"), np.uint8).reshape(height, width, 3)


def _crop_axis(length: int, crop: int) -> tuple[slice, slice]:
    """(source slice, destination slice) of the reference's centre crop along one axis.

    transformers' ``TorchvisionBackend.center_crop``: an axis shorter than the crop is first
    zero-padded, ``(crop - length) // 2`` before it; a longer one is cut from
    ``int((length - crop) / 2)`` (rounded down, where torchvision's ``center_crop`` rounds).
    """
    if crop > length:
        before = (crop - length) // 2
        return slice(0, length), slice(before, before + length)
    start = (length - crop) // 2
    return slice(start, start + crop), slice(0, crop)


def center_crop_hwc(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The reference's centre crop (zero padding where the crop is larger) of an HWC image.

    Args:
        pixels: (H, W, C) uint8.
        size: crop (height, width).

    Returns:
        ``pixels`` itself when already ``size``; else a new C-contiguous (height, width, C)
        uint8 array.
    """
    height, width = pixels.shape[:2]
    if (height, width) == tuple(size):
        return pixels
    (rows, to_rows), (cols, to_cols) = _crop_axis(height, size[0]), _crop_axis(width, size[1])
    if to_rows == slice(0, size[0]) and to_cols == slice(0, size[1]):
        return np.ascontiguousarray(pixels[rows, cols])
    out = np.zeros((size[0], size[1], *pixels.shape[2:]), dtype=pixels.dtype)
    out[to_rows, to_cols] = pixels[rows, cols]
    return out


def center_crop_chw(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """:func:`center_crop_hwc` for (..., H, W) tensors (on any device): a view when the crop
    fits inside, else a new zero-padded tensor."""
    height, width = images.shape[-2:]
    if (height, width) == tuple(size):
        return images
    (rows, to_rows), (cols, to_cols) = _crop_axis(height, size[0]), _crop_axis(width, size[1])
    if to_rows == slice(0, size[0]) and to_cols == slice(0, size[1]):
        return images[..., rows, cols]
    out = images.new_zeros((*images.shape[:-2], size[0], size[1]))
    out[..., to_rows, to_cols] = images[..., rows, cols]
    return out
