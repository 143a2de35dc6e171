"""resize_uint8 and pack_rgb: the same RGB values from PIL's 4-byte buffers as from packed RGB."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as tvF

from vlray.ops.decode import decode_rgb, rgb_pixels
from vlray.ops.resize import pack_rgb, resize_uint8
from vlray.testing.images import sample_photos


def test_pack_rgb_drops_the_pad_channel():
    rgbx = np.random.default_rng(0).integers(0, 256, (37, 53, 4), dtype=np.uint8)
    packed = pack_rgb(rgbx)
    assert packed.shape == (37, 53, 3) and packed.dtype == np.uint8
    assert packed.flags.c_contiguous
    assert np.array_equal(packed, rgbx[..., :3])
    strided = rgbx[:, ::2]  # not contiguous: the fallback, same values
    assert np.array_equal(pack_rgb(strided), strided[..., :3])


@pytest.mark.parametrize("interpolation", [InterpolationMode.BILINEAR, InterpolationMode.BICUBIC])
def test_resize_from_pil_buffer_equals_packed_rgb(interpolation):
    for _, blob in sample_photos(12):
        image = decode_rgb(blob, max_pixels=10**8)
        viewed, packed = rgb_pixels(image), np.asarray(image)
        assert viewed.shape[2] == 4  # the view path is the one under test
        h, w = packed.shape[:2]
        for size in [(h // 3 + 1, w // 2 + 3), (h, w), (2 * h, w)]:
            a = resize_uint8(viewed, size, interpolation)
            b = resize_uint8(packed, size, interpolation)
            assert a.shape == (*size, 3) and a.flags.c_contiguous
            assert np.array_equal(a, b), (image.size, size)


def test_resize_rejects_other_shapes():
    with pytest.raises(ValueError, match="expected"):
        resize_uint8(np.zeros((4, 4), np.uint8), (2, 2), InterpolationMode.BILINEAR)
    with pytest.raises(ValueError, match="expected"):
        resize_uint8(np.zeros((4, 4, 2), np.uint8), (2, 2), InterpolationMode.BILINEAR)


def test_pack_rgb_of_a_pil_image_buffer():
    image = Image.new("RGB", (31, 17), (200, 100, 50))
    assert np.array_equal(pack_rgb(rgb_pixels(image)), np.asarray(image))


@pytest.mark.parametrize(
    "interpolation",
    [
        InterpolationMode.BILINEAR,
        InterpolationMode.BICUBIC,
        InterpolationMode.LANCZOS,  # torchvision's own path (no direct kernel call)
    ],
)
def test_resize_equals_torchvision_on_the_references_layout(interpolation):
    """The reference resizes a contiguous (3, H, W) tensor with tvF.resize: same values."""
    rng = np.random.default_rng(1)
    for h, w, size in [(480, 640, (224, 288)), (97, 131, (288, 224)), (50, 50, (17, 93))]:
        rgbx = rng.integers(0, 256, (h, w, 4), dtype=np.uint8)
        chw = torch.from_numpy(np.ascontiguousarray(rgbx[..., :3])).permute(2, 0, 1).contiguous()
        expected = tvF.resize(chw, list(size), interpolation=interpolation, antialias=True)
        expected = expected.permute(1, 2, 0).numpy()
        assert np.array_equal(resize_uint8(rgbx, size, interpolation), expected)
        assert np.array_equal(resize_uint8(rgbx[..., :3].copy(), size, interpolation), expected)


def test_resize_keeps_the_pad_channel_when_asked():
    image = decode_rgb(next(iter(sample_photos(1)))[1], max_pixels=10**8)
    viewed = rgb_pixels(image)
    size = (viewed.shape[0] // 2, viewed.shape[1] // 3)
    padded = resize_uint8(viewed, size, InterpolationMode.BILINEAR, pack=False)
    assert padded.shape == (*size, 4)
    packed = resize_uint8(np.asarray(image), size, InterpolationMode.BILINEAR, pack=False)
    assert packed.shape == (*size, 3)  # nothing to drop from 3 channels
    assert np.array_equal(padded[..., :3], packed)


@pytest.mark.parametrize("shape", [(9, 12), (10, 13), (8, 8), (5, 12), (12, 5), (3, 4)])
def test_center_crop_matches_reference(shape):
    """Odd margins rounded down (torchvision's own center_crop rounds), zero padding where the
    crop is larger, in both layouts."""
    from transformers.image_processing_backends import TorchvisionBackend
    from transformers.image_utils import SizeDict

    from vlray.ops.resize import center_crop_chw, center_crop_hwc

    hwc = np.random.default_rng(1).integers(1, 256, (*shape, 3), dtype=np.uint8)
    chw = torch.from_numpy(hwc).permute(2, 0, 1)
    for size in [(8, 8), (7, 10), (1, 1)]:
        expected = TorchvisionBackend().center_crop(chw, SizeDict(height=size[0], width=size[1]))
        got = center_crop_hwc(hwc, size)
        assert got.flags.c_contiguous and got.shape == (*size, 3)
        assert torch.equal(torch.from_numpy(got).permute(2, 0, 1), expected), size
        assert torch.equal(center_crop_chw(chw, size), expected), size
    assert center_crop_hwc(hwc, shape) is hwc


def test_importing_resize_leaves_the_warning_filters_alone_and_reads_read_only_arrays():
    """No module-level filterwarnings: the global filters are the same after the import, and a
    read-only decoded array (a PIL buffer view) resizes without torch's not-writable warning,
    even where warnings are errors (fresh process: torch warns once per process)."""
    import subprocess
    import sys

    script = """
import warnings
import numpy as np
import PIL.Image
import torch
from torchvision.transforms.v2 import InterpolationMode, functional
import vlray.ops
before = list(warnings.filters)  # what the dependencies set is theirs
import vlray.ops.resize as resize
assert warnings.filters == before, "vlray.ops.resize changed the global warning filters"
warnings.simplefilter("error")
pixels = np.frombuffer(bytes(range(256)) * 48, np.uint8).reshape(64, 64, 3)
assert not pixels.flags.writeable
out = resize.resize_uint8(pixels, (32, 32), InterpolationMode.BILINEAR)
assert out.shape == (32, 32, 3)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
