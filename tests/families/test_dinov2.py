"""DINOv2: shortest-edge resize + a smaller centre crop, CLS (or CLS + mean patch) embeddings,
no text tower, against transformers' BitImageProcessor and Dinov2Model on tiny checkpoints in
facebook's hub layout, with and without registers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from vlray.families import family_for, resolve_checkpoint
from vlray.families.batch import preprocess_images
from vlray.ops.decode import decode_image
from vlray.testing.checkpoints import save_hub_dinov2
from vlray.testing.images import sample_photos, unusual_images

CPU = torch.device("cpu")
PHOTOS = [decode_image(blob, max_pixels=10**8) for _, blob in sample_photos(12)] + [
    decode_image(unusual_images()[name], max_pixels=10**8)
    for name in ("1x1.png", "tiny_wide.png", "exif_rotated.jpg", "gray.png")
]


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[bool, Path]:
    """{registers: folder}."""
    root = tmp_path_factory.mktemp("dinov2")
    return {r: save_hub_dinov2(root / f"registers-{r}", registers=r) for r in (False, True)}


def test_resize_policy_is_shortest_edge_then_crop(folders):
    family = family_for(resolve_checkpoint(str(folders[False])))
    assert family.name == "dinov2"
    assert family.resize_size(480, 640) == (40, 53)  # int(40 * 640 / 480): rounded down
    assert family.resize_size(640, 480) == (53, 40)
    assert family.target_size(480, 640) == family.target_size(7, 3000) == (32, 32)


def test_preprocessing_matches_reference_within_pil_twin(folders):
    from transformers import AutoImageProcessor, BitImageProcessorPil

    family = family_for(resolve_checkpoint(str(folders[False])))
    processor = AutoImageProcessor.from_pretrained(folders[False])
    assert type(processor).__name__ == "BitImageProcessor"
    pil = BitImageProcessorPil.from_pretrained(folders[False])
    worst_ours, worst_pil = 0.0, 0.0
    for image in PHOTOS:
        expected = processor(images=[Image.fromarray(image)], return_tensors="pt")["pixel_values"]
        twin = pil(images=[Image.fromarray(image)], return_tensors="pt")["pixel_values"]
        # from the PIL image: its 4-byte pixels, resized and cropped as 4 channels
        [(_, inputs)] = preprocess_images(family, [Image.fromarray(image)])
        got = inputs["pixel_values"]
        assert got.shape == expected.shape == (1, 3, 32, 32)
        worst_ours = max(worst_ours, (got - expected).abs().max().item())
        worst_pil = max(worst_pil, (twin - expected).abs().max().item())
    assert worst_ours <= worst_pil + 1e-6
    assert worst_ours == 0.0  # the same torchvision uint8 resize, crop and fused normalize


def _reference(model, processor, pooling: str) -> torch.Tensor:
    images = [Image.fromarray(i) for i in PHOTOS]
    with torch.no_grad():
        out = model(**processor(images=images, return_tensors="pt"))
    pooled = out.pooler_output
    if pooling == "cls_mean":  # Dinov2ForImageClassification's classifier input
        registers = getattr(model.config, "num_register_tokens", 0)
        patches = out.last_hidden_state[:, 1 + registers :]
        pooled = torch.cat([pooled, patches.mean(dim=1)], dim=-1)
    return torch.nn.functional.normalize(pooled, dim=-1)


@pytest.mark.parametrize("registers", [False, True])
@pytest.mark.parametrize("pooling", ["cls", "cls_mean"])
def test_embeddings_match_reference_model(folders, registers, pooling):
    from transformers import AutoImageProcessor, AutoModel

    folder = folders[registers]
    checkpoint = resolve_checkpoint(str(folder), processor_overrides={"pooling": pooling})
    family = family_for(checkpoint)
    model = AutoModel.from_pretrained(folder).eval()
    assert type(model).__name__ == ("Dinov2WithRegistersModel" if registers else "Dinov2Model")
    hidden = model.config.hidden_size
    encoder = family.load_encoder(CPU, torch.float32)
    assert encoder.dim == family.embedding_dim == (2 * hidden if pooling == "cls_mean" else hidden)
    assert family.model_bytes == 4 * sum(p.numel() for p in model.parameters())
    expected = _reference(model, AutoImageProcessor.from_pretrained(folder), pooling)
    got = torch.empty_like(expected)
    groups = preprocess_images(family, PHOTOS)
    assert len(groups) == 1  # every shape ends at the crop: one bucket
    for indices, inputs in groups:
        got[indices] = encoder.encode(inputs)
    assert torch.allclose(got.norm(dim=-1), torch.ones(len(PHOTOS)), atol=1e-5)
    assert (got * expected).sum(dim=-1).min().item() >= 0.999


def test_text_queries_raise_a_clear_error(folders):
    family = family_for(resolve_checkpoint(str(folders[False])))
    with pytest.raises(NotImplementedError, match="no text tower: query by --image or --id"):
        family.load_text_encoder(CPU, torch.float32)


def test_unknown_pooling_names_the_setting(folders):
    with pytest.raises(ValueError, match="model.processor.pooling"):
        family_for(resolve_checkpoint(str(folders[False]), processor_overrides={"pooling": "x"}))
