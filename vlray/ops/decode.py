"""Decode encoded image bytes into RGB arrays, robustly and with a pixel limit.

Everything here is pure PIL/numpy so it can run inside any Ray worker. Errors are
reported as :class:`DecodeError` with a short, single-line, human-readable message
that is safe to store next to a failed row (no stack traces, no raw bytes).
"""

from __future__ import annotations

import io
import re
import struct
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import simplejpeg
from PIL import ExifTags, Image, UnidentifiedImageError

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
)

# PIL plugins we allow. Restricting the list keeps exotic decoders (EPS runs
# Ghostscript, for example) out of reach of untrusted input. The JPEG plugin also
# opens multi-picture JPEGs (format "MPO") written by many phone cameras.
_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")

# Modes holding more than 8 bits per sample (integers, and "F": 32-bit floats) that PIL's
# convert("RGB") clips (values above 255 all become white, 0-1 floats black) instead of
# scaling: decoded by their real range, or refused.
_WIDE_INT_MODES: frozenset[str] = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I", "F"})

_ORIENTATION_TAG = ExifTags.Base.Orientation
_TRANSPOSE: dict[int, Image.Transpose] = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_MAX_MESSAGE_CHARS = 200

# libjpeg warnings (lower case) after which part of the image is made up: the decoder ran out
# of scan data and filled the rest with gray, or lost its place in the entropy-coded data.
# Pillow decodes such files without a word; vlray refuses them. "N extraneous bytes before
# marker" is not here: the scan was complete and the image is whole (common in camera files).
_JPEG_REFUSED: tuple[str, ...] = (
    "premature end of data segment",
    "bad huffman code",
    "bad arithmetic code",
    "instead of rst",
    "inconsistent progression",
    "invalid sos parameters",
)
# simplejpeg output colour spaces for a cheap check decode (1/8 scale) of each PIL JPEG mode
_JPEG_CHECK_SPACE: dict[str, str] = {"CMYK": "CMYK"}
_BYTES_LITERAL = re.compile(r"""b(['"]).*?(?<!\\)\1""")


class DecodeError(ValueError):
    """An input could not be decoded as an image.

    ``str(err)`` is one short human-readable line, e.g.
    ``"not an image (unrecognised format)"`` or
    ``"decompression bomb: 20000x20000 = 400000000 pixels exceeds limit 100000000"``.
    """


def _one_line(text: str) -> str:
    text = _BYTES_LITERAL.sub("<bytes>", text)
    text = " ".join(text.split())
    if len(text) > _MAX_MESSAGE_CHARS:
        text = text[: _MAX_MESSAGE_CHARS - 3] + "..."
    return text


def _wrap(exc: BaseException, fmt: str | None) -> DecodeError:
    """Turn an arbitrary decoder exception into a one-line DecodeError."""
    if isinstance(exc, UnidentifiedImageError):
        other = _other_format(exc)
        if other:
            return DecodeError(
                f"unsupported image format (looks like {other}; vlray decodes JPEG, PNG, WebP, "
                "BMP, GIF and TIFF)"
            )
        return DecodeError("not an image (unrecognised format)")
    if isinstance(exc, Image.DecompressionBombError):
        return DecodeError(_one_line(f"decompression bomb: {exc}"))
    detail = _one_line(str(exc)) or type(exc).__name__
    kind = fmt or "image"
    if "truncated" in detail.lower() or isinstance(exc, EOFError):
        return DecodeError(_one_line(f"truncated {kind}: {detail}"))
    return DecodeError(_one_line(f"corrupt {kind}: {detail} ({type(exc).__name__})"))


def _check_nonempty(data: bytes) -> None:
    if not data:
        raise DecodeError("empty file (0 bytes)")


def _check_pixels(size: tuple[int, int], max_pixels: int) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise DecodeError(f"invalid image size {width}x{height}")
    pixels = width * height
    if pixels > max_pixels:
        raise DecodeError(
            f"decompression bomb: {width}x{height} = {pixels} pixels exceeds limit {max_pixels}"
        )


def _orientation(img: Image.Image) -> int:
    """EXIF (or XMP) orientation, 1 when absent or invalid. Reads headers only.

    For PNG, PIL only sees an ``eXIf`` chunk placed before the pixel data without
    loading the image, so we only look at what the header already exposed.
    """
    if img.format == "PNG" and "exif" not in img.info:
        return 1
    try:
        value = img.getexif().get(_ORIENTATION_TAG, 1)
        value = int(value)
    except Exception:
        return 1
    return value if 1 <= value <= 8 else 1


