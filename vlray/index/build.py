"""Build a FAISS inner-product index from streamed, L2-normalised embeddings.

Pure numpy in, files out: no Ray, no torch. The output directory holds

- ``index.faiss``   the index, loadable by plain ``faiss.read_index``;
- ``ids.parquet``   one column ``id: string``; row i is FAISS position i;
- ``manifest.json`` written last, so its presence means the other two are complete.

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

logger = logging.getLogger(__name__)

INDEX_FILE = "index.faiss"
IDS_FILE = "ids.parquet"
MANIFEST_FILE = "manifest.json"
METRIC = "inner_product"
IDS_SCHEMA = pa.schema([pa.field("id", pa.string(), nullable=False)])

FLAT_MAX_ROWS = 200_000
# Above this HNSW build time (hours) outweighs its recall edge over IVF-PQ, whatever the memory.
HNSW_MAX_ROWS = 5_000_000
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 80
HNSW_EF_SEARCH = 64
# Training sample bounds: faiss wants >= 39 points per centroid and gains little past 256.
TRAIN_POINTS_PER_CENTROID = 256
TRAIN_MAX_ROWS = 262_144
NPROBE_MAX = 64

Batches = Callable[[], Iterable[tuple[list[str], np.ndarray]]]


def _hnsw_bytes(count: int, dim: int) -> int:
    # Raw float32 vectors + 2*M int32 links at level 0 + ~1/M of the nodes on upper levels
    # (M links each) + per-node level/offset bookkeeping.
    per_vector = 4 * dim + int(4 * 2 * HNSW_M * 1.1) + 16
    return count * per_vector


def _ivf_nlist(count: int) -> int:
    """K ~ 4 * sqrt(N) rounded to the nearest power of two, with >= 39 training points each."""
    k = 2 ** max(0, round(math.log2(max(1.0, 4.0 * math.sqrt(count)))))
    while k > 1 and k * 39 > count:
        k //= 2
    return k


def _pq_m(count: int, dim: int, nlist: int, memory_budget_bytes: int) -> int:
    """Bytes per PQ code: the largest divisor of dim up to dim/4 whose index fits the budget."""
    limit = max(1, dim // 4)
    candidates = [m for m in range(1, limit + 1) if dim % m == 0]
    # Coarse centroids and PQ codebooks are fixed costs; each row costs M code bytes + an int64 id.
    fixed = nlist * dim * 4 + 256 * dim * 4
    for m in reversed(candidates):
        if fixed + count * (m + 8) <= memory_budget_bytes:
            return m
    # Nothing fits: take the smallest code that still keeps >= 2 dims per sub-quantizer
    # apart (a soft budget beats a useless index).
    sensible = [m for m in candidates if m >= min(8, limit)]
    return sensible[0] if sensible else candidates[-1]


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
    - HNSW graph with raw vectors fits ``memory_budget_bytes`` and ``count <= hnsw_max``:
      ``"HNSW32,Flat"``.
    - otherwise ``"IVF{K},PQ{M}"`` with K ~ 4*sqrt(count) as a power of two and M the
      largest divisor of ``dim`` up to ``dim / 4`` bytes per vector that fits the budget.

    Args:
        count: Number of vectors to index, >= 0.
        dim: Vector dimension, > 0.
        memory_budget_bytes: Memory the finished index may use.
        flat_max: Largest row count served by exact search.
        hnsw_max: Largest row count for which HNSW is considered.

    Returns:
        A factory string for ``faiss.index_factory(dim, s, faiss.METRIC_INNER_PRODUCT)``.
    """
    if count < 0 or dim <= 0:
        raise ValueError(f"count must be >= 0 and dim > 0, got count={count}, dim={dim}")
    if count <= flat_max:
        return "Flat"
    if count <= hnsw_max and _hnsw_bytes(count, dim) <= memory_budget_bytes:
        return f"HNSW{HNSW_M},Flat"
    nlist = _ivf_nlist(count)
    return f"IVF{nlist},PQ{_pq_m(count, dim, nlist, memory_budget_bytes)}"


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


