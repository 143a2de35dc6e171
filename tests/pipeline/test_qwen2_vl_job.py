"""The Qwen2-VL vision tower through the whole job: parity row by row, the aspect-ratio error."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from vlray.config import build_config
from vlray.ops.decode import decode_image
from vlray.pipeline.job import run_job
from vlray.query import QueryError, Searcher
from vlray.testing.checkpoints import save_tiny_qwen2_vl
from vlray.testing.images import bad_images, extreme_aspect_png, sample_photos

pytestmark = pytest.mark.slow


def test_qwen2_vl_job_matches_reference(ray_local, tmp_path):
    from transformers import AutoImageProcessor, Qwen2VLForConditionalGeneration

    ckpt = save_tiny_qwen2_vl(tmp_path / "qwen")
    photos = sample_photos(8, seed=11)
    rows = photos + [
        ("wide.png", extreme_aspect_png(300)),
        ("empty.jpg", bad_images()["empty.jpg"]),
    ]
    pq.write_table(
        pa.table(
            {"id": [r[0] for r in rows], "image": pa.array([r[1] for r in rows], pa.binary())}
        ),
        tmp_path / "in.parquet",
    )
    out = tmp_path / "out"
    summary = run_job(
        build_config(
            None,
            {
                "input": {"uri": str(tmp_path / "in.parquet")},
                "output": {"uri": str(out)},
                "model": {"name": str(ckpt)},
            },
        )
    )
    assert (summary["rows_in"], summary["embedded"], summary["errors"]) == (10, 8, 2)
    assert summary["family"] == "qwen2_vl"
    errors = {
        r["id"]: r for r in pq.read_table(next((out / "errors").glob("*.parquet"))).to_pylist()
    }
    assert (
        errors["wide.png"]["stage"] == "preprocess"
        and "aspect ratio" in errors["wide.png"]["error"]
    )
    assert errors["empty.jpg"]["stage"] == "decode"

    embedded = {
        r["id"]: r["embedding"]
        for r in pq.read_table(next((out / "embeddings").glob("*.parquet"))).to_pylist()
    }
    processor = AutoImageProcessor.from_pretrained(ckpt)
    model = Qwen2VLForConditionalGeneration.from_pretrained(ckpt).eval()
    for name, blob in photos:
        image = Image.fromarray(decode_image(blob, max_pixels=10**9))
        inputs = processor(images=[image], return_tensors="pt")
        with torch.no_grad():
            out_ = model.model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
        tokens = out_.pooler_output if hasattr(out_, "pooler_output") else out_
        expected = torch.nn.functional.normalize(tokens.float().mean(0), dim=-1)
        assert float(torch.tensor(embedded[name]) @ expected) >= 0.999, name

    searcher = Searcher.open(str(out / "index"))
    assert searcher.by_id(photos[0][0], 3)[0]["id"] == photos[0][0]
    with pytest.raises(QueryError, match="no text tower"):
        searcher.by_text("a cat", 3)


def test_qwen2_vl_store_tokens(ray_local, tmp_path):
    import numpy as np

    ckpt = save_tiny_qwen2_vl(tmp_path / "qwen")
    photos = sample_photos(5, seed=12)
    pq.write_table(
        pa.table(
            {"id": [n for n, _ in photos], "image": pa.array([b for _, b in photos], pa.binary())}
        ),
        tmp_path / "in.parquet",
    )
    out = tmp_path / "out"
    overrides = {
        "input": {"uri": str(tmp_path / "in.parquet")},
        "output": {"uri": str(out)},
        "model": {"name": str(ckpt), "store_tokens": True},
    }
    summary = run_job(build_config(None, overrides))
    assert summary["embedded"] == 5
    tokens = {
        r["id"]: r for r in pq.read_table(next((out / "tokens").glob("*.parquet"))).to_pylist()
    }
    embedded = {
        r["id"]: r["embedding"]
        for r in pq.read_table(next((out / "embeddings").glob("*.parquet"))).to_pylist()
    }
    assert set(tokens) == set(embedded)
    for row_id, row in tokens.items():
        matrix = np.asarray(row["tokens"], np.float32).reshape(
            row["grid_h"] * row["grid_w"], row["dim"]
        )
        mean = matrix.mean(0)
        assert np.allclose(mean / np.linalg.norm(mean), embedded[row_id], atol=1e-5)
