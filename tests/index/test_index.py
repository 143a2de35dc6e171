"""Index build/search: exactness, ANN recall, streaming, file contract, validation."""

import json

import faiss
import numpy as np
import pyarrow.parquet as pq
import pytest

from vlray.index import SearchIndex, build_index, choose_factory
from vlray.index.build import _reservoir_sample

DIM = 32
ROWS = 3000
BATCH = 500
MANIFEST_KEYS = {
    "model",
    "family",
    "weights",
    "dim",
    "metric",
    "count",
    "factory",
    "search_params",
    "created_at",
    "vlray_version",
    "build_seconds",
}


def _unit_vectors(n: int, dim: int = DIM, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


class CountingBatches:
    """Batches callable that counts calls and rows, and yields slices (never a full copy)."""

    def __init__(self, vectors: np.ndarray, batch: int = BATCH):
        self.vectors = vectors
        self.ids = [f"img-{i:05d}" for i in range(len(vectors))]
        self.batch = batch
        self.calls = 0
        self.rows_yielded = 0
        self.max_batch_rows = 0

    def __call__(self):
        self.calls += 1
        for start in range(0, len(self.vectors), self.batch):
            chunk = self.vectors[start : start + self.batch]
            self.rows_yielded += len(chunk)
            self.max_batch_rows = max(self.max_batch_rows, len(chunk))
            yield self.ids[start : start + self.batch], chunk


@pytest.fixture(scope="module")
def vectors():
    return _unit_vectors(ROWS)


def _build(tmp_path, vectors, factory=None, **kw):
    batches = CountingBatches(vectors)
    meta = {"model": "test-model", "family": "test", "weights": "random"}
    manifest = build_index(
        batches, tmp_path, dim=DIM, count=len(vectors), factory=factory, manifest=meta, **kw
    )
    return batches, manifest


def _recall_at_k(index: SearchIndex, vectors: np.ndarray, queries: np.ndarray, k: int) -> float:
    truth = np.argsort(-(queries @ vectors.T), axis=1)[:, :k]
    got = index.search(queries, k)
    hits = [
        len({int(i.split("-")[1]) for i, _ in row} & set(t.tolist()))
        for row, t in zip(got, truth, strict=True)
    ]
    return sum(hits) / (k * len(queries))


def test_flat_exact(tmp_path, vectors):
    batches, manifest = _build(tmp_path, vectors)
    assert manifest["factory"] == "Flat"
    assert batches.calls == 1  # nothing to train: a single streaming pass
    index = SearchIndex.load(tmp_path)
    results = index.search(vectors[:20], 5)
    for i, row in enumerate(results):
        assert row[0][0] == f"img-{i:05d}"
        assert row[0][1] == pytest.approx(1.0, abs=1e-5)
        assert [s for _, s in row] == sorted((s for _, s in row), reverse=True)
    assert _recall_at_k(index, vectors, vectors[:50], 10) == 1.0
    assert index.load_seconds >= 0


def test_files_and_manifest(tmp_path, vectors):
    _, manifest = _build(tmp_path, vectors)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "ids.parquet",
        "index.faiss",
        "manifest.json",
    ]  # no temp files left behind
    on_disk = json.loads((tmp_path / "manifest.json").read_text())
    assert on_disk == manifest
    assert MANIFEST_KEYS <= on_disk.keys()
    assert on_disk["dim"] == DIM and on_disk["count"] == ROWS
    assert on_disk["metric"] == "inner_product"
    assert on_disk["created_at"].endswith("+00:00")

    plain = faiss.read_index(str(tmp_path / "index.faiss"))
    assert plain.ntotal == ROWS and plain.d == DIM
    assert plain.metric_type == faiss.METRIC_INNER_PRODUCT
    ids = pq.read_table(tmp_path / "ids.parquet")
    assert ids.column_names == ["id"] and str(ids.schema.field("id").type) == "string"
    assert ids.column("id").to_pylist() == [f"img-{i:05d}" for i in range(ROWS)]


