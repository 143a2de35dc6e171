"""Thumbnails: size rule, content (the decoded image, scaled with the antialiased filter)."""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pytest
from PIL import Image
from torchvision.transforms.v2 import InterpolationMode

from vlray.ops.decode import decode_image, decode_rgb, rgb_pixels
from vlray.ops.resize import resize_uint8
from vlray.ops.thumbnail import make_thumbnail, thumbnail_size
from vlray.schema import thumbnail_name
from vlray.testing.images import sample_photos


@pytest.mark.parametrize(
    ("size", "side", "expected"),
    [
        ((480, 640), 256, (192, 256)),
        ((640, 480), 256, (256, 192)),
        ((100, 3000), 256, (9, 256)),
        ((1, 5000), 64, (1, 64)),  # never 0 pixels
        ((120, 90), 256, (120, 90)),  # never upscaled
        ((256, 256), 256, (256, 256)),
    ],
)
def test_thumbnail_size(size, side, expected):
    assert thumbnail_size(*size, side) == expected


def test_thumbnail_size_rejects_a_zero_side():
    with pytest.raises(ValueError, match="max_side"):
        thumbnail_size(10, 10, 0)


def test_thumbnail_is_the_scaled_image():
    for _, blob in sample_photos(4, seed=5):
        pixels = decode_image(blob, max_pixels=10**9)
        data = make_thumbnail(pixels, 96)
        thumb = Image.open(io.BytesIO(data))
        assert thumb.format == "JPEG" and thumb.mode == "RGB"
        h, w = thumbnail_size(*pixels.shape[:2], 96)
        assert (thumb.height, thumb.width) == (h, w) and max(h, w) == 96
        expected = resize_uint8(pixels, (h, w), InterpolationMode.BILINEAR).astype(np.float32)
        error = np.abs(np.asarray(thumb, np.float32) - expected).mean()
        # quality-85 JPEG of a detailed 96-pixel image: 2.1-5.1 here; swapped channels (on colour
        # photos) or a flipped image give 16-95
        assert error < 8.0, error
        # PIL's 4-byte buffer (what the decode stage may hand over) gives the same file
        assert make_thumbnail(rgb_pixels(decode_rgb(blob, max_pixels=10**9)), 96) == data


def test_thumbnail_name_is_sha1_of_the_id():
    assert thumbnail_name("a/b.jpg") == hashlib.sha1(b"a/b.jpg").hexdigest() + ".jpg"
