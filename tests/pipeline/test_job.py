"""The whole job on a real local Ray: Parquet (bytes, struct, paths), image folders, bad input."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from vlray.config import build_config
from vlray.ops.decode import decode_image
from vlray.ops.thumbnail import thumbnail_size
from vlray.pipeline.job import run_job
from vlray.query import QueryError, Searcher
from vlray.schema import thumbnail_name
from vlray.testing.images import bad_images, sample_photos, unusual_images

pytestmark = pytest.mark.slow


def _config(input_uri, output_uri, model, **sections):
    overrides = {
        "input": {"uri": str(input_uri)},
        "output": {"uri": str(output_uri)},
        "model": {"name": str(model)},
    }
    for key, value in sections.items():
        overrides.setdefault(key, {}).update(value)
    overrides.setdefault("compute", {}).update({"decode_batch_size": 8, "encode_batch_size": 16})
    overrides.setdefault("input", {}).update({"rows_per_block": 8})
    return build_config(None, overrides)


def _read(folder):
    files = sorted(folder.glob("*.parquet"))
    assert not list(folder.glob(".tmp*")), "temporary files must not remain visible"
    return pa.concat_tables([pq.read_table(f) for f in files]) if files else None


@pytest.fixture(scope="module")
def mixed_parquet(tmp_path_factory):
    """Good photos, unusual-but-valid images, every bad case, a null cell and a duplicate id."""
    folder = tmp_path_factory.mktemp("mixed")
    good = sample_photos(24)
    unusual = sorted(unusual_images().items())
    bad = sorted(bad_images(max_pixels=10_000_000).items())
    ids = [n for n, _ in good] + [f"unusual/{n}" for n, _ in unusual] + [f"bad/{n}" for n, _ in bad]
    blobs = [b for _, b in good] + [b for _, b in unusual] + [b for _, b in bad]
    ids += ["null-cell", good[0][0]]
    blobs += [None, good[1][1]]
    table = pa.table({"id": ids, "image": pa.array(blobs, pa.binary())})
    # two files, several row groups each: exercises the read-task split
    pq.write_table(table.slice(0, 30), folder / "a.parquet", row_group_size=7)
    pq.write_table(table.slice(30), folder / "b.parquet", row_group_size=9)
    return folder, good, unusual, bad, len(ids)


@pytest.fixture(scope="module")
def mixed_run(mixed_parquet, siglip2_checkpoint, ray_local, tmp_path_factory):
    folder, *_ = mixed_parquet
    out = tmp_path_factory.mktemp("out") / "run"
    config = _config(folder, out, siglip2_checkpoint, input={"max_pixels": 20_000_000})
    return run_job(config), out


def test_every_row_lands_exactly_once(mixed_parquet, mixed_run):
    _, good, unusual, bad, n_rows = mixed_parquet
    summary, out = mixed_run
    emb, err = _read(out / "embeddings"), _read(out / "errors")
    assert summary["rows_in"] == n_rows
    assert summary["rows_in"] == summary["embedded"] + summary["errors"]
    assert emb.num_rows == summary["embedded"] and err.num_rows == summary["errors"]
    ids = emb.column("id").to_pylist()
    assert len(ids) == len(set(ids)), "no id twice in embeddings/"
    expected_ok = {n for n, _ in good} | {f"unusual/{n}" for n, _ in unusual}
    assert set(ids) == expected_ok
    # on the CPU a part per encoder batch (16 rows here), not per output.rows_per_file (2048):
    # a slow run commits as it goes and a stop keeps what it finished
    parts = {}
    for folder in ("embeddings", "errors"):
        for path in (out / folder).glob("*.parquet"):
            parts[path.name] = parts.get(path.name, 0) + pq.read_metadata(path).num_rows
    assert len(parts) >= n_rows / 16 and max(parts.values()) <= 16, parts
    errors = dict(zip(err.column("id").to_pylist(), err.column("stage").to_pylist(), strict=True))
    assert {f"bad/{n}" for n, _ in bad} <= set(errors)
    assert errors["null-cell"] == "read"
    assert errors[good[0][0]] == "read"  # the duplicate id (second occurrence)
    for name, _ in bad:
        assert errors[f"bad/{name}"] == "decode", name
    for message in err.column("error").to_pylist():
        assert message and "\n" not in message
    bomb = err.filter(pa.compute.equal(err.column("id"), "bad/bomb.png")).column("error")[0].as_py()
    assert "pixels" in bomb and "limit" in bomb
    saved = json.loads((out / "_summary.json").read_text())
    assert saved["rows_in"] == n_rows and saved["accounted"]
    assert saved["buckets"]["groups_per_batch"] > 0


def test_output_schema_and_sizes(mixed_parquet, mixed_run):
    _, good, unusual, _, _ = mixed_parquet
    _, out = mixed_run
    emb = _read(out / "embeddings")
    assert emb.schema.field("embedding").type == pa.list_(pa.float32(), 32)
    assert emb.schema.field("width").type == pa.int32()
    rows = {r["id"]: r for r in emb.to_pylist()}
    for name, blob in good + [(f"unusual/{n}", b) for n, b in unusual]:
        image = decode_image(blob, max_pixels=10**9)
        assert (rows[name]["width"], rows[name]["height"]) == (image.shape[1], image.shape[0]), name
    vectors = np.asarray([r["embedding"] for r in rows.values()], dtype=np.float32)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)


def test_embeddings_match_reference(mixed_parquet, mixed_run, siglip2_checkpoint):
    from transformers import AutoImageProcessor, AutoModel

    _, good, _, _, _ = mixed_parquet
    _, out = mixed_run
    rows = {r["id"]: r["embedding"] for r in _read(out / "embeddings").to_pylist()}
    processor = AutoImageProcessor.from_pretrained(siglip2_checkpoint)
    model = AutoModel.from_pretrained(siglip2_checkpoint).eval()
    for name, blob in good[1:8]:
        image = Image.fromarray(decode_image(blob, max_pixels=10**9))
        with torch.no_grad():
            ref = model.get_image_features(
                **processor(images=[image], return_tensors="pt")
            ).pooler_output
        ref = torch.nn.functional.normalize(ref, dim=-1)[0]
        assert float(torch.tensor(rows[name]) @ ref) >= 0.999, name


def test_separate_stages_give_the_same_rows(mixed_parquet, mixed_run, siglip2_checkpoint, tmp_path):
    """compute.fuse off (decode actors -> encoder actor) vs the CPU default (fused actors)."""
    folder, *_ = mixed_parquet
    summary, out = mixed_run
    assert summary["resources"]["fused"] is True  # the default on a CPU-only cluster
    config = _config(
        folder,
        tmp_path / "separate",
        siglip2_checkpoint,
        input={"max_pixels": 20_000_000},
        compute={"fuse": "off"},
        index={"enabled": False},
    )
    separate = run_job(config)
    assert separate["resources"]["fused"] is False and separate["resources"]["encode_actors"] >= 1
    for key in ("rows_in", "embedded", "errors", "errors_by_stage"):
        assert separate[key] == summary[key], key
    fused = {r["id"]: r["embedding"] for r in _read(out / "embeddings").to_pylist()}
    other = {
        r["id"]: r["embedding"] for r in _read(tmp_path / "separate" / "embeddings").to_pylist()
    }
    assert fused.keys() == other.keys()
    for key, vector in fused.items():
        assert np.allclose(vector, other[key], atol=1e-5), key
    errors = _read(tmp_path / "separate" / "errors").to_pydict()
    assert sorted(zip(errors["id"], errors["stage"], strict=True)) == sorted(
        zip(*[_read(out / "errors").column(c).to_pylist() for c in ("id", "stage")], strict=True)
    )


def test_draft_decode_is_close_to_exact(mixed_parquet, mixed_run, siglip2_checkpoint, tmp_path):
    """input.decode=draft: same rows, same sizes, embeddings close to the exact run's."""
    folder, good, _, _, _ = mixed_parquet
    summary, out = mixed_run
    config = _config(
        folder,
        tmp_path / "draft",
        siglip2_checkpoint,
        input={"max_pixels": 20_000_000, "decode": "draft"},
        output={"thumbnails": 40},
        index={"enabled": False},
    )
    draft = run_job(config)
    for key in ("rows_in", "embedded", "errors", "errors_by_stage"):
        assert draft[key] == summary[key], key
    exact = {r["id"]: r for r in _read(out / "embeddings").to_pylist()}
    rows = {r["id"]: r for r in _read(tmp_path / "draft" / "embeddings").to_pylist()}
    assert rows.keys() == exact.keys()
    cosines = []
    for key, row in rows.items():
        assert (row["width"], row["height"]) == (exact[key]["width"], exact[key]["height"]), key
        cosines.append(float(np.dot(row["embedding"], exact[key]["embedding"])))
    # a tiny random model magnifies pixel differences; measured here over 38 rows:
    # min 0.9936, mean 0.99974
    assert min(cosines) >= 0.99 and float(np.mean(cosines)) >= 0.999, sorted(cosines)[:5]
    assert min(cosines) < 1.0 - 1e-6, "draft decoding changed nothing: was it applied?"
    # thumbnails (fused actors, draft decode: never decoded below the thumbnail's size)
    assert draft["thumbnails"] == draft["embedded"]
    for key, row in rows.items():
        thumb = Image.open(tmp_path / "draft" / "thumbnails" / thumbnail_name(key))
        h, w = thumbnail_size(row["height"], row["width"], 40)
        assert (thumb.height, thumb.width) == (h, w), key
    assert len(list((tmp_path / "draft" / "thumbnails").iterdir())) == draft["embedded"]


