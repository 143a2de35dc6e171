"""A new index written into the served folder goes live without a restart or a failed query."""

from __future__ import annotations

import json
import threading
import time

import httpx
from serve_helpers import running, write_out


def test_index_swap_under_load(tmp_path, serve_checkpoint, embedded):
    from vlray.serve import ServeConfig, create_app

    ids = embedded[0]
    write_out(tmp_path, serve_checkpoint, embedded)
    app = create_app(ServeConfig(index=str(tmp_path / "index"), reload_interval_s=0.2))
    failures: list[str] = []
    counts: set[int] = set()
    done = threading.Event()
    requests = [0]

    def hammer(url: str, worker: int) -> None:
        with httpx.Client(base_url=url, timeout=30) as c:
            i = 0
            while not done.is_set():
                i += 1
                try:
                    r = c.get("/api/search/id", params={"id": ids[(worker + i) % 10], "k": 50})
                    if r.status_code != 200:
                        failures.append(f"{r.status_code} {r.text}")
                        continue
                    body = r.json()
                    counts.add(body["total_vectors"])
                    if len(body["hits"]) != body["total_vectors"]:
                        failures.append(f"{len(body['hits'])} hits of {body['total_vectors']}")
                except httpx.HTTPError as exc:
                    failures.append(repr(exc))
                requests[0] += 1

    with running(app) as url:
        threads = [threading.Thread(target=hammer, args=(url, w)) for w in range(4)]
        for t in threads:
            t.start()
        time.sleep(0.5)
        old_created = json.loads((tmp_path / "index" / "manifest.json").read_text())
        time.sleep(1.05)  # created_at has second resolution
        # rebuild in place: a different count, the manifest is rewritten last
        new = write_out(tmp_path, serve_checkpoint, embedded, n=12)
        assert new["created_at"] != old_created["created_at"]
        deadline = time.monotonic() + 15
        with httpx.Client(base_url=url, timeout=30) as c:
            while time.monotonic() < deadline:
                if c.get("/api/info").json()["count"] == 12:
                    break
                time.sleep(0.1)
            info = c.get("/api/info").json()
            time.sleep(0.5)  # keep hammering the new index a little
            done.set()
            for t in threads:
                t.join(30)
            metrics = c.get("/metrics").text
    assert info["count"] == 12 and info["created_at"] == new["created_at"]
    assert failures == [], failures[:5]
    assert counts == {20, 12} and requests[0] > 20
    assert 'vlray_serve_index_reloads_total{result="ok"} 2.0' in metrics
    assert "vlray_serve_index_vectors 12.0" in metrics


def test_models_survive_swap(tmp_path, serve_checkpoint, embedded):
    """Same model in the new manifest: the loaded encoders are reused, not reloaded."""
    from vlray.serve.state import IndexHolder

    write_out(tmp_path, serve_checkpoint, embedded)
    holder = IndexHolder(str(tmp_path / "index"), interval=0)
    assert holder.check()
    first = holder.snapshot
    first.models.encode_text("a cat")
    assert holder.check() is False  # unchanged manifest: nothing to do
    time.sleep(1.05)
    write_out(tmp_path, serve_checkpoint, embedded, n=5)
    assert holder.check()
    assert holder.snapshot is not first and holder.snapshot.count == 5
    assert holder.snapshot.models is first.models
