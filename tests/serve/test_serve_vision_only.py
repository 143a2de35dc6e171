"""A SigLIP2 checkpoint without its tokenizer (a vision-only export): the service says
text_search false and answers a text query with a clear 400, image search still works."""

from __future__ import annotations

import shutil

import httpx
from serve_helpers import running, write_out


def test_vision_only_checkpoint_has_no_text_search(serve_checkpoint, embedded, photos, tmp_path):
    from vlray.serve import ServeConfig, create_app

    folder = tmp_path / "vision-only"
    folder.mkdir()
    for name in ("config.json", "preprocessor_config.json", "model.safetensors"):
        shutil.copy(serve_checkpoint / name, folder)
    write_out(tmp_path / "out", folder, embedded, n=5)
    app = create_app(ServeConfig(index=str(tmp_path / "out" / "index")))
    with running(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        assert client.get("/api/info").json()["text_search"] is False
        answer = client.get("/api/search/text", params={"q": "a cat"})
        assert answer.status_code == 400
        assert "no text tower" in answer.json()["detail"]
        assert "tokenizer" in answer.json()["detail"]
        name, blob = photos[0]
        hits = client.post("/api/search/image", files={"file": ("a.jpg", blob, "image/jpeg")})
        assert hits.status_code == 200, hits.text