def test_gpu_decode_without_a_gpu_is_a_clear_error(
    mixed_parquet, mixed_run, siglip2_checkpoint, tmp_path
):
    """input.decode=gpu on a CPU-only cluster: refused before any row is read, nothing written."""
    from vlray.config import ConfigError

    folder, *_ = mixed_parquet
    config = _config(folder, tmp_path / "gpu", siglip2_checkpoint, input={"decode": "gpu"})
    with pytest.raises(ConfigError, match="no GPU for the encoder"):
        run_job(config)
    assert not list((tmp_path / "gpu").glob("**/*.parquet"))


def test_index_and_queries(mixed_run):
    import faiss

    summary, out = mixed_run
    index = faiss.read_index(str(out / "index" / "index.faiss"))
    assert index.ntotal == summary["embedded"]
    manifest = json.loads((out / "index" / "manifest.json").read_text())
    for key in (
        "model",
        "family",
        "dim",
        "metric",
        "count",
        "factory",
        "weights",
        "created_at",
        "vlray_version",
    ):
        assert key in manifest, key
    assert manifest["family"] == "siglip2" and manifest["count"] == summary["embedded"]
    searcher = Searcher.open(str(out / "index"))
    for item in ("photo_0003.jpg", "unusual/gray.png"):
        hits = searcher.by_id(item, 3)
        assert hits[0]["id"] == item and hits[0]["score"] == pytest.approx(1.0, abs=1e-4)
    text = searcher.by_text("a photo of a cat", 5)
    assert len(text) == 5 and all(0.0 <= h["probability"] <= 1.0 for h in text)
    assert [h["score"] for h in text] == sorted((h["score"] for h in text), reverse=True)
    with pytest.raises(QueryError):
        searcher.by_id("no-such-id", 3)