def _open(data: bytes) -> Image.Image:
    """Opens ``data`` (header only) with the allowed plugins, as ``Image.open`` does but
    without its decompression-bomb check.

    Every caller checks ``width * height`` against its own ``max_pixels`` from this header
    before any pixel is decoded. Pillow's check reads the process-wide ``MAX_IMAGE_PIXELS``
    (warning above 89 MP, refusing above 179 MP whatever the caller's limit); setting that
    global would switch the check off for every library in the process, so it stays untouched
    and is skipped for vlray's calls only.
    """
    Image.preinit()
    fp = io.BytesIO(data)
    prefix = fp.read(16)
    for fmt in _FORMATS:
        if fmt not in Image.OPEN:
            Image.init()
        factory, accept = Image.OPEN[fmt]
        if accept and accept(prefix) is not True:
            continue
        fp.seek(0)
        try:
            return factory(fp, "")
        except (SyntaxError, IndexError, TypeError, struct.error):
            continue
    raise UnidentifiedImageError(f"cannot identify image file{_OTHER}{_sniff(prefix)}")


_OTHER = "; format: "


def _sniff(prefix: bytes) -> str:
    """The Pillow format (outside ``_FORMATS``) whose signature ``prefix`` carries, or ''.

    Only the plugins' signature checks run (no header is parsed), to name the format in the
    error of a file vlray does not decode (PPM, ICO, JPEG 2000...)."""
    for fmt, (_, accept) in Image.OPEN.items():
        if fmt in _FORMATS or accept is None:
            continue
        try:
            if accept(prefix) is True:
                return fmt
        except Exception:  # a signature check that cannot handle this prefix
            continue
    return ""


def _other_format(exc: UnidentifiedImageError) -> str:
    text = str(exc)
    return text.split(_OTHER, 1)[1] if _OTHER in text else ""


def probe_image(data: bytes, max_pixels: int) -> tuple[int, int]:
    """Read the image header and return its displayed size, without decoding pixels.

    Args:
        data: Encoded image bytes (JPEG, PNG, WebP, BMP, GIF or TIFF).
        max_pixels: Largest accepted ``width * height``.

    Returns:
        ``(width, height)`` after EXIF orientation, i.e. the size of the array that
        :func:`decode_image` returns (as ``(shape[1], shape[0])``).

    Raises:
        DecodeError: Empty or unrecognised data, or more than ``max_pixels`` pixels.
    """
    _, _, _, height, width = _probe(data, max_pixels)
    return width, height


def _probe(data: bytes, max_pixels: int) -> tuple[str | None, str, int, int, int]:
    """(format, mode, EXIF orientation, displayed height, displayed width) from the header,
    with the pixel limit; PIL's errors become :class:`DecodeError`."""
    _check_nonempty(data)
    fmt: str | None = None
    try:
        with _open(data) as img:
            fmt = img.format
            orientation, height, width = _header(img, max_pixels)
            return fmt, img.mode, orientation, height, width
    except DecodeError:
        raise
    except Exception as exc:  # PIL raises many types for malformed headers.
        raise _wrap(exc, fmt) from None


def _has_eoi(data: bytes) -> bool:
    """Whether JPEG data ends in an EOI marker (trailing zero padding allowed)."""
    return data.rstrip(b"\x00")[-2:] == b"\xff\xd9"


def _header(img: Image.Image, max_pixels: int) -> tuple[int, int, int]:
    """Pixel limit check, then (EXIF orientation, displayed height, displayed width), all
    from the header: probing and decoding agree on the size by construction."""
    _check_pixels(img.size, max_pixels)
    orientation = _orientation(img)
    width, height = img.size
    if orientation >= 5:
        width, height = height, width
    return orientation, height, width


def _wide_int_to_l(img: Image.Image) -> Image.Image:
    """Scale a 16/32-bit integer grayscale image to 8-bit mode "L" by its real range.

    16-bit modes: ``value >> 8``. Mode "I" (int32) may hold 8-bit or 16-bit data (older PIL
    opened 16-bit PNGs as "I"): shifted only when values exceed 8 bits. Values outside 0-65535
    (signed or 32-bit TIFFs) have no known scale: refused rather than clipped.
    """
    arr = np.asarray(img)
    if img.mode == "I":
        low, high = (int(arr.min()), int(arr.max())) if arr.size else (0, 0)
        if low < 0 or high > 65535:
            raise DecodeError(
                f"unsupported pixel values: 32-bit integers in {low}..{high} (no known scale)"
            )
        if high > 255:
            arr = arr >> 8
    else:
        arr = arr.astype(np.uint16, copy=False) >> 8
    return Image.fromarray(np.ascontiguousarray(arr, dtype=np.uint8), mode="L")


