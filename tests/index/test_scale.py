"""Index choice at scale (by arithmetic), bounded training samples, tuned search parameters,
fast-scan and two-level training on small clustered sets."""

import math

import faiss
import numpy as np
import pytest

from vlray.index import SearchIndex, build_index, choose_factory
from vlray.index import build as build_mod
from vlray.index.build import (
    INDEX_BUDGET_SHARE,
    TRAIN_BUDGET_SHARE,
    ivf_nlist,
    train_rows_cap,
    train_size,
)

GIB = 1 << 30


def _parse(factory: str) -> dict:
    parts = factory.split(",")
    out = {"opq": None, "coarse": None, "nlist": 0, "code": parts[-1]}
    for part in parts:
        if part.startswith("OPQ"):
            out["opq"] = int(part[3:])
        if part.startswith("IVF"):
            out["nlist"] = int(part[3:].split("_")[0])
            out["coarse"] = part.split("_")[1] if "_" in part else "Flat"
    return out


@pytest.mark.parametrize(
    ("count", "dim", "budget_gb", "expected"),
    [
        (10_000_000, 256, 4, "IVF32768_HNSW32,SQ8"),
        (10_000_000, 768, 4, "OPQ384,IVF16384_HNSW32,PQ384x4fsr"),
        (100_000_000, 768, 4, "OPQ32,IVF16384_HNSW32,PQ32x4fsr"),
        (100_000_000, 768, 64, "OPQ384,IVF262144_HNSW32,PQ384x4fsr"),
        (1_000_000_000, 768, 256, "OPQ256,IVF1048576_HNSW32,PQ256x4fsr"),
        (1_000_000_000, 768, 64, "OPQ64,IVF262144_HNSW32,PQ64x4fsr"),
    ],
)
def test_choose_factory_at_scale(count, dim, budget_gb, expected):
    budget = budget_gb * GIB
    factory = choose_factory(count, dim, budget)
    assert factory == expected
    spec = _parse(factory)
    assert spec["coarse"] == "HNSW32"  # above 1M rows
    nlist = spec["nlist"]
    # training sample: >= 39 per list, <= 256 per list, within its share of the budget
    rows = train_size(count, dim, nlist, budget)
    assert 39 * nlist <= rows <= 256 * nlist
    assert rows * dim * 4 <= TRAIN_BUDGET_SHARE * budget
    # the list count is the FAISS guideline for the size, halved only for the budget
    guideline = 65_536 if count < 10**7 else 262_144 if count < 10**8 else 1_048_576
    assert nlist == guideline or 39 * 2 * nlist * dim * 4 > TRAIN_BUDGET_SHARE * budget
    # the finished index fits its share: codes + ids + coarse centroids
    code = spec["code"]
    per_row = dim if code == "SQ8" else int(code[2:].split("x")[0]) / (2 if "x4" in code else 1)
    assert count * (per_row + 8) + nlist * dim * 4 <= INDEX_BUDGET_SHARE * budget
    if spec["opq"]:
        assert dim % spec["opq"] == 0 and dim // spec["opq"] >= 2
    faiss.index_factory(dim, factory.replace("1048576", "1024").replace("262144", "1024"))


@pytest.mark.parametrize("dim", [256, 768])
def test_a_budget_too_small_keeps_a_useful_code_and_says_so(dim, caplog):
    # 1 B vectors: 8 bytes of ids each already pass a 4 GiB budget, and 16 GiB leaves ~3 code
    # bytes. Neither may shrink the code below 8 sub-quantizers (that loses most of the
    # recall), and a bigger budget never gets a smaller code than a smaller one.
    codes = []
    for budget_gb in (4, 16, 64, 256):
        caplog.clear()
        with caplog.at_level("WARNING", logger="vlray.index.build"):
            code = _parse(choose_factory(1_000_000_000, dim, budget_gb * GIB))["code"]
        codes.append(int(code[2:].split("x")[0]))
        assert (budget_gb <= 16) == any("raise the budget" in r.message for r in caplog.records)
    assert codes[:2] == [8, 8] and codes == sorted(codes)


def test_nlist_halved_until_39_points_fit():
    # 3M x 768 at 1 GiB: 0.5 GiB of float32 training rows = 174k -> 4096 lists (39 * 4096)
    cap = train_rows_cap(3_000_000, 768, GIB)
    assert cap == GIB // 2 // (4 * 768)
    nlist = ivf_nlist(3_000_000, 768, GIB)
    assert nlist * 39 <= cap < 2 * nlist * 39
    assert ivf_nlist(400_000, 64, 4 * GIB) == 2 ** round(math.log2(4 * math.sqrt(400_000)))