def test_image_folder_input(siglip_checkpoint, ray_local, tmp_path):
    root = tmp_path / "images"
    (root / "nested" / "deeper").mkdir(parents=True)
    photos = sample_photos(6, seed=1)
    for i, (name, blob) in enumerate(photos):
        target = root / ("nested" if i % 2 else "") / name
        target.write_bytes(blob)
    (root / "nested" / "deeper" / "broken.png").write_bytes(bad_images()["corrupt.png"])
    (root / "notes.txt").write_text("not an image, not listed")
    (root / ".hidden.jpg").write_bytes(photos[0][1])
    (root / "_DSC0001.JPE").write_bytes(photos[1][1])  # cameras' names, Pillow's extensions
    out = tmp_path / "out"
    summary = run_job(_config(root, out, siglip_checkpoint))
    assert summary["rows_in"] == 8 and summary["embedded"] == 7 and summary["errors"] == 1
    assert summary["skipped"] == {"hidden": 1, "unsupported_extension": 1}
    ids = set(_read(out / "embeddings").column("id").to_pylist())
    assert {"nested/photo_0001.jpg", "photo_0000.jpg", "_DSC0001.JPE"} <= ids
    assert _read(out / "errors").column("id").to_pylist() == ["nested/deeper/broken.png"]
    assert summary["family"] == "siglip"
    first = sorted(ids)[0]
    assert Searcher.open(str(out / "index")).by_id(first, 1)[0]["id"] == first


