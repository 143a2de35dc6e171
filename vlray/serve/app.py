"""The FastAPI app: search API, health, metrics and the web page.

No ``from __future__ import annotations`` here: FastAPI reads endpoint annotations at runtime,
and some models are built per app (their limits come from the config).
"""

import hmac
import logging
import math
import time
from importlib import resources
from typing import Annotated, Any
from urllib.parse import quote

import numpy as np
import torch
from fastapi import APIRouter, Depends, FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.security import APIKeyHeader
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field, create_model
from starlette.concurrency import run_in_threadpool

from vlray.families.base import Family, UnsupportedImage
from vlray.ops.decode import DecodeError, probe_image
from vlray.query import QueryError
from vlray.serve.config import ServeConfig
from vlray.serve.guard import Guard, GuardSettings
from vlray.serve.metrics import Metrics, Observe
from vlray.serve.public import load_error, model_name, redact
from vlray.serve.slots import DecodeSlots, SlotsBusy
from vlray.serve.state import IndexHolder, Snapshot
from vlray.storage import read_bytes

logger = logging.getLogger(__name__)

API_KEY_HEADER = "x-api-key"
# Multipart framing around an upload: the body limit is the upload limit plus this.
_BODY_SLACK = 64 << 10
_STATIC = resources.files("vlray.serve") / "static"


class Hit(BaseModel):
    """One search result."""

    rank: int = Field(description="1-based rank over the whole result list (offset + i + 1)")
    id: str
    score: float = Field(description="cosine similarity (inner product of unit vectors)")
    probability: float | None = Field(
        None, description="SigLIP's match probability (text queries only)"
    )
    width: int | None = Field(None, description="source image width (from embeddings/*.parquet)")
    height: int | None = Field(None, description="source image height")
    thumbnail: str | None = Field(None, description="link to the item's thumbnail, if one exists")
    masks: str | None = Field(None, description="link to the item's SAM masks, if it has any")


class SearchResponse(BaseModel):
    """Hits of one query, best first."""

    kind: str = Field(description="text, image, id or vector")
    k: int
    offset: int
    min_score: float | None = None
    hits: list[Hit]
    next_offset: int | None = Field(
        None, description="offset of the next page; absent on the last page"
    )
    total_vectors: int
    index_created_at: str | None = None
    took_ms: float


class Item(BaseModel):
    """An indexed item."""

    id: str
    width: int | None = None
    height: int | None = None
    thumbnail: str | None = None
    masks: str | None = None


class Segmentation(BaseModel):
    """COCO run-length encoding (column-major, pycocotools' compressed string)."""

    size: list[int] = Field(description="[height, width] of the source image")
    counts: str


class MaskRecord(BaseModel):
    """One mask of ``OUT/masks/*.parquet``."""

    mask_id: int
    segmentation: Segmentation
    bbox: list[float] = Field(description="[x, y, w, h] in source pixels (COCO)")
    area: int
    predicted_iou: float
    stability_score: float
    point: list[float] | None = Field(None, description="automatic mode: the prompt point")
    prompt_index: int | None = Field(None, description="prompted mode: the prompt's index")


class ItemMasks(BaseModel):
    """An item's SAM masks."""

    id: str
    width: int | None = None
    height: int | None = None
    masks: list[MaskRecord]


class IndexInfo(BaseModel):
    """The served index and the service's limits."""

    count: int
    dim: int
    factory: str | None = None
    model: str | None = None
    family: str | None = None
    weights: str | None = None
    created_at: str | None = None
    text_search: bool
    thumbnails: bool
    masks: int = Field(description="images with SAM masks in OUT/masks")
    max_k: int
    max_offset: int
    max_upload_bytes: int
    max_pixels: int
    api_key_required: bool


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    status: str
    count: int
    created_at: str | None = None


def _decode_status(exc: DecodeError) -> int:
    text = str(exc)
    if text.startswith("empty file"):
        return 400
    if text.startswith("not an image"):
        return 415
    if text.startswith("decompression bomb"):
        return 413
    return 400


def _thumbnail_link(request: Request, item_id: str) -> str:
    return f"{request.scope.get('root_path', '')}/api/thumbnail?id={quote(item_id, safe='')}"


def _masks_link(request: Request, item_id: str) -> str:
    return f"{request.scope.get('root_path', '')}/api/masks?id={quote(item_id, safe='')}"


def _has_text_tower(snap: Snapshot) -> bool:
    try:
        family = snap.models.family
    except QueryError:
        return False
    return type(family).load_text_encoder is not Family.load_text_encoder


