"""Indexes with lossy (PQ) codes keep their vectors on disk and re-rank candidates exactly."""

from itertools import starmap

import numpy as np
import pytest

from vlray.index import SearchIndex, add_to_index, build_index
from vlray.index.distributed import build_index_sharded
from vlray.index.refine import VECTORS_FILE, VectorStore, VectorWriter, wants_refine

DIM = 64


def _clustered(n: int, seed: int, clusters: int = 50, noise: float = 0.6) -> np.ndarray:
    rng = np.random.default_rng(seed)
    means = np.random.default_rng(99).standard_normal((clusters, DIM)).astype(np.float32)
    x = means[rng.integers(0, clusters, n)]
    x += noise * rng.standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _batches(x: np.ndarray, first: int = 0, size: int = 1000):
    def batches():
        for s in range(0, len(x), size):
            part = x[s : s + size]
            yield [f"v/{first + s + i} ü" for i in range(len(part))], part

    return batches


def _recall(found: np.ndarray, data: np.ndarray, queries: np.ndarray) -> float:
    exact = np.argsort(-(queries @ data.T), axis=1)[:, :10]
    return np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, exact, strict=True)])


def _positions(index: SearchIndex, hits: list[list[tuple[str, float]]]) -> np.ndarray:
    return np.array([[int(h.split("/")[1].split()[0]) for h, _ in row] for row in hits])


@pytest.mark.parametrize(
    ("factory", "refines"),
    [
        ("OPQ384,IVF16384_HNSW32,PQ384x4fsr", True),
        ("IVF100,PQ8", True),
        ("IVF64,PQ8x4fs", True),
        ("IVF1024_HNSW32,SQ8", True),
        ("IVF64,SQ4", True),
        ("IVF64,SQfp16", False),
        ("IVF64,Flat", False),
        ("HNSW32,Flat", False),
        ("Flat", False),
    ],
)
def test_lossy_codes_keep_their_vectors(factory, refines):
    assert wants_refine(factory) is refines


@pytest.fixture(scope="module")
def pq_index(tmp_path_factory):
    data = _clustered(8000, seed=0)
    folder = tmp_path_factory.mktemp("pq")
    manifest = build_index(
        _batches(data), folder, dim=DIM, count=len(data), factory="IVF32,PQ8x4fs"
    )
    return folder, data, manifest


def test_re_rank_finds_what_the_code_alone_misses(pq_index):
    folder, data, manifest = pq_index
    queries = _clustered(200, seed=7)
    index = SearchIndex.load(folder)
    assert manifest["refine"] == {"file": VECTORS_FILE, "dtype": "float16", "k_factor": 32}
    assert (folder / VECTORS_FILE).stat().st_size == len(data) * DIM * 2
    refined = _recall(_positions(index, index.search(queries, 10)), data, queries)
    _, raw = index.index.search(queries, 10)  # the same index, its 4-byte codes only
    coded = _recall(raw, data, queries)
    assert refined >= 0.95 > coded + 0.3
    # the scores are the exact inner products of the stored (float16) vectors
    hits = index.search(queries[:5], 10)
    stored = data.astype(np.float16).astype(np.float32)
    for q, row in zip(queries[:5], hits, strict=True):
        want = [float(stored[int(h.split("/")[1].split()[0])] @ q) for h, _ in row]
        assert [s for _, s in row] == pytest.approx(want, abs=1e-5)
        assert want == sorted(want, reverse=True)


def test_tuning_measures_the_re_ranked_search(pq_index):
    folder, data, manifest = pq_index
    assert manifest["tuning"]["recall"] >= 0.95  # impossible for 4-byte codes alone
    assert manifest["search_params"]["nprobe"] <= 32


def test_stored_vectors_are_the_inputs(pq_index):
    folder, data, _ = pq_index
    index = SearchIndex.load(folder)
    assert np.array_equal(
        index.vector("v/1234 ü"), data[1234].astype(np.float16).astype(np.float32)
    )
    assert index.vector("missing") is None


def test_a_short_vector_file_is_refused(tmp_path):
    data = _clustered(3000, seed=1)
    build_index(_batches(data), tmp_path, dim=DIM, count=len(data), factory="IVF16,PQ8")
    with open(tmp_path / VECTORS_FILE, "r+b") as f:
        f.truncate(10 * DIM * 2)
    with pytest.raises(ValueError, match="holds 10 rows of dim 64, the index 3000"):
        SearchIndex.load(tmp_path)


