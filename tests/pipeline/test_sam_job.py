"""SAM in the job: masks alone, and one pass with an embedding model (decode once, two models)."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from vlray.config import build_config
from vlray.families import resolve_checkpoint
from vlray.ops.decode import decode_image
from vlray.ops.rle import rle_to_mask
from vlray.pipeline.job import run_job
from vlray.schema import MASKS_SCHEMA
from vlray.testing.checkpoints import save_tiny_sam
from vlray.testing.images import bad_images, sample_photos

pytestmark = pytest.mark.slow

SAM_FAST = {
    "points_per_side": 4,
    "points_per_batch": 16,
    "pred_iou_thresh": 0.0,
    "stability_score_thresh": 0.0,
    "box_nms_thresh": 0.999,
}


@pytest.fixture(scope="module")
def sam_checkpoint(tmp_path_factory):
    return save_tiny_sam(tmp_path_factory.mktemp("ckpt") / "tiny-sam")


def _photos():
    out = []
    for name, blob in sample_photos(12, seed=3):
        image = decode_image(blob, max_pixels=10**9)
        if 200 <= max(image.shape[:2]) <= 800:
            out.append((name, blob, image))
    return out[:3]


def _prompted_input(path, photos):
    """Row 0: points + labels (2 objects); row 1: boxes (2 objects); row 2: no prompts; bad row."""
    (_, b0, i0), (_, b1, i1), (_, b2, _) = photos
    h0, w0 = i0.shape[:2]
    h1, w1 = i1.shape[:2]
    table = pa.table(
        {
            "id": ["points", "boxes", "auto", "broken"],
            "image": pa.array([b0, b1, b2, bad_images()["truncated.jpg"]], pa.binary()),
            "points": pa.array(
                [
                    [
                        [[w0 * 0.3, h0 * 0.4], [w0 * 0.6, h0 * 0.5]],
                        [[w0 * 0.8, h0 * 0.2], [w0 * 0.1, h0 * 0.9]],
                    ],
                    None,
                    None,
                    None,
                ],
                pa.list_(pa.list_(pa.list_(pa.float32()))),
            ),
            "labels": pa.array(
                [[[1, 0], [1, 1]], None, None, None], pa.list_(pa.list_(pa.int64()))
            ),
            "boxes": pa.array(
                [
                    None,
                    [[w1 * 0.1, h1 * 0.1, w1 * 0.6, h1 * 0.7], [0.0, 0.0, w1 - 1.0, h1 - 1.0]],
                    None,
                    None,
                ],
                pa.list_(pa.list_(pa.float32())),
            ),
        }
    )
    pq.write_table(table, path)


@pytest.fixture(scope="module")
def one_pass(siglip2_checkpoint, sam_checkpoint, ray_local, tmp_path_factory):
    """Embeddings, masks, regions (at most 4 per image) and 48-pixel thumbnails in one job over
    the prompted input."""
    tmp_path = tmp_path_factory.mktemp("one-pass")
    photos = _photos()
    _prompted_input(tmp_path / "in.parquet", photos)
    out = tmp_path / "out"
    config = build_config(
        None,
        {
            "input": {"uri": str(tmp_path / "in.parquet")},
            "output": {"uri": str(out), "thumbnails": 48},
            "model": {"name": str(siglip2_checkpoint)},
            "sam": {"name": str(sam_checkpoint), **SAM_FAST},
            "regions": {"enabled": True, "max_per_image": 4, "min_area": 0.0},
        },
    )
    return tmp_path, out, run_job(config)


def test_one_pass_embeddings_and_masks(sam_checkpoint, one_pass):
    from transformers import SamImageProcessor, SamModel, SamProcessor

    tmp_path, out, summary = one_pass
    assert (summary["rows_in"], summary["embedded"], summary["errors"]) == (4, 3, 1)
    assert summary["segmented"] == 3 and summary["accounted"]
    masks = pa.concat_tables([pq.read_table(f) for f in (out / "masks").glob("*.parquet")])
    assert masks.schema.equals(MASKS_SCHEMA)
    assert summary["masks"] == masks.num_rows
    by_id = {}
    for row in masks.to_pylist():
        by_id.setdefault(row["id"], []).append(row)
    assert len(by_id["points"]) == 2 * 3 and len(by_id["boxes"]) == 2 * 3  # 3 masks per prompt
    assert {r["prompt_index"] for r in by_id["points"]} == {0, 1}
    assert all(r["point"] is not None and r["prompt_index"] is None for r in by_id.get("auto", []))
    assert "broken" not in by_id
    for row in masks.to_pylist():
        mask = rle_to_mask(row["segmentation"])
        assert int(mask.sum()) == row["area"]
    emb_ids = pq.read_table(next((out / "embeddings").glob("*.parquet"))).column("id").to_pylist()
    assert sorted(emb_ids) == ["auto", "boxes", "points"]

    # the prompted masks agree with SamProcessor + SamModel + post_process_masks
    processor = SamProcessor(image_processor=SamImageProcessor.from_pretrained(sam_checkpoint))
    model = SamModel.from_pretrained(sam_checkpoint).eval()
    table = pq.read_table(tmp_path / "in.parquet").to_pylist()
    row = table[0]
    image = Image.open(io.BytesIO(row["image"])).convert("RGB")
    inputs = processor(
        images=image,
        input_points=[row["points"]],
        input_labels=[row["labels"]],
        return_tensors="pt",
    )
    with torch.inference_mode():
        ref = model(**inputs)
    ref_masks = processor.post_process_masks(
        ref.pred_masks, inputs["original_sizes"], inputs["reshaped_input_sizes"]
    )[0]
    ref_masks = ref_masks.flatten(0, 1).numpy()
    ours = sorted(by_id["points"], key=lambda r: r["mask_id"])
    for got, expected in zip(ours, ref_masks, strict=True):
        mask = rle_to_mask(got["segmentation"])
        union = np.logical_or(mask, expected).sum()
        iou = np.logical_and(mask, expected).sum() / union if union else 1.0
        assert iou >= 0.99


def test_regions_follow_their_masks_and_match_the_reference(siglip2_checkpoint, one_pass):
    """Each region: one of its image's masks (best predicted IoU first), the mask's box grown
    by 10% a side, and the reference processor + model's embedding of that crop."""
    from transformers import AutoImageProcessor, AutoModel

    from vlray.regions import crop_box, regions_schema

    tmp_path, out, summary = one_pass
    regions = pa.concat_tables([pq.read_table(f) for f in (out / "regions").glob("*.parquet")])
    masks = pa.concat_tables([pq.read_table(f) for f in (out / "masks").glob("*.parquet")])
    assert regions.schema.equals(regions_schema(32)) and summary["regions"] == regions.num_rows
    by_mask = {(r["id"], r["mask_id"]): r for r in masks.to_pylist()}
    rows = regions.to_pylist()
    assert {r["id"] for r in rows} == {r["id"] for r in masks.to_pylist()} - {"broken"}
    source = {r["id"]: r["image"] for r in pq.read_table(tmp_path / "in.parquet").to_pylist()}
    processor = AutoImageProcessor.from_pretrained(siglip2_checkpoint)
    model = AutoModel.from_pretrained(siglip2_checkpoint).eval()
    for item_id in {r["id"] for r in rows}:
        mine = [r for r in rows if r["id"] == item_id]
        theirs = sorted(
            (m for (i, _), m in by_mask.items() if i == item_id),
            key=lambda m: (-m["predicted_iou"], m["mask_id"]),
        )
        assert [r["mask_id"] for r in mine] == [m["mask_id"] for m in theirs[:4]]
        original = Image.open(io.BytesIO(source[item_id])).convert("RGB")
        for region in mine:
            mask = by_mask[(item_id, region["mask_id"])]
            h, w = original.height, original.width
            assert tuple(region["bbox"]) == crop_box(mask["bbox"], h, w, 0.1)
            assert region["area"] == mask["area"]
            x, y, bw, bh = map(int, region["bbox"])
            crop = original.crop((x, y, x + bw, y + bh))
            with torch.no_grad():
                expected = model.get_image_features(**processor(images=[crop], return_tensors="pt"))
            expected = torch.nn.functional.normalize(expected.pooler_output, dim=-1)[0]
            assert float(torch.dot(expected, torch.tensor(region["embedding"]))) >= 0.999


