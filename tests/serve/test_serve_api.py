"""The search API over real HTTP: every endpoint, bad inputs, API key, metrics."""

from __future__ import annotations

import hashlib
import statistics
import time

import httpx
import numpy as np
import pytest
from serve_helpers import fake_masks

from vlray.ops.rle import rle_to_mask
from vlray.testing.images import bad_images

MAX_PIXELS = 4_000_000


def test_health_ready_info(client, photos):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["count"] == len(photos)
    info = client.get("/api/info").json()
    assert info["count"] == len(photos) and info["dim"] == 32
    assert info["text_search"] is True and info["thumbnails"] is True
    assert info["api_key_required"] is False


def test_openapi_schema(client):
    schema = client.get("/openapi.json").json()
    paths = schema["paths"]
    for path in (
        "/api/search/text",
        "/api/search/image",
        "/api/search/id",
        "/api/search/vector",
        "/api/item",
        "/api/thumbnail",
        "/healthz",
        "/readyz",
        "/metrics",
    ):
        assert path in paths, path
    assert client.get("/docs").status_code == 200


def test_search_by_id(client, photos, embedded):
    ids, _, widths, heights = embedded
    r = client.get("/api/search/id", params={"id": ids[3], "k": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["kind"] == "id" and len(body["hits"]) == 5
    top = body["hits"][0]
    assert top["id"] == ids[3] and top["score"] == pytest.approx(1.0, abs=1e-5)
    assert (top["width"], top["height"]) == (widths[3], heights[3])
    assert "probability" not in top
    scores = [h["score"] for h in body["hits"]]
    assert scores == sorted(scores, reverse=True)
    assert [h["rank"] for h in body["hits"]] == [1, 2, 3, 4, 5]
    assert body["next_offset"] == 5


def test_paging_and_threshold(client, embedded):
    ids = embedded[0]
    full = client.get("/api/search/id", params={"id": ids[0], "k": 20}).json()["hits"]
    page = client.get("/api/search/id", params={"id": ids[0], "k": 5, "offset": 5}).json()
    assert [h["id"] for h in page["hits"]] == [h["id"] for h in full[5:10]]
    assert page["hits"][0]["rank"] == 6
    last = client.get("/api/search/id", params={"id": ids[0], "k": 5, "offset": 18}).json()
    assert len(last["hits"]) == 2 and last.get("next_offset") is None
    cut = full[3]["score"]
    th = client.get("/api/search/id", params={"id": ids[0], "k": 20, "min_score": cut}).json()
    assert all(h["score"] >= cut for h in th["hits"]) and len(th["hits"]) >= 4
    assert th.get("next_offset") is None


def test_thumbnails(client, embedded):
    ids = embedded[0]
    hits = client.get("/api/search/id", params={"id": ids[0], "k": 20}).json()["hits"]
    with_thumb = {h["id"] for h in hits if "thumbnail" in h}
    assert with_thumb == set(ids[:5])
    link = next(h["thumbnail"] for h in hits if h["id"] == ids[0])
    r = client.get(link)
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    assert r.content[:2] == b"\xff\xd8"
    assert client.get("/api/thumbnail", params={"id": ids[10]}).status_code == 404
    # the id is hashed, never used as a path
    for evil in ("../../etc/passwd", "/etc/passwd", hashlib.sha1(b"x").hexdigest()):
        r = client.get("/api/thumbnail", params={"id": evil})
        assert r.status_code == 404 and "detail" in r.json()
    item = client.get("/api/item", params={"id": ids[1]}).json()
    assert item["id"] == ids[1] and item["thumbnail"].startswith("/api/thumbnail?id=")
    assert client.get("/api/item", params={"id": "nope"}).status_code == 404


def test_masks(client, embedded):
    """Hits link the masks of the ids that have some; /api/masks returns the masks/ rows."""
    ids, _, widths, heights = embedded
    assert client.get("/api/info").json()["masks"] == 3
    hits = client.get("/api/search/id", params={"id": ids[0], "k": 20}).json()["hits"]
    assert {h["id"] for h in hits if "masks" in h} == set(ids[:3])
    for i in range(3):
        link = next(h["masks"] for h in hits if h["id"] == ids[i])
        body = client.get(link).json()
        assert (body["id"], body["width"], body["height"]) == (ids[i], widths[i], heights[i])
        expected = fake_masks(heights[i], widths[i])
        assert [m["mask_id"] for m in body["masks"]] == [0, 1]
        for got, want in zip(body["masks"], expected, strict=True):
            assert got["segmentation"] == want["segmentation"]
            assert np.array_equal(
                rle_to_mask(got["segmentation"]), rle_to_mask(want["segmentation"])
            )
            assert got["bbox"] == want["bbox"] and got["area"] == want["area"]
            assert got["predicted_iou"] == pytest.approx(want["predicted_iou"])
        item = client.get("/api/item", params={"id": ids[i]}).json()
        assert item["masks"] == link
    for missing in (ids[5], "nope", "../masks/part-0.parquet"):
        r = client.get("/api/masks", params={"id": missing})
        assert r.status_code == 404 and "detail" in r.json()
    assert "masks" not in client.get("/api/item", params={"id": ids[5]}).json()


def test_search_by_text(client):
    r = client.get("/api/search/text", params={"q": "a photo of a red car", "k": 4})
    assert r.status_code == 200, r.text
    hits = r.json()["hits"]
    assert len(hits) == 4
    for h in hits:
        assert 0.0 <= h["probability"] <= 1.0 and -1.0 <= h["score"] <= 1.0


def test_search_by_image(client, photos, embedded):
    name, data = photos[2]
    r = client.post(
        "/api/search/image", params={"k": 3}, files={"file": ("q.jpg", data, "image/jpeg")}
    )
    assert r.status_code == 200, r.text
    top = r.json()["hits"][0]
    # same bytes, same preprocessing and model as the index: the photo finds itself
    assert top["id"] == name and top["score"] == pytest.approx(1.0, abs=1e-4)


def test_search_by_vector(client, embedded):
    ids, vectors = embedded[0], embedded[1]
    r = client.post("/api/search/vector", json={"vector": (vectors[7] * 3).tolist(), "k": 2})
    assert r.status_code == 200, r.text
    assert r.json()["hits"][0]["id"] == ids[7]


@pytest.mark.parametrize("name", sorted(bad_images(MAX_PIXELS)))
def test_bad_uploads(client, name):
    data = bad_images(MAX_PIXELS)[name]
    r = client.post("/api/search/image", files={"file": (name, data, "image/jpeg")})
    expected = {
        "empty.jpg": 400,
        "random.jpg": 415,
        "truncated.jpg": 400,
        "corrupt.png": 400,
        "bomb.png": 413,
        "text.txt.jpg": 415,
    }[name]
    assert r.status_code == expected, r.text
    assert isinstance(r.json()["detail"], str)


def test_huge_and_wrong_uploads(client):
    huge = b"\xff\xd8" + b"\0" * (3 << 20)
    r = client.post("/api/search/image", files={"file": ("big.jpg", huge, "image/jpeg")})
    assert r.status_code == 413 and "too large" in r.json()["detail"]
    r = client.post(
        "/api/search/image", files={"file": ("notes.txt", b"hello world\n", "text/plain")}
    )
    assert r.status_code == 415
    r = client.post("/api/search/image", data={"nothing": "here"})
    assert r.status_code == 422
    r = client.post("/api/search/image", content=b"raw", headers={"content-type": "image/jpeg"})
    assert r.status_code == 422


def test_bad_queries(client, embedded):
    ids = embedded[0]
    cases = [
        (client.get("/api/search/id", params={"id": "no-such-id"}), 404),
        (client.get("/api/search/id", params={"id": ids[0], "k": 0}), 422),
        (client.get("/api/search/id", params={"id": ids[0], "k": 10000}), 422),
        (client.get("/api/search/id", params={"id": ids[0], "k": "ten"}), 422),
        (client.get("/api/search/id", params={"id": ids[0], "offset": -1}), 422),
        (client.get("/api/search/id", params={"id": ids[0], "min_score": 2}), 422),
        (client.get("/api/search/id"), 422),
        (client.get("/api/search/text", params={"q": ""}), 422),
        (client.get("/api/search/text", params={"q": "   "}), 422),
        (client.get("/api/search/text", params={"q": "x" * 5000}), 422),
        (client.get("/api/search/text", params={"q": "cat", "k": 10000}), 422),
        (client.post("/api/search/vector", json={"vector": [0.1] * 31}), 422),
        (client.post("/api/search/vector", json={"vector": [0.0] * 32}), 422),
        (client.post("/api/search/vector", json={"vector": []}), 422),
        (client.post("/api/search/vector", json={"vector": [1.0] * 32, "k": 0}), 422),
        (
            client.post(
                "/api/search/vector",
                content=b"{not json",
                headers={"content-type": "application/json"},
            ),
            422,
        ),
        (client.post("/api/search/vector", json={"vector": "abc"}), 422),
        (client.get("/api/nope"), 404),
        (client.delete("/api/search/id"), 405),
    ]
    for i, (r, status) in enumerate(cases):
        assert r.status_code == status, (i, r.status_code, r.text)
        assert "detail" in r.json(), i
    r = client.post(
        "/api/search/vector",
        content=b'{"vector": [NaN' + b", 1.0" * 31 + b"]}",
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 422


def test_metrics(client, embedded):
    client.get("/api/search/id", params={"id": embedded[0][0]})
    client.get("/api/search/text", params={"q": "cat"})
    text = client.get("/metrics").text
    assert 'vlray_serve_requests_total{method="GET",route="/api/search/id",status="200"}' in text
    assert "vlray_serve_request_duration_seconds_bucket" in text
    assert 'vlray_serve_query_duration_seconds_count{kind="id"}' in text
    assert "vlray_serve_index_vectors 20.0" in text
    assert 'vlray_serve_model_load_seconds{encoder="text"}' in text
    assert "vlray_serve_index_load_seconds" in text


def test_web_page_assets(client):
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    for asset in ("static/app.js", "static/style.css"):
        assert asset in page.text
        r = client.get("/" + asset)
        assert r.status_code == 200
        assert "http://" not in r.text and "https://" not in r.text  # no CDN, no internet
    assert "https://" not in page.text and "http://" not in page.text


def test_api_key(out_dir):
    from serve_helpers import running

    from vlray.serve import ServeConfig, create_app

    app = create_app(ServeConfig(index=str(out_dir / "index"), api_key="s3cret"))
    with running(app) as url, httpx.Client(base_url=url, timeout=30) as c:
        assert c.get("/healthz").status_code == 200
        assert c.get("/readyz").status_code == 200
        assert c.get("/").status_code == 200
        for headers in ({}, {"x-api-key": "wrong"}, {"x-api-key": ""}):
            r = c.get("/api/info", headers=headers)
            assert r.status_code == 401 and "API key" in r.json()["detail"]
            r = c.post("/api/search/vector", json={"vector": [1.0] * 32}, headers=headers)
            assert r.status_code == 401
        r = c.get("/api/info", headers={"x-api-key": "s3cret"})
        assert r.status_code == 200 and r.json()["api_key_required"] is True
        schema = c.get("/openapi.json").json()
        assert "APIKeyHeader" in schema["components"]["securitySchemes"]


def test_not_ready_without_index(tmp_path):
    from serve_helpers import running

    from vlray.serve import ServeConfig, create_app

    app = create_app(ServeConfig(index=str(tmp_path / "index"), reload_interval_s=0.1))
    with running(app) as url, httpx.Client(base_url=url, timeout=30) as c:
        assert c.get("/healthz").status_code == 200
        r = c.get("/readyz")
        assert r.status_code == 503 and "manifest" in r.json()["detail"]
        assert c.get("/api/search/id", params={"id": "x"}).status_code == 503


def test_latency(client, photos, embedded, capsys):
    """p50 latencies over real HTTP on the tiny model (printed; loose upper bound only)."""
    ids = embedded[0]
    data = photos[0][1]
    runs = {
        "id": lambda i: client.get("/api/search/id", params={"id": ids[i % 20], "k": 10}),
        "vector": lambda i: client.post(
            "/api/search/vector", json={"vector": embedded[1][i % 20].tolist(), "k": 10}
        ),
        "text": lambda i: client.get("/api/search/text", params={"q": f"a photo of a cat {i}"}),
        "image": lambda i: client.post(
            "/api/search/image", files={"file": ("q.jpg", data, "image/jpeg")}
        ),
    }
    report = {}
    for kind, call in runs.items():
        call(0)  # warm (model load)
        times = []
        for i in range(15):
            start = time.perf_counter()
            assert call(i).status_code == 200
            times.append((time.perf_counter() - start) * 1000)
        report[kind] = statistics.median(times)
    with capsys.disabled():
        print("\nserve p50 ms: " + ", ".join(f"{k}={v:.1f}" for k, v in report.items()))
    assert all(v < 2000 for v in report.values())
