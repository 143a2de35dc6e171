"""Search-parameter tuning: exact top-k of a few held-out queries, then the cheapest
``nprobe`` / ``efSearch`` that reaches a target recall within a latency cap.

The queries are stored vectors picked at seeded random positions; each query's own position
is left out of both the exact and the approximate results, so a query is never its own
(trivially found) neighbour.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import faiss
import numpy as np

from vlray.index.refine import K_FACTORS, VectorStore, refined_search

logger = logging.getLogger(__name__)

TUNE_QUERIES = 256
TUNE_K = 10
TARGET_RECALL = 0.95
NPROBE_GRID = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
EF_GRID = (16, 32, 64, 128, 256, 512)
QUANTIZER_EF_MIN = 64
MAX_QUERY_MS = 30.0
"""Median single-query latency (ms, k=10) a tuned setting may cost; a wider one is not tried."""
LATENCY_QUERIES = 16
PLATEAU = 0.002
"""A recall gain below this from one setting to the next: wider probing has stopped paying."""

Search = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]
"""``index.search``-like: (queries, k) -> (scores, positions)."""


class ExactTopK:
    """Running exact top-(k+1) inner products of fixed queries over streamed batches.

    Attributes:
        queries: float32 (q, d), filled by :meth:`take` as their positions stream past.
        positions: int64 (q,), global row positions of the queries.
    """

    def __init__(self, positions: np.ndarray, dim: int, k: int = TUNE_K) -> None:
        self.positions = np.sort(np.asarray(positions, dtype=np.int64))
        self.queries = np.zeros((len(self.positions), dim), dtype=np.float32)
        self.k = k
        self.scores = np.full((len(self.positions), k + 1), -np.inf, dtype=np.float32)
        self.ids = np.full((len(self.positions), k + 1), -1, dtype=np.int64)

    def take(self, vectors: np.ndarray, offset: int) -> None:
        """Copies the queries that lie in rows ``[offset, offset + n)`` of the stream."""
        lo, hi = np.searchsorted(self.positions, [offset, offset + len(vectors)])
        self.queries[lo:hi] = vectors[self.positions[lo:hi] - offset]

    def update(self, vectors: np.ndarray, offset: int) -> None:
        """Merges the exact scores of rows ``[offset, offset + n)`` (float32 (n, d))."""
        if not len(self.positions) or not len(vectors):
            return
        scores = self.queries @ vectors.T
        keep = min(self.k + 1, scores.shape[1])
        part = np.argpartition(-scores, keep - 1, axis=1)[:, :keep]
        both_s = np.concatenate([self.scores, np.take_along_axis(scores, part, 1)], axis=1)
        both_i = np.concatenate([self.ids, part + offset], axis=1)
        order = np.argsort(-both_s, axis=1, kind="stable")[:, : self.k + 1]
        self.scores = np.take_along_axis(both_s, order, 1)
        self.ids = np.take_along_axis(both_i, order, 1)

    def merge(self, other: ExactTopK) -> None:
        """Folds in the top-k another accumulator (same queries) kept over other rows."""
        both_s = np.concatenate([self.scores, other.scores], axis=1)
        both_i = np.concatenate([self.ids, other.ids], axis=1)
        order = np.argsort(-both_s, axis=1, kind="stable")[:, : self.k + 1]
        self.scores = np.take_along_axis(both_s, order, 1)
        self.ids = np.take_along_axis(both_i, order, 1)

    def truth(self) -> list[set[int]]:
        """Per query, the positions of its k exact neighbours other than itself."""
        return [_without(row, p, self.k) for row, p in zip(self.ids, self.positions, strict=True)]


def _without(row: np.ndarray, self_pos: int, k: int) -> set[int]:
    return set([int(i) for i in row if i != self_pos and i >= 0][:k])


def recall(index: faiss.Index, truth: ExactTopK, search: Search | None = None) -> float:
    """Mean fraction of each query's k exact neighbours (itself left out) that ``index``
    (or ``search``, e.g. a re-ranking one over it) returns in its top k."""
    if not len(truth.positions):
        return 1.0
    _, found = (search or index.search)(truth.queries, truth.k + 1)
    hits = 0
    expected = 0
    for row, pos, exact in zip(found, truth.positions, truth.truth(), strict=True):
        got = _without(row, pos, truth.k)
        hits += len(got & exact)
        expected += len(exact)
    return hits / expected if expected else 1.0


def query_ms(
    index: faiss.Index, truth: ExactTopK, n: int = LATENCY_QUERIES, search: Search | None = None
) -> float:
    """Median wall time (ms) of ``n`` single-query searches (k + 1 results) of ``truth``'s
    queries: the cost a served query pays with the index's current parameters."""
    times = []
    search = search or index.search
    for query in truth.queries[:n]:
        start = time.perf_counter()
        search(query.reshape(1, -1), truth.k + 1)
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times)) if times else 0.0