def test_region_queries(one_pass, capsys):
    """``jobs/query.py --regions``: the best regions (several per image, or --per-image N),
    scored against the regions' own embeddings; --id searches with the image's vector."""
    from vlray.cli import query_main
    from vlray.query import Searcher

    _, out, summary = one_pass
    regions = pa.concat_tables([pq.read_table(f) for f in (out / "regions").glob("*.parquet")])
    assert summary["region_index"]["count"] == regions.num_rows
    vectors = {
        (r["id"], r["mask_id"]): (np.asarray(r["embedding"]), r["bbox"])
        for r in regions.to_pylist()
    }
    index = str(out / "index")
    text = Searcher.open(index).family.load_text_encoder(torch.device("cpu"), torch.float32)
    query = text.encode(["a red bicycle"])[0].numpy()
    assert (
        query_main(["--index", index, "--regions", "--text", "a red bicycle", "-k", "50", "--json"])
        == 0
    )
    hits = json.loads(capsys.readouterr().out)
    assert len(hits) == regions.num_rows  # k over the count: every region once
    assert {(h["id"], h["mask_id"]) for h in hits} == set(vectors)
    expected = sorted((float(v @ query) for v, _ in vectors.values()), reverse=True)
    np.testing.assert_allclose([h["score"] for h in hits], expected, atol=1e-4)  # best first
    for hit in hits:
        vector, bbox = vectors[(hit["id"], hit["mask_id"])]
        assert hit["bbox"] == bbox and abs(hit["score"] - float(vector @ query)) < 1e-4
    assert (
        query_main(["--index", index, "--regions", "--per-image", "1", "--id", "points", "--json"])
        == 0
    )
    hits = json.loads(capsys.readouterr().out)
    assert len({h["id"] for h in hits}) == len(hits) == len({i for i, _ in vectors})
    image_vector = np.asarray(Searcher.open(index).index.vector("points"))
    best = max(float(v @ image_vector) for v, _ in vectors.values())
    assert abs(hits[0]["score"] - best) < 1e-4


