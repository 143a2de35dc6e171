"""Tests for vlray.ops.decode and the images from vlray.testing.images."""

from __future__ import annotations

import io
import time

import numpy as np
import pytest
from PIL import Image, ImageFile

from vlray.ops.decode import IMAGE_EXTENSIONS, DecodeError, decode_image, probe_image
from vlray.testing import images as test_images
from vlray.testing.images import (
    UNUSUAL_IMAGE_SIZES,
    bad_images,
    extreme_aspect_png,
    sample_photos,
    unusual_images,
)

MAX_PIXELS = 100_000_000
BAD_LIMIT = 10_000_000

UNUSUAL = unusual_images()
BAD = bad_images(BAD_LIMIT)


def _hf_convert_to_rgb(data: bytes) -> np.ndarray:
    from transformers.image_transforms import convert_to_rgb

    return convert_to_rgb(Image.open(io.BytesIO(data)), return_numpy=True)


def test_image_extensions() -> None:
    assert {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"} == IMAGE_EXTENSIONS
    assert isinstance(IMAGE_EXTENSIONS, frozenset)


@pytest.mark.parametrize("name", sorted(UNUSUAL))
def test_unusual_images_decode(name: str) -> None:
    data = UNUSUAL[name]
    arr = decode_image(data, max_pixels=MAX_PIXELS)
    width, height = UNUSUAL_IMAGE_SIZES[name]
    assert arr.shape == (height, width, 3)
    assert arr.dtype == np.uint8
    assert arr.flags.c_contiguous
    assert probe_image(data, MAX_PIXELS) == (width, height)


def test_exif_rotation_swaps_size() -> None:
    data = UNUSUAL["exif_rotated.jpg"]
    with Image.open(io.BytesIO(data)) as img:
        stored = img.size
    assert stored == (80, 48)
    assert probe_image(data, MAX_PIXELS) == (48, 80)
    arr = decode_image(data, max_pixels=MAX_PIXELS)
    assert arr.shape == (80, 48, 3)
    # Orientation 6 = rotate 90 degrees clockwise: the stored left column (red ~ 0)
    # becomes the top row.
    with Image.open(io.BytesIO(data)) as img:
        expected = np.asarray(img.convert("RGB").transpose(Image.Transpose.ROTATE_270))
    np.testing.assert_array_equal(arr, expected)


@pytest.mark.parametrize(
    "name",
    ["rgba.png", "la.png", "palette_transparent.png", "gray.png", "cmyk.jpg", "1x1.png"],
)
def test_rgb_conversion_matches_transformers(name: str) -> None:
    data = UNUSUAL[name]
    ours = decode_image(data, max_pixels=MAX_PIXELS)
    theirs = _hf_convert_to_rgb(data)
    assert theirs.shape == ours.shape
    np.testing.assert_array_equal(ours, theirs)


def test_transparency_is_composited_on_white() -> None:
    # Alpha is 0 in the first column of rgba.png / la.png.
    for name in ("rgba.png", "la.png"):
        arr = decode_image(UNUSUAL[name], max_pixels=MAX_PIXELS)
        assert (arr[:, 0] == 255).all(), name
    pal = decode_image(UNUSUAL["palette_transparent.png"], max_pixels=MAX_PIXELS)
    with Image.open(io.BytesIO(UNUSUAL["palette_transparent.png"])) as img:
        transparent = np.asarray(img) == img.info["transparency"]
    assert transparent.any()
    assert (pal[transparent] == 255).all()


def test_16bit_png_keeps_its_range() -> None:
    data = UNUSUAL["16bit.png"]
    with Image.open(io.BytesIO(data)) as img:
        assert img.mode.startswith("I")
        # What we guard against: PIL clips 16-bit values to 255 on convert("RGB").
        assert (np.asarray(img.convert("RGB"))[0, 1:] == 255).all()
    arr = decode_image(data, max_pixels=MAX_PIXELS)
    assert not (arr == 255).all()
    row = arr[0, :, 0].astype(int)
    assert row[0] == 0 and row[-1] == 255
    assert np.all(np.diff(row) >= 0)  # monotonic ramp
    assert len(np.unique(row)) > 200
    assert (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all()


def test_16bit_mode_i_and_8bit_mode_i() -> None:
    ramp = np.linspace(0, 65535, 64).astype(np.int32)[None, :].repeat(4, 0)
    buf = io.BytesIO()
    Image.fromarray(ramp, "I").save(buf, "TIFF")
    arr = decode_image(buf.getvalue(), max_pixels=MAX_PIXELS)
    assert arr[0, 0, 0] == 0 and arr[0, -1, 0] == 255
    small = np.arange(64, dtype=np.int32)[None, :].repeat(4, 0)
    buf = io.BytesIO()
    Image.fromarray(small, "I").save(buf, "TIFF")
    arr = decode_image(buf.getvalue(), max_pixels=MAX_PIXELS)
    np.testing.assert_array_equal(arr[0, :, 0], np.arange(64))


@pytest.mark.parametrize("name", ["animated.gif", "animated.webp"])
def test_animated_gives_first_frame(name: str) -> None:
    data = UNUSUAL[name]
    with Image.open(io.BytesIO(data)) as img:
        assert getattr(img, "n_frames", 1) >= 2
    arr = decode_image(data, max_pixels=MAX_PIXELS)
    assert (arr == np.array([255, 0, 0], dtype=np.uint8)).all()


def test_other_modes() -> None:
    cases = {
        "1": Image.new("1", (8, 6), 1),
        "F": Image.fromarray(np.full((6, 8), 100.0, dtype=np.float32), "F"),
        "P": Image.new("RGB", (8, 6), (10, 20, 30)).convert("P"),
        "I;16B": Image.fromarray(np.full((6, 8), 40000, dtype=">u2")),
    }
    for mode, img in cases.items():
        buf = io.BytesIO()
        img.save(buf, "TIFF" if mode in ("F", "I;16B") else "PNG")
        arr = decode_image(buf.getvalue(), max_pixels=MAX_PIXELS)
        assert arr.shape == (6, 8, 3), mode
        assert arr.dtype == np.uint8
        expected = {"F": 100, "I;16B": 40000 >> 8, "1": 255, "P": None}[mode]
        if expected is not None:
            assert (arr == expected).all(), mode
    assert (decode_image(_png(Image.new("1", (8, 6), 1)), max_pixels=100) == 255).all()


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_images_raise_one_line(name: str) -> None:
    assert not ImageFile.LOAD_TRUNCATED_IMAGES
    with pytest.raises(DecodeError) as info:
        decode_image(BAD[name], max_pixels=BAD_LIMIT)
    message = str(info.value)
    assert message
    assert "\n" not in message and "\r" not in message
    assert len(message) <= 200
    assert "Traceback" not in message and "\\x" not in message
    assert isinstance(info.value, ValueError)


def test_bad_messages() -> None:
    def msg(name: str) -> str:
        with pytest.raises(DecodeError) as info:
            decode_image(BAD[name], max_pixels=BAD_LIMIT)
        return str(info.value)

    assert "empty" in msg("empty.jpg")
    assert msg("random.jpg") == "not an image (unrecognised format)"
    assert msg("text.txt.jpg") == "not an image (unrecognised format)"
    assert msg("truncated.jpg").startswith("truncated JPEG")
    assert "PNG" in msg("corrupt.png")


def test_bomb_rejected_by_probe_without_decoding() -> None:
    data = BAD["bomb.png"]
    assert len(data) < 100_000
    start = time.perf_counter()
    with pytest.raises(DecodeError) as info:
        probe_image(data, BAD_LIMIT)
    assert time.perf_counter() - start < 0.5
    message = str(info.value)
    assert "decompression bomb" in message and str(BAD_LIMIT) in message
    start = time.perf_counter()
    with pytest.raises(DecodeError, match="decompression bomb"):
        decode_image(data, max_pixels=BAD_LIMIT)
    assert time.perf_counter() - start < 0.5
    # It is a genuine image: the header is valid and a large enough limit accepts it.
    side = int(message.split()[2].split("x")[0])
    assert probe_image(data, side * side) == (side, side)


def test_bomb_png_is_a_valid_png() -> None:
    data = bad_images(max_pixels=10_000)["bomb.png"]
    arr = decode_image(data, max_pixels=10**6)
    assert arr.shape == (201, 201, 3)
    assert (arr == 0).all()


def test_pixel_limit_is_inclusive() -> None:
    data = UNUSUAL["tiny_wide.png"]  # 300x3 = 900 pixels
    assert probe_image(data, 900) == (300, 3)
    with pytest.raises(DecodeError, match="exceeds limit 899"):
        probe_image(data, 899)


def test_sample_photos_deterministic_and_varied() -> None:
    photos = sample_photos(8, seed=3)
    assert photos == sample_photos(8, seed=3)
    assert photos != sample_photos(8, seed=4)
    assert [name for name, _ in photos] == [f"photo_{i:04d}.jpg" for i in range(8)]
    shapes = set()
    for _, data in photos:
        assert data[:2] == b"\xff\xd8"
        arr = decode_image(data, max_pixels=MAX_PIXELS)
        assert arr.std() > 5  # real content, not flat
        shapes.add(arr.shape[:2])
    assert len(shapes) == 8


def test_sample_photos_fallback_without_skimage(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(test_images, "_skimage_sources", lambda: ())
    photos = sample_photos(3)
    for _, data in photos:
        arr = decode_image(data, max_pixels=MAX_PIXELS)
        assert arr.std() > 5


def test_extreme_aspect_png() -> None:
    data = extreme_aspect_png(300)
    assert probe_image(data, MAX_PIXELS) == (1, 300)
    assert decode_image(data, max_pixels=MAX_PIXELS).shape == (300, 1, 3)


def _jpeg_variants() -> dict[str, bytes]:
    """Real photos re-encoded the ways cameras and web pipelines do."""
    out = {}
    for name, blob in sample_photos(8, seed=5):
        image = Image.open(io.BytesIO(blob)).convert("RGB")
        for label, options in {
            "420": {"subsampling": 2, "quality": 90},
            "422": {"subsampling": 1, "quality": 75},
            "444": {"subsampling": 0, "quality": 95},
            "progressive": {"progressive": True, "quality": 80},
            "optimized": {"optimize": True, "quality": 60},
        }.items():
            buffer = io.BytesIO()
            image.save(buffer, "JPEG", **options)
            out[f"{name}-{label}"] = buffer.getvalue()
    out["trailing-zeros"] = out[next(iter(out))] + b"\x00" * 7
    return out


JPEGS = _jpeg_variants()


@pytest.mark.parametrize("name", sorted(JPEGS) + [f"unusual/{n}" for n in sorted(UNUSUAL)])
def test_decode_pixels_equals_decode_image(name: str) -> None:
    """The fast decode (simplejpeg for plain JPEGs, PIL's buffer viewed otherwise) gives
    decode_image's pixels exactly, whatever path it takes."""
    from vlray.ops.decode import _jpeg_fast_path_ok, decode_pixels

    data = UNUSUAL[name.split("/", 1)[1]] if name.startswith("unusual/") else JPEGS[name]
    assert _jpeg_fast_path_ok(), "simplejpeg's JPEG decode differs from PIL's here"
    pixels = decode_pixels(data, max_pixels=MAX_PIXELS)
    expected = decode_image(data, max_pixels=MAX_PIXELS)
    assert pixels.dtype == np.uint8 and pixels.shape[2] in (3, 4)
    assert np.array_equal(pixels[..., :3], expected), name


def test_decode_pixels_takes_the_simplejpeg_path_for_plain_jpegs(monkeypatch) -> None:
    from vlray.ops import decode

    calls = []
    real = decode._decode_jpeg_simple
    monkeypatch.setattr(
        decode, "_decode_jpeg_simple", lambda data, strict: calls.append(1) or real(data, strict)
    )
    decode.decode_pixels(JPEGS[sorted(JPEGS)[0]], max_pixels=MAX_PIXELS)
    assert calls, "a plain RGB JPEG should be decoded by simplejpeg"
    calls.clear()
    decode.decode_pixels(UNUSUAL["exif_rotated.jpg"], max_pixels=MAX_PIXELS)
    assert not calls, "EXIF-rotated JPEGs go through PIL"


@pytest.mark.parametrize("name", sorted(BAD))
def test_decode_pixels_bad_images_same_errors(name: str) -> None:
    from vlray.ops.decode import decode_pixels

    with pytest.raises(DecodeError) as fast:
        decode_pixels(BAD[name], max_pixels=BAD_LIMIT)
    with pytest.raises(DecodeError) as slow:
        decode_image(BAD[name], max_pixels=BAD_LIMIT)
    assert str(fast.value) == str(slow.value)


def test_decode_draft_keeps_full_size_and_covers_the_target() -> None:
    """Draft decoding shrinks big JPEGs in the DCT domain, never below what is needed, and
    reports the full displayed size; other formats decode fully."""
    from torchvision.transforms.v2 import InterpolationMode

    from vlray.ops.decode import decode_draft
    from vlray.ops.resize import resize_uint8

    big = Image.fromarray(
        np.asarray(
            Image.open(io.BytesIO(sample_photos(1, seed=2)[0][1]))
            .convert("RGB")
            .resize((1600, 1200))
        )
    )
    buffer = io.BytesIO()
    big.save(buffer, "JPEG", quality=90)
    data = buffer.getvalue()
    pixels, size = decode_draft(data, max_pixels=MAX_PIXELS, needed=lambda h, w: (224, 288))
    assert size == (1200, 1600)
    assert pixels.shape[:2] == (300, 400)  # 1/4 scale: the smallest that covers 224x288
    full = decode_image(data, max_pixels=MAX_PIXELS)
    a = resize_uint8(pixels, (224, 288), InterpolationMode.BILINEAR).astype(np.int16)
    b = resize_uint8(full, (224, 288), InterpolationMode.BILINEAR).astype(np.int16)
    assert np.abs(a - b).mean() < 2.0  # close, not equal: the documented trade
    # EXIF-rotated JPEG: the displayed (rotated) size, as probe_image reports it
    rotated = UNUSUAL["exif_rotated.jpg"]
    width, height = probe_image(rotated, max_pixels=MAX_PIXELS)
    pixels, size = decode_draft(rotated, max_pixels=MAX_PIXELS, needed=lambda h, w: (h, w))
    assert size == (height, width) and pixels.shape[:2] == (height, width)
    # PNG: full decode whatever is needed
    png = UNUSUAL["rgba.png"]
    pixels, size = decode_draft(png, max_pixels=MAX_PIXELS, needed=lambda h, w: (1, 1))
    assert pixels.shape[:2] == size
    with pytest.raises(DecodeError):
        decode_draft(BAD[sorted(BAD)[0]], max_pixels=BAD_LIMIT, needed=lambda h, w: (h, w))


def _tiff(arr: np.ndarray, mode: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode).save(buf, "TIFF")
    return buf.getvalue()


def test_float_pixels_by_their_real_range() -> None:
    ramp = np.linspace(0.0, 1.0, 64, dtype=np.float32)[None, :].repeat(4, 0)
    arr = decode_image(_tiff(ramp, "F"), max_pixels=MAX_PIXELS)  # normalised: x 255
    np.testing.assert_array_equal(arr[0, :, 0], np.rint(ramp[0] * 255).astype(np.uint8))
    assert (arr[..., 0] == arr[..., 2]).all()
    # PIL's convert("RGB") would make this image black (0-1 clipped to 0 or 1)
    assert int(np.asarray(Image.fromarray(ramp, "F").convert("RGB")).max()) <= 1
    wide = np.linspace(0.0, 255.0, 64, dtype=np.float32)[None, :].repeat(4, 0)
    np.testing.assert_array_equal(
        decode_image(_tiff(wide, "F"), max_pixels=MAX_PIXELS)[0, :, 0],
        np.rint(wide[0]).astype(np.uint8),
    )


@pytest.mark.parametrize(
    ("values", "mode", "message"),
    [
        (np.linspace(-1.0, 1.0, 32, dtype=np.float32), "F", "floats in -1..1"),
        (np.linspace(0.0, 4000.0, 32, dtype=np.float32), "F", "floats in 0..4000"),
        (np.array([0.5, np.nan] * 16, dtype=np.float32), "F", "NaN"),
        (np.linspace(-500, 500, 32).astype(np.int32), "I", "32-bit integers in -500..500"),
        (np.linspace(0, 1 << 20, 32).astype(np.int32), "I", "integers in 0..1048576"),
    ],
)
def test_pixel_values_with_no_known_scale_are_refused(values, mode, message) -> None:
    data = _tiff(values[None, :].repeat(4, 0), mode)
    with pytest.raises(DecodeError, match="unsupported pixel values") as err:
        decode_image(data, max_pixels=MAX_PIXELS)
    assert message in str(err.value) and "\n" not in str(err.value)


def _scan_damaged(blob: bytes) -> dict[str, bytes]:
    """A JPEG damaged inside its entropy-coded scan the ways disks and transfers do it."""
    sos = blob.find(b"\xff\xda")
    mid = sos + (len(blob) - sos) // 2
    zeroed = bytearray(blob)
    zeroed[mid : mid + 2000] = bytes(2000)
    return {"zeroed": bytes(zeroed), "cut": blob[:mid] + blob[mid + 3000 :]}


def _photo_jpeg(mode: str = "RGB", exif_orientation: int | None = None) -> bytes:
    name, blob = sample_photos(1, seed=7)[0]
    image = Image.open(io.BytesIO(blob)).convert("RGB").resize((640, 480)).convert(mode)
    buffer = io.BytesIO()
    exif = Image.Exif()
    if exif_orientation:
        exif[0x0112] = exif_orientation
    image.save(buffer, "JPEG", quality=90, exif=exif.tobytes())
    return buffer.getvalue()


@pytest.mark.parametrize(
    "mode, orientation", [("RGB", None), ("RGB", 6), ("L", None), ("CMYK", None)]
)
@pytest.mark.parametrize("damage", ["zeroed", "cut"])
def test_jpeg_with_damaged_scan_is_refused(mode, orientation, damage) -> None:
    """PIL decodes these without a word, the missing part gray; every decode path refuses."""
    from vlray.ops.decode import decode_draft, decode_pixels

    data = _scan_damaged(_photo_jpeg(mode, orientation))[damage]
    with Image.open(io.BytesIO(data)) as img:
        img.load()  # the premise: Pillow accepts it
    for decode in (decode_image, decode_pixels):
        with pytest.raises(DecodeError, match="corrupt JPEG: premature end of data segment"):
            decode(data, max_pixels=MAX_PIXELS)
    with pytest.raises(DecodeError, match="corrupt JPEG"):
        decode_draft(data, max_pixels=MAX_PIXELS, needed=lambda h, w: (64, 64))


def test_jpeg_with_extraneous_bytes_before_eoi_is_kept() -> None:
    """Junk between a complete scan and the EOI marker (some cameras write it): libjpeg warns,
    the image is whole, vlray decodes it as PIL does."""
    from vlray.ops.decode import decode_pixels

    blob = _photo_jpeg()
    data = blob[:-2] + b"\x00\x11" * 20 + b"\xff\xd9"
    expected = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    assert np.array_equal(decode_pixels(data, max_pixels=MAX_PIXELS)[..., :3], expected)
    assert np.array_equal(decode_image(data, max_pixels=MAX_PIXELS), expected)