def test_rebuilding_without_a_lossy_code_removes_the_old_vectors(tmp_path):
    data = _clustered(3000, seed=1)
    build_index(_batches(data), tmp_path, dim=DIM, count=len(data), factory="IVF16,PQ8")
    assert (tmp_path / VECTORS_FILE).exists()
    manifest = build_index(_batches(data), tmp_path, dim=DIM, count=len(data), factory="IVF16,Flat")
    assert "refine" not in manifest and not (tmp_path / VECTORS_FILE).exists()
    assert len(SearchIndex.load(tmp_path).search(data[:3], 5)[0]) == 5


def test_added_rows_are_appended_and_re_ranked(tmp_path):
    old, new = _clustered(4000, seed=2), _clustered(1500, seed=3)
    build_index(_batches(old), tmp_path, dim=DIM, count=len(old), factory="IVF16,PQ8x4fs")
    # a failed add (wrong count) wrote rows past the index's end: the next add cuts them
    with pytest.raises(ValueError, match="yielded 1500 rows but count=9"):
        add_to_index(_batches(new, first=len(old)), tmp_path, dim=DIM, count=9)
    assert SearchIndex.load(tmp_path).count == len(old)
    manifest = add_to_index(_batches(new, first=len(old)), tmp_path, dim=DIM, count=len(new))
    assert manifest["count"] == 5500
    assert (tmp_path / VECTORS_FILE).stat().st_size == 5500 * DIM * 2
    index = SearchIndex.load(tmp_path)
    both = np.concatenate([old, new])
    store = VectorStore(tmp_path / VECTORS_FILE, DIM, 5500)
    assert np.array_equal(store.rows(np.arange(5500)), both.astype(np.float16).astype(np.float32))
    top = index.search(new[:50], 1)
    assert [row[0][0] for row in top] == [f"v/{len(old) + i} ü" for i in range(50)]


def test_sharded_build_writes_the_same_vectors(tmp_path):
    data = _clustered(6000, seed=4)
    single = build_index(_batches(data), tmp_path / "one", dim=DIM, count=6000, factory="IVF32,PQ8")
    cuts = [0, 2000, 5000, 6000]
    shards = [(_batches(data[a:b], a), b - a) for a, b in zip(cuts, cuts[1:], strict=False)]
    sharded = build_index_sharded(
        shards, tmp_path / "many", dim=DIM, factory="IVF32,PQ8", map_shards=starmap
    )
    assert sharded["refine"] == single["refine"]
    one, many = (tmp_path / d / VECTORS_FILE for d in ("one", "many"))
    assert one.read_bytes() == many.read_bytes()
    queries = _clustered(30, seed=5)
    assert SearchIndex.load(tmp_path / "one").search(queries, 10) == SearchIndex.load(
        tmp_path / "many"
    ).search(queries, 10)


def test_a_failed_build_leaves_no_vector_file(tmp_path):
    data = _clustered(3000, seed=1)
    with pytest.raises(ValueError, match="count=3001"):
        build_index(_batches(data), tmp_path, dim=DIM, count=3001, factory="IVF16,PQ8")
    assert not [p.name for p in tmp_path.iterdir() if "vectors" in p.name]


def test_the_writer_refuses_rows_out_of_order(tmp_path):
    writer = VectorWriter(tmp_path / "v.f16", 4)
    writer.write(np.ones((3, 4), np.float32), 0)
    with pytest.raises(ValueError, match="rows 5... after 3 rows"):
        writer.write(np.ones((2, 4), np.float32), 5)
    writer.close()


def test_tuning_widens_the_candidates_when_probing_stops_paying(tmp_path):
    # 2-byte codes of 64-d vectors: 320 candidates hold a quarter of the top 10, however many
    # lists are probed; the tuner walks the grid again with more candidates per result
    data = _clustered(20_000, seed=0, clusters=5, noise=1.0)
    manifest = build_index(
        _batches(data), tmp_path, dim=DIM, count=len(data), factory="IVF16,PQ4x4fs"
    )
    assert manifest["refine"]["k_factor"] == 256
    assert "k_factor" not in manifest["search_params"]
    assert manifest["tuning"]["recall"] >= 0.85
    index = SearchIndex.load(tmp_path)
    queries = _clustered(100, seed=9, clusters=5, noise=1.0)
    assert _recall(_positions(index, index.search(queries, 10)), data, queries) >= 0.85