class _Holder(IndexHolder):
    """An IndexHolder whose every failed load (a corrupt ``index.faiss`` included) leaves a clear
    reason in ``error`` (served as 503) instead of escaping from start-up or the reload thread."""

    def __init__(self, uri: str, interval: float, on_error: Any, **kwargs: Any) -> None:
        super().__init__(uri, interval, **kwargs)
        self._on_error = on_error

    def check(self) -> bool:
        try:
            return super().check()
        except Exception as exc:
            self.error = load_error(self.uri, exc)
            logger.warning("%s (%s: %s)", self.error, type(exc).__name__, exc)
            self._on_error()
            return False


def create_app(config: ServeConfig) -> FastAPI:
    """Builds the app and loads the index (a missing index only makes ``/readyz`` fail)."""
    metrics = Metrics()

    def on_swap(snap: Snapshot) -> None:
        metrics.index_vectors.set(snap.count)
        metrics.index_dim.set(snap.dim)
        metrics.index_load_seconds.set(snap.searcher.load_seconds)
        metrics.index_loaded_timestamp.set(snap.loaded_at)

    holder = _Holder(
        config.index,
        config.reload_interval_s,
        on_error=lambda: metrics.index_reloads.labels("error").inc(),
        on_swap=on_swap,
        on_model_load=lambda kind, s: metrics.model_load_seconds.labels(kind).set(s),
        on_reload_result=lambda result: metrics.index_reloads.labels(result).inc(),
        model=config.model,
    )
    holder.check()
    if config.preload_models and holder.snapshot is not None:
        holder.snapshot.models.preload()

    app = FastAPI(
        title="vlray search",
        version="1",
        description=(
            "Nearest-neighbour search over a vlray index by text, image, id or raw vector. "
            + (
                f"Every /api/* request needs the `{API_KEY_HEADER}` header."
                if config.api_key
                else ""
            )
        ),
    )
    app.state.config = config
    app.state.holder = holder
    app.state.metrics = metrics
    slots = DecodeSlots(config.max_decodes, config.decode_wait_s)
    app.state.decode_slots = slots

    # the last added is the outermost: Observe counts what Guard refuses
    guard = GuardSettings(
        body_limit=config.max_upload_bytes + _BODY_SLACK,
        shown_limit=config.max_upload_bytes,
        api_key=config.api_key,
        key_header=API_KEY_HEADER,
        allowed_hosts=config.allowed_hosts,
    )
    app.add_middleware(Guard, settings=guard)
    app.add_middleware(Observe, metrics=metrics, before=holder.maybe_reload)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unexpected error on %s", request.url.path)
        return JSONResponse({"detail": "internal error"}, status_code=500)

    # -- dependencies -------------------------------------------------------------------------

    key_header = APIKeyHeader(
        name=API_KEY_HEADER, auto_error=False, description="the service's API key"
    )

    def require_key(key: Annotated[str | None, Depends(key_header)]) -> None:
        expected = config.api_key
        if expected is None:
            return
        if key is None or not hmac.compare_digest(key.encode(), expected.encode()):
            raise HTTPException(
                401,
                f"missing or invalid API key (send it in the {API_KEY_HEADER} header)",
                headers={"WWW-Authenticate": "ApiKey"},
            )

    def current() -> Snapshot:
        snap = holder.snapshot
        if snap is None:
            raise HTTPException(503, redact(holder.error or "index not loaded yet"))
        return snap

    Snap = Annotated[Snapshot, Depends(current)]
    K = Annotated[int, Query(ge=1, le=config.max_k, description="results per page")]
    Offset = Annotated[int, Query(ge=0, le=config.max_offset, description="hits to skip")]
    MinScore = Annotated[
        float | None, Query(ge=-1.0, le=1.0, description="drop hits scoring below this")
    ]
    ItemId = Annotated[str, Query(min_length=1, max_length=4096, description="an indexed id")]

    VectorQuery = create_model(
        "VectorQuery",
        __doc__="A raw query vector (normalised to unit length by the server).",
        vector=(list[float], Field(min_length=1, max_length=1 << 16)),
        k=(int, Field(10, ge=1, le=config.max_k)),
        offset=(int, Field(0, ge=0, le=config.max_offset)),
        min_score=(float | None, Field(None, ge=-1.0, le=1.0)),
    )

    def respond(
        request: Request,
        snap: Snapshot,
        kind: str,
        vector: np.ndarray,
        k: int,
        offset: int,
        min_score: float | None,
        start: float,
        probability: Any = None,
    ) -> dict[str, Any]:
        pairs = snap.search(vector, offset + k)
        hits = []
        for rank, (item_id, score) in enumerate(pairs[offset:], start=offset + 1):
            if min_score is not None and score < min_score:
                break
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
                hit["thumbnail"] = _thumbnail_link(request, item_id)
            if snap.masks.has(item_id):
                hit["masks"] = _masks_link(request, item_id)
            hits.append(hit)
        more = (
            len(hits) == k
            and offset + k < snap.count
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
            "total_vectors": snap.count,
            "index_created_at": snap.manifest.get("created_at"),
            "took_ms": round(took * 1000, 3),
        }

    async def encode_upload(snap: Snapshot, file: UploadFile) -> np.ndarray:
        data = await file.read(config.max_upload_bytes + 1)
        if len(data) > config.max_upload_bytes:
            raise HTTPException(413, f"upload too large (limit {config.max_upload_bytes} bytes)")
        if not data:
            raise HTTPException(400, "empty upload (0 bytes)")
        try:
            probe_image(data, config.max_pixels)  # header only: bombs never get decoded
            return await run_in_threadpool(snap.models.encode_image, data, config.max_pixels)
        except DecodeError as exc:
            raise HTTPException(
                _decode_status(exc), f"{file.filename or 'upload'}: {exc}"
            ) from None
        except UnsupportedImage as exc:
            raise HTTPException(
                422, f"the model cannot take this image: {redact(str(exc))}"
            ) from None
        except QueryError as exc:
            raise HTTPException(503, f"model not available: {redact(str(exc))}") from None

    # -- /api ---------------------------------------------------------------------------------

    api = APIRouter(prefix="/api", dependencies=[Depends(require_key)] if config.api_key else [])
    common: dict[str, Any] = {"response_model_exclude_none": True}

    @api.get("/info", response_model=IndexInfo, summary="The served index")
    def info(snap: Snap) -> dict[str, Any]:
        m = snap.manifest
        return {
            "count": snap.count,
            "dim": snap.dim,
            "factory": m.get("factory"),
            "model": model_name(m.get("model")),
            "family": m.get("family"),
            "weights": m.get("weights"),
            "created_at": m.get("created_at"),
            "text_search": _has_text_tower(snap),
            "thumbnails": snap.thumbnails is not None,
            "masks": len(snap.masks),
            "max_k": config.max_k,
            "max_offset": config.max_offset,
            "max_upload_bytes": config.max_upload_bytes,
            "max_pixels": config.max_pixels,
            "api_key_required": bool(config.api_key),
        }

    @api.get(
        "/search/text", response_model=SearchResponse, summary="Search by text (SigLIP)", **common
    )
    def search_text(
        request: Request,
        snap: Snap,
        q: Annotated[str, Query(min_length=1, max_length=config.max_text_chars)],
        k: K = 10,
        offset: Offset = 0,
        min_score: MinScore = None,
    ) -> dict[str, Any]:
        if not q.strip():
            raise HTTPException(422, "empty text query")
        start = time.perf_counter()
        try:
            vector, probability = snap.models.encode_text(q)
        except NotImplementedError as exc:
            raise HTTPException(400, redact(str(exc))) from None
        except QueryError as exc:
            raise HTTPException(503, f"model not available: {redact(str(exc))}") from None
        return respond(request, snap, "text", vector, k, offset, min_score, start, probability)

    @api.get(
        "/search/id", response_model=SearchResponse, summary="Neighbours of an indexed id", **common
    )
    def search_id(
        request: Request,
        snap: Snap,
        id: ItemId,
        k: K = 10,
        offset: Offset = 0,
        min_score: MinScore = None,
    ) -> dict[str, Any]:
        start = time.perf_counter()
        try:
            vector = snap.searcher.index.vector(id)
        except NotImplementedError as exc:
            raise HTTPException(400, str(exc)) from None
        if vector is None:
            raise HTTPException(404, f"id {id!r} is not in the index")
        return respond(request, snap, "id", np.asarray(vector), k, offset, min_score, start)

    @api.post(
        "/search/vector",
        response_model=SearchResponse,
        summary="Search by a raw vector",
        **common,
    )
    def search_vector(request: Request, snap: Snap, query: VectorQuery) -> dict[str, Any]:  # type: ignore[valid-type]
        start = time.perf_counter()
        vector = np.asarray(query.vector, dtype=np.float64)
        if vector.shape[0] != snap.dim:
            raise HTTPException(
                422, f"vector has {vector.shape[0]} values, the index has dim {snap.dim}"
            )
        norm = float(np.linalg.norm(vector)) if np.isfinite(vector).all() else math.nan
        if not math.isfinite(norm) or norm == 0.0:
            raise HTTPException(422, "vector must be finite and non-zero")
        unit = (vector / norm).astype(np.float32)
        return respond(request, snap, "vector", unit, query.k, query.offset, query.min_score, start)

    @api.post(
        "/search/image",
        response_model=SearchResponse,
        summary="Search by an uploaded image (multipart field `file`)",
        **common,
    )
    async def search_image(
        request: Request,
        snap: Snap,
        file: Annotated[UploadFile, File(description="JPEG, PNG, WebP, BMP, GIF or TIFF")],
        k: K = 10,
        offset: Offset = 0,
        min_score: MinScore = None,
    ) -> dict[str, Any]:
        start = time.perf_counter()
        try:
            async with slots.slot():  # the bytes in memory and the decode: a bounded number
                vector = await encode_upload(snap, file)
        except SlotsBusy as exc:
            metrics.image_busy.inc()
            raise HTTPException(503, f"{exc}; retry shortly", headers=exc.headers) from None
        finally:
            await file.close()
        return await run_in_threadpool(
            respond, request, snap, "image", vector, k, offset, min_score, start
        )

    @api.get("/item", response_model=Item, summary="An indexed item", **common)
    def item(request: Request, snap: Snap, id: ItemId) -> dict[str, Any]:
        if snap.searcher.index.position(id) is None:
            raise HTTPException(404, f"id {id!r} is not in the index")
        width, height = snap.sizes.get(id)
        thumb = snap.thumbnail(id)
        return {
            "id": id,
            "width": width,
            "height": height,
            "thumbnail": _thumbnail_link(request, id) if thumb is not None else None,
            "masks": _masks_link(request, id) if snap.masks.has(id) else None,
        }

    @api.get(
        "/masks",
        response_model=ItemMasks,
        summary="An item's SAM masks (from OUT/masks/*.parquet)",
        responses={404: {"description": "not in the index, or no masks"}},
        **common,
    )
    def masks(snap: Snap, id: ItemId) -> dict[str, Any]:
        if snap.searcher.index.position(id) is None:
            raise HTTPException(404, f"id {id!r} is not in the index")
        try:
            records = snap.masks.masks(id)
        except (OSError, FileNotFoundError):
            records = None
        if records is None:
            raise HTTPException(404, f"no masks for id {id!r}")
        width, height = snap.sizes.get(id)
        return {"id": id, "width": width, "height": height, "masks": records}

    @api.get(
        "/thumbnail",
        summary="An item's thumbnail (OUT/thumbnails/<sha1(id)>.jpg)",
        response_class=Response,
        responses={200: {"content": {"image/jpeg": {}}}, 404: {"description": "no thumbnail"}},
    )
    def thumbnail(snap: Snap, id: ItemId) -> Response:
        if snap.searcher.index.position(id) is None:
            raise HTTPException(404, f"id {id!r} is not in the index")
        location = snap.thumbnail(id)  # the path is derived from the id's hash, never given
        if location is None:
            raise HTTPException(404, f"no thumbnail for id {id!r}")
        try:
            data = read_bytes(location)
        except (OSError, FileNotFoundError):
            raise HTTPException(404, f"no thumbnail for id {id!r}") from None
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=300"})

    app.include_router(api)

    # -- operations ---------------------------------------------------------------------------

    @app.get("/healthz", response_model=Health, summary="Liveness")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(
        "/readyz",
        response_model=Readiness,
        summary="Readiness: 200 once an index is loaded, else 503",
        responses={503: {"description": "no index loaded"}},
    )
    def readyz() -> Any:
        snap = holder.snapshot
        if snap is None:
            detail = redact(holder.error or "index not loaded")
            return JSONResponse({"detail": detail}, status_code=503)
        return {
            "status": "ready",
            "count": snap.count,
            "created_at": snap.manifest.get("created_at"),
        }

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # -- web page -----------------------------------------------------------------------------

    @app.get("/", include_in_schema=False)
    def home() -> FileResponse:
        return FileResponse(str(_STATIC / "index.html"), media_type="text/html")

    app.mount("/static", StaticFiles(directory=str(_STATIC)), name="static")
    return app
