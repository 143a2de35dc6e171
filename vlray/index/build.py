"""Build a FAISS inner-product index from streamed, L2-normalised embeddings.

Pure numpy in, files out: no Ray, no torch. The output directory holds

- ``index.faiss``   the index, loadable by plain ``faiss.read_index``;
- ``ids.parquet``   one column ``id: string``; row i is FAISS position i;
- ``vectors.f16``   for lossy (SQ8, PQ) codes only: every vector as float16, re-read to re-rank
  the candidates exactly (:mod:`vlray.index.refine`);
- ``manifest.json`` written last, so its presence means the others are complete.

Every file is written to a temporary name in the same directory and moved into place with
``os.replace``, so a reader never sees a half-written file.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vlray.index.refine import (
    K_FACTOR,
    VECTORS_FILE,
    VectorStore,
    VectorWriter,
    refine_fields,
    wants_refine,
)
from vlray.index.tune import TARGET_RECALL, TUNE_QUERIES, ExactTopK, tune

logger = logging.getLogger(__name__)

INDEX_FILE = "index.faiss"
IDS_FILE = "ids.parquet"
MANIFEST_FILE = "manifest.json"
METRIC = "inner_product"
IDS_SCHEMA = pa.schema([pa.field("id", pa.string(), nullable=False)])

FLAT_MAX_ROWS = 200_000
# Above this HNSW build time (hours) outweighs its recall edge over IVF-PQ, whatever the memory.
HNSW_MAX_ROWS = 1_000_000
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 80
HNSW_EF_SEARCH = 64
# FAISS guidelines: an HNSW coarse quantizer above ~1M rows, with these list counts per size.
HNSW_COARSE_MIN_ROWS = 1_000_000
GUIDELINE_NLIST = ((1_000_000, 0), (10_000_000, 65_536), (100_000_000, 262_144))
GUIDELINE_NLIST_MAX = 1_048_576
# Training sample: faiss wants >= 39 points per centroid; 100..256 is the sweet spot.
TRAIN_MIN_PER_CENTROID = 39
TRAIN_POINTS_PER_CENTROID = 256
TRAIN_BUDGET_SHARE = 0.5  # of memory_budget_bytes, for the float32 training sample
INDEX_BUDGET_SHARE = 0.7  # of memory_budget_bytes, for the finished index (the rest: batches)
# Fast-scan (4-bit, SIMD) PQ pays once lists are long enough that scanning dominates.
FAST_SCAN_MIN_ROWS = 1_000_000
PQ_MIN_SUBQUANTIZERS = 8  # fewer codes per vector than this lose most of the recall
# Flat k-means costs n * nlist * d per iteration; two-level costs ~2 n sqrt(nlist) d.
TWO_LEVEL_MIN_NLIST = 4096
KMEANS_NITER = 10
# OPQ's rotation learning re-trains a PQ per iteration: bounded rows and iterations.
OPQ_NITER = 10
OPQ_TRAIN_MAX_ROWS = 32_768
NPROBE_MAX = 64
ADD_QUANTIZER_EF = 128
"""HNSW coarse quantizer's efSearch while adding: FAISS's default 16 put 1.6% of 300 k
clustered 768-d vectors in a list other than their nearest centroid's (4,096 lists), where
queries of their neighbourhood do not probe; 64 left 0.014%, 128 none (`tests/index/test_scale.py`:
98.6% placed right at 16 over 4,096 lists of 64-d vectors, >= 99.9% at 128)."""

# Fast-scan conversions in this process (a handful per build; the plain codes go with them).
_KEEP_ALIVE: list[tuple[faiss.Index, faiss.Index]] = []

Batches = Callable[[], Iterable[tuple[list[str], np.ndarray]]]


def _hnsw_bytes(count: int, dim: int) -> int:
    # Raw float32 vectors + 2*M int32 links at level 0 + ~1/M of the nodes on upper levels
    # (M links each) + per-node level/offset bookkeeping.
    per_vector = 4 * dim + int(4 * 2 * HNSW_M * 1.1) + 16
    return count * per_vector


def _pow2(x: float) -> int:
    return 2 ** max(0, round(math.log2(max(1.0, x))))


def train_rows_cap(count: int, dim: int, memory_budget_bytes: int) -> int:
    """Most training vectors the budget allows: ``TRAIN_BUDGET_SHARE`` of it as float32."""
    return max(1, min(count, int(memory_budget_bytes * TRAIN_BUDGET_SHARE) // (4 * dim)))


def ivf_nlist(count: int, dim: int, memory_budget_bytes: int) -> int:
    """IVF list count: ~4*sqrt(N) below 1M rows, the FAISS guideline sizes above (65,536 up
    to 10M, 262,144 up to 100M, 1,048,576 beyond), halved until >= 39 training points per
    list fit both the rows and the training share of the budget."""
    k = _pow2(4.0 * math.sqrt(count))
    for upto, guideline in GUIDELINE_NLIST:
        if count < upto:
            k = guideline or k
            break
    else:
        k = GUIDELINE_NLIST_MAX
    cap = train_rows_cap(count, dim, memory_budget_bytes)
    while k > 1 and k * TRAIN_MIN_PER_CENTROID > cap:
        k //= 2
    return k


def train_size(count: int, dim: int, nlist: int, memory_budget_bytes: int) -> int:
    """Training sample rows: 256 per list (>= 39 by :func:`ivf_nlist`), within the budget."""
    return min(
        TRAIN_POINTS_PER_CENTROID * max(nlist, 1), train_rows_cap(count, dim, memory_budget_bytes)
    )


def _divisors(dim: int, most: int) -> list[int]:
    return [m for m in range(1, min(most, dim) + 1) if dim % m == 0]


def _encoding(count: int, dim: int, nlist: int, memory_budget_bytes: int) -> str:
    """The IVF list encoding that fits: Flat (4d bytes), SQ8 (d bytes), else OPQ + PQ with
    the largest code; 4-bit fast-scan codes (twice the sub-quantizers per byte) from
    ``FAST_SCAN_MIN_ROWS`` rows."""
    fixed = nlist * (4 * dim + 4 * 2 * HNSW_M)  # coarse centroids + their HNSW links
    per_row = (memory_budget_bytes * INDEX_BUDGET_SHARE - fixed) / max(count, 1) - 8  # ids
    if per_row >= 4 * dim:
        return "Flat"
    if per_row >= dim:
        return "SQ8"
    fast = count >= FAST_SCAN_MIN_ROWS
    m = _pq_subquantizers(count, dim, per_row, memory_budget_bytes, 2 if fast else 1)
    return f"PQ{m}x4fsr" if fast else f"PQ{m}"


def _pq_subquantizers(
    count: int, dim: int, row_bytes: float, memory_budget_bytes: int, per_byte: int
) -> int:
    """The most sub-quantizers (>= 2 dims each, ``per_byte`` to a code byte) within
    ``row_bytes``; never fewer than ``PQ_MIN_SUBQUANTIZERS``: a soft budget beats a useless
    index, so an index that cannot fit at that code size goes past the budget's index share,
    with a warning."""
    options = _divisors(dim, dim // 2) or [1]
    floor = next((m for m in options if m >= min(PQ_MIN_SUBQUANTIZERS, dim // 2)), options[0])
    fitting = [m for m in options if floor <= m <= row_bytes * per_byte]
    if fitting:
        return fitting[-1]
    logger.warning(
        "index.memory_budget_gb %.1f holds %d vectors of dim %d only below a useful code "
        "size; building PQ%d past its %.0f%% index share (about %.1f GB of codes and ids): "
        "raise the budget for better recall",
        memory_budget_bytes / 2**30,
        count,
        dim,
        floor,
        100 * INDEX_BUDGET_SHARE,
        count * (floor / per_byte + 8) / 1e9,
    )
    return floor


def choose_factory(
    count: int,
    dim: int,
    memory_budget_bytes: int,
    flat_max: int = FLAT_MAX_ROWS,
    *,
    hnsw_max: int = HNSW_MAX_ROWS,
) -> str:
    """Pick a FAISS factory string for ``count`` vectors of ``dim`` floats.

    - ``count <= flat_max``: ``"Flat"`` (exact inner product).
    - an HNSW graph over raw vectors fits the index share of the budget and
      ``count < hnsw_max``: ``"HNSW32,Flat"``.
    - otherwise IVF with :func:`ivf_nlist` lists (an ``_HNSW32`` coarse quantizer from 1M
      rows) and the best list encoding that fits: ``Flat``, ``SQ8``, or ``OPQ{M},...,PQ{M}``
      (``PQ{M}x4fsr`` fast-scan from 1M rows).

    Args:
        count: Number of vectors to index, >= 0.
        dim: Vector dimension, > 0.
        memory_budget_bytes: Memory the build may use (the finished index gets
            ``INDEX_BUDGET_SHARE`` of it, the training sample ``TRAIN_BUDGET_SHARE``).
        flat_max: Largest row count served by exact search.
        hnsw_max: Largest row count for which HNSW is considered.

    Returns:
        A factory string for ``faiss.index_factory(dim, s, faiss.METRIC_INNER_PRODUCT)``.
    """
    if count < 0 or dim <= 0:
        raise ValueError(f"count must be >= 0 and dim > 0, got count={count}, dim={dim}")
    if count <= flat_max:
        return "Flat"
    index_budget = memory_budget_bytes * INDEX_BUDGET_SHARE
    if count < hnsw_max and _hnsw_bytes(count, dim) <= index_budget:
        return f"HNSW{HNSW_M},Flat"
    nlist = ivf_nlist(count, dim, memory_budget_bytes)
    coarse = f"IVF{nlist}_HNSW{HNSW_M}" if count >= HNSW_COARSE_MIN_ROWS else f"IVF{nlist}"
    encoding = _encoding(count, dim, nlist, memory_budget_bytes)
    if encoding.startswith("PQ"):
        m = int(encoding[2:].split("x")[0])
        return f"OPQ{m},{coarse},{encoding}"
    return f"{coarse},{encoding}"


def _vlray_version() -> str:
    try:
        return metadata.version("vlray")
    except metadata.PackageNotFoundError:
        return "0.0.0"


def _check_batch(ids: object, vectors: object, dim: int) -> tuple[list[str], np.ndarray]:
    if not isinstance(vectors, np.ndarray) or vectors.dtype != np.float32 or vectors.ndim != 2:
        desc = (
            f"{type(vectors).__name__} {vectors.dtype} {vectors.ndim}-D"
            if isinstance(vectors, np.ndarray)
            else type(vectors).__name__
        )
        raise ValueError(
            f"embedding batch must be a 2-D float32 numpy array (n, {dim}), got {desc}; "
            "convert with np.asarray(x, dtype=np.float32)"
        )
    if vectors.shape[1] != dim:
        raise ValueError(
            f"embedding batch has dim {vectors.shape[1]}, expected dim={dim}: "
            "the vectors come from a different model than the one the index is built for"
        )
    ids = list(ids)  # type: ignore[call-overload]
    if len(ids) != vectors.shape[0]:
        raise ValueError(f"batch has {len(ids)} ids but {vectors.shape[0]} vectors")
    if not np.isfinite(vectors).all():
        raise ValueError("embedding batch contains NaN or infinite values")
    return ids, np.ascontiguousarray(vectors)


def _nlist(index: faiss.Index) -> int | None:
    try:
        return faiss.extract_index_ivf(index).nlist
    except RuntimeError:
        return None


def _reservoir_sample(
    batches: Batches,
    size: int,
    dim: int,
    seed: int,
    on_batch: Callable[[np.ndarray, int], None] | None = None,
) -> np.ndarray:
    """Uniform sample of ``size`` rows over one pass (Algorithm R, vectorised per batch);
    ``on_batch(vectors, offset)`` sees every batch on the way.

    Returns:
        float32 array (min(size, rows seen), dim).
    """
    rng = np.random.default_rng(seed)
    sample = np.empty((size, dim), dtype=np.float32)
    seen = 0
    for ids, vectors in batches():
        _, vectors = _check_batch(ids, vectors, dim)
        if on_batch is not None:
            on_batch(vectors, seen)
        n = vectors.shape[0]
        fill = min(max(size - seen, 0), n)
        if fill:
            sample[seen : seen + fill] = vectors[:fill]
        if fill < n:
            # Row j (0-based, global) replaces slot r ~ U[0, j] when r < size.
            j = np.arange(seen + fill, seen + n)
            slots = rng.integers(0, j + 1)
            keep = np.nonzero(slots < size)[0]
            if keep.size:
                # Later rows win, as in the sequential algorithm: keep each slot's last writer.
                _, first = np.unique(slots[keep][::-1], return_index=True)
                chosen = keep[::-1][first]
                sample[slots[chosen]] = vectors[fill + chosen]
        seen += n
    return sample[: min(size, seen)]


def _fsync_replace(tmp: Path, final: Path) -> None:
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, final)


def _write_manifest(out: Path, manifest: dict) -> None:
    """Writes ``manifest.json`` atomically (last, so its presence means the index is whole)."""
    manifest_path = out / MANIFEST_FILE
    manifest_tmp = _tmp_name(manifest_path)
    try:
        manifest_tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        _fsync_replace(manifest_tmp, manifest_path)
    finally:
        manifest_tmp.unlink(missing_ok=True)


def _tmp_name(final: Path) -> Path:
    return final.with_name(f".{final.name}.tmp-{os.getpid()}-{time.monotonic_ns()}")


def plain_factory(factory: str) -> str:
    """The factory to train and add with: fast-scan PQ (``x4fs``, ``x4fsr``) as the plain
    4-bit IVF-PQ it converts from (``merge_from`` on fast-scan lists corrupts memory)."""
    return factory.replace("x4fsr", "x4").replace("x4fs", "x4")


def new_index(factory: str, dim: int, seed: int) -> tuple[faiss.Index, dict[str, int]]:
    """An empty inner-product index for ``plain_factory(factory)`` and its default search
    parameters (HNSW efSearch, IVF nprobe)."""
    try:
        faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)  # validates the real one
        index = faiss.index_factory(dim, plain_factory(factory), faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as err:
        raise ValueError(f"invalid FAISS factory string {factory!r}: {err}") from err
    search_params: dict[str, int] = {}
    if isinstance(index, faiss.IndexHNSW):
        index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        search_params["efSearch"] = HNSW_EF_SEARCH
    nlist = _nlist(index)
    for part in (index, faiss.extract_index_ivf(index) if nlist is not None else None):
        # The factory turns on polysemous training for PQ codes: minutes of Hamming-ordering
        # work that only pays off with polysemous_ht search, which we never enable.
        if hasattr(part, "do_polysemous_training"):
            part.do_polysemous_training = False
    outer = faiss.downcast_index(index)
    if isinstance(outer, faiss.IndexPreTransform):
        for i in range(outer.chain.size()):
            transform = faiss.downcast_VectorTransform(outer.chain.at(i))
            if isinstance(transform, faiss.OPQMatrix):
                transform.niter = OPQ_NITER
                transform.max_train_points = OPQ_TRAIN_MAX_ROWS
    if nlist is not None:
        ivf = faiss.extract_index_ivf(index)
        ivf.cp.seed = seed
        if "x4fs" in factory and "x4fsr" not in factory:
            ivf.by_residual = False
        quantizer = faiss.downcast_index(ivf.quantizer)
        if isinstance(quantizer, faiss.IndexHNSW):
            quantizer.hnsw.efSearch = ADD_QUANTIZER_EF  # serialized: shard tasks get it too
        search_params["nprobe"] = min(nlist, max(8, min(NPROBE_MAX, nlist // 8)))
    return index, search_params


def train_index(index: faiss.Index, sample: np.ndarray, seed: int) -> None:
    """Trains ``index`` on ``sample`` (float32 (n, dim)); many lists use two-level k-means
    (sqrt(nlist) clusters, then each split), ~sqrt(nlist)/2 times cheaper than flat k-means.
    A pre-transform that keeps the dimension (OPQ) is applied to ``sample`` in place."""
    nlist = _nlist(index)
    if nlist is None or nlist < TWO_LEVEL_MIN_NLIST:
        index.train(sample)
        return
    from faiss.contrib.clustering import two_level_clustering

    x = sample
    outer = faiss.downcast_index(index)
    if isinstance(outer, faiss.IndexPreTransform):
        for i in range(outer.chain.size()):
            transform = outer.chain.at(i)
            transform.train(x)
            x = _apply(transform, x)
    ivf = faiss.extract_index_ivf(index)
    centroids, _ = two_level_clustering(
        x,
        int(math.sqrt(nlist)),
        nlist,
        clustering_niter=KMEANS_NITER,
        seed=seed,
    )
    ivf.quantizer.add(np.ascontiguousarray(centroids, dtype=np.float32))
    ivf.train(x)  # the quantizer is full: this trains the list encoding only
    index.is_trained = True


def _apply(transform: faiss.VectorTransform, x: np.ndarray) -> np.ndarray:
    """``transform.apply(x)``, in place in chunks when the dimension is kept (OPQ's rotation):
    a second copy of a budget-sized training sample would double the build's peak."""
    if transform.d_out != transform.d_in or not x.flags.writeable:
        return transform.apply(x)
    for start in range(0, len(x), 1 << 16):
        x[start : start + (1 << 16)] = transform.apply(x[start : start + (1 << 16)])
    return x


def finish_index(index: faiss.Index, factory: str) -> faiss.Index:
    """Converts a plain 4-bit IVF-PQ to the fast-scan layout ``factory`` asks for."""
    if "x4fs" not in factory:
        return index
    outer = faiss.downcast_index(index)
    plain = faiss.downcast_index(faiss.extract_index_ivf(index))
    fast = faiss.IndexIVFPQFastScan(plain)
    plain.reset()  # its codes are copied into ``fast``: free them (the wrapper stays alive)
    _KEEP_ALIVE.append((index, fast))  # SWIG: the wrappers own the C++ objects
    if isinstance(outer, faiss.IndexPreTransform):
        outer.index = fast
        return outer
    return fast


def query_positions(count: int, seed: int, queries: int = TUNE_QUERIES) -> np.ndarray:
    """Seeded random row positions of the tuning queries (int64, sorted)."""
    rng = np.random.default_rng(seed + 1)
    return np.sort(rng.choice(count, size=min(queries, count), replace=False))


def _sample_and_queries(
    batches: Batches,
    index: faiss.Index,
    factory: str,
    count: int,
    dim: int,
    budget: int,
    seed: int,
    truth: ExactTopK | None,
    vectors: VectorWriter | None = None,
) -> np.ndarray | None:
    """One pass: the training sample (None for untrained indexes) and the query vectors;
    ``vectors`` (when given) gets every row on the way."""
    take = _each_batch(truth, vectors)
    if index.is_trained:
        if take is not None:
            _reservoir_sample(batches, 0, dim, seed, take)
        return None
    nlist = _nlist(index)
    size = (
        train_size(count, dim, nlist or 0, budget)
        if nlist
        else min(count, train_rows_cap(count, dim, budget))
    )
    sample = _reservoir_sample(batches, size, dim, seed, take)
    if nlist is not None and sample.shape[0] < nlist:
        raise ValueError(
            f"factory {factory!r} needs >= {nlist} training vectors, got {sample.shape[0]}: "
            "use fewer IVF lists or a Flat/HNSW factory"
        )
    return sample


def _each_batch(
    truth: ExactTopK | None, vectors: VectorWriter | None
) -> Callable[[np.ndarray, int], None] | None:
    """One ``on_batch`` feeding the queries' ``truth`` and the vector file (None: neither)."""
    sinks = [sink for sink in (truth and truth.take, vectors and vectors.write) if sink]
    if not sinks:
        return None

    def each(batch: np.ndarray, offset: int) -> None:
        for sink in sinks:
            sink(batch, offset)

    return each


def _id_array(ids: list[str]) -> pa.Array:
    try:
        id_array = pa.array(ids, type=pa.string())
    except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
        raise ValueError(f"ids must be strings: {err}") from err
    if id_array.null_count:
        raise ValueError("ids must not be None")
    return id_array


def add_batches(
    batches: Batches,
    index: faiss.Index,
    writer: pq.ParquetWriter,
    dim: int,
    *,
    offset: int = 0,
    truth: ExactTopK | None = None,
    vectors: VectorWriter | None = None,
) -> int:
    """Adds every batch to ``index`` at positions ``offset...`` (``add_with_ids`` for IVF, so
    shards built apart merge into the same positions), writes their ids (and to ``vectors``
    their rows), updates ``truth``.

    Returns:
        Rows added.
    """
    rows = 0
    ivf = _nlist(index) is not None
    for ids, batch in batches():
        ids, batch = _check_batch(ids, batch, dim)
        if not ids:
            continue
        writer.write_table(pa.table({"id": _id_array(ids)}, schema=IDS_SCHEMA))
        if vectors is not None:
            vectors.write(batch, offset + rows)
        if ivf:
            index.add_with_ids(batch, np.arange(offset + rows, offset + rows + len(ids)))
        else:
            index.add(batch)
        if truth is not None:
            truth.update(batch, offset + rows)
        rows += len(ids)
    return rows


def write_files(
    out: Path, index: faiss.Index, ids_tmp: Path, vectors: VectorWriter | None = None
) -> None:
    """Moves the index, the written ids and vectors into place (the manifest comes after);
    without ``vectors``, an earlier build's vector file goes."""
    index_path = out / INDEX_FILE
    index_tmp = _tmp_name(index_path)
    try:
        faiss.write_index(index, str(index_tmp))
        _fsync_replace(index_tmp, index_path)
        _fsync_replace(ids_tmp, out / IDS_FILE)
        if vectors is not None:
            vectors.close()
            _fsync_replace(vectors.path, out / VECTORS_FILE)
        else:
            (out / VECTORS_FILE).unlink(missing_ok=True)
    finally:
        index_tmp.unlink(missing_ok=True)


def _discard(vectors: VectorWriter | None) -> None:
    """Closes and removes an unfinished vector file (a no-op once moved into place)."""
    if vectors is not None:
        vectors.close()
        vectors.path.unlink(missing_ok=True)


def open_vectors(out: Path, factory: str, dim: int, count: int) -> VectorWriter | None:
    """A writer of the vector file (temporary name in ``out``) when ``factory`` re-ranks."""
    if count == 0 or not wants_refine(factory):
        return None
    return VectorWriter(_tmp_name(out / VECTORS_FILE), dim)


def tune_refined(
    index: faiss.Index, truth: ExactTopK, target: float, vectors: VectorWriter | None
) -> tuple[dict, dict, dict | None]:
    """:func:`tune` through the exact re-rank when ``vectors`` were kept (closed here).

    Returns:
        (search_params, tuning record, the manifest's ``refine`` entry or None).
    """
    if vectors is None:
        return (*tune(index, truth, target), None)
    vectors.close()
    store = VectorStore(vectors.path, int(index.d), int(index.ntotal))
    try:
        search_params, tuning = tune(index, truth, target, vectors=store)
    finally:
        store.close()
    return search_params, tuning, refine_fields(search_params.pop("k_factor", K_FACTOR))


def manifest_fields(
    index: faiss.Index,
    factory: str,
    search_params: dict,
    tuning: dict | None,
    train_rows: int,
    seed: int,
    start: float,
    refine: dict | None = None,
) -> dict:
    """The index's own manifest fields (callers add model fields); ``refine`` when the
    vectors were kept for re-ranking."""
    return {
        **({"refine": refine} if refine else {}),
        "dim": int(index.d),
        "metric": METRIC,
        "count": int(index.ntotal),
        "factory": factory,
        "search_params": search_params,
        "tuning": tuning,
        "train_rows": train_rows,
        "trained_for": int(index.ntotal),
        "seed": seed,
        "index_file": INDEX_FILE,
        "ids_file": IDS_FILE,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "vlray_version": _vlray_version(),
        "build_seconds": round(time.perf_counter() - start, 3),
    }


def _train(
    batches: Batches,
    index: faiss.Index,
    factory: str,
    count: int,
    dim: int,
    memory_budget_bytes: int,
    seed: int,
    vectors: VectorWriter | None = None,
) -> tuple[ExactTopK | None, int]:
    """First pass of a build: the tuning queries drawn (None for Flat), ``vectors`` written
    and ``index`` trained on a reservoir sample when its type needs training; returns
    (queries, training rows)."""
    tunable = factory.upper() != "FLAT" and count > 0
    truth = ExactTopK(query_positions(count, seed), dim) if tunable else None
    sample = _sample_and_queries(
        batches, index, factory, count, dim, memory_budget_bytes, seed, truth, vectors
    )
    if sample is None:
        return truth, 0
    logger.info("training %s on %d sampled vectors", factory, sample.shape[0])
    train_index(index, sample, seed)
    return truth, int(sample.shape[0])


def _checked_fields(dim: int, count: int, manifest: dict | None) -> dict:
    """The caller's manifest fields, once ``dim``, ``count`` and they are known good (before
    any file is touched)."""
    if dim <= 0:
        raise ValueError(f"dim must be > 0, got {dim}")
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    fields = dict(manifest or {})
    json.dumps(fields)  # not JSON-serialisable: fails here
    return fields


def _build_files(
    batches: Batches,
    out: Path,
    blank: tuple[faiss.Index, dict[str, int]],
    factory: str,
    count: int,
    memory_budget_bytes: int,
    seed: int,
    target_recall: float,
    start: float,
) -> dict:
    """Both passes of :func:`build_index` over ``blank`` (:func:`new_index`'s empty index and
    default search parameters) and its files in place; returns the index's manifest fields
    (the manifest itself is the caller's to write)."""
    index, search_params = blank
    dim = int(index.d)
    ids_tmp = _tmp_name(out / IDS_FILE)
    vectors = open_vectors(out, factory, dim, count)
    try:
        truth, train_rows = _train(
            batches, index, factory, count, dim, memory_budget_bytes, seed, vectors
        )
        # Fast-scan lists take adds (only merge_from is unsafe): converting the empty index
        # keeps one copy of the codes instead of two at the end of the build.
        index = finish_index(index, factory)
        with pq.ParquetWriter(ids_tmp, IDS_SCHEMA) as writer:
            rows = add_batches(batches, index, writer, dim, truth=truth)
        if rows != count:
            raise ValueError(f"batches yielded {rows} rows but count={count}")
        tuning = refine = None
        if truth is not None:
            search_params, tuning, refine = tune_refined(index, truth, target_recall, vectors)
        write_files(out, index, ids_tmp, vectors)
    finally:
        ids_tmp.unlink(missing_ok=True)
        _discard(vectors)
    return manifest_fields(index, factory, search_params, tuning, train_rows, seed, start, refine)


def build_index(
    batches: Batches,
    index_dir: str | Path,
    *,
    dim: int,
    count: int,
    factory: str | None = None,
    memory_budget_bytes: int = 4 << 30,
    manifest: dict | None = None,
    seed: int = 0,
    target_recall: float = TARGET_RECALL,
    before_manifest: Callable[[Path], None] | None = None,
) -> dict:
    """Build an inner-product FAISS index over streamed embeddings and write it to ``index_dir``.

    ``batches`` is called once for Flat indexes and twice otherwise: first to draw a seeded
    reservoir sample for training (bounded by the budget) and the tuning queries, then to
    add every vector while the queries' exact neighbours are kept. ``nprobe`` / ``efSearch``
    are then tuned to ``target_recall`` and stored in the manifest. Only one batch, the
    training sample (freed before adding) and the index itself are held in memory.

    Args:
        batches: Returns a fresh iterable of ``(ids, vectors)``; ``vectors`` float32 (n, dim),
            L2-normalised (inner product is then cosine similarity); ``ids`` n strings.
        index_dir: Local directory; created if missing. Existing index files are replaced.
        dim: Vector dimension.
        count: Total rows ``batches`` yields; picks the index type and is checked.
        factory: FAISS factory string overriding :func:`choose_factory` (e.g. ``"HNSW32,Flat"``).
        memory_budget_bytes: Memory the build may use; picks the index type and sample size.
        manifest: Caller fields (model, family, weights, ...) stored in ``manifest.json``.
        seed: Seed for training sample, k-means and tuning queries.
        target_recall: recall@10 the stored search parameters reach on the tuning queries.
        before_manifest: Called with ``index_dir`` once the index files are in place and
            before the manifest is written (files of the caller's that must change with them).

    Returns:
        The manifest as written to ``manifest.json``.

    Raises:
        ValueError: bad dim/count/factory, a batch that is not float32 (n, dim), or a row
            count that differs from ``count``.
    """
    start = time.perf_counter()
    caller_fields = _checked_fields(dim, count, manifest)
    # no rows: nothing to train on, and an empty exact index is still valid
    factory = "Flat" if count == 0 else factory or choose_factory(count, dim, memory_budget_bytes)
    blank = new_index(factory, dim, seed)  # before any file is touched: checks the factory
    out = Path(index_dir)
    out.mkdir(parents=True, exist_ok=True)
    # A manifest next to half-replaced files would describe the wrong index: drop it first.
    (out / MANIFEST_FILE).unlink(missing_ok=True)
    fields = _build_files(
        batches, out, blank, factory, count, memory_budget_bytes, seed, target_recall, start
    )
    if before_manifest is not None:
        before_manifest(out)
    result = {**caller_fields, **fields}
    _write_manifest(out, result)
    logger.info(
        "built %s index of %d x %d in %.1fs", factory, result["count"], dim, result["build_seconds"]
    )
    return result


def _copy_ids(path: Path, writer: pq.ParquetWriter) -> None:
    """Streams an index's ids into ``writer`` (the rows an add keeps)."""
    for batch in pq.ParquetFile(path).iter_batches(batch_size=1 << 16):
        writer.write_table(pa.Table.from_batches([batch]).cast(IDS_SCHEMA))


def _appending(out: Path, manifest: dict) -> VectorWriter | None:
    """A writer appending to the index's vector file in place (after its ``count`` rows: a
    failed earlier add's extra rows are cut), when the index keeps one."""
    refine = manifest.get("refine")
    if not refine:
        return None
    return VectorWriter(
        out / refine["file"], int(manifest["dim"]), start_rows=int(manifest["count"])
    )


def _kind(factory: str) -> str:
    """The index family of a factory string: ``Flat``, ``HNSW`` or ``IVF`` (else the string)."""
    head = factory.split(",")[0].upper()
    for kind in ("HNSW", "IVF"):
        if head.startswith(kind) or f",{kind}" in factory.upper():
            return kind
    return "Flat" if head == "FLAT" else factory


def can_add(
    manifest: dict | None,
    *,
    total: int,
    dim: int,
    memory_budget_bytes: int,
    factory: str | None = None,
    flat_max: int = FLAT_MAX_ROWS,
) -> bool:
    """Whether vectors can be added to an existing index instead of rebuilding it.

    Yes when the existing index has the same dim, the index type chosen for the new total is
    still the same kind (Flat, HNSW, IVF), an explicit factory (if any) is the one it was built
    with, and for trained indexes (IVF, PQ) the data has not outgrown the training: at most 2x
    the rows it was trained for, else the lists are too long and the codebooks too old.
    """
    if not manifest or manifest.get("dim") != dim or manifest.get("count", 0) == 0:
        return False
    existing = manifest.get("factory", "")
    wanted = factory or choose_factory(total, dim, memory_budget_bytes, flat_max)
    if factory and factory != existing:
        return False
    if _kind(wanted) != _kind(existing):
        return False
    if manifest.get("train_rows", 0) or _kind(existing) == "IVF":
        return total <= 2 * int(manifest.get("trained_for", manifest.get("count", 0)))
    return True


def add_to_index(
    batches: Batches,
    index_dir: str | Path,
    *,
    dim: int,
    count: int,
    manifest: dict | None = None,
    before_manifest: Callable[[Path], None] | None = None,
) -> dict:
    """Add streamed vectors to the index in ``index_dir`` (same atomic file protocol as build).

    Args:
        batches: Returns a fresh iterable of ``(ids, vectors)`` of the NEW rows only.
        index_dir: A directory holding a finished index.
        dim: Vector dimension (must match).
        count: Rows ``batches`` yields (checked).
        manifest: Caller fields merged into the manifest.
        before_manifest: As in :func:`build_index`.

    Returns:
        The new manifest; its ``runs`` list gains one entry.
    """
    start = time.perf_counter()
    out = Path(index_dir)
    old = json.loads((out / MANIFEST_FILE).read_text())
    if old.get("dim") != dim:
        raise ValueError(f"cannot add {dim}-d vectors to a {old.get('dim')}-d index: rebuild it")
    index = faiss.read_index(str(out / old.get("index_file", INDEX_FILE)))
    ids_tmp = _tmp_name(out / IDS_FILE)
    vectors = _appending(out, old)  # in place: rows past the manifest's count are never read
    try:
        with pq.ParquetWriter(ids_tmp, IDS_SCHEMA) as writer:
            _copy_ids(out / old.get("ids_file", IDS_FILE), writer)
            rows = add_batches(
                batches, index, writer, dim, offset=int(index.ntotal), vectors=vectors
            )
        if rows != count:
            raise ValueError(f"batches yielded {rows} rows but count={count}")
        (out / MANIFEST_FILE).unlink(missing_ok=True)
        write_files(out, index, ids_tmp, vectors)
    finally:
        ids_tmp.unlink(missing_ok=True)
        if vectors is not None:
            vectors.close()
    if before_manifest is not None:
        before_manifest(out)
    result = {
        **old,
        **(manifest or {}),
        "count": int(index.ntotal),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "vlray_version": _vlray_version(),
        "build_seconds": round(time.perf_counter() - start, 3),
    }
    _write_manifest(out, result)
    logger.info("added %d vectors to %s index (now %d)", rows, old.get("factory"), result["count"])
    return result
