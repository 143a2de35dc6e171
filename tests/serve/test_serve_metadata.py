"""Kept input columns in the service: ``metadata`` on search hits and items (``metadata.caption``
is what the page shows)."""

from __future__ import annotations

import httpx
import pyarrow as pa
import pyarrow.parquet as pq
from serve_helpers import running, write_out


def test_hits_and_items_carry_the_kept_columns(tmp_path, serve_checkpoint, embedded):
    from vlray.serve import ServeConfig, create_app

    write_out(tmp_path, serve_checkpoint, embedded, n=6)
    part = tmp_path / "embeddings" / "part-0.parquet"
    table = pq.read_table(part)
    ids = table.column("id").to_pylist()
    captions = [f"caption of {item}" if j != 2 else None for j, item in enumerate(ids)]
    table = table.append_column("caption", pa.array(captions, pa.string()))
    table = table.append_column("label", pa.array(range(6), pa.int16()))
    pq.write_table(table, part)
    app = create_app(ServeConfig(index=str(tmp_path / "index")))
    with running(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        hits = client.get("/api/search/id", params={"id": ids[1], "k": 6}).json()["hits"]
        by_id = {h["id"]: h for h in hits}
        assert by_id[ids[1]]["metadata"] == {"caption": f"caption of {ids[1]}", "label": 1}
        assert by_id[ids[2]]["metadata"] == {"caption": None, "label": 2}
        item = client.get("/api/item", params={"id": ids[4]}).json()
        assert item["metadata"] == {"caption": f"caption of {ids[4]}", "label": 4}
        schema = client.get("/openapi.json").json()["components"]["schemas"]
        assert "metadata" in schema["Hit"]["properties"]
