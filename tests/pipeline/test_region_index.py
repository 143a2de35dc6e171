"""The region index kept up to date (vlray/region_index.py, no Ray): a run adds the region parts
it committed, ``regions.parquet`` gains their rows in the same order as the vectors, and the
index is rebuilt when it cannot be trusted (another model, a part an earlier run committed but
never indexed, a metadata file that does not match); locally and on S3 (moto)."""

from __future__ import annotations

import json

import faiss
import numpy as np
import pyarrow.parquet as pq
import pytest

from vlray.region_index import META_FILE, build_region_index, region_key
from vlray.regions import Region, regions_table
from vlray.storage import list_files, locate, write_parquet_atomic

DIM = 16
FIELDS = {"model": "m", "family": "siglip2", "weights": "random", "seed": 0, "fingerprint": None}


def _part(out, name: str, ids: list[str], seed: int) -> None:
    """``regions/NAME``: two regions per image (mask ids 0 and 7), random unit vectors."""
    rng = np.random.default_rng(seed)
    rows = [(i, m) for i in ids for m in (0, 7)]
    vectors = rng.standard_normal((len(rows), DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    regions = [Region(m, (m, 1, 5 + m, 6), 30 + m, 0.5) for _, m in rows]
    table = regions_table([i for i, _ in rows], regions, vectors)
    write_parquet_atomic(out.join("regions", name), table)


def _read(fs, folder: str):
    """(FAISS index, its ids, the meta rows) of an index folder on ``fs``."""
    with fs.open_input_file(f"{folder}/index.faiss") as f:
        index = faiss.deserialize_index(np.frombuffer(f.read(), np.uint8))
    with fs.open_input_file(f"{folder}/ids.parquet") as f:
        ids = pq.read_table(f).column("id").to_pylist()
    with fs.open_input_file(f"{folder}/{META_FILE}") as f:
        meta = pq.read_table(f).to_pylist()
    return index, ids, meta


def _regions(out) -> dict[str, tuple[np.ndarray, list[float]]]:
    found = {}
    for path in list_files(out.join("regions"), (".parquet",)):
        with out.fs.open_input_file(path) as f:
            for row in pq.read_table(f).to_pylist():
                key = region_key(row["id"], row["mask_id"])
                found[key] = (np.asarray(row["embedding"], np.float32), row["bbox"])
    return found


def _check_aligned(out) -> int:
    """Every position: ids.parquet's key == the meta row's (id, mask_id), the vector the
    region part holds, the bbox it holds; each region once."""
    index, ids, meta = _read(out.fs, out.join("index", "regions").path)
    expected = _regions(out)
    assert index.ntotal == len(ids) == len(meta) == len(expected)
    assert sorted(ids) == sorted(expected)
    vectors = index.reconstruct_n(0, index.ntotal)
    for pos, (key, row) in enumerate(zip(ids, meta, strict=True)):
        assert key == region_key(row["id"], row["mask_id"])
        np.testing.assert_allclose(vectors[pos], expected[key][0], atol=1e-6)
        assert row["bbox"] == expected[key][1]
    return index.ntotal


def _runs(result) -> list[str]:
    return [r["mode"] for r in result["runs"]]


@pytest.fixture(params=["local", "s3"])
def out(request, tmp_path):
    if request.param == "local":
        return locate(str(tmp_path / "out"))
    s3_env = request.getfixturevalue("s3_env")
    return locate(f"s3://{s3_env.bucket}/region-index-{id(tmp_path)}", s3_env.s3)


def test_runs_add_their_parts_and_stay_aligned(out):
    _part(out, "part-a.parquet", ["a1", "a\n2"], seed=1)
    first = build_region_index(out, DIM, 1 << 30, FIELDS, ["part-a.parquet"])
    assert (first["mode"], first["count"], first["kind"]) == ("rebuild", 4, "regions")
    assert _check_aligned(out) == 4
    _part(out, "part-b.parquet", ["b1", 'b"3'], seed=2)
    _part(out, "part-c.parquet", ["c1"], seed=3)
    second = build_region_index(out, DIM, 1 << 30, FIELDS, ["part-b.parquet", "part-c.parquet"])
    assert (second["mode"], second["count"]) == ("add", 10) and _runs(second) == ["rebuild", "add"]
    assert [r["rows_added"] for r in second["runs"]] == [4, 6]
    assert _check_aligned(out) == 10
    # a run that committed no regions (every image failed): nothing added, index unchanged
    third = build_region_index(out, DIM, 1 << 30, FIELDS, [])
    assert (third["mode"], third["count"]) == ("add", 10)


def test_rebuilt_when_the_index_cannot_be_trusted(tmp_path):
    out = locate(str(tmp_path / "out"))
    _part(out, "part-a.parquet", ["a"], seed=1)
    assert build_region_index(out, DIM, 1 << 30, FIELDS, ["part-a.parquet"])["mode"] == "rebuild"
    # an earlier run committed part-b but stopped before indexing it
    _part(out, "part-b.parquet", ["b"], seed=2)
    _part(out, "part-c.parquet", ["c"], seed=3)
    again = build_region_index(out, DIM, 1 << 30, FIELDS, ["part-c.parquet"])
    assert (again["mode"], again["count"]) == ("rebuild", 6) and _check_aligned(out) == 6
    # another model's regions: never mixed into this one's index
    other = build_region_index(out, DIM, 1 << 30, {**FIELDS, "model": "other"}, [])
    assert other["mode"] == "rebuild" and _runs(other) == ["rebuild"]
    # a metadata file that lost rows (truncated copy): rebuilt, not appended to
    folder = tmp_path / "out" / "index" / "regions"
    pq.write_table(pq.read_table(folder / META_FILE).slice(0, 2), folder / META_FILE)
    _part(out, "part-d.parquet", ["d"], seed=4)
    fixed = build_region_index(out, DIM, 1 << 30, {**FIELDS, "model": "other"}, ["part-d.parquet"])
    assert (fixed["mode"], fixed["count"]) == ("rebuild", 8) and _check_aligned(out) == 8
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["count"] == 8 and manifest["model"] == "other"


def test_no_regions_no_index(tmp_path):
    out = locate(str(tmp_path / "out"))
    assert build_region_index(out, DIM, 1 << 30, FIELDS, []) is None
    assert not (tmp_path / "out" / "index").exists()
