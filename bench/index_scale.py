"""Index at scale: build time, peak RSS, index size, recall@10 vs exact search, query latency.

Clustered synthetic unit vectors (1,000 Gaussian clusters) are generated batch by batch from
seeds, so nothing but one batch, the training sample and the index is ever in memory. The
index type is the one ``choose_factory`` picks within ``--budget-gb``; the search parameters
are the ones the build tuned and stored in the manifest. Recall@10 is measured against exact
inner-product search (streamed) on 1,000 held-out queries drawn from the same clusters.

    python bench/index_scale.py --rows 1000000 --dim 256 --budget-gb 4
    python bench/index_scale.py --rows 1000000 --shards 4   # + the Ray sharded build, same vectors

With ``--shards N`` the same vectors are also indexed by ``build_index_sharded`` (trained once,
N shards added in parallel Ray tasks on a local Ray, merged) and both indexes are measured on
the same held-out queries: the two recalls should agree within 0.01.

Run one size per process: peak RSS (``ru_maxrss``) is the whole process's.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from vlray.index import SearchIndex, build_index, build_index_sharded

CLUSTERS = 1000
BATCH = 65_536
NOISE = 0.6


def _centers(dim: int) -> np.ndarray:
    return np.random.default_rng(12345).standard_normal((CLUSTERS, dim)).astype(np.float32)


def _vectors(centers: np.ndarray, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = centers[rng.integers(0, CLUSTERS, n)]
    x += NOISE * rng.standard_normal(x.shape, dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def _stream(centers: np.ndarray, rows: int) -> Iterator[tuple[int, np.ndarray]]:
    for b, start in enumerate(range(0, rows, BATCH)):
        yield start, _vectors(centers, min(BATCH, rows - start), seed=1 + b)


def _exact_top10(centers: np.ndarray, rows: int, queries: np.ndarray) -> np.ndarray:
    best_s = np.full((len(queries), 10), -np.inf, dtype=np.float32)
    best_i = np.zeros((len(queries), 10), dtype=np.int64)
    for start, x in _stream(centers, rows):
        s = queries @ x.T
        part = np.argpartition(-s, 9, axis=1)[:, :10]
        all_s = np.concatenate([best_s, np.take_along_axis(s, part, 1)], 1)
        all_i = np.concatenate([best_i, part + start], 1)
        order = np.argsort(-all_s, axis=1)[:, :10]
        best_s, best_i = np.take_along_axis(all_s, order, 1), np.take_along_axis(all_i, order, 1)
    return best_i


def _file_gb(path: Path) -> float:
    return path.stat().st_size / 1e9 if path.exists() else 0.0


def _measure(folder: str, queries: np.ndarray, exact: np.ndarray) -> dict:
    """recall@10 and single-query latency of the index in ``folder``."""
    index = SearchIndex.load(folder)
    latencies = []
    hits = 0
    for q, truth in zip(queries, exact, strict=True):
        t = time.perf_counter()
        found = index.search(q, 10)[0]
        latencies.append(time.perf_counter() - t)
        hits += len({int(i) for i, _ in found} & set(truth.tolist()))
    return {
        "index_gb": round((Path(folder) / "index.faiss").stat().st_size / 1e9, 3),
        "vectors_gb_on_disk": round(_file_gb(Path(folder) / "vectors.f16"), 3),
        "recall_at_10": round(hits / (10 * len(queries)), 4),
        "latency_ms_p50": round(1000 * float(np.percentile(latencies, 50)), 2),
        "latency_ms_p99": round(1000 * float(np.percentile(latencies, 99)), 2),
    }


def _shard_batches(centers: np.ndarray, first: int, rows: int, stop: int):
    """Batches ``first .. stop-1`` of the stream (picklable by value for Ray: a closure)."""

    def batches() -> Iterator[tuple[list[str], np.ndarray]]:
        for b in range(first, stop):
            start = b * BATCH
            x = _vectors(centers, min(BATCH, rows - start), seed=1 + b)
            yield [str(i) for i in range(start, start + len(x))], x

    return batches


def _sharded(centers: np.ndarray, rows: int, dim: int, budget: int, shards: int, tmp: str):
    """build_index_sharded over ``shards`` runs of whole batches, on a local Ray."""
    import ray

    ray.init(num_cpus=min(shards, os.cpu_count() or 2), include_dashboard=False)
    n_batches = -(-rows // BATCH)
    bounds = np.linspace(0, n_batches, shards + 1).astype(int)
    parts = [
        (
            _shard_batches(centers, int(a), rows, int(b)),
            min(rows, int(b) * BATCH) - int(a) * BATCH,
        )
        for a, b in zip(bounds[:-1], bounds[1:], strict=True)
        if b > a
    ]
    t0 = time.perf_counter()
    manifest = build_index_sharded(parts, tmp, dim=dim, memory_budget_bytes=budget)
    seconds = time.perf_counter() - t0
    ray.shutdown()
    return manifest, seconds


def run(
    rows: int, dim: int, budget_gb: float, queries_n: int, shards: int = 0, factory: str = ""
) -> dict:
    centers = _centers(dim)
    budget = int(budget_gb * (1 << 30))

    def batches() -> Iterator[tuple[list[str], np.ndarray]]:
        for start, x in _stream(centers, rows):
            yield [str(i) for i in range(start, start + len(x))], x

    queries = _vectors(centers, queries_n, seed=10**6)  # held out: a seed no batch uses
    exact = _exact_top10(centers, rows, queries)
    with tempfile.TemporaryDirectory(prefix="vlray-index-scale-") as tmp:
        t0 = time.perf_counter()
        manifest = build_index(
            batches, tmp, dim=dim, count=rows, factory=factory or None, memory_budget_bytes=budget
        )
        build_s = time.perf_counter() - t0
        rss_build_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20)
        measured = _measure(tmp, queries, exact)
    result = {
        "rows": rows,
        "dim": dim,
        "budget_gb": budget_gb,
        "factory": manifest["factory"],
        "search_params": manifest["search_params"],
        "tuning": manifest["tuning"],
        "train_rows": manifest["train_rows"],
        "refine": manifest.get("refine"),
        "build_s": round(build_s, 1),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20), 2),
        "peak_rss_build_gb": round(rss_build_gb, 2),
        **measured,
    }
    if shards:
        with tempfile.TemporaryDirectory(prefix="vlray-index-sharded-") as tmp:
            sharded, seconds = _sharded(centers, rows, dim, budget, shards, tmp)
            other = _measure(tmp, queries, exact)
        result["sharded"] = {
            "shards": sharded["shards"],
            "factory": sharded["factory"],
            "search_params": sharded["search_params"],
            "build_s": round(seconds, 1),
            **other,
            "recall_diff": round(other["recall_at_10"] - measured["recall_at_10"], 4),
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--budget-gb", type=float, default=4.0)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--shards", type=int, default=0, help="also build on Ray in N shards")
    parser.add_argument("--factory", default="", help="FAISS factory (default: choose_factory)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    result = run(args.rows, args.dim, args.budget_gb, args.queries, args.shards, args.factory)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