def _float_to_l(img: Image.Image) -> Image.Image:
    """A floating-point grayscale image (mode "F", e.g. 32-bit float TIFF) as 8-bit "L" by
    its real range: 0-1 (normalised) scaled by 255, 0-255 kept (as ``convert`` does); any
    other range, or NaN / infinity, is refused rather than clipped to black or white."""
    arr = np.asarray(img, dtype=np.float32)
    if not arr.size:
        return img.convert("L")
    if not np.isfinite(arr).all():
        raise DecodeError("unsupported pixel values: floating-point NaN or infinity")
    low, high = float(arr.min()), float(arr.max())
    if low < 0 or high > 255:
        raise DecodeError(
            f"unsupported pixel values: floats in {low:g}..{high:g} (expected 0-1 or 0-255)"
        )
    if high <= 1.0:
        arr = arr * 255.0
    return Image.fromarray(np.ascontiguousarray(np.rint(arr), dtype=np.uint8), mode="L")


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in _WIDE_INT_MODES:
        transparency = img.info.get("transparency")
        mask = None
        if isinstance(transparency, int):
            mask = np.asarray(img) == transparency
        rgb = (_float_to_l if img.mode == "F" else _wide_int_to_l)(img).convert("RGB")
        if mask is not None and mask.any():
            arr = np.array(rgb)
            arr[mask] = 255  # transparent over white, like convert_to_rgb
            rgb = Image.fromarray(arr, mode="RGB")
        return rgb
    # Exactly transformers.image_transforms.convert_to_rgb for PIL images.
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode == "RGB":
        return img  # convert("RGB") would only copy it
    return img.convert("RGB")


def decode_rgb(data: bytes, *, max_pixels: int) -> Image.Image:
    """Decode encoded image bytes into an RGB PIL image (see :func:`decode_image`).

    The same steps and errors as :func:`decode_image`; the pixels stay in PIL's own buffer
    (4 bytes per pixel), which :func:`rgb_pixels` exposes without a copy.
    """
    return _decode(data, max_pixels, None)[0]


def decode_draft(
    data: bytes, *, max_pixels: int, needed: Callable[[int, int], tuple[int, int]]
) -> tuple[np.ndarray, tuple[int, int]]:
    """Like :func:`decode_pixels`, but JPEGs are decoded at the smallest DCT scale (1/2, 1/4,
    1/8) that still covers ``needed(height, width)`` (PIL's ``draft``). Not bit-identical to a
    full decode; other formats decode fully.

    Returns:
        (pixels (h, w, 3 or 4) uint8 at the decoded scale, the displayed (height, width) of the
        full image, as :func:`probe_image` reports it).
    """
    image, size = _decode(data, max_pixels, needed)
    return rgb_pixels(image), size


def _decode(
    data: bytes,
    max_pixels: int,
    needed: Callable[[int, int], tuple[int, int]] | None,
    fast_jpeg: bool = False,
) -> tuple[Image.Image | np.ndarray, tuple[int, int]]:
    """(RGB image, displayed (height, width) of the full image), from one open of the data.

    ``needed`` enables draft decoding. With ``fast_jpeg``, a plain RGB JPEG comes back as the
    pixel array of libjpeg-turbo's decode (simplejpeg) instead of an image (see
    :func:`decode_pixels`). Every JPEG whose scan libjpeg finds cut short or garbled is refused
    (:data:`_JPEG_REFUSED`), though PIL would decode it with gray filling in.
    """
    _check_nonempty(data)
    fmt: str | None = None
    try:
        with _open(data) as img:
            fmt = img.format
            orientation, height, width = _header(img, max_pixels)
            if fmt in ("JPEG", "MPO"):
                plain = fast_jpeg and fmt == "JPEG" and img.mode == "RGB" and orientation == 1
                pixels = _decode_jpeg_fast(data) if plain else None
                if pixels is not None and pixels.shape[:2] == (height, width):
                    return pixels, (height, width)
                if pixels is None:
                    _check_jpeg_scan(data, img.mode)
            if needed is not None and fmt == "JPEG":
                need_h, need_w = needed(height, width)
                # draft takes (width, height) in the stored orientation
                request = (need_h, need_w) if orientation >= 5 else (need_w, need_h)
                img.draft(img.mode, request)
            img.load()  # Full decode here, so truncation/corruption raises now.
            frame: Image.Image = img
            if orientation != 1:
                # Same transposition table as PIL.ImageOps.exif_transpose.
                frame = img.transpose(_TRANSPOSE[orientation])
            rgb = _to_rgb(frame)
            if rgb.mode != "RGB":
                raise DecodeError(f"unexpected decoded mode {rgb.mode}")
    except DecodeError:
        raise
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, zlib...
        raise _wrap(exc, fmt) from None
    return rgb, (height, width)


