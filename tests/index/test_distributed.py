"""Sharded build (train once, add shards apart, merge) equals the single-machine build."""

from itertools import starmap

import faiss
import numpy as np
import pytest

from vlray.index import SearchIndex, build_index
from vlray.index.distributed import build_index_sharded, ray_map

DIM = 32


def _clustered(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((100, DIM)).astype(np.float32)
    x = means[rng.integers(0, 100, n)] + 0.4 * rng.standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _shard(x: np.ndarray, start: int):
    def batches():
        for s in range(0, len(x), 1000):
            yield [f"v{start + s + i}" for i in range(len(x[s : s + 1000]))], x[s : s + 1000]

    return batches


def _recall(index: SearchIndex, data: np.ndarray, queries: np.ndarray) -> float:
    exact = np.argsort(-(queries @ data.T), axis=1)[:, :10]
    got = index.search(queries, 10)
    return sum(
        len({f"v{i}" for i in row} & {h for h, _ in hits})
        for row, hits in zip(exact, got, strict=True)
    ) / (10 * len(queries))


@pytest.mark.parametrize("factory", ["IVF64,SQ8", "IVF64,PQ8x4fsr"])
def test_sharded_equals_single_machine(tmp_path, factory):
    data = _clustered(12_000, seed=0)
    queries = _clustered(12_100, seed=0)[12_000:]
    single = build_index(
        _shard(data, 0), tmp_path / "one", dim=DIM, count=len(data), factory=factory
    )
    cuts = [0, 5000, 9000, 12_000]
    shards = [(_shard(data[a:b], a), b - a) for a, b in zip(cuts, cuts[1:], strict=False)]
    sharded = build_index_sharded(
        shards, tmp_path / "many", dim=DIM, factory=factory, map_shards=starmap
    )
    assert sharded["count"] == single["count"] == len(data) and sharded["shards"] == 3
    assert sharded["search_params"] == single["search_params"]
    a, b = SearchIndex.load(tmp_path / "one"), SearchIndex.load(tmp_path / "many")
    assert abs(_recall(a, data, queries) - _recall(b, data, queries)) <= 0.01
    assert a.search(queries[:20], 10) == b.search(queries[:20], 10)  # same codes, same lists
    if "fs" in factory:
        plain = faiss.read_index(str(tmp_path / "many" / "index.faiss"))
        assert isinstance(faiss.downcast_index(plain), faiss.IndexIVFPQFastScan)


def test_sharded_on_ray_tasks(tmp_path, ray_local):
    data = _clustered(6000, seed=1)
    shards = [(_shard(data[:3000], 0), 3000), (_shard(data[3000:], 3000), 3000)]
    manifest = build_index_sharded(
        shards, tmp_path, dim=DIM, factory="IVF32,SQ8", map_shards=ray_map
    )
    index = SearchIndex.load(tmp_path)
    assert manifest["count"] == 6000 and index.search(data[4321], 1)[0][0][0] == "v4321"
