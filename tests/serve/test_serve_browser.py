"""The web page in a real headless Chromium (the system one; skipped when not installed)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from urllib.parse import quote_plus

import numpy as np
import pytest
from serve_helpers import CHROMIUM, FLAGS, fake_masks

from vlray.ops.rle import _unpack_counts, rle_to_mask

DOCS_SHOT = Path(__file__).resolve().parents[2] / "docs" / "serve-screenshot.png"


@pytest.mark.skipif(CHROMIUM is None, reason="no system chromium (apt-get install chromium)")
def test_web_page(server, photos, tmp_path, serve_checkpoint):
    sync_api = pytest.importorskip("playwright.sync_api")
    query_file = tmp_path / "query.jpg"
    query_file.write_bytes(photos[4][1])
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(server + "/")
            page.wait_for_function(
                "document.getElementById('info').textContent.includes('20 vectors')"
            )
            info = page.locator("#info").inner_text()
            assert serve_checkpoint.name in info and str(serve_checkpoint.parent) not in info

            # text search
            page.fill("#q", "a photo of a cat")
            page.click("#search-btn")
            page.wait_for_selector(".hit")
            assert page.locator(".hit").count() == 20
            assert "p=" in page.locator(".hit .score").first.inner_text()
            page.wait_for_selector(".thumb img")  # thumbnails of the first 5 ids load
            page.wait_for_function("document.querySelectorAll('.thumb canvas.masks').length === 3")

            # the page's RLE decoder and mask drawing agree with vlray.ops.rle, pixel for pixel
            for mask in fake_masks(37, 53) + fake_masks(120, 90):
                rle = mask["segmentation"]
                counts = page.evaluate("(s) => rleCounts(s)", rle["counts"])
                assert counts == _unpack_counts(rle["counts"]).tolist()
                alpha = page.evaluate(
                    """(m) => {
                        const c = maskCanvas([m], 1000);
                        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                        return [c.height, c.width, Array.from(d.filter((_, i) => i % 4 === 3))];
                    }""",
                    mask,
                )
                h, w = rle["size"]
                drawn = np.array(alpha[2]).reshape(alpha[0], alpha[1]) > 0
                assert alpha[:2] == [h, w] and np.array_equal(drawn, rle_to_mask(rle))

            # image upload (the file input behind the drop zone)
            page.set_input_files("#file", str(query_file))
            page.wait_for_function(
                "document.getElementById('status').textContent.includes('image query')"
            )
            assert page.locator(".hit .id").first.inner_text() == photos[4][0]

            # drag and drop onto the drop zone
            data = list(photos[6][1])
            page.evaluate(
                """(bytes) => {
                    const dt = new DataTransfer();
                    dt.items.add(new File([new Uint8Array(bytes)], 'dropped.jpg', {type: 'image/jpeg'}));
                    document.getElementById('drop').dispatchEvent(
                        new DragEvent('drop', {dataTransfer: dt, bubbles: true, cancelable: true}));
                }""",
                data,
            )
            page.wait_for_function(
                f"document.querySelector('.hit .id').textContent === {photos[6][0]!r}"
            )

            # click a result: its neighbours, itself first
            target = page.locator(".hit").nth(2)
            target_id = target.get_attribute("data-id")
            target.click()
            page.wait_for_function(
                "document.getElementById('status').textContent.includes('id query')"
            )
            assert page.locator(".hit .id").first.inner_text() == target_id
            assert target_id in page.locator("#query-view").inner_text()

            # the query is in the URL (an uploaded image's is not: "/"); Back walks them, a
            # link reopens a query
            assert page.url.endswith("/?id=" + quote_plus(target_id))
            page.go_back()
            assert page.url.endswith(":" + server.rsplit(":", 1)[1] + "/")
            page.wait_for_function("document.querySelectorAll('.hit').length === 0")
            page.go_back()
            page.wait_for_function(
                "document.getElementById('status').textContent.includes('text query')"
            )
            assert page.url.endswith("/?q=a+photo+of+a+cat")
            assert page.input_value("#q") == "a photo of a cat"
            linked = browser.new_page()
            linked.goto(f"{server}/?id={quote_plus(photos[3][0])}&k=4")
            linked.wait_for_function(
                "document.getElementById('status').textContent.includes('id query')"
            )
            assert linked.locator(".hit").count() == 4
            assert linked.locator(".hit .id").first.inner_text() == photos[3][0]
            linked.close()

            # a bad request shows the server's message
            page.fill("#k", "5000")
            page.fill("#q", "cat")
            page.click("#search-btn")
            page.wait_for_selector("#status.error")
            page.fill("#k", "20")
            page.click("#search-btn")
            page.wait_for_selector(".hit")

            shot = tmp_path / "serve-screenshot.png"
            page.screenshot(path=str(shot), full_page=False)
            assert shot.stat().st_size > 10_000
            # docs/serve-screenshot.png: written when missing or with VLRAY_UPDATE_SCREENSHOT=1
            # (not on every run: that would dirty the work tree)
            refresh = os.environ.get("VLRAY_UPDATE_SCREENSHOT") or not DOCS_SHOT.exists()
            if refresh and DOCS_SHOT.parent.is_dir():
                shutil.copyfile(shot, DOCS_SHOT)

            # captions (hit.metadata.caption) and a link to an http(s) original, none for s3://
            page.evaluate(
                """() => render({hits: [
                    {rank: 1, id: "https://example.org/a.jpg", score: 0.5,
                     metadata: {caption: "a red <b>fox</b>"}},
                    {rank: 2, id: "b", score: 0.4, metadata: {url: "http://example.org/b.png"}},
                    {rank: 3, id: "s3://bucket/c.jpg", score: 0.3, metadata: {}}]})"""
            )
            assert page.locator(".hit .caption").all_inner_texts() == ["a red <b>fox</b>"]
            links = page.locator(".hit .original")
            assert [links.nth(i).get_attribute("href") for i in range(links.count())] == [
                "https://example.org/a.jpg",
                "http://example.org/b.png",
            ]
            assert errors == []
        finally:
            browser.close()
