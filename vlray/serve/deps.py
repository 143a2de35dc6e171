"""What the routers share: the app's services, the served snapshot, the API key, item links.

No ``from __future__ import annotations``: FastAPI reads these annotations at runtime.
"""

import hmac
from dataclasses import dataclass
from typing import Annotated
from urllib.parse import quote

from fastapi import Depends, HTTPException, Query, Request
from fastapi.security import APIKeyHeader

from vlray.serve.config import ServeConfig
from vlray.serve.metrics import Metrics
from vlray.serve.public import redact
from vlray.serve.slots import DecodeSlots
from vlray.serve.state import IndexHolder, Snapshot

API_KEY_HEADER = "x-api-key"


@dataclass(frozen=True)
class Services:
    """Everything of one app the routes use (``app.state.services``)."""

    config: ServeConfig
    holder: IndexHolder
    metrics: Metrics
    slots: DecodeSlots


def get_services(request: Request) -> Services:
    """The services of the app serving this request."""
    return request.app.state.services


ServicesDep = Annotated[Services, Depends(get_services)]


def current_snapshot(services: ServicesDep) -> Snapshot:
    """The snapshot this request uses throughout (503 while no index is loaded)."""
    snap = services.holder.snapshot
    if snap is None:
        raise HTTPException(503, redact(services.holder.error or "index not loaded yet"))
    return snap


SnapshotDep = Annotated[Snapshot, Depends(current_snapshot)]
ItemId = Annotated[str, Query(min_length=1, max_length=4096, description="an indexed id")]

_key_header = APIKeyHeader(
    name=API_KEY_HEADER, auto_error=False, description="the service's API key"
)


def require_key(services: ServicesDep, key: Annotated[str | None, Depends(_key_header)]) -> None:
    """The key check as the OpenAPI schema shows it (``Guard`` enforces it before the body)."""
    expected = services.config.api_key
    if expected is None:
        return
    if key is None or not hmac.compare_digest(key.encode(), expected.encode()):
        raise HTTPException(
            401,
            f"missing or invalid API key (send it in the {API_KEY_HEADER} header)",
            headers={"WWW-Authenticate": "ApiKey"},
        )


def thumbnail_link(request: Request, item_id: str) -> str:
    """The URL of an item's thumbnail (below the app's root path)."""
    return f"{request.scope.get('root_path', '')}/api/thumbnail?id={quote(item_id, safe='')}"


def masks_link(request: Request, item_id: str) -> str:
    """The URL of an item's SAM masks."""
    return f"{request.scope.get('root_path', '')}/api/masks?id={quote(item_id, safe='')}"
