"""Region search through the service: ``regions=true`` on every search endpoint, the same hits
as the query CLI's :class:`RegionSearcher`, the info count, and a region index that appears
after the image index is picked up by the reload check."""

from __future__ import annotations

import io
import json

import httpx
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from serve_helpers import CHROMIUM, FLAGS, fake_masks, running, write_out

from vlray.families import family_for, resolve_checkpoint
from vlray.ops.decode import decode_image
from vlray.ops.resize import resize_uint8
from vlray.region_index import build_region_index
from vlray.region_query import RegionSearcher
from vlray.regions import Region, regions_table
from vlray.storage import locate

N_IMAGES = 6  # regions for the first 4 of them, 2 each
MASKED = 4


def _encode(family, encoder, pixels: np.ndarray) -> np.ndarray:
    size = family.target_size(pixels.shape[0], pixels.shape[1])
    resized = resize_uint8(np.ascontiguousarray(pixels), size, family.interpolation)
    return encoder.encode(family.preprocess(torch.from_numpy(resized).permute(2, 0, 1)[None]))[
        0
    ].numpy()


def _write_regions(out, checkpoint, photos) -> None:
    """OUT/regions/part-0.parquet: the fake masks' boxes of the first MASKED photos, each crop
    embedded by the checkpoint, then OUT/index/regions/."""
    family = family_for(resolve_checkpoint(str(checkpoint), weights="pretrained"))
    encoder = family.load_encoder(torch.device("cpu"), torch.float32)
    ids, regions, vectors = [], [], []
    for name, data in photos[:MASKED]:
        pixels = decode_image(data, max_pixels=100_000_000)
        height, width = pixels.shape[:2]
        for mask in fake_masks(height, width):
            x, y, w, h = (int(v) for v in mask["bbox"])
            vectors.append(_encode(family, encoder, pixels[y : y + h, x : x + w]))
            ids.append(name)
            regions.append(
                Region(
                    mask_id=mask["mask_id"],
                    box=(x, y, w, h),
                    area=mask["area"],
                    score=mask["predicted_iou"],
                )
            )
    (out / "regions").mkdir(exist_ok=True)
    table = regions_table(ids, regions, np.stack(vectors).astype(np.float32))
    pq.write_table(table, out / "regions" / "part-0.parquet")
    manifest = json.loads((out / "index" / "manifest.json").read_text())
    fields = {k: manifest[k] for k in ("model", "model_path", "family", "weights", "seed")}
    build_region_index(locate(str(out)), table.column("embedding").type.list_size, 1 << 30, fields)


@pytest.fixture(scope="module")
def region_out(tmp_path_factory, serve_checkpoint, embedded, photos):
    out = tmp_path_factory.mktemp("serve-regions")
    write_out(out, serve_checkpoint, embedded, n=N_IMAGES, thumbs=2, photos=photos, masks=MASKED)
    _write_regions(out, serve_checkpoint, photos)
    return out


@pytest.fixture(scope="module")
def region_server(region_out):
    from vlray.serve import ServeConfig, create_app

    with running(create_app(ServeConfig(index=str(region_out / "index")))) as url:
        yield url


@pytest.fixture(scope="module")
def region_client(region_server):
    with httpx.Client(base_url=region_server, timeout=30) as c:
        yield c


def _regions_of(out):
    table = pq.read_table(out / "regions")
    return table.to_pylist()


def test_info_counts_the_regions(region_client):
    info = region_client.get("/api/info").json()
    assert info["count"] == N_IMAGES and info["regions"] == 2 * MASKED


def test_a_region_vector_finds_itself_first(region_client, region_out):
    rows = _regions_of(region_out)
    for row in rows[:3]:
        body = region_client.post(
            "/api/search/vector", json={"vector": row["embedding"], "k": 3, "regions": True}
        ).json()
        assert body["regions"] is True and body["total_vectors"] == len(rows)
        top = body["hits"][0]
        assert (top["id"], top["mask_id"]) == (row["id"], row["mask_id"])
        assert top["bbox"] == row["bbox"] and top["score"] == pytest.approx(1.0, abs=1e-4)
        assert top["masks"].startswith("/api/masks?id=")  # the page draws the mask from it


def test_service_hits_equal_the_query_cli(region_client, region_out, photos):
    cli = RegionSearcher.open(str(region_out / "index"))
    item_id = photos[1][0]
    want = cli.by_id(item_id, 5)
    got = region_client.get(
        "/api/search/id", params={"id": item_id, "k": 5, "regions": "true"}
    ).json()["hits"]
    assert [(h["id"], h["mask_id"]) for h in got] == [(h["id"], h["mask_id"]) for h in want]
    assert [h["score"] for h in got] == pytest.approx([h["score"] for h in want], abs=1e-6)
    text = region_client.get("/api/search/text", params={"q": "a cat", "regions": "true"})
    assert text.status_code == 200, text.text
    cli_text = cli.by_text("a cat", 10)
    assert [(h["id"], h["mask_id"]) for h in text.json()["hits"]] == [
        (h["id"], h["mask_id"]) for h in cli_text
    ]