def _clustered(n: int, dim: int, centers: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((centers, dim)).astype(np.float32)
    x = means[rng.integers(0, centers, n)] + 0.35 * rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _batches(x: np.ndarray, batch: int = 2000):
    def batches():
        for s in range(0, len(x), batch):
            yield [f"v{i}" for i in range(s, min(s + batch, len(x)))], x[s : s + batch]

    return batches


def _recall(index: SearchIndex, data: np.ndarray, queries: np.ndarray, k: int = 10) -> float:
    exact = np.argsort(-(queries @ data.T), axis=1)[:, :k]
    got = index.search(queries, k)
    hits = sum(
        len({f"v{i}" for i in row} & {h for h, _ in hits})
        for row, hits in zip(exact, got, strict=True)
    )
    return hits / (k * len(queries))


def test_tuned_nprobe_reaches_target_on_held_out_queries(tmp_path):
    data = _clustered(20_000, 32, 200, seed=0)
    held_out = _clustered(20_200, 32, 200, seed=0)[20_000:]  # same clusters, not indexed
    manifest = build_index(
        _batches(data), tmp_path, dim=32, count=len(data), factory="IVF128,Flat", target_recall=0.9
    )
    nprobe = manifest["search_params"]["nprobe"]
    assert manifest["tuning"]["recall"] >= 0.9 and manifest["tuning"]["queries"] == 256
    index = SearchIndex.load(tmp_path)  # the stored nprobe is applied by default
    assert faiss.extract_index_ivf(index.index).nprobe == nprobe
    assert _recall(index, data, held_out) >= 0.85
    # one query's lists are scanned by every thread; the hits are those of one thread per query
    assert faiss.extract_index_ivf(index.index).parallel_mode == 1
    parallel = [index.search(q, 10) for q in held_out[:20]]
    faiss.extract_index_ivf(index.index).parallel_mode = 0
    assert [index.search(q, 10) for q in held_out[:20]] == parallel
    faiss.extract_index_ivf(index.index).parallel_mode = 1
    # the cheapest setting: half the probes misses the target on the tuning queries
    if nprobe > 1:
        faiss.extract_index_ivf(index.index).nprobe = nprobe // 2
        assert _recall(index, data, held_out) < _recall(SearchIndex.load(tmp_path), data, held_out)


def test_latency_cap_stops_the_grid_before_the_target(tmp_path, monkeypatch):
    from vlray.index import tune as tune_mod

    data = np.random.default_rng(0).standard_normal((20_000, 32)).astype(np.float32)
    data /= np.linalg.norm(data, axis=1, keepdims=True)  # no clusters: needs wide probing
    # every setting wider than nprobe 4 "costs" 100 ms: the grid stops there, below the target
    monkeypatch.setattr(
        tune_mod,
        "query_ms",
        lambda index, truth, search=None: (
            100.0 if faiss.extract_index_ivf(index).nprobe > 4 else 1.0
        ),
    )
    manifest = build_index(
        _batches(data), tmp_path, dim=32, count=len(data), factory="IVF128,Flat", target_recall=0.99
    )
    assert manifest["search_params"]["nprobe"] <= 4
    assert manifest["tuning"]["latency_capped"] == tune_mod.MAX_QUERY_MS
    assert manifest["tuning"]["recall"] < 0.99


def test_query_ms_times_single_queries():
    from vlray.index.tune import ExactTopK, query_ms

    x = _clustered(2000, 16, 10, seed=1)
    index = faiss.IndexFlatIP(16)
    index.add(x)
    truth = ExactTopK(np.arange(8), 16)
    truth.take(x, 0)
    assert 0.0 < query_ms(index, truth) < 1000.0


def test_fast_scan_opq_two_level_training(tmp_path, monkeypatch):
    monkeypatch.setattr(build_mod, "TWO_LEVEL_MIN_NLIST", 64)  # exercise the big-nlist path
    monkeypatch.setattr(build_mod, "OPQ_NITER", 2)
    monkeypatch.setattr(build_mod, "OPQ_TRAIN_MAX_ROWS", 1000)
    data = _clustered(20_000, 32, 200, seed=1)
    factory = "OPQ4,IVF64_HNSW32,PQ16x4fsr"
    manifest = build_index(_batches(data), tmp_path, dim=32, count=len(data), factory=factory)
    plain = faiss.read_index(str(tmp_path / "index.faiss"))  # readable without vlray
    ivf = faiss.downcast_index(faiss.extract_index_ivf(plain))
    assert isinstance(ivf, faiss.IndexIVFPQFastScan) and ivf.by_residual
    assert isinstance(faiss.downcast_index(ivf.quantizer), faiss.IndexHNSWFlat)
    assert ivf.quantizer.ntotal == 64 and plain.ntotal == 20_000
    assert manifest["train_rows"] == 64 * 256
    index = SearchIndex.load(tmp_path)
    assert "quantizer_efSearch" in manifest["search_params"]
    # 8-byte codes of 32-d vectors: well above chance (0.0005), below exact
    assert 0.3 < _recall(index, data, data[:200]) < 1.0


def test_training_sample_bounded_by_budget(tmp_path):
    data = _clustered(12_000, 32, 100, seed=2)
    budget = 32 * 4 * 3000 * 2  # training share = 3,000 float32 rows of 32 dims
    manifest = build_index(
        _batches(data),
        tmp_path,
        dim=32,
        count=len(data),
        factory="IVF64,SQ8",
        memory_budget_bytes=budget,
    )
    assert manifest["train_rows"] == 3000 < 256 * 64
    assert manifest["train_rows"] >= 39 * 64


def test_adds_assign_vectors_to_their_nearest_list(tmp_path):
    from faiss.contrib.inspect_tools import get_invlist

    # an HNSW coarse quantizer searched at FAISS's default efSearch (16) misplaces vectors
    x = _clustered(170_000, 64, 50, seed=3)
    build_index(_batches(x, 20_000), tmp_path, dim=64, count=len(x), factory="IVF4096_HNSW32,Flat")
    index = faiss.read_index(str(tmp_path / "index.faiss"))
    ivf = faiss.extract_index_ivf(index)
    quantizer = faiss.downcast_index(ivf.quantizer)
    storage = faiss.downcast_index(quantizer.storage)
    centroids = storage.reconstruct_n(0, ivf.nlist)
    nearest = np.argmax(x @ centroids.T, axis=1)
    listed = np.empty(len(x), dtype=np.int64)
    for lst in range(ivf.nlist):
        ids, _ = get_invlist(ivf.invlists, lst)
        listed[ids] = lst
    assert (listed == nearest).mean() >= 0.999
