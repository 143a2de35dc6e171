"""preprocess_images (PIL in, model inputs out) equals the reference processors, every family.

Covers the fast paths: PIL's RGBX buffer viewed without a copy, the 4-channel uint8 resize, the
chunked normalization, the patch-order views of siglip2 and qwen2_vl, the thread pool.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

from vlray.families import family_for, resolve_checkpoint
from vlray.families.batch import preprocess_images
from vlray.ops.decode import decode_rgb, rgb_pixels
from vlray.testing.checkpoints import save_tiny_qwen2_vl, save_tiny_sam
from vlray.testing.images import sample_photos, unusual_images


def _images() -> list[Image.Image]:
    images = [decode_rgb(blob, max_pixels=10**8) for _, blob in sample_photos(14)]
    extra = unusual_images()
    for name in ("1x1.png", "tiny_wide.png", "exif_rotated.jpg", "rgba.png", "gray.png"):
        images.append(decode_rgb(extra[name], max_pixels=10**8))
    images.append(images[0].copy())  # a duplicate: same-shape groups of more than one
    return images


IMAGES = _images()


@pytest.fixture(scope="module")
def folders(siglip2_checkpoint, siglip_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("batch")
    return {
        "siglip2": siglip2_checkpoint,
        "siglip": siglip_checkpoint,
        "qwen2_vl": save_tiny_qwen2_vl(root / "qwen2_vl"),
        "sam": save_tiny_sam(root / "sam"),
    }


def _reference(kind, folder):
    import transformers

    if kind == "sam":
        return transformers.SamImageProcessor.from_pretrained(str(folder))
    return transformers.AutoImageProcessor.from_pretrained(str(folder))


@pytest.mark.parametrize("threads", [None, 2])
@pytest.mark.parametrize("kind", ["siglip2", "siglip", "qwen2_vl", "sam"])
def test_matches_reference_image_by_image(kind, threads, folders):
    family = family_for(resolve_checkpoint(str(folders[kind])))
    ref = _reference(kind, folders[kind])
    pool = ThreadPoolExecutor(threads) if threads else None
    groups = preprocess_images(family, IMAGES, pool)
    seen = sorted(i for indices, _ in groups for i in indices)
    assert seen == list(range(len(IMAGES))), "every image in exactly one group"
    assert any(len(indices) > 1 for indices, _ in groups)
    for indices, inputs in groups:
        values = inputs["pixel_values"]
        offset = 0
        for slot, index in enumerate(indices):
            expected = ref(images=[IMAGES[index]], return_tensors="pt")["pixel_values"]
            if kind == "qwen2_vl":  # patches of the group's images, one after the other
                got = values[offset : offset + expected.shape[0]]
                offset += expected.shape[0]
            elif kind == "siglip2":  # the reference pads to max_num_patches; vlray does not
                got = values[slot : slot + 1]
                expected = expected[:, : got.shape[1]]
            else:
                got = values[slot : slot + 1]
            assert got.shape == expected.shape, (kind, index)
            assert torch.equal(got, expected), (kind, index, (got - expected).abs().max())
    if pool:
        pool.shutdown()


def test_rgb_pixels_views_pil_buffer_without_copy():
    image = IMAGES[0]
    view = rgb_pixels(image)
    assert view.shape == (image.height, image.width, 4) and view.dtype == np.uint8
    assert not view.flags.writeable and not view.flags.owndata
    assert np.array_equal(view[..., :3], np.asarray(image))
    with pytest.raises(ValueError, match="RGB"):
        rgb_pixels(image.convert("L"))


def test_rgb_pixels_falls_back_for_multi_block_images():
    # Pillow's default 16 MiB blocks split a 3000x2000 RGB image (24 MB as RGBX)
    from PIL import Image as PILImage

    block = PILImage.core.get_block_size()
    PILImage.core.set_block_size(1 << 24)
    try:
        rng = np.random.default_rng(0)
        array = rng.integers(0, 256, (2000, 3000, 3), dtype=np.uint8)
        image = PILImage.fromarray(array)
        pixels = rgb_pixels(image)
        assert pixels.shape == (2000, 3000, 3)
        assert np.array_equal(pixels, array)
    finally:
        PILImage.core.set_block_size(block)
