"""Regions (vlray/regions.py): which masks, which crop, and parity of a region's embedding with
the reference processor + model applied to the same crop of the original, EXIF-oriented image."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image, ImageOps
from transformers import AutoImageProcessor, AutoModel, Qwen2VLForConditionalGeneration

from vlray.families import family_for, resolve_checkpoint
from vlray.families.batch import preprocess_images
from vlray.ops.decode import decode_image
from vlray.ops.rle import masks_to_rle, rle_to_mask
from vlray.regions import (
    Region,
    RegionSettings,
    crop_box,
    image_regions,
    mean_colour,
    regions_table,
    select_masks,
)
from vlray.testing.checkpoints import save_hub_clip, save_hub_dinov2, save_tiny_qwen2_vl
from vlray.testing.images import sample_photos, unusual_images

CPU = torch.device("cpu")


def _record(mask: np.ndarray, mask_id: int, iou: float) -> dict:
    ys, xs = np.nonzero(mask)
    bbox = [
        float(xs.min()),
        float(ys.min()),
        float(xs.max() - xs.min()),
        float(ys.max() - ys.min()),
    ]
    (rle,) = masks_to_rle(torch.from_numpy(mask)[None])
    return {
        "mask_id": mask_id,
        "segmentation": rle,
        "bbox": bbox,
        "area": int(mask.sum()),
        "predicted_iou": iou,
    }


def _ellipse(height: int, width: int, cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    y, x = np.mgrid[:height, :width]
    return ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1.0


def _records(height: int, width: int) -> list[dict]:
    return [
        _record(
            _ellipse(height, width, height * 0.5, width * 0.4, height * 0.2, width * 0.25), 0, 0.8
        ),
        _record(
            _ellipse(height, width, height * 0.2, width * 0.8, height * 0.1, width * 0.1), 1, 0.95
        ),
        _record(_ellipse(height, width, height * 0.9, width * 0.1, 2, 2), 2, 0.99),  # tiny
    ]


def test_select_masks_best_first_skipping_small_ones():
    records = _records(120, 160)
    kept = select_masks(records, 120, 160, RegionSettings(min_area=0.01))
    assert [r["mask_id"] for r in kept] == [1, 0]  # 2 is under 1% of the image
    assert [r["mask_id"] for r in select_masks(records, 120, 160, RegionSettings(min_area=0))] == [
        2,
        1,
        0,
    ]
    one = select_masks(records, 120, 160, RegionSettings(max_per_image=1, min_area=0))
    assert [r["mask_id"] for r in one] == [2]


def test_crop_box_grows_clamps_and_rounds_outward():
    assert crop_box([10.0, 20.0, 30.0, 40.0], 100, 100, 0.1) == (7, 16, 36, 48)
    assert crop_box([10.5, 20.2, 30.0, 40.0], 100, 100, 0.0) == (10, 20, 31, 41)
    assert crop_box([0.0, 0.0, 100.0, 50.0], 50, 100, 0.5) == (0, 0, 100, 50)  # clamped
    assert crop_box([99.0, 49.0, 0.0, 0.0], 50, 100, 0.1) == (99, 49, 1, 1)  # a one-pixel mask


def test_settings_are_checked():
    from vlray.config import ConfigError, build_config

    base = {"input": {"uri": "x"}, "model": {"name": "m"}}
    bad = {"background": "grey", "max_per_image": 0, "min_area": 2.0, "enabled": True}
    with pytest.raises(ConfigError) as err:
        build_config(None, {**base, "regions": bad})
    text = str(err.value)
    for expected in (
        "regions.background: 'grey' is not keep or gray",
        "regions.max_per_image: must be >= 1",
        "regions.min_area: 2.0 is not in [0, 1]",
        "regions.enabled: needs sam.name",
    ):
        assert expected in text, text
    config = build_config(None, {**base, "sam": {"name": "s"}, "regions": {"enabled": "true"}})
    assert config.regions.enabled and config.regions.max_per_image == 16


def test_gray_background_fills_outside_the_mask_only():
    frame = np.random.default_rng(0).integers(0, 256, (60, 80, 3), dtype=np.uint8)
    records = _records(60, 80)
    settings = RegionSettings(background="gray", context=0.2)
    regions = image_regions(
        frame, records, settings, image_mean=(0.48145466, 0.4578275, 0.40821073)
    )
    fill = mean_colour((0.48145466, 0.4578275, 0.40821073))
    assert fill.tolist() == [123, 117, 104]  # CLIP's mean colour
    for region, pixels in regions:
        x, y, w, h = region.box
        record = next(r for r in records if r["mask_id"] == region.mask_id)
        mask = _ellipse(60, 80, *_params(records, region.mask_id))[y : y + h, x : x + w]
        assert pixels.shape == (h, w, 3)
        np.testing.assert_array_equal(pixels[mask], frame[y : y + h, x : x + w][mask])
        assert (pixels[~mask] == fill).all() and (~mask).any()
        assert region.area == record["area"]


def _params(records, mask_id):
    h, w = 60, 80
    return {
        0: (h * 0.5, w * 0.4, h * 0.2, w * 0.25),
        1: (h * 0.2, w * 0.8, h * 0.1, w * 0.1),
        2: (h * 0.9, w * 0.1, 2, 2),
    }[mask_id]


def test_regions_table_schema():
    regions = [Region(3, (1, 2, 3, 4), 10, 0.9), Region(5, (0, 0, 8, 8), 64, 0.7)]
    vectors = np.eye(2, 4, dtype=np.float32)
    table = regions_table(["a", "a"], regions, vectors)
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 4)
    assert table.column("bbox").to_pylist() == [[1, 2, 3, 4], [0, 0, 8, 8]]
    assert table.column("mask_id").to_pylist() == [3, 5]


@pytest.fixture(scope="module")
def folders(siglip2_checkpoint, siglip_checkpoint, tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("region-families")
    return {
        "siglip2": siglip2_checkpoint,
        "siglip": siglip_checkpoint,
        "clip": save_hub_clip(tmp / "clip"),
        "dinov2": save_hub_dinov2(tmp / "dinov2"),
        "qwen2_vl": save_tiny_qwen2_vl(tmp / "qwen2_vl"),
    }


def _reference(kind: str, folder: Path, crops: list[Image.Image]) -> torch.Tensor:
    processor = AutoImageProcessor.from_pretrained(folder)
    if kind == "qwen2_vl":  # mean-pooled merged vision tokens, as tests/families/test_qwen2_vl.py
        model = Qwen2VLForConditionalGeneration.from_pretrained(folder, dtype=torch.float32)
        with torch.no_grad():
            pooled = []
            for crop in crops:
                ref = processor(images=[crop], return_tensors="pt")
                tokens = (
                    model.eval()
                    .get_image_features(ref["pixel_values"], ref["image_grid_thw"])
                    .pooler_output
                )
                pooled.append(torch.cat(list(tokens)).mean(0, keepdim=True))
        return torch.nn.functional.normalize(torch.cat(pooled), dim=-1)
    model = AutoModel.from_pretrained(folder).eval()
    out = []
    with torch.no_grad():
        for crop in crops:
            inputs = processor(images=[crop], return_tensors="pt")
            if kind == "dinov2":
                pooled = model(**inputs).pooler_output
            else:
                pooled = model.get_image_features(**inputs).pooler_output
            out.append(torch.nn.functional.normalize(pooled, dim=-1))
    return torch.cat(out)


@pytest.mark.parametrize("kind", ["siglip2", "siglip", "clip", "dinov2", "qwen2_vl"])
@pytest.mark.parametrize("background", ["keep", "gray"])
def test_region_embeddings_match_the_reference_on_the_same_crop(kind, background, folders):
    folder = folders[kind]
    family = family_for(resolve_checkpoint(str(folder)))
    encoder = family.load_encoder(CPU, torch.float32)
    blobs = [sample_photos(2, seed=21)[0][1], unusual_images()["exif_rotated.jpg"]]
    ours, crops = [], []
    mean = AutoImageProcessor.from_pretrained(folder).image_mean
    settings = RegionSettings(background=background, min_area=0.0, context=0.1)
    for blob in blobs:
        frame = decode_image(blob, max_pixels=10**8)
        original = ImageOps.exif_transpose(Image.open(io.BytesIO(blob))).convert("RGB")
        assert original.size == (frame.shape[1], frame.shape[0])
        records = _records(*frame.shape[:2])
        for region, pixels in image_regions(frame, records, settings, image_mean=mean):
            x, y, w, h = region.box
            crop = original.crop((x, y, x + w, y + h))
            if background == "gray":
                (rle,) = [r["segmentation"] for r in records if r["mask_id"] == region.mask_id]
                inside = rle_to_mask(rle)[y : y + h, x : x + w]
                arr = np.array(crop)
                arr[~inside] = mean_colour(mean)
                crop = Image.fromarray(arr)
            crops.append(crop)
            ours.append(pixels)
    assert len(ours) == 6
    got = torch.empty(len(ours), family.embedding_dim)
    for indices, inputs in preprocess_images(family, ours):
        got[indices] = encoder.encode(inputs)
    expected = _reference(kind, folder, crops)
    assert torch.allclose(got.norm(dim=-1), torch.ones(len(ours)), atol=1e-5)
    assert (got * expected).sum(dim=-1).min().item() >= 0.999
