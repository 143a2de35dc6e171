"""``/api/search/*``: by text, uploaded image, indexed id or raw vector.

No ``from __future__ import annotations``: FastAPI reads endpoint annotations at runtime. The
page limits (``k``, ``offset``) come from the config, so the router is built per app.
"""

import math
import time
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
import torch
from fastapi import APIRouter, Depends, File, HTTPException, Query, Request, UploadFile
from starlette.concurrency import run_in_threadpool

from vlray.families.base import UnsupportedImage
from vlray.ops.decode import DecodeError, probe_image
from vlray.query import QueryError
from vlray.serve.config import ServeConfig
from vlray.serve.deps import ItemId, ServicesDep, SnapshotDep, masks_link, thumbnail_link
from vlray.serve.metrics import Metrics
from vlray.serve.public import redact
from vlray.serve.schemas import SearchResponse, vector_query_model
from vlray.serve.slots import SlotsBusy
from vlray.serve.state import Snapshot

MinScore = Annotated[
    float | None, Query(ge=-1.0, le=1.0, description="drop hits scoring below this")
]
Regions = Annotated[
    bool,
    Query(description="search the SAM regions inside the images (index/regions/) instead"),
]
NO_REGIONS = (
    "this index has no region index (run the job with --set regions.enabled=true and sam.name)"
)
_COMMON: dict[str, Any] = {"response_model": SearchResponse, "response_model_exclude_none": True}


@dataclass(frozen=True)
class Page:
    """Which hits of the ranking a request wants."""

    k: int
    offset: int
    min_score: float | None
    regions: bool = False
    per_image: int = 0
    """With ``regions``: at most this many regions of one image (0: no limit)."""


def _decode_status(exc: DecodeError) -> int:
    text = str(exc)
    if text.startswith("empty file"):
        return 400
    if text.startswith("not an image"):
        return 415
    if text.startswith("decompression bomb"):
        return 413
    return 400


def _hit(
    request: Request, snap: Snapshot, rank: int, item_id: str, score: float, probability: Any
) -> dict[str, Any]:
    width, height = snap.sizes.get(item_id)
    hit: dict[str, Any] = {
        "rank": rank,
        "id": item_id,
        "score": float(score),
        "width": width,
        "height": height,
    }
    if probability is not None:
        p = probability(torch.tensor(score))
        if p is not None:
            hit["probability"] = float(p.item())
    if snap.thumbnail(item_id) is not None:
        hit["thumbnail"] = thumbnail_link(request, item_id)
    if snap.masks.has(item_id):
        hit["masks"] = masks_link(request, item_id)
    metadata = snap.searcher.metadata.get(item_id) if snap.searcher.metadata else None
    if metadata is not None:
        hit["metadata"] = metadata
    return hit


def _ranked(
    snap: Snapshot, vector: np.ndarray, page: Page
) -> tuple[list[tuple[str, float, dict[str, Any]]], int]:
    """The first ``offset + k`` (id, score, region fields) of the ranking, and the number of
    vectors ranked (images, or regions with ``page.regions``)."""
    n = page.offset + page.k
    if not page.regions:
        return [(i, score, {}) for i, score in snap.search(vector, n)], snap.count
    if snap.regions is None:
        raise HTTPException(400, NO_REGIONS)
    found = snap.regions.search_vector(np.asarray(vector, np.float32), n, per_image=page.per_image)
    ranked = [(h["id"], h["score"], {"mask_id": h["mask_id"], "bbox": h["bbox"]}) for h in found]
    return ranked, snap.regions.index.count


def respond(
    request: Request,
    snap: Snapshot,
    metrics: Metrics,
    kind: str,
    vector: np.ndarray,
    page: Page,
    start: float,
    probability: Any = None,
) -> dict[str, Any]:
    """The SearchResponse of one query vector."""
    k, offset, min_score = page.k, page.offset, page.min_score
    pairs, total = _ranked(snap, vector, page)
    hits = []
    for rank, (item_id, score, region) in enumerate(pairs[offset:], start=offset + 1):
        if min_score is not None and score < min_score:
            break
        hits.append({**_hit(request, snap, rank, item_id, score, probability), **region})
    more = (
        len(hits) == k
        and offset + k < total
        and (min_score is None or not pairs or pairs[-1][1] >= min_score)
    )
    took = time.perf_counter() - start
    metrics.query_seconds.labels(kind).observe(took)
    return {
        "kind": kind,
        "k": k,
        "offset": offset,
        "min_score": min_score,
        "hits": hits,
        "next_offset": offset + k if more else None,
        "total_vectors": total,
        "regions": page.regions or None,
        "index_created_at": snap.manifest.get("created_at"),
        "took_ms": round(took * 1000, 3),
    }


