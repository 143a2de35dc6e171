"""CLIP: shortest-edge resize + centre crop, projected image and text embeddings, against
transformers' CLIPImageProcessor and CLIPModel on a tiny checkpoint in openai's hub layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vlray.config import S3Config
from vlray.families import Family, family_for, resolve_checkpoint
from vlray.families.batch import preprocess_images
from vlray.ops.decode import decode_image
from vlray.pipeline.stages import DecodeStage, EncodeStage
from vlray.schema import ROW_SCHEMA
from vlray.testing.checkpoints import save_hub_clip
from vlray.testing.images import sample_photos, unusual_images

CPU = torch.device("cpu")
BLOBS = [blob for _, blob in sample_photos(12)] + [
    unusual_images()[name] for name in ("1x1.png", "tiny_wide.png", "exif_rotated.jpg", "gray.png")
]
PHOTOS = [decode_image(blob, max_pixels=10**8) for blob in BLOBS]
TEXTS = ["a photo of a cat", "a red car", "astronaut"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_hub_clip(tmp_path_factory.mktemp("clip") / "hub")


@pytest.fixture(scope="module")
def family(folder: Path) -> Family:
    return family_for(resolve_checkpoint(str(folder)))


@pytest.fixture(scope="module")
def reference(folder: Path):
    from transformers import AutoImageProcessor, CLIPModel

    return AutoImageProcessor.from_pretrained(folder), CLIPModel.from_pretrained(folder).eval()


def _ours(family: Family, image: np.ndarray) -> dict[str, torch.Tensor]:
    return family.preprocess(torch.from_numpy(family.fit(image)).permute(2, 0, 1)[None])


def test_resize_policy_is_shortest_edge_then_crop(family):
    assert family.name == "clip"
    assert family.resize_size(480, 640) == (32, 42)  # int(32 * 640 / 480): rounded down
    assert family.resize_size(640, 480) == (42, 32)
    assert family.target_size(480, 640) == family.target_size(7, 3000) == (32, 32)


def test_preprocessing_matches_reference_within_pil_twin(family, folder, reference):
    from transformers import CLIPImageProcessorPil

    processor, _ = reference
    assert type(processor).__name__ == "CLIPImageProcessor"
    pil = CLIPImageProcessorPil.from_pretrained(folder)
    worst_ours, worst_pil = 0.0, 0.0
    for image in PHOTOS:
        expected = processor(images=[Image.fromarray(image)], return_tensors="pt")["pixel_values"]
        twin = pil(images=[Image.fromarray(image)], return_tensors="pt")["pixel_values"]
        got = _ours(family, image)["pixel_values"]
        assert got.shape == expected.shape == (1, 3, 32, 32)
        worst_ours = max(worst_ours, (got - expected).abs().max().item())
        worst_pil = max(worst_pil, (twin - expected).abs().max().item())
    assert worst_ours <= worst_pil + 1e-6
    assert worst_ours == 0.0  # the same torchvision uint8 resize, crop and fused normalize


def test_embeddings_match_reference_model(family, reference):
    processor, model = reference
    encoder = family.load_encoder(CPU, torch.float32)
    assert encoder.dim == family.embedding_dim == model.config.projection_dim == 24
    assert family.embedding_dim != model.config.vision_config.hidden_size
    resident = (model.vision_model, model.visual_projection)
    values = sum(t.numel() for m in resident for t in [*m.parameters(), *m.buffers()])
    assert family.model_bytes == 4 * values
    images = [Image.fromarray(i) for i in PHOTOS]
    with torch.no_grad():
        expected = model.get_image_features(**processor(images=images, return_tensors="pt"))
    expected = torch.nn.functional.normalize(expected.pooler_output, dim=-1)
    got = torch.empty_like(expected)
    groups = preprocess_images(family, PHOTOS)
    assert len(groups) == 1  # every shape ends at the crop: one bucket
    for indices, inputs in groups:
        got[indices] = encoder.encode(inputs)
    assert torch.allclose(got.norm(dim=-1), torch.ones(len(PHOTOS)), atol=1e-5)
    assert (got * expected).sum(dim=-1).min().item() >= 0.999


def test_text_embeddings_match_reference_model(family, folder, reference):
    from transformers import AutoTokenizer

    _, model = reference
    text = family.load_text_encoder(CPU, torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert type(tokenizer).__name__ == "CLIPTokenizer"
    with torch.no_grad():
        features = model.get_text_features(**tokenizer(TEXTS, padding=True, return_tensors="pt"))
    expected = torch.nn.functional.normalize(features.pooler_output, dim=-1)
    got = text.encode(TEXTS)
    assert got.shape == (3, 24)
    assert torch.allclose(got, expected, atol=1e-5)
    assert torch.allclose(text.encode(TEXTS[1:2]), expected[1:2], atol=1e-5)  # unpadded
    assert text.probability(torch.tensor(0.3)) is None


def _rows(blobs: list[bytes]):
    import pyarrow as pa

    n = len(blobs)
    columns = {"id": [f"r{i}" for i in range(n)], "source": ["x"] * n, "data": blobs}
    columns.update({k: [""] * n for k in ("uri", "error", "stage", "prompts")})
    return pa.table(columns, schema=ROW_SCHEMA)


@pytest.mark.parametrize("decode", ["exact", "gpu"])
def test_stages_crop_and_group_on_the_final_shape(family, folder, decode):
    """The decode actor crops (bucket key = the crop); with decode gpu the encoder resizes
    and crops the JPEGs it decodes; either way the stage's embeddings are the in-process ones."""
    threads = torch.get_num_threads()
    checkpoint = resolve_checkpoint(str(folder))
    blobs = BLOBS[:6]
    try:
        table = DecodeStage(checkpoint, 10**8, S3Config(), decode=decode)(_rows(blobs))
        batch = {c: table.column(c).to_numpy(zero_copy_only=False) for c in table.column_names}
        assert set(batch["th"]) == set(batch["tw"]) == {32}
        out = EncodeStage(checkpoint, "cpu", "float32", 8, 1)(batch)
    finally:
        torch.set_num_threads(threads)
    assert (out["error"] == "").all()
    encoder = family.load_encoder(CPU, torch.float32)
    [(indices, inputs)] = preprocess_images(family, [PHOTOS[int(i[1:])] for i in out["id"]])
    expected = encoder.encode(inputs).numpy()
    assert np.allclose(out["embedding"][indices], expected, atol=1e-6)
    assert decode == "exact" or batch["encoded"].sum() > 0  # the encoder's decode ran


def test_sharded_hub_layout_embeds_the_same(family, tmp_path):
    sharded = family_for(resolve_checkpoint(str(save_hub_clip(tmp_path, max_shard_size="20KB"))))
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    [(_, inputs)] = preprocess_images(family, PHOTOS[:3])
    images = [f.load_encoder(CPU, torch.float32).encode(inputs) for f in (family, sharded)]
    texts = [f.load_text_encoder(CPU, torch.float32).encode(TEXTS) for f in (family, sharded)]
    assert torch.equal(*images) and torch.equal(*texts)
