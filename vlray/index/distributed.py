"""Sharded IVF build: train once on a sample, add shards in parallel, merge.

The driver draws the training sample and the tuning queries in one pass over all shards,
trains the index and ships it (serialized) to one task per shard; each task adds its
vectors at their global positions (``add_with_ids``), keeps the queries' exact top-k over
its rows and returns its lists. The driver merges the lists (plain IVF-PQ: fast-scan lists
are converted after the merge, see docs/SCALE.md), tunes and writes the same files as
:func:`vlray.index.build_index`, so the result equals a single-machine build on the data.

``map_shards`` runs the tasks: :func:`ray_map` (Ray tasks, the only Ray here) by default,
``itertools.starmap`` in one process.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vlray.index.build import (
    IDS_FILE,
    IDS_SCHEMA,
    MANIFEST_FILE,
    Batches,
    _discard,
    _nlist,
    _tmp_name,
    _train,
    _write_manifest,
    add_batches,
    choose_factory,
    finish_index,
    manifest_fields,
    new_index,
    open_vectors,
    tune_refined,
    write_files,
)
from vlray.index.tune import TARGET_RECALL, ExactTopK

Shard = tuple[Batches, int]  # (batches callable, its row count)
ShardResult = tuple[np.ndarray, bytes, np.ndarray, np.ndarray]


def _chain(shards: list[Shard]) -> Batches:
    def batches() -> Iterator[tuple[list[str], np.ndarray]]:
        for shard, _ in shards:
            yield from shard()

    return batches


def add_shard(
    trained: np.ndarray,
    batches: Batches,
    offset: int,
    dim: int,
    queries: np.ndarray,
    positions: np.ndarray,
) -> ShardResult:
    """One task: adds a shard to a copy of the trained index at rows ``offset...``.

    Returns:
        (serialized index holding the shard, ids as Parquet bytes, top-k scores, top-k rows).
    """
    index = faiss.deserialize_index(trained)
    truth = ExactTopK(positions, dim)
    truth.queries[:] = queries
    sink = io.BytesIO()
    with pq.ParquetWriter(sink, IDS_SCHEMA) as writer:
        add_batches(batches, index, writer, dim, offset=offset, truth=truth)
    return faiss.serialize_index(index), sink.getvalue(), truth.scores, truth.ids


def ray_map(fn: Callable[..., ShardResult], items: Iterable[tuple]) -> list[ShardResult]:
    """Runs ``fn(*item)`` as one Ray task per item (the trained index put once)."""
    import ray

    items = list(items)
    if not items:
        return []
    remote = ray.remote(fn)
    trained = ray.put(items[0][0])
    return ray.get([remote.remote(trained, *item[1:]) for item in items])


def _merge(index: faiss.Index, parts: list[ShardResult], truth: ExactTopK, ids_tmp: Path) -> None:
    ivf = faiss.extract_index_ivf(index)
    with pq.ParquetWriter(ids_tmp, IDS_SCHEMA) as writer:
        for blob, ids, scores, rows in parts:
            part = faiss.deserialize_index(blob)
            ivf.merge_from(faiss.extract_index_ivf(part), 0)
            writer.write_table(pq.read_table(pa.BufferReader(ids)))
            other = ExactTopK(truth.positions, truth.queries.shape[1])
            other.scores, other.ids = scores, rows
            truth.merge(other)
    index.ntotal = ivf.ntotal


def _add_shards(
    index: faiss.Index,
    shards: list[Shard],
    dim: int,
    truth: ExactTopK,
    map_shards: Callable[[Callable[..., ShardResult], Iterable[tuple]], Any],
) -> list[ShardResult]:
    """Every shard added to a copy of the trained ``index`` at its global positions."""
    trained = faiss.serialize_index(index)
    offsets = np.concatenate([[0], np.cumsum([n for _, n in shards])[:-1]])
    items = [
        (trained, batches, int(o), dim, truth.queries, truth.positions)
        for (batches, _), o in zip(shards, offsets, strict=True)
    ]
    return list(map_shards(add_shard, items))


def build_index_sharded(
    shards: list[Shard],
    index_dir: str | Path,
    *,
    dim: int,
    factory: str | None = None,
    memory_budget_bytes: int = 4 << 30,
    manifest: dict | None = None,
    seed: int = 0,
    target_recall: float = TARGET_RECALL,
    map_shards: Callable[[Callable[..., ShardResult], Iterable[tuple]], Any] | None = None,
) -> dict:
    """:func:`vlray.index.build_index` over ``shards`` added in parallel tasks (IVF only).

    Args:
        shards: ``(batches, rows)`` per shard, in position order; each ``batches`` must be
            picklable for Ray (e.g. a closure over file paths).
        map_shards: ``starmap``-like runner of the shard tasks; :func:`ray_map` when None.

    Returns:
        The manifest as written (``shards``: the number of tasks).
    """
    start = time.perf_counter()
    count = sum(n for _, n in shards)
    factory = factory or choose_factory(count, dim, memory_budget_bytes)
    index, _ = new_index(factory, dim, seed)
    if _nlist(index) is None or count == 0:
        raise ValueError(f"sharded builds need an IVF factory and rows, got {factory!r}, {count}")
    out = Path(index_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST_FILE).unlink(missing_ok=True)
    ids_tmp = _tmp_name(out / IDS_FILE)
    vectors = open_vectors(out, factory, dim, count)  # written by the driver's sampling pass
    try:
        truth, train_rows = _train(
            _chain(shards), index, factory, count, dim, memory_budget_bytes, seed, vectors
        )
        _merge(index, _add_shards(index, shards, dim, truth, map_shards or ray_map), truth, ids_tmp)
        if index.ntotal != count:
            raise ValueError(f"shards added {index.ntotal} rows, expected {count}")
        index = finish_index(index, factory)
        search_params, tuning, refine = tune_refined(index, truth, target_recall, vectors)
        write_files(out, index, ids_tmp, vectors)
    finally:
        ids_tmp.unlink(missing_ok=True)
        _discard(vectors)
    result = {
        **dict(manifest or {}),
        **manifest_fields(index, factory, search_params, tuning, train_rows, seed, start, refine),
        "shards": len(shards),
    }
    json.dumps(result)
    _write_manifest(out, result)
    return result
