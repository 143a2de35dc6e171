"""Small JPEG previews of decoded images (``output.thumbnails``), named by the image's id.

The job writes ``OUT/thumbnails/<sha1(id)>.jpg`` (``vlray.schema.thumbnail_name``) so a result page can show images without access
to the original files or bucket; the query service serves them from there.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image
from torchvision.transforms.v2 import InterpolationMode

from vlray.ops.resize import resize_uint8

THUMBNAIL_QUALITY = 85


def thumbnail_size(height: int, width: int, max_side: int) -> tuple[int, int]:
    """(height, width) fitting in ``max_side`` x ``max_side`` with the aspect ratio kept; images
    already that small keep their size (thumbnails never upscale)."""
    if max_side <= 0:
        raise ValueError(f"max_side must be positive, got {max_side}")
    scale = min(1.0, max_side / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def make_thumbnail(pixels: np.ndarray, max_side: int) -> bytes:
    """JPEG bytes of ``pixels`` ((H, W, 3 or 4) uint8, channels 0-2 RGB, as decoded) scaled down
    to fit ``max_side`` with the antialiased bilinear filter."""
    height, width = pixels.shape[:2]
    small = resize_uint8(
        pixels, thumbnail_size(height, width, max_side), InterpolationMode.BILINEAR
    )
    buffer = io.BytesIO()
    Image.fromarray(small, "RGB").save(buffer, "JPEG", quality=THUMBNAIL_QUALITY)
    return buffer.getvalue()