def test_thumbnails_and_masks_are_served(one_pass):
    """``output.thumbnails``: one JPEG per embedded row (none for the error row), and the query
    service links and serves them and the masks (``/api/masks`` = the row's ``masks/`` rows)."""
    from fastapi.testclient import TestClient

    from vlray.schema import thumbnail_name
    from vlray.serve import ServeConfig, create_app

    tmp_path, out, summary = one_pass
    assert summary["thumbnails"] == 3
    source = {r["id"]: r["image"] for r in pq.read_table(tmp_path / "in.parquet").to_pylist()}
    names = {thumbnail_name(i): i for i in ("points", "boxes", "auto")}
    assert sorted(p.name for p in (out / "thumbnails").iterdir()) == sorted(names)
    for name, item_id in names.items():
        thumb = Image.open(out / "thumbnails" / name)
        original = decode_image(source[item_id], max_pixels=10**9)
        h, w = original.shape[:2]
        assert thumb.format == "JPEG" and max(thumb.size) == 48
        assert abs(thumb.width / thumb.height - w / h) < 0.05

    masks = pa.concat_tables([pq.read_table(f) for f in (out / "masks").glob("*.parquet")])
    expected = {}
    for row in masks.to_pylist():
        expected.setdefault(row.pop("id"), []).append(row)
    with TestClient(create_app(ServeConfig(index=str(out / "index")))) as client:
        info = client.get("/api/info").json()
        assert info["thumbnails"] is True and info["masks"] == len(expected)
        hits = client.get("/api/search/id", params={"id": "points", "k": 3}).json()["hits"]
        assert {h["id"] for h in hits} == {"points", "boxes", "auto"}
        for hit in hits:
            assert hit["thumbnail"].startswith("/api/thumbnail?id=")
            image = client.get(hit["thumbnail"])
            assert image.status_code == 200 and image.headers["content-type"] == "image/jpeg"
            assert image.content == (out / "thumbnails" / thumbnail_name(hit["id"])).read_bytes()
            if hit["id"] not in expected:
                assert "masks" not in hit
                assert client.get(f"/api/masks?id={hit['id']}").status_code == 404
                continue
            body = client.get(hit["masks"]).json()
            assert body["id"] == hit["id"] and (body["width"], body["height"]) == (
                hit["width"],
                hit["height"],
            )
            got = [{k: v for k, v in m.items() if v is not None} for m in body["masks"]]
            want = [{k: v for k, v in m.items() if v is not None} for m in expected[hit["id"]]]
            assert got == want
        assert client.get("/api/masks", params={"id": "broken"}).status_code == 404
        assert client.get("/api/masks", params={"id": "nope"}).status_code == 404