async def encode_upload(snap: Snapshot, file: UploadFile, config: ServeConfig) -> np.ndarray:
    """The query vector of an uploaded image (read, header-checked, decoded and encoded)."""
    data = await file.read(config.max_upload_bytes + 1)
    if len(data) > config.max_upload_bytes:
        raise HTTPException(413, f"upload too large (limit {config.max_upload_bytes} bytes)")
    if not data:
        raise HTTPException(400, "empty upload (0 bytes)")
    try:
        probe_image(data, config.max_pixels)  # header only: bombs never get decoded
        return await run_in_threadpool(snap.models.encode_image, data, config.max_pixels)
    except DecodeError as exc:
        raise HTTPException(_decode_status(exc), f"{file.filename or 'upload'}: {exc}") from None
    except UnsupportedImage as exc:
        raise HTTPException(422, f"the model cannot take this image: {redact(str(exc))}") from None
    except QueryError as exc:
        raise HTTPException(503, f"model not available: {redact(str(exc))}") from None


def _vector(query: Any, dim: int) -> np.ndarray:
    vector = np.asarray(query.vector, dtype=np.float64)
    if vector.shape[0] != dim:
        raise HTTPException(422, f"vector has {vector.shape[0]} values, the index has dim {dim}")
    norm = float(np.linalg.norm(vector)) if np.isfinite(vector).all() else math.nan
    if not math.isfinite(norm) or norm == 0.0:
        raise HTTPException(422, "vector must be finite and non-zero")
    return (vector / norm).astype(np.float32)


def _page_dependency(config: ServeConfig) -> Any:
    """The page query parameters every GET/upload search takes, as one dependency."""
    K = Annotated[int, Query(ge=1, le=config.max_k, description="results per page")]
    Offset = Annotated[int, Query(ge=0, le=config.max_offset, description="hits to skip")]
    PerImage = Annotated[
        int,
        Query(ge=0, le=config.max_k, description="with regions: at most this many per image"),
    ]

    def page(
        k: K = 10,
        offset: Offset = 0,
        min_score: MinScore = None,
        regions: Regions = False,
        per_image: PerImage = 0,
    ) -> Page:
        return Page(k, offset, min_score, regions, per_image)

    return Annotated[Page, Depends(page)]


def _text_vector(snap: Snapshot, q: str) -> tuple[np.ndarray, Any]:
    if not q.strip():
        raise HTTPException(422, "empty text query")
    try:
        return snap.models.encode_text(q)
    except NotImplementedError as exc:
        raise HTTPException(400, redact(str(exc))) from None
    except QueryError as exc:
        raise HTTPException(503, f"model not available: {redact(str(exc))}") from None


def _id_vector(snap: Snapshot, item_id: str) -> np.ndarray:
    try:
        vector = snap.searcher.index.vector(item_id)
    except NotImplementedError as exc:
        raise HTTPException(400, str(exc)) from None
    if vector is None:
        raise HTTPException(404, f"id {item_id!r} is not in the index")
    return np.asarray(vector)


async def _upload_vector(snap: Snapshot, services: Any, file: UploadFile) -> np.ndarray:
    try:
        async with services.slots.slot():  # the bytes in memory and the decode: bounded
            return await encode_upload(snap, file, services.config)
    except SlotsBusy as exc:
        services.metrics.image_busy.inc()
        raise HTTPException(503, f"{exc}; retry shortly", headers=exc.headers) from None
    finally:
        await file.close()


def search_router(config: ServeConfig) -> APIRouter:
    """The four search endpoints, their page limits from ``config``."""
    router = APIRouter(prefix="/api")
    PageDep = _page_dependency(config)
    VectorQuery = vector_query_model(config.max_k, config.max_offset)
    Text = Annotated[str, Query(min_length=1, max_length=config.max_text_chars)]

    @router.get("/search/text", summary="Search by text (models with a text tower)", **_COMMON)
    def search_text(
        request: Request, snap: SnapshotDep, services: ServicesDep, q: Text, page: PageDep
    ) -> dict[str, Any]:
        start = time.perf_counter()
        vector, probability = _text_vector(snap, q)
        return respond(request, snap, services.metrics, "text", vector, page, start, probability)

    @router.get("/search/id", summary="Neighbours of an indexed id", **_COMMON)
    def search_id(
        request: Request, snap: SnapshotDep, services: ServicesDep, id: ItemId, page: PageDep
    ) -> dict[str, Any]:
        start = time.perf_counter()
        vector = _id_vector(snap, id)
        return respond(request, snap, services.metrics, "id", vector, page, start)

    @router.post("/search/vector", summary="Search by a raw vector", **_COMMON)
    def search_vector(
        request: Request,
        snap: SnapshotDep,
        services: ServicesDep,
        query: VectorQuery,  # type: ignore[valid-type]
    ) -> dict[str, Any]:
        start = time.perf_counter()
        unit = _vector(query, snap.dim)
        page = Page(query.k, query.offset, query.min_score, query.regions, query.per_image)
        return respond(request, snap, services.metrics, "vector", unit, page, start)

    @router.post(
        "/search/image", summary="Search by an uploaded image (multipart field `file`)", **_COMMON
    )
    async def search_image(
        request: Request,
        snap: SnapshotDep,
        services: ServicesDep,
        file: Annotated[UploadFile, File(description="JPEG, PNG, WebP, BMP, GIF or TIFF")],
        page: PageDep,
    ) -> dict[str, Any]:
        start = time.perf_counter()
        vector = await _upload_vector(snap, services, file)
        return await run_in_threadpool(
            respond, request, snap, services.metrics, "image", vector, page, start
        )

    return router
