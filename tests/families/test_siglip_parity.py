"""SigLIP2 NaFlex and fixed-res SigLIP: preprocessing and embeddings against transformers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModel

from vlray.families import family_for, resolve_checkpoint
from vlray.families.siglip2 import size_for_max_num_patches
from vlray.ops.decode import decode_image
from vlray.ops.resize import resize_uint8
from vlray.testing.images import sample_photos, unusual_images


def _photos():
    images = [decode_image(blob, max_pixels=10**8) for _, blob in sample_photos(12)]
    extra = unusual_images()
    for name in ("1x1.png", "tiny_wide.png", "exif_rotated.jpg", "rgba.png", "gray.png"):
        images.append(decode_image(extra[name], max_pixels=10**8))
    return images


PHOTOS = _photos()


def _ours(family, image):
    size = family.target_size(*image.shape[:2])
    resized = resize_uint8(image, size, family.interpolation)
    return torch.from_numpy(resized).permute(2, 0, 1)[None]


@pytest.mark.parametrize("kind", ["siglip2", "siglip"])
def test_preprocessing_matches_reference_within_pil_twin(
    kind, siglip2_checkpoint, siglip_checkpoint
):
    import transformers

    folder = siglip2_checkpoint if kind == "siglip2" else siglip_checkpoint
    family = family_for(resolve_checkpoint(str(folder)))
    ref = AutoImageProcessor.from_pretrained(folder)
    pil_cls = getattr(transformers, type(ref).__name__ + "Pil")
    pil = pil_cls.from_pretrained(folder)
    worst_ours, worst_pil = 0.0, 0.0
    for image in PHOTOS:
        expected = ref(images=[Image.fromarray(image)], return_tensors="pt")
        twin = pil(images=[Image.fromarray(image)], return_tensors="pt")
        x = _ours(family, image)
        got = family.preprocess(x, pad=True) if kind == "siglip2" else family.preprocess(x)
        assert got["pixel_values"].shape == expected["pixel_values"].shape
        worst_ours = max(
            worst_ours, (got["pixel_values"] - expected["pixel_values"]).abs().max().item()
        )
        worst_pil = max(
            worst_pil, (twin["pixel_values"] - expected["pixel_values"]).abs().max().item()
        )
        if kind == "siglip2":
            assert torch.equal(
                got["pixel_attention_mask"].int(), expected["pixel_attention_mask"].int()
            )
            assert torch.equal(got["spatial_shapes"].long(), expected["spatial_shapes"].long())
    assert worst_ours <= worst_pil + 1e-6
    assert worst_ours == 0.0  # the same torchvision uint8 resize and fused normalize: bit-identical


@pytest.mark.parametrize("kind", ["siglip2", "siglip"])
def test_embeddings_match_reference_model(kind, siglip2_checkpoint, siglip_checkpoint):
    folder = siglip2_checkpoint if kind == "siglip2" else siglip_checkpoint
    family = family_for(resolve_checkpoint(str(folder)))
    encoder = family.load_encoder(torch.device("cpu"), torch.float32)
    ref = AutoImageProcessor.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder).eval()
    for image in PHOTOS:
        with torch.no_grad():
            expected = model.get_image_features(
                **ref(images=[Image.fromarray(image)], return_tensors="pt")
            )
        expected = torch.nn.functional.normalize(expected.pooler_output, dim=-1)
        got = encoder.encode(family.preprocess(_ours(family, image)))
        assert got.shape == expected.shape
        assert torch.allclose(got.norm(dim=-1), torch.ones(1), atol=1e-5)
        assert float((got * expected).sum()) >= 0.999


def test_batched_group_equals_single_images(siglip2_checkpoint):
    family = family_for(resolve_checkpoint(str(siglip2_checkpoint)))
    encoder = family.load_encoder(torch.device("cpu"), torch.float32)
    rng = np.random.default_rng(0)
    group = torch.from_numpy(rng.integers(0, 256, (5, 3, 96, 144), dtype=np.uint8))
    together = encoder.encode(family.preprocess(group))
    alone = torch.cat([encoder.encode(family.preprocess(group[i : i + 1])) for i in range(5)])
    assert torch.allclose(together, alone, atol=1e-5)


@pytest.mark.parametrize(
    "h,w", [(1, 1), (480, 640), (640, 480), (3, 300), (300, 3), (17, 999), (4000, 3000), (256, 256)]
)
def test_naflex_size_matches_reference(h, w):
    from transformers.models.siglip2.image_processing_siglip2 import (
        get_image_size_for_max_num_patches,
    )

    for patches in (64, 256, 1024):
        assert size_for_max_num_patches(h, w, 16, patches) == get_image_size_for_max_num_patches(
            h, w, 16, patches
        )


@pytest.mark.parametrize("kind", ["siglip2", "siglip"])
def test_text_tower_matches_reference(kind, siglip2_checkpoint, siglip_checkpoint):
    from transformers import AutoTokenizer

    folder = siglip2_checkpoint if kind == "siglip2" else siglip_checkpoint
    family = family_for(resolve_checkpoint(str(folder)))
    text = family.load_text_encoder(torch.device("cpu"), torch.float32)
    got = text.encode(["a photo of a cat", "a red car"])
    model = AutoModel.from_pretrained(folder).eval()
    tokens = AutoTokenizer.from_pretrained(folder)(
        ["a photo of a cat", "a red car"], padding="max_length", max_length=64, return_tensors="pt"
    )
    assert tokens["input_ids"].shape[1] == 64
    with torch.no_grad():
        expected = torch.nn.functional.normalize(
            model.get_text_features(**tokens).pooler_output, dim=-1
        )
    assert torch.allclose(got, expected, atol=1e-5)
    cos = torch.tensor(0.3)
    expected_p = torch.sigmoid(cos * model.logit_scale.exp() + model.logit_bias)
    assert torch.allclose(text.probability(cos), expected_p.detach())


def test_random_weights_are_identical_across_loads(siglip2_checkpoint):
    checkpoint = resolve_checkpoint(str(siglip2_checkpoint), weights="random", seed=3)
    family = family_for(checkpoint)
    a = family.load_encoder(torch.device("cpu"), torch.float32)
    b = family.load_encoder(torch.device("cpu"), torch.float32)
    for (name, pa_), (_, pb) in zip(
        a.vision.named_parameters(), b.vision.named_parameters(), strict=True
    ):
        assert torch.equal(pa_, pb), name
    assert checkpoint.random_weights


@pytest.mark.parametrize("kind", ["siglip2", "siglip"])
def test_vision_only_checkpoint(kind, siglip2_checkpoint, siglip_checkpoint, tmp_path):
    """A checkpoint of the vision tower alone (``*VisionModel.save_pretrained``) embeds the same."""
    import shutil

    folder = siglip2_checkpoint if kind == "siglip2" else siglip_checkpoint
    full = AutoModel.from_pretrained(folder)
    full.vision_model.save_pretrained(tmp_path)
    shutil.copy(folder / "preprocessor_config.json", tmp_path)
    vision_family = family_for(resolve_checkpoint(str(tmp_path)))
    family = family_for(resolve_checkpoint(str(folder)))
    image = PHOTOS[0]
    a = family.load_encoder(torch.device("cpu"), torch.float32).encode(
        family.preprocess(_ours(family, image))
    )
    b = vision_family.load_encoder(torch.device("cpu"), torch.float32).encode(
        vision_family.preprocess(_ours(vision_family, image))
    )
    assert torch.allclose(a, b, atol=1e-6)
    with pytest.raises(NotImplementedError, match="no text tower"):
        vision_family.load_text_encoder(torch.device("cpu"), torch.float32)


def test_processor_save_pretrained_layout(siglip2_checkpoint, tmp_path):
    """transformers 5's Processor.save_pretrained nests the image settings in processor_config.json."""
    import shutil

    from transformers import AutoTokenizer, Siglip2ImageProcessor, Siglip2Processor

    for name in ("config.json", "model.safetensors"):
        shutil.copy(siglip2_checkpoint / name, tmp_path)
    processor = Siglip2Processor(
        image_processor=Siglip2ImageProcessor(max_num_patches=48, patch_size=16),
        tokenizer=AutoTokenizer.from_pretrained(siglip2_checkpoint),
    )
    processor.save_pretrained(tmp_path)
    assert not (tmp_path / "preprocessor_config.json").exists()
    family = family_for(resolve_checkpoint(str(tmp_path)))
    assert family.max_num_patches == 48
    reference = AutoImageProcessor.from_pretrained(tmp_path)
    image = PHOTOS[1]
    expected = reference(images=[Image.fromarray(image)], return_tensors="pt")
    got = family.preprocess(_ours(family, image), pad=True)
    assert torch.equal(got["pixel_values"], expected["pixel_values"])
