"""Deterministic test images as encoded bytes.

Used by the test suite, the benchmarks and the offline demo, so it lives in the
package. Photos come from scikit-image's bundled sample data when it is installed
and from synthetic PIL drawings otherwise.
"""

from __future__ import annotations

import functools
import io
import math
import struct
import zlib

import numpy as np
from PIL import Image, ImageDraw

# (width, height) of the generated photos, cycled through deterministically.
_PHOTO_SHAPES: tuple[tuple[int, int], ...] = (
    (640, 480),
    (480, 640),
    (300, 200),
    (1024, 256),
    (97, 131),
    (224, 224),
    (800, 600),
    (256, 1024),
    (333, 500),
    (1280, 720),
    (150, 150),
    (720, 1280),
)

_SKIMAGE_PHOTOS: tuple[str, ...] = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "camera",
    "immunohistochemistry",
    "hubble_deep_field",
)

# (width, height) that decode_image / probe_image must report for unusual_images().
UNUSUAL_IMAGE_SIZES: dict[str, tuple[int, int]] = {
    "1x1.png": (1, 1),
    "gray.png": (64, 48),
    "la.png": (64, 48),
    "palette_transparent.png": (64, 48),
    "rgba.png": (64, 48),
    "cmyk.jpg": (64, 48),
    "16bit.png": (256, 16),
    "exif_rotated.jpg": (48, 80),  # stored as 80x48 with EXIF Orientation=6
    "animated.gif": (40, 30),
    "animated.webp": (40, 30),
    "large.jpg": (4000, 3000),
    "tiny_wide.png": (300, 3),
    "bmp.bmp": (50, 40),
    "tiff.tiff": (50, 40),
}


def _encode(img: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


@functools.lru_cache(maxsize=1)
def _skimage_sources() -> tuple[Image.Image, ...]:
    try:
        import skimage.data
    except ImportError:
        return ()
    sources = []
    for name in _SKIMAGE_PHOTOS:
        try:
            arr = getattr(skimage.data, name)()
        except Exception:  # missing file / not bundled in this version
            continue
        sources.append(Image.fromarray(np.ascontiguousarray(arr)))
    return tuple(sources)


def _synthetic_photo(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """Gradient + shapes + noise, for when scikit-image is missing."""
    width, height = size
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    t = (xx / max(width - 1, 1) + yy / max(height - 1, 1))[..., None] / 2
    arr = c0 * (1 - t) + c1 * t
    img = Image.fromarray(arr.astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 9))):
        x0, x1 = sorted(rng.integers(0, width, 2).tolist())
        y0, y1 = sorted(rng.integers(0, height, 2).tolist())
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        else:
            draw.rectangle((x0, y0, x1, y1), fill=fill)
    noisy = np.asarray(img, dtype=np.int16) + rng.normal(0, 8, (height, width, 3)).astype(np.int16)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), "RGB")


def _crop_resize(src: Image.Image, rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """Random crop of ``src`` with the aspect ratio of ``size``, resized to ``size``."""
    width, height = size
    sw, sh = src.size
    target = width / height
    if sw / sh > target:
        ch, cw = sh, max(1, round(sh * target))
    else:
        cw, ch = sw, max(1, round(sw / target))
    scale = rng.uniform(0.6, 1.0)
    cw, ch = max(1, int(cw * scale)), max(1, int(ch * scale))
    x0 = int(rng.integers(0, sw - cw + 1))
    y0 = int(rng.integers(0, sh - ch + 1))
    out = src.crop((x0, y0, x0 + cw, y0 + ch)).resize(size, Image.Resampling.BICUBIC)
    if rng.random() < 0.5:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return out


def sample_photos(n: int, seed: int = 0) -> list[tuple[str, bytes]]:
    """Generate ``n`` realistic JPEG photos of varied sizes and aspect ratios.

    Args:
        n: Number of photos.
        seed: Seed; the same ``(n, seed)`` always gives the same bytes (for a given
            PIL/libjpeg and scikit-image).

    Returns:
        ``[(name, jpeg_bytes), ...]`` with names ``"photo_0000.jpg"``,
        ``"photo_0001.jpg"``, ... Sizes cycle through a fixed list from 97x131 to
        1280x720; some photos are grayscale JPEGs.
    """
    sources = _skimage_sources()
    out: list[tuple[str, bytes]] = []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        size = _PHOTO_SHAPES[(i + seed) % len(_PHOTO_SHAPES)]
        if sources:
            img = _crop_resize(sources[int(rng.integers(len(sources)))], rng, size)
        else:
            img = _synthetic_photo(rng, size)
        quality = int(rng.integers(80, 96))
        out.append((f"photo_{i:04d}.jpg", _encode(img, "JPEG", quality=quality)))
    return out


def _gradient_rgb(width: int, height: int) -> np.ndarray:
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :]
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None]
    r = np.broadcast_to(x, (height, width))
    g = np.broadcast_to(y, (height, width))
    b = 255 - (r + g) / 2
    return np.stack([r, g, b], axis=-1).astype(np.uint8)


def _frames(size: tuple[int, int]) -> list[Image.Image]:
    colors = [(255, 0, 0), (0, 0, 255), (0, 255, 0)]
    return [Image.new("RGB", size, c) for c in colors]


