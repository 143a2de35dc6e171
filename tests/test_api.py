"""The Python API: vlray.embed on a user's Ray Dataset, vlray.open_index for queries."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import vlray
from vlray.families import family_for, resolve_checkpoint
from vlray.ops.decode import decode_image
from vlray.pipeline.sources import InputError
from vlray.query import QueryError
from vlray.testing.images import sample_photos


def _reference(checkpoint, data: bytes) -> np.ndarray:
    """The query path's vector of one image (decode, fit, preprocess, encode in-process)."""
    family = family_for(resolve_checkpoint(str(checkpoint)))
    resized = family.fit(decode_image(data, max_pixels=10**8))
    encoder = family.load_encoder(torch.device("cpu"), torch.float32)
    inputs = family.preprocess(torch.from_numpy(resized).permute(2, 0, 1)[None])
    return encoder.encode(inputs)[0].numpy()


def test_embed_a_users_webdataset_rows(siglip2_checkpoint, ray_local, tmp_path):
    """A shard read by Ray's own WebDataset reader (bytes, no decoding), ids from ``__key__``,
    the caption kept; a corrupt image and a null image are error rows, nothing is written."""
    import ray.data

    photos = sample_photos(4)
    members = []
    for i, (_, data) in enumerate(photos):
        members += [(f"k{i}.jpg", data), (f"k{i}.txt", f"caption {i}".encode())]
    members += [("bad.jpg", b"\xff\xd8 not a jpeg"), ("bad.txt", b"broken")]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (tmp_path / "s.tar").write_bytes(buf.getvalue())
    ds = ray.data.read_webdataset(str(tmp_path / "s.tar"), decoder=None)
    out = vlray.embed(
        ds,
        model=str(siglip2_checkpoint),
        id_column="__key__",
        image_column="jpg",
        keep_columns=["txt"],
        compute={"encode_batch_size": 4},
    )
    table = pa.concat_tables(out.iter_batches(batch_format="pyarrow", batch_size=None))
    assert table.column_names == ["id", "embedding", "width", "height", "error", "txt"]
    assert table.schema.field("txt").type == pa.binary()  # as Ray's reader gives it
    rows = {r["id"]: r for r in table.to_pylist()}
    assert sorted(rows) == ["bad", "k0", "k1", "k2", "k3"]
    assert rows["bad"]["error"] and rows["bad"]["embedding"] is None
    assert rows["bad"]["txt"] == b"broken"
    for i, (_, data) in enumerate(photos):
        row = rows[f"k{i}"]
        assert row["error"] == "" and row["txt"] == f"caption {i}".encode()
        vector = np.asarray(row["embedding"], np.float32)
        assert float(vector @ _reference(siglip2_checkpoint, data)) >= 0.999
    assert not list(tmp_path.glob("**/*.parquet"))


def test_embed_checks_columns_and_settings_before_running(siglip2_checkpoint, ray_local):
    import ray.data

    from vlray.config import ConfigError

    ds = ray.data.from_items([{"name": "a", "image": b"x"}])
    with pytest.raises(InputError, match=r"no column 'id' in the dataset \(columns: name, image\)"):
        vlray.embed(ds, model=str(siglip2_checkpoint))
    with pytest.raises(ConfigError, match="compute.encode_batch_size: must be >= 1"):
        vlray.embed(
            ds, model=str(siglip2_checkpoint), id_column="name", **{"compute.encode_batch_size": 0}
        )


def _index(tmp_path) -> tuple[str, np.ndarray]:
    from vlray.index import build_index

    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(6, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = [f"i{j}" for j in range(6)]
    table = pa.table(
        {
            "id": ids,
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), 8),
            "width": pa.array([1] * 6, pa.int32()),
            "height": pa.array([1] * 6, pa.int32()),
            "caption": [f"c{j}" for j in range(6)],
            "when": pa.array([0, 1, 2, 3, 4, None], pa.timestamp("s")),
        }
    )
    (tmp_path / "embeddings").mkdir()
    pq.write_table(table, tmp_path / "embeddings" / "part-x.parquet")
    build_index(
        lambda: [(ids, vectors)], tmp_path / "index", dim=8, count=6, manifest={"model": "m"}
    )
    return str(tmp_path / "index"), vectors


def test_open_index_searches_by_id_and_vector_with_metadata(tmp_path):
    uri, vectors = _index(tmp_path)
    index = vlray.open_index(uri)
    hits = index.id("i3", k=2)
    assert hits[0]["id"] == "i3" and hits[0]["score"] == pytest.approx(1.0, abs=1e-5)
    assert hits[0]["metadata"] == {"caption": "c3", "when": "1970-01-01T00:00:03"}
    by_vector = index.vector(vectors[5] * 3.0, k=1)
    assert by_vector[0]["id"] == "i5" and by_vector[0]["metadata"]["when"] is None
    json.dumps(hits + by_vector)  # JSON all the way down
    with pytest.raises(QueryError, match="needs 8 finite values"):
        index.vector(np.zeros(8))
    with pytest.raises(QueryError, match="not a vlray index"):
        vlray.open_index(str(tmp_path / "nowhere"))


def test_decoded_pixel_columns_reach_the_decoder_unchanged():
    """Ray's tensor columns (read_images, read_webdataset's default decoder) are re-encoded
    losslessly; arrays that are not uint8 images are error rows."""
    from ray.data.extensions import ArrowTensorArray

    from vlray.config import InputConfig
    from vlray.pipeline.sources import dataset_rows

    rng = np.random.default_rng(0)
    images = [
        rng.integers(0, 256, (5, 7, 3), dtype=np.uint8),
        rng.integers(0, 256, (4, 3, 3), dtype=np.uint8),
    ]
    column = ArrowTensorArray.from_numpy(np.array(images, dtype=object))
    rows = dataset_rows(pa.table({"id": [7, 8], "image": column}), InputConfig()).to_pylist()
    assert [r["id"] for r in rows] == ["7", "8"] and all(not r["error"] for r in rows)
    for row, pixels in zip(rows, images, strict=True):
        assert np.array_equal(decode_image(row["data"], max_pixels=10**6), pixels)
    floats = ArrowTensorArray.from_numpy(np.zeros((1, 2, 2, 3), np.float32))
    bad = dataset_rows(pa.table({"id": ["f"], "image": floats}), InputConfig()).to_pylist()
    assert (
        bad[0]["error"]
        == "pixel array float32 of shape (2, 2, 3): expected uint8 (height, width[, channels])"
    )
