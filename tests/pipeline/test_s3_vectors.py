"""A PQ index's vector file travels with it to and from S3 (streamed), and a query host that
downloads the index gets the same exact re-ranked results."""

from __future__ import annotations

import numpy as np

from vlray.index import SearchIndex, add_to_index, build_index
from vlray.index.refine import VECTORS_FILE
from vlray.index.update import stage_index, staged_index
from vlray.query import _local_index_dir
from vlray.storage import locate

DIM = 32


def _data(n: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _batches(x: np.ndarray, first: int = 0):
    def batches():
        for s in range(0, len(x), 500):
            yield [f"id {first + s + i}" for i in range(len(x[s : s + 500]))], x[s : s + 500]

    return batches


def test_vectors_upload_download_and_add_on_s3(s3_env, tmp_path, monkeypatch):
    monkeypatch.setenv("VLRAY_HOME", str(tmp_path / "home"))
    uri = f"s3://{s3_env.bucket}/refine/index"
    loc = locate(uri, s3_env.s3)
    old, new = _data(3000, 0), _data(700, 1)
    with staged_index(loc) as staging:
        build_index(_batches(old), staging, dim=DIM, count=3000, factory="IVF16,PQ4x4fs")
    key = f"{s3_env.bucket}/refine/index/{VECTORS_FILE}"
    assert s3_env.fs.size(key) == 3000 * DIM * 2
    local = SearchIndex.load(_local_index_dir(uri, s3_env.s3))
    hits = local.search(old[:20], 1)
    assert [h[0][0] for h in hits] == [f"id {i}" for i in range(20)]  # exact re-rank
    # an incremental add stages the vector file, appends to it, uploads it before the manifest
    with staged_index(loc) as staging:
        stage_index(loc, staging)
        add_to_index(_batches(new, 3000), staging, dim=DIM, count=700)
    s3_env.fs.invalidate_cache()
    assert s3_env.fs.size(key) == 3700 * DIM * 2
    again = SearchIndex.load(_local_index_dir(uri, s3_env.s3))
    assert again.count == 3700
    assert [h[0][0] for h in again.search(new[:20], 1)] == [f"id {3000 + i}" for i in range(20)]
