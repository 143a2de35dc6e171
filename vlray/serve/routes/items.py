"""``/api/info``, ``/api/item``, ``/api/masks``, ``/api/thumbnail``: the index and its items.

No ``from __future__ import annotations``: FastAPI reads endpoint annotations at runtime.
"""

from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import Response

from vlray.families.base import Capability
from vlray.query import QueryError
from vlray.serve.deps import ItemId, ServicesDep, SnapshotDep, masks_link, thumbnail_link
from vlray.serve.public import model_name
from vlray.serve.schemas import IndexInfo, Item, ItemMasks
from vlray.serve.state import Snapshot
from vlray.storage import read_bytes

router = APIRouter(prefix="/api")
_COMMON: dict[str, Any] = {"response_model_exclude_none": True}


def _has_text_tower(snap: Snapshot) -> bool:
    try:
        family = snap.models.family
    except QueryError:
        return False
    return family.supports(Capability.TEXT_EMBEDDINGS)  # the checkpoint, not the class


def _known(snap: Snapshot, item_id: str) -> None:
    if snap.searcher.index.position(item_id) is None:
        raise HTTPException(404, f"id {item_id!r} is not in the index")


@router.get("/info", response_model=IndexInfo, summary="The served index")
def info(snap: SnapshotDep, services: ServicesDep) -> dict[str, Any]:
    m, config = snap.manifest, services.config
    return {
        "count": snap.count,
        "dim": snap.dim,
        "factory": m.get("factory"),
        "model": model_name(m.get("model")),  # a hub id or a folder's name, never its path
        "family": m.get("family"),
        "weights": m.get("weights"),
        "created_at": m.get("created_at"),
        "text_search": _has_text_tower(snap),
        "thumbnails": snap.thumbnails is not None,
        "masks": len(snap.masks),
        "regions": snap.regions.index.count if snap.regions is not None else 0,
        "max_k": config.max_k,
        "max_offset": config.max_offset,
        "max_upload_bytes": config.max_upload_bytes,
        "max_pixels": config.max_pixels,
        "api_key_required": bool(config.api_key),
    }


@router.get("/item", response_model=Item, summary="An indexed item", **_COMMON)
def item(request: Request, snap: SnapshotDep, id: ItemId) -> dict[str, Any]:
    _known(snap, id)
    width, height = snap.sizes.get(id)
    thumb = snap.thumbnail(id)
    return {
        "id": id,
        "width": width,
        "height": height,
        "thumbnail": thumbnail_link(request, id) if thumb is not None else None,
        "masks": masks_link(request, id) if snap.masks.has(id) else None,
        "metadata": snap.searcher.metadata.get(id) if snap.searcher.metadata else None,
    }


@router.get(
    "/masks",
    response_model=ItemMasks,
    summary="An item's SAM masks (from OUT/masks/*.parquet)",
    responses={404: {"description": "not in the index, or no masks"}},
    **_COMMON,
)
def masks(snap: SnapshotDep, id: ItemId) -> dict[str, Any]:
    _known(snap, id)
    try:
        records = snap.masks.masks(id)
    except (OSError, FileNotFoundError):
        records = None
    if records is None:
        raise HTTPException(404, f"no masks for id {id!r}")
    width, height = snap.sizes.get(id)
    return {"id": id, "width": width, "height": height, "masks": records}


@router.get(
    "/thumbnail",
    summary="An item's thumbnail (OUT/thumbnails/<sha1(id)>.jpg)",
    response_class=Response,
    responses={200: {"content": {"image/jpeg": {}}}, 404: {"description": "no thumbnail"}},
)
def thumbnail(snap: SnapshotDep, id: ItemId) -> Response:
    _known(snap, id)
    location = snap.thumbnail(id)  # the path is derived from the id's hash, never given
    if location is None:
        raise HTTPException(404, f"no thumbnail for id {id!r}")
    try:
        data = read_bytes(location)
    except (OSError, FileNotFoundError):
        raise HTTPException(404, f"no thumbnail for id {id!r}") from None
    return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=300"})