def rgb_pixels(image: Image.Image) -> np.ndarray:
    """The pixels of an RGB PIL image as uint8, without a copy where Pillow allows it.

    PIL keeps RGB pixels as 4 bytes (R, G, B, pad); when the image is one contiguous block
    (Pillow's Arrow export succeeds) the result is a read-only ``(H, W, 4)`` view of that buffer,
    channels 0-2 being RGB (the resize kernels read it directly, without the RGB -> RGBA
    unpacking they do for 3 channels). Otherwise it is an ``(H, W, 3)`` copy.
    """
    if image.mode != "RGB":
        raise ValueError(f"expected an RGB image, got mode {image.mode}")
    width, height = image.size
    try:
        values = pa.array(image).buffers()[-1]
    except (ValueError, TypeError, pa.ArrowException):  # several blocks, or no Arrow export
        return np.asarray(image)
    if values is None or values.size < width * height * 4:
        return np.asarray(image)
    return np.frombuffer(values, dtype=np.uint8, count=width * height * 4).reshape(height, width, 4)


def decode_pixels(data: bytes, *, max_pixels: int) -> np.ndarray:
    """Decode encoded image bytes into (H, W, 3 or 4) uint8 RGB pixels, as fast as allowed.

    The same pixels and errors as :func:`decode_image` (channels 0-2; a 4th channel is padding):

    * plain RGB JPEGs (no EXIF rotation, ending in an EOI marker) go through
      ``simplejpeg.decode_jpeg``, the same libjpeg-turbo decode as PIL's without PIL's
      per-row copies (1.7-2.8x faster than PIL's decode alone on a 1600x1200 photo, by
      chroma subsampling and progressive; see docs/BENCHMARKS.md),
      once a self-check at first use has found its output identical to PIL's on this machine;
      libjpeg's warnings are errors there, so a scan cut short is refused, not gray-filled;
    * everything else, and any JPEG simplejpeg cannot take, goes through :func:`decode_rgb` and
      :func:`rgb_pixels` (PIL's buffer viewed without a copy).

    Raises:
        DecodeError: as :func:`decode_image`.
    """
    pixels, _ = _decode(data, max_pixels, None, fast_jpeg=True)
    return pixels if isinstance(pixels, np.ndarray) else rgb_pixels(pixels)


def plain_jpeg_size(data: bytes, *, max_pixels: int) -> tuple[int, int] | None:
    """(height, width) of a JPEG another decoder may decode as PIL would show it, else None.

    Such a JPEG is RGB (not grayscale or CMYK), has no EXIF rotation, and ends in an EOI
    marker (truncated files go to PIL, which reports them). Reads the header only, with the
    pixel limit, for ``input.decode: gpu`` (the GPU decodes these; the rest decode here).

    Raises:
        DecodeError: empty or unrecognised data, or more than ``max_pixels`` pixels.
    """
    fmt, mode, orientation, height, width = _probe(data, max_pixels)
    if fmt != "JPEG" or mode != "RGB" or orientation != 1 or not _has_eoi(data):
        return None
    return height, width


def _decode_jpeg_fast(data: bytes) -> np.ndarray | None:
    """libjpeg-turbo's decode of a complete JPEG (EOI marker present; truncated files go to
    PIL, which reports them) when the self-check passed here, else None.

    Raises:
        DecodeError: the scan is cut short or garbled (:data:`_JPEG_REFUSED`).
    """
    if not _has_eoi(data) or not _jpeg_fast_path_ok():
        return None
    try:
        return _decode_jpeg_simple(data, strict=True)
    except ValueError as exc:
        _refuse_jpeg(exc)
    try:  # a warning vlray accepts (extraneous bytes): the image is whole
        return _decode_jpeg_simple(data, strict=False)
    except ValueError:
        return None


def _decode_jpeg_simple(data: bytes, strict: bool) -> np.ndarray:
    """(H, W, 3) uint8 RGB from simplejpeg; ValueError when libjpeg errs (or warns, if strict)."""
    return simplejpeg.decode_jpeg(data, "RGB", strict=strict)