def test_hnsw_override(tmp_path, vectors):
    batches, manifest = _build(tmp_path, vectors, factory="HNSW32,Flat")
    assert batches.calls == 2  # tuning queries, then add (no training)
    ef = manifest["search_params"]["efSearch"]
    assert manifest["tuning"]["recall"] >= manifest["tuning"]["target_recall"] == 0.95
    index = SearchIndex.load(tmp_path)
    assert faiss.downcast_index(index.index).hnsw.efSearch == ef
    assert _recall_at_k(index, vectors, vectors[:100], 10) >= 0.95
    assert index.search(vectors[7], 1)[0][0][0] == "img-00007"


def test_ivf_pq_override_streams_two_passes(tmp_path, vectors):
    batches, manifest = _build(tmp_path, vectors, factory="IVF16,PQ8")
    assert batches.calls == 2  # sample for training, then add
    assert batches.rows_yielded == 2 * ROWS
    assert batches.max_batch_rows == BATCH
    assert manifest["train_rows"] == ROWS  # min(count, 256 * 16)
    nprobe = manifest["search_params"]["nprobe"]
    index = SearchIndex.load(tmp_path)
    assert faiss.extract_index_ivf(index.index).nprobe == nprobe
    queries = _unit_vectors(100, seed=1)
    # Random 32-d vectors at 8 bytes/vector: ~0.6 measured; exact search gives 1.0.
    assert _recall_at_k(index, vectors, queries, 10) >= 0.45
    assert index.search(vectors[:1], 1)[0][0][0] == "img-00000"


def test_vector_lookup(tmp_path, vectors):
    _build(tmp_path / "flat", vectors)
    flat = SearchIndex.load(tmp_path / "flat")
    np.testing.assert_array_equal(flat.vector("img-00042"), vectors[42])
    np.testing.assert_array_equal(flat.vector("img-02999"), vectors[2999])
    assert flat.vector("img-99999") is None
    assert flat.vector("") is None

    _build(tmp_path / "hnsw", vectors, factory="HNSW32,Flat")
    np.testing.assert_array_equal(
        SearchIndex.load(tmp_path / "hnsw").vector("img-00001"), vectors[1]
    )

    _build(tmp_path / "ivf", vectors, factory="IVF16,Flat")
    np.testing.assert_array_equal(
        SearchIndex.load(tmp_path / "ivf").vector("img-00500"), vectors[500]
    )


def test_unsorted_ids_lookup(tmp_path):
    x = _unit_vectors(5)
    ids = ["zeta", "alpha", "émile", "Beta", "mid"]
    build_index(lambda: [(ids, x)], tmp_path, dim=DIM, count=5)
    index = SearchIndex.load(tmp_path)
    for i, name in enumerate(ids):
        np.testing.assert_array_equal(index.vector(name), x[i])
    assert index.vector("beta") is None


def test_k_clamped_and_empty(tmp_path):
    x = _unit_vectors(3)
    build_index(lambda: [(["a", "b", "c"], x)], tmp_path / "small", dim=DIM, count=3)
    small = SearchIndex.load(tmp_path / "small")
    assert [len(r) for r in small.search(x, 10)] == [3, 3, 3]

    calls = []
    manifest = build_index(
        lambda: calls.append(1) or iter(()),
        tmp_path / "empty",
        dim=DIM,
        count=0,
        factory="IVF16,PQ8",
    )
    assert manifest["factory"] == "Flat" and manifest["count"] == 0
    assert faiss.read_index(str(tmp_path / "empty" / "index.faiss")).ntotal == 0
    empty = SearchIndex.load(tmp_path / "empty")
    assert empty.count == 0 and empty.dim == DIM
    assert empty.search(x[:2], 5) == [[], []]
    assert empty.vector("a") is None