def test_struct_and_path_columns_and_derived_ids(siglip2_checkpoint, ray_local, tmp_path):
    photos = sample_photos(4, seed=2)
    (tmp_path / "data" / "imgs").mkdir(parents=True)
    for name, blob in photos:
        (tmp_path / "data" / "imgs" / name).write_bytes(blob)
    # HF datasets Image layout: {bytes, path}; bytes null -> path (relative to the Parquet file)
    struct = pa.array(
        [
            {"bytes": photos[0][1], "path": None},
            {"bytes": None, "path": f"imgs/{photos[1][0]}"},
            {"bytes": None, "path": "imgs/missing.jpg"},
            None,
        ],
        pa.struct([("bytes", pa.binary()), ("path", pa.string())]),
    )
    pq.write_table(pa.table({"image": struct}), tmp_path / "data" / "struct.parquet")
    paths = pa.array(
        [f"imgs/{photos[2][0]}", str(tmp_path / "data" / "imgs" / photos[3][0]), "../secret.jpg"]
    )
    pq.write_table(pa.table({"image": paths}), tmp_path / "data" / "paths.parquet")
    (tmp_path / "secret.jpg").write_bytes(photos[0][1])  # outside the dataset folder
    (tmp_path / "data" / "junk.parquet").write_bytes(b"not Parquet")  # left out, reported
    out = tmp_path / "out"
    summary = run_job(_config(tmp_path / "data" / "*.parquet", out, siglip2_checkpoint))
    assert (summary["rows_in"], summary["embedded"], summary["errors"]) == (7, 4, 3)
    assert len(summary["input_errors"]) == 1 and "junk.parquet" in summary["input_errors"][0]
    ids = sorted(_read(out / "embeddings").column("id").to_pylist())
    assert ids == ["paths.parquet:0", "paths.parquet:1", "struct.parquet:0", "struct.parquet:1"]
    errors = {r["id"]: r for r in _read(out / "errors").to_pylist()}
    assert (
        errors["struct.parquet:2"]["stage"] == "read"
        and "missing" in errors["struct.parquet:2"]["error"]
    )
    assert errors["struct.parquet:3"]["error"] == "null image cell"
    assert "leaves the dataset folder" in errors["paths.parquet:2"]["error"]


def test_cli_embed_and_query_json(siglip2_checkpoint, ray_local, tmp_path, capsys):
    from vlray.cli import embed_main, query_main

    table = pa.table(
        {"id": [n for n, _ in sample_photos(5)], "image": [b for _, b in sample_photos(5)]}
    )
    pq.write_table(table, tmp_path / "in.parquet")
    out = tmp_path / "out"
    code = embed_main(
        [
            "--input",
            str(tmp_path / "in.parquet"),
            "--output",
            str(out),
            "--model",
            str(siglip2_checkpoint),
            "--set",
            "compute.encode_batch_size=4",
            "--set",
            "index.factory=HNSW32,Flat",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "5 in = 5 embedded + 0 errors" in printed
    # the summary names only what this run wrote, and a query this model can answer
    assert (
        f"  written    {out}/embeddings/  {out}/thumbnails/  {out}/index/  {out}/_summary.json\n"
        in printed
    )
    assert f'python jobs/query.py --index {out}/index --text "a photo of a cat"' in printed
    assert "DEMO" not in printed and "demo" not in printed
    summary = json.loads((out / "_summary.json").read_text())
    assert summary["written"] == ["embeddings", "thumbnails", "index"]
    assert summary["text_queries"] is True and summary["thumbnails"] == 5
    assert json.loads((out / "index" / "manifest.json").read_text())["factory"] == "HNSW32,Flat"
    assert (
        query_main(["--index", str(out / "index"), "--id", "photo_0002.jpg", "-k", "3", "--json"])
        == 0
    )
    hits = json.loads(capsys.readouterr().out)
    assert hits[0] == {"id": "photo_0002.jpg", "score": pytest.approx(1.0, abs=1e-4)}
    assert len(hits) == 3 and set(hits[0]) == {"id", "score"}
    assert (
        embed_main(
            [
                "--input",
                str(tmp_path / "nope.parquet"),
                "--output",
                str(out),
                "--model",
                str(siglip2_checkpoint),
            ]
        )
        == 2
    )
