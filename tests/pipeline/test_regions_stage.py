"""The region stage on a batch as the mask stage hands it on (no Ray): regions per row, crops
grouped by shape across rows, embeddings equal to each crop embedded alone, errors untouched."""

from __future__ import annotations

import json

import numpy as np
import torch

from vlray.families import family_for, resolve_checkpoint
from vlray.families.batch import preprocess_images
from vlray.ops.decode import decode_image
from vlray.ops.rle import masks_to_rle
from vlray.pipeline.regions_stage import RegionStage, encode_regions, read_regions_cell
from vlray.regions import RegionSettings
from vlray.testing.images import sample_photos


def _records(h: int, w: int) -> list[dict]:
    y, x = np.mgrid[:h, :w]
    out = []
    for k, (cy, cx, ry, rx, iou) in enumerate(
        [(0.5, 0.5, 0.3, 0.3, 0.9), (0.25, 0.7, 0.15, 0.2, 0.95), (0.8, 0.2, 0.1, 0.1, 0.5)]
    ):
        mask = ((y - cy * h) / (ry * h)) ** 2 + ((x - cx * w) / (rx * w)) ** 2 <= 1
        ys, xs = np.nonzero(mask)
        (rle,) = masks_to_rle(torch.from_numpy(mask)[None])
        bbox = [float(xs.min()), float(ys.min()), float(np.ptp(xs)), float(np.ptp(ys))]
        out.append(
            {
                "mask_id": k,
                "segmentation": rle,
                "bbox": bbox,
                "area": int(mask.sum()),
                "predicted_iou": iou,
            }
        )
    return out


def test_region_stage_rows(siglip2_checkpoint):
    checkpoint = resolve_checkpoint(str(siglip2_checkpoint))
    settings = RegionSettings(enabled=True, max_per_image=2, min_area=0.0)
    stage = RegionStage(checkpoint, "cpu", "float32", settings)
    frames = [decode_image(b, max_pixels=10**8) for _, b in sample_photos(3, seed=2)]
    masks = [json.dumps(_records(*f.shape[:2])) for f in frames]
    masks[1] = "[]"  # an image SAM found nothing in
    batch = {
        "id": np.array(["a", "b", "c", "bad"], dtype=object),
        "error": np.array(["", "", "", "decode failed"], dtype=object),
        "masks": np.array(masks + [""], dtype=object),
        "height": np.array([f.shape[0] for f in frames] + [0]),
        "width": np.array([f.shape[1] for f in frames] + [0]),
        "frame": np.array([f.tobytes() for f in frames] + [b""], dtype=object),
    }
    out = stage(batch)
    assert "frame" not in out and out["region_count"].tolist() == [2, 0, 2, 0]
    assert out["regions"][1] == b"" and out["regions"][3] == b""
    family = family_for(checkpoint)
    encoder = family.load_encoder(torch.device("cpu"), torch.float32)
    for row in (0, 2):
        table = read_regions_cell(out["regions"][row])
        assert table.column("id").to_pylist() == [batch["id"][row]] * 2
        assert table.column("mask_id").to_pylist() == [1, 0]  # best predicted IoU first
        for bbox, vector in zip(
            table.column("bbox").to_pylist(), table.column("embedding").to_pylist(), strict=True
        ):
            x, y, w, h = map(int, bbox)
            assert [x, y, w, h] == bbox  # whole pixels
            crop = frames[row][y : y + h, x : x + w]
            ((_, inputs),) = preprocess_images(family, [crop])
            alone = encoder.encode(inputs)[0].numpy()
            assert float(np.dot(alone, vector)) >= 0.9999


def test_crops_the_model_refuses_are_skipped(tmp_path):
    from vlray.testing.checkpoints import save_tiny_qwen2_vl

    family = family_for(resolve_checkpoint(str(save_tiny_qwen2_vl(tmp_path / "qwen"))))
    encoder = family.load_encoder(torch.device("cpu"), torch.float32)
    crops = [np.zeros((56, 84, 3), np.uint8), np.zeros((2, 600, 3), np.uint8)]  # 1:300 refused
    vectors, accepted = encode_regions(family, encoder, crops)
    assert accepted.tolist() == [True, False]
    assert abs(np.linalg.norm(vectors[0]) - 1) < 1e-5 and not vectors[1].any()
    vectors, accepted = encode_regions(family, encoder, [])
    assert vectors.shape == (0, family.embedding_dim) and accepted.shape == (0,)