def probe_in_parallel(index: faiss.Index) -> None:
    """Lets one query's inverted-list scan use every OpenMP thread (FAISS ``parallel_mode``
    1) instead of one thread per query (mode 0, its default, which leaves a single served
    query on one core). On 2 cores a single query at nprobe 1024 took 4.9 ms against 8.4 ms
    (median of 64, IVF4096_HNSW32,SQ8 over 500 k x 256); a batch of 512 costs the same in both
    modes. Not stored in the index file, so set when an index is loaded or tuned."""
    ivf = _ivf(index)
    if ivf is not None:
        ivf.parallel_mode = 1


def _ivf(index: faiss.Index) -> faiss.IndexIVF | None:
    """The IVF index inside ``index`` (through pre-transforms), or None."""
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def _candidates(index: faiss.Index) -> list[dict[str, int]]:
    ivf = _ivf(index)
    if ivf is not None:
        hnsw_coarse = isinstance(faiss.downcast_index(ivf.quantizer), faiss.IndexHNSW)
        grid = [n for n in NPROBE_GRID if n <= ivf.nlist] or [1]
        return [
            {
                "nprobe": n,
                **({"quantizer_efSearch": max(QUANTIZER_EF_MIN, 2 * n)} if hnsw_coarse else {}),
            }
            for n in grid
        ]
    if isinstance(faiss.downcast_index(index), faiss.IndexHNSW):
        return [{"efSearch": ef} for ef in EF_GRID]
    return []


def _searches(index: faiss.Index, vectors: VectorStore | None) -> list[tuple[dict, Search]]:
    """The grids to walk: ``index.search`` alone, or the exact re-rank at each ``k_factor``."""
    if vectors is None:
        return [({}, index.search)]

    def at(k_factor: int) -> Search:
        return lambda queries, k: refined_search(index, vectors, queries, k, k_factor)

    return [({"k_factor": f}, at(f)) for f in K_FACTORS]


def _walk(
    index: faiss.Index,
    truth: ExactTopK,
    target: float,
    max_query_ms: float,
    grid: tuple[dict, Search],
    seen: list[tuple[dict[str, int], float]],
) -> tuple[bool, bool]:
    """Widens ``nprobe``/``efSearch`` at one ``grid`` (extra parameters, search), appending
    to ``seen``; stops at the target, the latency cap (the narrowest setting is always
    tried) or, for a re-ranked search, where recall stops growing (then only more candidates
    help). Returns (target reached, latency capped)."""
    extra, search = grid
    params = faiss.ParameterSpace()
    mine: list[float] = []
    for candidate in _candidates(index):
        for name, value in candidate.items():
            params.set_index_parameter(index, name, value)
        setting = {**candidate, **extra}
        ms = query_ms(index, truth, search=search)
        if mine and ms > max_query_ms:
            logger.info("tuning stops at %s: %.2f ms per query > %.0f", setting, ms, max_query_ms)
            return False, True
        mine.append(recall(index, truth, search))
        seen.append((setting, mine[-1]))
        logger.info("tuning %s: recall@%d %.4f, %.2f ms per query", setting, truth.k, mine[-1], ms)
        if mine[-1] >= target:
            return True, False
        if extra and len(mine) > 1 and mine[-1] - mine[-2] < PLATEAU:
            return False, False
    return False, False


def tune(
    index: faiss.Index,
    truth: ExactTopK,
    target: float = TARGET_RECALL,
    max_query_ms: float = MAX_QUERY_MS,
    vectors: VectorStore | None = None,
) -> tuple[dict[str, int], dict[str, float | int]]:
    """The cheapest search parameters reaching ``target`` recall@k on ``truth``'s queries
    (else those within 0.005 of the best recall seen), applied to ``index``.

    The grid widens until the target is reached or a setting's median single-query latency
    exceeds ``max_query_ms`` (that setting and wider ones are not kept; the narrowest one is
    always tried), so a large index gets the best recall it can serve in time.

    With ``vectors`` (the index's stored rows) recall and latency are measured through the
    exact re-rank of :func:`vlray.index.refine.refined_search`, and the grid is walked again
    at each wider ``k_factor`` (in the returned parameters) until the target is reached or
    more candidates stop helping.

    Returns:
        (search_params for the manifest, a tuning record: target, recall, queries, k, and
        ``latency_capped`` when the cap stopped the grid before the target).
    """
    probe_in_parallel(index)
    seen: list[tuple[dict[str, int], float]] = []
    capped = False
    best = -1.0
    for grid in _searches(index, vectors):
        reached, stopped = _walk(index, truth, target, max_query_ms, grid, seen)
        capped |= stopped
        if reached or not seen or max(r for _, r in seen) < best + PLATEAU:
            break
        best = max(r for _, r in seen)
    if not seen:
        return {}, {
            "target_recall": target,
            "recall": recall(index, truth, _searches(index, vectors)[0][1]),
            "queries": len(truth.positions),
            "k": truth.k,
        }
    best = max(r for _, r in seen)
    chosen, got = next((c, r) for c, r in seen if r >= min(target, best - 0.005))
    params = faiss.ParameterSpace()
    for name, value in chosen.items():
        if name != "k_factor":
            params.set_index_parameter(index, name, value)
    record = {
        "target_recall": target,
        "recall": round(got, 4),
        "queries": len(truth.positions),
        "k": truth.k,
    }
    if capped and got < target:
        record["latency_capped"] = max_query_ms
    return chosen, record
