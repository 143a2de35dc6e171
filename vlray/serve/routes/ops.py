"""Operations and the web page: ``/healthz``, ``/readyz``, ``/metrics``, ``/``.

No ``from __future__ import annotations``: FastAPI reads endpoint annotations at runtime.
"""

from importlib import resources
from typing import Any

from fastapi import APIRouter
from fastapi.responses import FileResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from vlray.serve.deps import ServicesDep
from vlray.serve.public import redact
from vlray.serve.schemas import Health, Readiness

STATIC = resources.files("vlray.serve") / "static"
router = APIRouter()


@router.get("/healthz", response_model=Health, summary="Liveness")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    response_model=Readiness,
    summary="Readiness: 200 once an index is loaded, else 503",
    responses={503: {"description": "no index loaded"}},
)
def readyz(services: ServicesDep) -> Any:
    holder = services.holder
    snap = holder.snapshot
    if snap is None:
        detail = redact(holder.error or "index not loaded")
        return JSONResponse({"detail": detail}, status_code=503)
    return {"status": "ready", "count": snap.count, "created_at": snap.manifest.get("created_at")}


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
def prometheus(services: ServicesDep) -> Response:
    return Response(generate_latest(services.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/", include_in_schema=False)
def home() -> FileResponse:
    return FileResponse(str(STATIC / "index.html"), media_type="text/html")