def _reservoir_sample(batches: Batches, size: int, dim: int, seed: int) -> np.ndarray:
    """Uniform sample of ``size`` rows over one pass (Algorithm R, vectorised per batch).

    Returns:
        float32 array (min(size, rows seen), dim).
    """
    rng = np.random.default_rng(seed)
    sample = np.empty((size, dim), dtype=np.float32)
    seen = 0
    for ids, vectors in batches():
        _, vectors = _check_batch(ids, vectors, dim)
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
) -> dict:
    """Build an inner-product FAISS index over streamed embeddings and write it to ``index_dir``.

    ``batches`` is called once for Flat/HNSW indexes and twice for trained ones (IVF, PQ):
    first to draw a seeded reservoir sample for training, then to add every vector. Only one
    batch, the training sample and the index itself are held in memory.

    Args:
        batches: Returns a fresh iterable of ``(ids, vectors)``; ``vectors`` float32 (n, dim),
            L2-normalised (inner product is then cosine similarity); ``ids`` n strings.
        index_dir: Local directory; created if missing. Existing index files are replaced.
        dim: Vector dimension.
        count: Total rows ``batches`` yields; picks the index type and is checked.
        factory: FAISS factory string overriding :func:`choose_factory` (e.g. ``"HNSW32,Flat"``).
        memory_budget_bytes: Memory the finished index may use; picks the index type.
        manifest: Caller fields (model, family, weights, ...) stored in ``manifest.json``.
        seed: Seed for training sample and k-means.

    Returns:
        The manifest as written to ``manifest.json``.

    Raises:
        ValueError: bad dim/count/factory, a batch that is not float32 (n, dim), or a row
            count that differs from ``count``.
    """
    start = time.perf_counter()
    if dim <= 0:
        raise ValueError(f"dim must be > 0, got {dim}")
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    caller_fields = dict(manifest or {})
    json.dumps(caller_fields)  # fail before any file is touched if it is not JSON-serialisable

    if count == 0:
        factory = "Flat"  # nothing to train on; an empty exact index is still valid
    elif factory is None:
        factory = choose_factory(count, dim, memory_budget_bytes)
    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
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
    if nlist is not None:
        search_params["nprobe"] = min(nlist, max(8, min(NPROBE_MAX, nlist // 8)))
        faiss.extract_index_ivf(index).cp.seed = seed

    out = Path(index_dir)
    out.mkdir(parents=True, exist_ok=True)
    # A manifest next to half-replaced files would describe the wrong index: drop it first.
    (out / MANIFEST_FILE).unlink(missing_ok=True)

    train_rows = 0
    if not index.is_trained:
        size = min(count, TRAIN_MAX_ROWS)
        if nlist is not None:
            size = min(size, TRAIN_POINTS_PER_CENTROID * nlist)
        sample = _reservoir_sample(batches, size, dim, seed)
        train_rows = sample.shape[0]
        if nlist is not None and train_rows < nlist:
            raise ValueError(
                f"factory {factory!r} needs >= {nlist} training vectors, got {train_rows}: "
                "use fewer IVF lists or a Flat/HNSW factory"
            )
        logger.info("training %s on %d sampled vectors", factory, train_rows)
        index.train(sample)
        del sample

    index_path, ids_path = out / INDEX_FILE, out / IDS_FILE
    ids_tmp, index_tmp = _tmp_name(ids_path), _tmp_name(index_path)
    try:
        rows = 0
        with pq.ParquetWriter(ids_tmp, IDS_SCHEMA) as writer:
            for ids, vectors in batches():
                ids, vectors = _check_batch(ids, vectors, dim)
                if not ids:
                    continue
                try:
                    id_array = pa.array(ids, type=pa.string())
                except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
                    raise ValueError(f"ids must be strings: {err}") from err
                if id_array.null_count:
                    raise ValueError("ids must not be None")
                writer.write_table(pa.table({"id": id_array}, schema=IDS_SCHEMA))
                index.add(vectors)
                rows += len(ids)
        if rows != count:
            raise ValueError(f"batches yielded {rows} rows but count={count}")
        faiss.write_index(index, str(index_tmp))
        _fsync_replace(index_tmp, index_path)
        _fsync_replace(ids_tmp, ids_path)
    finally:
        ids_tmp.unlink(missing_ok=True)
        index_tmp.unlink(missing_ok=True)

    result = {
        **caller_fields,
        "dim": dim,
        "metric": METRIC,
        "count": int(index.ntotal),
        "factory": factory,
        "search_params": search_params,
        "train_rows": train_rows,
        "trained_for": int(index.ntotal),
        "seed": seed,
        "index_file": INDEX_FILE,
        "ids_file": IDS_FILE,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "vlray_version": _vlray_version(),
        "build_seconds": round(time.perf_counter() - start, 3),
    }
    _write_manifest(out, result)
    logger.info(
        "built %s index of %d x %d in %.1fs", factory, result["count"], dim, result["build_seconds"]
    )
    return result


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
) -> dict:
    """Add streamed vectors to the index in ``index_dir`` (same atomic file protocol as build).

    Args:
        batches: Returns a fresh iterable of ``(ids, vectors)`` of the NEW rows only.
        index_dir: A directory holding a finished index.
        dim: Vector dimension (must match).
        count: Rows ``batches`` yields (checked).
        manifest: Caller fields merged into the manifest.

    Returns:
        The new manifest; its ``runs`` list gains one entry.
    """
    start = time.perf_counter()
    out = Path(index_dir)
    old = json.loads((out / MANIFEST_FILE).read_text())
    if old.get("dim") != dim:
        raise ValueError(f"cannot add {dim}-d vectors to a {old.get('dim')}-d index: rebuild it")
    index = faiss.read_index(str(out / old.get("index_file", INDEX_FILE)))
    index_path, ids_path = out / INDEX_FILE, out / IDS_FILE
    ids_tmp, index_tmp = _tmp_name(ids_path), _tmp_name(index_path)
    try:
        rows = 0
        with pq.ParquetWriter(ids_tmp, IDS_SCHEMA) as writer:
            previous = pq.ParquetFile(out / old.get("ids_file", IDS_FILE))
            for batch in previous.iter_batches(batch_size=1 << 16):
                writer.write_table(pa.Table.from_batches([batch]).cast(IDS_SCHEMA))
            for ids, vectors in batches():
                ids, vectors = _check_batch(ids, vectors, dim)
                if not ids:
                    continue
                writer.write_table(pa.table({"id": pa.array(ids, pa.string())}, schema=IDS_SCHEMA))
                index.add(vectors)
                rows += len(ids)
        if rows != count:
            raise ValueError(f"batches yielded {rows} rows but count={count}")
        faiss.write_index(index, str(index_tmp))
        (out / MANIFEST_FILE).unlink(missing_ok=True)
        _fsync_replace(index_tmp, index_path)
        _fsync_replace(ids_tmp, ids_path)
    finally:
        ids_tmp.unlink(missing_ok=True)
        index_tmp.unlink(missing_ok=True)
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
