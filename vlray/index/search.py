"""Load an index written by :func:`vlray.index.build_index` and answer k-NN queries."""

from __future__ import annotations

import bisect
import json
import logging
import threading
import time
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from vlray.index.build import IDS_FILE, INDEX_FILE, MANIFEST_FILE
from vlray.index.refine import VectorStore, refined_search
from vlray.index.tune import probe_in_parallel

logger = logging.getLogger(__name__)


class _SortedIds:
    """Read-only sequence view of a sorted Arrow string array, for :mod:`bisect`.

    Keeps ids in Arrow buffers instead of millions of Python strings; a lookup costs
    ~log2(n) scalar reads. Arrow sorts strings by UTF-8 bytes, which is code-point order,
    the same order Python compares ``str`` in.
    """

    def __init__(self, values: pa.Array) -> None:
        self._values = values

    def __len__(self) -> int:
        return len(self._values)

    def __getitem__(self, i: int) -> str:
        return self._values[i].as_py()


class IdLookup:
    """id -> row of an Arrow string array: one Arrow sort, then binary search per lookup."""

    def __init__(self, ids: pa.Array) -> None:
        order = pc.sort_indices(ids)
        self._sorted = _SortedIds(ids.take(order))
        self._order = order.to_numpy()

    def __len__(self) -> int:
        return len(self._sorted)

    def find(self, id: str) -> int | None:
        """The row of ``id`` in the original array, or None."""
        i = bisect.bisect_left(self._sorted, id)
        if i < len(self._sorted) and self._sorted[i] == id:
            return int(self._order[i])
        return None


class SearchIndex:
    """An inner-product FAISS index with its id mapping and manifest.

    Scores are inner products of L2-normalised vectors, i.e. cosine similarity in [-1, 1]
    (approximate for PQ-compressed indexes).
    """

    def __init__(
        self,
        index: faiss.Index,
        ids: pa.Array,
        manifest: dict,
        load_seconds: float,
        vectors: VectorStore | None = None,
    ):
        self._index = index
        self._vectors = vectors  # exact float16 rows of a lossy index, re-ranked on search
        self._k_factor = int(manifest["refine"]["k_factor"]) if vectors is not None else 0
        self._ids = ids  # position -> id, Arrow large_string
        self._manifest = manifest
        self.load_seconds = load_seconds
        self._lookup: IdLookup | None = None  # built on first use, set in one assignment
        self._lookup_lock = threading.Lock()
        self._reconstruct_ready = False

    @classmethod
    def load(cls, index_dir: str | Path) -> SearchIndex:
        """Read ``manifest.json``, ``index.faiss`` and ``ids.parquet`` from a local directory.

        Search parameters recorded at build time (``efSearch``, ``nprobe``) are applied.

        Raises:
            FileNotFoundError: no manifest (the build did not finish or the path is wrong).
            ValueError: the files disagree with each other.
        """
        start = time.perf_counter()
        root = Path(index_dir)
        manifest_path = root / MANIFEST_FILE
        if not manifest_path.is_file():
            raise FileNotFoundError(
                f"{manifest_path} not found: {root} is not a finished vlray index "
                "(build_index writes the manifest last)"
            )
        manifest = json.loads(manifest_path.read_text())
        index = faiss.read_index(str(root / manifest.get("index_file", INDEX_FILE)))
        ids = (
            pq.read_table(root / manifest.get("ids_file", IDS_FILE), columns=["id"])
            .column("id")
            .cast(pa.large_string())  # > 2 GiB of id text must not overflow int32 offsets
            .combine_chunks()
        )
        if index.d != manifest["dim"] or index.ntotal != len(ids) or len(ids) != manifest["count"]:
            raise ValueError(
                f"{root}: index has {index.ntotal} x {index.d}, ids.parquet {len(ids)} rows, "
                f"manifest count={manifest['count']} dim={manifest['dim']}; rebuild the index"
            )
        params = faiss.ParameterSpace()
        for name, value in manifest.get("search_params", {}).items():
            params.set_index_parameter(index, name, value)
        probe_in_parallel(index)
        refine = manifest.get("refine")
        vectors = VectorStore(root / refine["file"], index.d, index.ntotal) if refine else None
        load_seconds = time.perf_counter() - start
        logger.info(
            "loaded %s index of %d rows in %.2fs", manifest.get("factory"), len(ids), load_seconds
        )
        return cls(index, ids, manifest, load_seconds, vectors)

    @property
    def manifest(self) -> dict:
        return self._manifest

    @property
    def dim(self) -> int:
        return int(self._manifest["dim"])

    @property
    def count(self) -> int:
        return int(self._index.ntotal)

    @property
    def index(self) -> faiss.Index:
        return self._index

    def search(self, queries: np.ndarray, k: int) -> list[list[tuple[str, float]]]:
        """k nearest stored vectors by inner product for each query.

        Args:
            queries: float32 (q, dim), L2-normalised; a single (dim,) vector is accepted.
            k: Results per query, >= 1; clamped to the number of stored vectors.

        Returns:
            For each query, up to k ``(id, score)`` pairs, best (highest score) first.
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        queries = np.asarray(queries)
        if queries.ndim == 1:
            queries = queries[None, :]
        if queries.dtype != np.float32 or queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(
                f"queries must be float32 (q, {self.dim}), got {queries.dtype} {queries.shape}"
            )
        k = min(k, self.count)
        if k == 0 or queries.shape[0] == 0:
            return [[] for _ in range(queries.shape[0])]
        queries = np.ascontiguousarray(queries)
        if self._vectors is not None:
            scores, positions = refined_search(
                self._index, self._vectors, queries, k, self._k_factor
            )
        else:
            scores, positions = self._index.search(queries, k)
        valid = positions >= 0  # FAISS pads with -1 when fewer than k are found
        found = self._ids.take(pa.array(positions[valid])).to_pylist()
        results: list[list[tuple[str, float]]] = []
        taken = 0
        for row_scores, row_valid in zip(scores, valid, strict=True):
            n = int(row_valid.sum())
            row_ids = found[taken : taken + n]
            results.append(list(zip(row_ids, row_scores[row_valid].tolist(), strict=True)))
            taken += n
        return results

    def position(self, id: str) -> int | None:
        """FAISS position of ``id``, or None; O(log n) after a one-time Arrow sort."""
        lookup = self._lookup
        if lookup is None:
            with self._lookup_lock:  # first calls from several threads build it once
                if self._lookup is None:
                    self._lookup = IdLookup(self._ids)
                lookup = self._lookup
        return lookup.find(id)

    def vector(self, id: str) -> np.ndarray | None:
        """The stored vector for ``id`` (float32 (dim,)), or None for an unknown id.

        Exact for Flat and HNSW,Flat and indexes that keep their vectors (SQ8, PQ; float16
        precision); the decoded approximation for other compressed indexes (SQfp16).
        """
        pos = self.position(id)
        if pos is None:
            return None
        if self._vectors is not None:
            return self._vectors.rows(np.array([pos]))[0]
        if not self._reconstruct_ready:
            try:
                # IVF lists are not addressable by position until a direct map exists.
                faiss.extract_index_ivf(self._index).make_direct_map()
            except RuntimeError:
                pass  # not an IVF index
            self._reconstruct_ready = True
        try:
            return self._index.reconstruct(pos)
        except RuntimeError as err:
            raise NotImplementedError(
                f"index {self._manifest.get('factory')!r} cannot reconstruct stored vectors: {err}"
            ) from err