def _refuse_jpeg(exc: ValueError) -> None:
    """Raises DecodeError when libjpeg's message says part of the image would be made up."""
    text = str(exc).lower()
    if any(marker in text for marker in _JPEG_REFUSED):
        reason = _one_line(str(exc)).removeprefix("Corrupt JPEG data: ")
        raise DecodeError(f"corrupt JPEG: {reason} (the decoder would fill the rest in)")


def _check_jpeg_scan(data: bytes, mode: str) -> None:
    """Decodes the JPEG at 1/8 scale with libjpeg's warnings as errors (about a tenth of a
    full decode: the whole scan is read, little is transformed) and refuses a damaged scan.
    Other simplejpeg errors are left to PIL, which decodes the file."""
    try:
        simplejpeg.decode_jpeg(
            data, _JPEG_CHECK_SPACE.get(mode, "GRAY"), min_height=1, min_width=1, strict=True
        )
    except ValueError as exc:
        _refuse_jpeg(exc)


_JPEG_FAST_PATH: list[bool] = []


def _jpeg_fast_path_ok() -> bool:
    """True when simplejpeg's decode gives PIL's pixels bit for bit here (checked once per
    process on generated photos-like JPEGs: 4:2:0, 4:2:2, 4:4:4, progressive, odd sizes)."""
    if not _JPEG_FAST_PATH:
        ok = True
        try:
            rng = np.random.default_rng(0)
            base = np.linspace(0, 255, 61 * 37 * 3).reshape(37, 61, 3)
            noisy = np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8)
            for options in (
                {"subsampling": 2},
                {"subsampling": 1},
                {"subsampling": 0},
                {"progressive": True},
            ):
                buffer = io.BytesIO()
                Image.fromarray(noisy).save(buffer, "JPEG", quality=85, **options)
                blob = buffer.getvalue()
                fast = _decode_jpeg_simple(blob, strict=True)
                with _open(blob) as img:
                    slow = np.asarray(img.convert("RGB"))
                ok = ok and np.array_equal(fast, slow)
        except Exception:  # simplejpeg unusable here: PIL only
            ok = False
        _JPEG_FAST_PATH.append(ok)
    return _JPEG_FAST_PATH[0]


def large_pil_blocks(max_bytes: int = 1 << 30) -> None:
    """Lets Pillow keep images up to ``max_bytes`` in one block, so :func:`rgb_pixels` can
    view them without a copy (Pillow's default, 16 MiB, splits photos over ~4 MP). Process-wide:
    call it in worker processes that own their Pillow allocations."""
    if Image.core.get_block_size() < max_bytes:
        Image.core.set_block_size(max_bytes)


def decode_image(data: bytes, *, max_pixels: int) -> np.ndarray:
    """Decode encoded image bytes into an RGB array.

    Steps: header probe with the pixel limit (before any pixel is decoded), full
    decode of the first frame (animated GIF/WebP, multi-page TIFF), EXIF/XMP orientation
    (the transposition table of ``PIL.ImageOps.exif_transpose``, with the orientation
    read from the header so the result always matches :func:`probe_image`), then RGB conversion with the semantics of
    ``transformers.image_transforms.convert_to_rgb``: images with an alpha band or a
    ``transparency`` entry are composited over opaque white, everything else
    (L, 1, P, CMYK, YCbCr, ...) goes through ``convert("RGB")``.

    One deliberate difference: 16-bit (and int32) grayscale images, modes ``"I;16*"``
    and ``"I"`` as produced by 16-bit PNG/TIFF, are first scaled to 8 bits
    (``value >> 8``; for mode ``"I"`` only when the maximum exceeds 255), because
    PIL's ``convert("RGB")`` clips such values to 255, turning most of the image white.
    A ``transparency`` key colour on such images is still composited to white. Likewise
    32-bit float images (mode ``"F"``) in 0-1 are scaled by 255; pixel values with no known
    scale (negative or over 65535 integers, floats outside 0-255, NaN) are refused.

    Args:
        data: Encoded image bytes (JPEG, PNG, WebP, BMP, GIF or TIFF).
        max_pixels: Largest accepted ``width * height``; checked on the header.

    Returns:
        ``np.ndarray`` of shape ``(H, W, 3)``, dtype ``uint8``, values 0..255, RGB
        channel order, C-contiguous, where ``(W, H)`` equals :func:`probe_image`.

    Raises:
        DecodeError: Empty, unrecognised, truncated or corrupt data, or more than
            ``max_pixels`` pixels. The message is a single short line.
    """
    arr = np.asarray(decode_rgb(data, max_pixels=max_pixels), dtype=np.uint8)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise DecodeError(f"unexpected decoded shape {arr.shape}")
    return np.ascontiguousarray(arr)