def test_hnsw_pads_missing_results(tmp_path):
    # k > reachable rows never shows FAISS's -1 slots.
    x = _unit_vectors(40)
    build_index(
        lambda: [([str(i) for i in range(40)], x)],
        tmp_path,
        dim=DIM,
        count=40,
        factory="HNSW32,Flat",
    )
    rows = SearchIndex.load(tmp_path).search(x[:3], 40)
    assert all(len(r) <= 40 and all(i != "-1" for i, _ in r) for r in rows)


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((4, DIM + 1), dtype=np.float32),
        np.zeros((4, DIM), dtype=np.float64),
        np.zeros(DIM, dtype=np.float32),
        [[0.0] * DIM] * 4,
    ],
    ids=["wrong-dim", "float64", "1-d", "list"],
)
def test_bad_batches_raise(tmp_path, bad):
    with pytest.raises(ValueError, match="float32|dim"):
        build_index(lambda: [(["a"] * 4, bad)], tmp_path, dim=DIM, count=4)
    assert not (tmp_path / "manifest.json").exists()


def test_other_validation(tmp_path):
    x = _unit_vectors(4)
    with pytest.raises(ValueError, match="2 ids but 4 vectors"):
        build_index(lambda: [(["a", "b"], x)], tmp_path, dim=DIM, count=4)
    with pytest.raises(ValueError, match="count=5"):
        build_index(lambda: [(list("abcd"), x)], tmp_path, dim=DIM, count=5)
    with pytest.raises(ValueError, match="factory"):
        build_index(lambda: [(list("abcd"), x)], tmp_path, dim=DIM, count=4, factory="Nope9")
    nan = x.copy()
    nan[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        build_index(lambda: [(list("abcd"), nan)], tmp_path, dim=DIM, count=4)
    assert list(tmp_path.iterdir()) == []  # no partial or temp files
    build_index(lambda: [(list("abcd"), x)], tmp_path, dim=DIM, count=4)
    with pytest.raises(ValueError, match="float32"):
        SearchIndex.load(tmp_path).search(x[:, :8], 1)
    with pytest.raises(FileNotFoundError, match="manifest"):
        SearchIndex.load(tmp_path / "missing")


def test_rebuild_replaces(tmp_path, vectors):
    _build(tmp_path, vectors[:100])
    _build(tmp_path, vectors[:200], factory="HNSW32,Flat")
    index = SearchIndex.load(tmp_path)
    assert index.count == 200 and index.manifest["factory"] == "HNSW32,Flat"
    assert len(list(tmp_path.iterdir())) == 3


def test_choose_factory_small_sets():
    gib = 1 << 30
    assert choose_factory(0, 768, 4 * gib) == "Flat"
    assert choose_factory(200_000, 768, 4 * gib) == "Flat"
    assert choose_factory(300_000, 768, 4 * gib, flat_max=500_000) == "Flat"
    assert choose_factory(500_000, 768, 4 * gib) == "HNSW32,Flat"  # 1.7 GB of graph fits
    # below 1M rows: ~4 sqrt(N) lists and a flat coarse quantizer
    assert choose_factory(900_000, 768, 2 * gib) == "IVF4096,SQ8"
    for count, dim, budget in [(3_000_000, 512, gib), (500_000, 96, 1 << 20)]:
        factory = choose_factory(count, dim, budget)
        faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)  # valid string


def test_reservoir_sample_uniform_and_seeded():
    n, size = 20_000, 500
    rows = np.arange(n, dtype=np.float32)[:, None].repeat(2, axis=1)

    def batches():
        for s in range(0, n, 1000):
            yield [""] * len(rows[s : s + 1000]), rows[s : s + 1000]

    a = _reservoir_sample(batches, size, 2, seed=3)
    b = _reservoir_sample(batches, size, 2, seed=3)
    np.testing.assert_array_equal(a, b)
    picked = a[:, 0]
    assert len(np.unique(picked)) == size
    assert abs(picked.mean() - n / 2) < 0.1 * n  # not biased to the first batches
    assert (picked >= n / 2).sum() > size / 3
    assert _reservoir_sample(batches, n + 10, 2, seed=0).shape == (n, 2)