def test_sam_alone_and_incremental(sam_checkpoint, ray_local, tmp_path):
    photos = _photos()
    pq.write_table(
        pa.table(
            {
                "id": [n for n, _, _ in photos],
                "image": pa.array([b for _, b, _ in photos], pa.binary()),
            }
        ),
        tmp_path / "in.parquet",
    )
    out = tmp_path / "out"
    overrides = {
        "input": {"uri": str(tmp_path / "in.parquet")},
        "output": {"uri": str(out)},
        "model": {"name": str(sam_checkpoint)},
        "sam": SAM_FAST,
    }
    summary = run_job(build_config(None, overrides))
    assert (summary["rows_in"], summary["segmented"], summary["errors"]) == (3, 3, 0)
    assert summary["accounted"] and summary["index"] is None and summary["family"] == "sam"
    assert not (out / "embeddings").exists() and not (out / "index").exists()
    again = run_job(build_config(None, overrides))
    assert (again["rows_in"], again["skipped_done"]) == (0, 3)


def test_decode_stage_decodes_once_for_two_models(siglip2_checkpoint, sam_checkpoint, monkeypatch):
    from vlray.config import S3Config
    from vlray.pipeline import stages
    from vlray.schema import ROW_SCHEMA

    calls = []
    real = stages.decode_pixels
    monkeypatch.setattr(
        stages, "decode_pixels", lambda data, **kw: calls.append(1) or real(data, **kw)
    )
    photos = _photos()
    stage = stages.DecodeStage(
        resolve_checkpoint(str(siglip2_checkpoint)),
        10**8,
        S3Config(),
        resolve_checkpoint(str(sam_checkpoint)),
    )
    rows = pa.table(
        {
            "id": [n for n, _, _ in photos],
            "source": ["x"] * len(photos),
            "data": [b for _, b, _ in photos],
            "uri": [""] * len(photos),
            "error": [""] * len(photos),
            "stage": [""] * len(photos),
            "prompts": [""] * len(photos),
        },
        schema=ROW_SCHEMA,
    )
    out = stage(rows)
    assert len(calls) == len(photos)
    for row in out.to_pylist():
        assert max(row["sam_th"], row["sam_tw"]) == 1024
        assert len(row["sam_pixels"]) == row["sam_th"] * row["sam_tw"] * 3
        assert len(row["pixels"]) == row["th"] * row["tw"] * 3


def test_regions_incremental_run_adds_to_the_region_index(
    siglip2_checkpoint, sam_checkpoint, ray_local, tmp_path
):
    """A scheduled rerun over a folder that gained an image: its regions are added to
    index/regions/ (not rebuilt), each region once, and the index matches regions/."""
    photos = _photos()
    folder = tmp_path / "photos"
    folder.mkdir()
    overrides = {
        "input": {"uri": str(folder)},
        "output": {"uri": str(tmp_path / "out")},
        "model": {"name": str(siglip2_checkpoint)},
        "sam": {"name": str(sam_checkpoint), **SAM_FAST},
        "regions": {"enabled": True, "max_per_image": 3, "min_area": 0.0},
    }
    modes, counts = [], []
    for batch in (photos[:1], photos[1:2]):
        for name, blob, _ in batch:
            (folder / f"{name}.jpg").write_bytes(blob)
        summary = run_job(build_config(None, overrides))
        assert summary["accounted"] and summary["embedded"] == len(batch)
        modes.append(summary["region_index"]["mode"])
        counts.append(summary["region_index"]["count"])
    regions = pa.concat_tables(
        [pq.read_table(f) for f in (tmp_path / "out" / "regions").glob("*.parquet")]
    )
    assert modes == ["rebuild", "add"] and counts[-1] == regions.num_rows > counts[0]
    index = tmp_path / "out" / "index" / "regions"
    meta = pq.read_table(index / "regions.parquet").to_pylist()
    ids = pq.read_table(index / "ids.parquet").column("id").to_pylist()
    assert ids == [json.dumps([m["id"], m["mask_id"]]) for m in meta]
    assert sorted(ids) == sorted(json.dumps([r["id"], r["mask_id"]]) for r in regions.to_pylist())