@functools.lru_cache(maxsize=1)
def _unusual_images() -> tuple[tuple[str, bytes], ...]:
    w, h = 64, 48
    rgb = Image.fromarray(_gradient_rgb(w, h), "RGB")
    alpha = Image.fromarray(
        np.broadcast_to(np.linspace(0, 255, w, dtype=np.uint8)[None, :], (h, w)).copy(), "L"
    )
    out: dict[str, bytes] = {}
    out["1x1.png"] = _encode(Image.new("RGB", (1, 1), (12, 34, 56)), "PNG")
    gray = rgb.convert("L")
    out["gray.png"] = _encode(gray, "PNG")
    la = gray.convert("LA")
    la.putalpha(alpha)
    out["la.png"] = _encode(la, "PNG")
    pal = rgb.quantize(colors=16)
    out["palette_transparent.png"] = _encode(pal, "PNG", transparency=0)
    rgba = rgb.convert("RGBA")
    rgba.putalpha(alpha)
    out["rgba.png"] = _encode(rgba, "PNG")
    out["cmyk.jpg"] = _encode(rgb.convert("CMYK"), "JPEG", quality=95)
    ramp = np.linspace(0, 65535, 256).round().astype(np.uint16)
    out["16bit.png"] = _encode(Image.fromarray(np.tile(ramp, (16, 1))), "PNG")
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to display
    rotated = Image.fromarray(_gradient_rgb(80, 48), "RGB")
    out["exif_rotated.jpg"] = _encode(rotated, "JPEG", quality=95, exif=exif.tobytes())
    frames = _frames((40, 30))
    out["animated.gif"] = _encode(
        frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0
    )
    out["animated.webp"] = _encode(
        frames[0], "WEBP", save_all=True, append_images=frames[1:], duration=100, lossless=True
    )
    out["large.jpg"] = _encode(
        Image.fromarray(_gradient_rgb(4000, 3000), "RGB"), "JPEG", quality=85
    )
    out["tiny_wide.png"] = _encode(Image.fromarray(_gradient_rgb(300, 3), "RGB"), "PNG")
    small = Image.fromarray(_gradient_rgb(50, 40), "RGB")
    out["bmp.bmp"] = _encode(small, "BMP")
    out["tiff.tiff"] = _encode(small, "TIFF")
    assert set(out) == set(UNUSUAL_IMAGE_SIZES)
    return tuple(out.items())


def unusual_images() -> dict[str, bytes]:
    """Valid but unusual images that a decoder must accept.

    Returns:
        ``{name: encoded_bytes}``; keys are those of :data:`UNUSUAL_IMAGE_SIZES`, which
        gives the expected displayed ``(width, height)`` of each: 1x1, grayscale, LA,
        palette with transparency, RGBA, CMYK JPEG, 16-bit grayscale PNG (ramp over
        0..65535), JPEG with EXIF Orientation=6, animated GIF and WebP (first frame
        pure red, then blue, then green), a 4000x3000 JPEG, a 300x3 PNG, BMP and TIFF.
    """
    return dict(_unusual_images())


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


@functools.lru_cache(maxsize=8)
def _bomb_png(side: int) -> bytes:
    """A valid all-black 1-bit PNG of ``side x side`` pixels, a few KB in size."""
    row = b"\x00" * (1 + math.ceil(side / 8))  # filter byte + packed bits
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


@functools.lru_cache(maxsize=1)
def _bad_base() -> tuple[bytes, bytes, bytes]:
    rng = np.random.default_rng(1234)
    random_bytes = b"\x13\x37" + rng.integers(0, 256, 4096, dtype=np.uint8).tobytes()
    noisy = rng.integers(0, 256, (128, 160, 3), dtype=np.uint8)
    jpeg = _encode(Image.fromarray(noisy, "RGB"), "JPEG", quality=90)
    png = _encode(Image.fromarray(noisy, "RGB"), "PNG")
    return random_bytes, jpeg, png


def _corrupt_png(png: bytes) -> bytes:
    """Overwrite the middle of the first IDAT payload (its CRC no longer matches)."""
    pos = png.index(b"IDAT")
    length = struct.unpack(">I", png[pos - 4 : pos])[0]
    start = pos + 4 + length // 4
    garbage = bytes((i * 37 + 11) % 256 for i in range(length // 2))
    return png[:start] + garbage + png[start + len(garbage) :]


def bad_images(max_pixels: int = 10_000_000) -> dict[str, bytes]:
    """Inputs a decoder must reject with a clean error.

    Args:
        max_pixels: The limit the decoder will be called with; ``"bomb.png"`` declares
            about four times as many pixels (while being only a few KB).

    Returns:
        ``{name: bytes}`` with ``"empty.jpg"`` (no bytes), ``"random.jpg"`` (random
        bytes), ``"truncated.jpg"`` (a real JPEG cut in half), ``"corrupt.png"`` (a
        real PNG with garbage in its IDAT), ``"bomb.png"`` and ``"text.txt.jpg"``
        (plain text).
    """
    random_bytes, jpeg, png = _bad_base()
    side = math.isqrt(max_pixels) * 2 + 1
    return {
        "empty.jpg": b"",
        "random.jpg": random_bytes,
        "truncated.jpg": jpeg[: len(jpeg) // 2],
        "corrupt.png": _corrupt_png(png),
        "bomb.png": _bomb_png(side),
        "text.txt.jpg": b"This is a plain text file, not a JPEG.\nSecond line.\n" * 20,
    }


def extreme_aspect_png(ratio: int = 300) -> bytes:
    """A valid 1 x ``ratio`` (width x height) RGB PNG, for aspect-ratio limits.

    Args:
        ratio: Height in pixels (the width is 1).

    Returns:
        PNG bytes.
    """
    column = np.linspace(0, 255, ratio, dtype=np.float32).astype(np.uint8)
    arr = np.stack([column, 255 - column, np.full_like(column, 128)], axis=-1)[:, None, :]
    return _encode(Image.fromarray(np.ascontiguousarray(arr), "RGB"), "PNG")