def test_per_image_and_pages(region_client, photos):
    params = {"id": photos[0][0], "k": 3, "regions": "true", "per_image": 1}
    hits = region_client.get("/api/search/id", params=params).json()["hits"]
    assert len(hits) == 3 and len({h["id"] for h in hits}) == 3
    first = region_client.get(
        "/api/search/id", params={"id": photos[0][0], "k": 4, "regions": "true"}
    ).json()
    second = region_client.get(
        "/api/search/id",
        params={"id": photos[0][0], "k": 4, "regions": "true", "offset": first["next_offset"]},
    ).json()
    keys = [(h["id"], h["mask_id"]) for h in first["hits"] + second["hits"]]
    assert len(keys) == 2 * MASKED and len(set(keys)) == len(keys)  # every region once
    assert [h["rank"] for h in second["hits"]] == [5, 6, 7, 8] and "next_offset" not in second


def test_image_upload_searches_regions(region_client, photos):
    from PIL import Image

    buf = io.BytesIO()
    Image.open(io.BytesIO(photos[2][1])).convert("RGB").save(buf, "PNG")
    response = region_client.post(
        "/api/search/image",
        params={"k": 2, "regions": "true"},
        files={"file": ("q.png", buf.getvalue(), "image/png")},
    )
    assert response.status_code == 200, response.text
    assert all("mask_id" in h and len(h["bbox"]) == 4 for h in response.json()["hits"])


def test_regions_on_an_index_without_them_is_a_clear_400(client):
    response = client.get("/api/search/text", params={"q": "a cat", "regions": "true"})
    assert response.status_code == 400
    assert "no region index" in response.json()["detail"]
    assert client.get("/api/info").json()["regions"] == 0
    plain = client.get("/api/search/text", params={"q": "a cat"}).json()
    assert "regions" not in plain and all("mask_id" not in h for h in plain["hits"])


def test_region_index_built_after_the_image_index_is_picked_up(
    tmp_path, serve_checkpoint, embedded, photos
):
    from vlray.serve.state import IndexHolder

    write_out(tmp_path, serve_checkpoint, embedded, n=N_IMAGES, masks=MASKED)
    holder = IndexHolder(str(tmp_path / "index"), interval=0)
    assert holder.check() and holder.snapshot.regions is None
    _write_regions(tmp_path, serve_checkpoint, photos)  # the job writes index/regions/ last
    assert holder.check(), "a new region index is a new snapshot"
    assert holder.snapshot.regions.index.count == 2 * MASKED
    assert not holder.check()  # nothing changed since


@pytest.mark.skipif(CHROMIUM is None, reason="no system chromium (apt-get install chromium)")
def test_page_draws_the_region_box_and_only_its_mask(region_server, region_client, photos):
    sync_api = pytest.importorskip("playwright.sync_api")
    item_id = photos[0][0]  # has a thumbnail and masks
    hits = region_client.get(
        "/api/search/id", params={"id": item_id, "k": 8, "regions": "true"}
    ).json()["hits"]
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(f"{region_server}/?id={item_id}&k=8&regions=all")
            page.wait_for_function("document.querySelectorAll('.hit').length === 8")
            assert page.is_visible("#region-box") and page.is_checked("#regions")
            scores = page.locator(".hit .score").all_inner_texts()
            assert [s.rsplit("region ", 1)[1] for s in scores] == [str(h["mask_id"]) for h in hits]
            drawn = [i for i, h in enumerate(hits) if h.get("thumbnail") and h.get("masks")]
            page.wait_for_function(
                f"document.querySelectorAll('.thumb canvas.masks').length === {len(drawn)}"
            )
            first = hits[drawn[0]]
            # the canvas: the hit's mask only, and its box outlined at the canvas's scale
            probe = page.evaluate(
                """([index, bbox, width]) => {
                    const c = document.querySelectorAll('.hit')[index].querySelector('canvas');
                    const s = c.width / width, ctx = c.getContext('2d');
                    const at = (x, y) => Array.from(ctx.getImageData(x, y, 1, 1).data);
                    return {title: c.title, edge: at(Math.floor(bbox[0] * s + 1),
                            Math.floor((bbox[1] + bbox[3] / 2) * s))};
                }""",
                [drawn[0], first["bbox"], first["width"]],
            )
            assert probe["title"] == f"region {first['mask_id']}"
            assert probe["edge"][3] == 255  # the box's outline is opaque
            page.uncheck("#regions")  # back to image hits
            page.wait_for_function(
                "!document.querySelector('.hit .score').textContent.includes('region')"
            )
            assert errors == []
        finally:
            browser.close()
