"""The job, the query CLI and the service on a checkpoint as the hub publishes it.

google/siglip-* layout: a config.json without default keys (``vision_config`` near empty), the
hub's preprocessor_config.json, a SentencePiece-only tokenizer and sharded safetensors. The job
must embed every row at the config object's dimension, with parity against transformers on the
same folder, and text queries must use those weights.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vlray.testing.checkpoints import save_hub_siglip
from vlray.testing.images import sample_photos


def _reference(folder: Path, images: list[bytes], text: str) -> tuple[np.ndarray, np.ndarray]:
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(str(folder)).eval()
    processor = AutoImageProcessor.from_pretrained(str(folder))
    pil = [Image.open(io.BytesIO(b)).convert("RGB") for b in images]
    tokens = AutoTokenizer.from_pretrained(str(folder))(
        [text], padding="max_length", max_length=64, truncation=True, return_tensors="pt"
    )
    with torch.no_grad():
        image = model.get_image_features(**processor(pil, return_tensors="pt")).pooler_output
        text_vec = model.get_text_features(**tokens).pooler_output
    return F.normalize(image, dim=-1).numpy(), F.normalize(text_vec, dim=-1)[0].numpy()


def test_job_and_queries_on_a_hub_layout(ray_local, tmp_path: Path, capsys) -> None:
    from vlray.cli import embed_main, query_main

    folder = save_hub_siglip(tmp_path / "google--siglip-tiny", max_shard_size="20KB")
    assert len(list(folder.glob("*.safetensors"))) > 1
    assert not (folder / "tokenizer.json").exists()
    assert set(json.loads((folder / "config.json").read_text())["vision_config"]) <= {
        "model_type",
        "hidden_size",
        "image_size",
        "intermediate_size",
        "num_attention_heads",
        "num_hidden_layers",
        "patch_size",
    }
    photos = sample_photos(6)
    pq.write_table(
        pa.table({"id": [n for n, _ in photos], "image": [b for _, b in photos]}),
        tmp_path / "in.parquet",
    )
    out = tmp_path / "out"
    argv = ["--input", str(tmp_path / "in.parquet"), "--output", str(out), "--model", str(folder)]
    assert embed_main(argv) == 0
    assert "6 in = 6 embedded + 0 errors" in capsys.readouterr().out
    table = pq.read_table(out / "embeddings")
    ours = {
        i: np.asarray(v)
        for i, v in zip(table["id"].to_pylist(), table["embedding"].to_pylist(), strict=True)
    }
    text = "a photo of a cat"
    ref_images, ref_text = _reference(folder, [b for _, b in photos], text)
    assert ref_images.shape[1] == 32  # the config object's projection, not a raw JSON key
    for (name, _), ref in zip(photos, ref_images, strict=True):
        assert float(ours[name] @ ref) >= 0.999, name
    manifest = json.loads((out / "index" / "manifest.json").read_text())
    assert manifest["fingerprint"]["files"] and manifest["weights"] == "pretrained"
    assert query_main(["--index", str(out / "index"), "--text", text, "-k", "6", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)
    want = {n: float(ours[n] @ ref_text) for n, _ in photos}
    assert [h["id"] for h in hits] == sorted(want, key=want.get, reverse=True)
    for hit in hits:
        assert hit["score"] == pytest.approx(want[hit["id"]], abs=1e-4)
