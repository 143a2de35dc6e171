"""The FastAPI app: the index holder, the middleware and the routers, put together.

The routes live in :mod:`vlray.serve.routes` (search, items, operations) over the shared
dependencies of :mod:`vlray.serve.deps`; the request checks that must come before the body is
read (allowed hosts, API key, body limit) in :mod:`vlray.serve.guard`.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles

from vlray.serve.config import ServeConfig
from vlray.serve.deps import API_KEY_HEADER, Services, require_key
from vlray.serve.guard import Guard, GuardSettings
from vlray.serve.metrics import Metrics, Observe
from vlray.serve.public import load_error
from vlray.serve.routes import items, ops, search
from vlray.serve.slots import DecodeSlots
from vlray.serve.state import IndexHolder, Snapshot

logger = logging.getLogger(__name__)

# Multipart framing around an upload: the body limit is the upload limit plus this.
_BODY_SLACK = 64 << 10


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


def _holder(config: ServeConfig, metrics: Metrics) -> IndexHolder:
    def on_swap(snap: Snapshot) -> None:
        metrics.index_vectors.set(snap.count)
        metrics.index_dim.set(snap.dim)
        metrics.index_load_seconds.set(snap.searcher.load_seconds)
        metrics.index_loaded_timestamp.set(snap.loaded_at)

    return _Holder(
        config.index,
        config.reload_interval_s,
        on_error=lambda: metrics.index_reloads.labels("error").inc(),
        on_swap=on_swap,
        on_model_load=lambda kind, s: metrics.model_load_seconds.labels(kind).set(s),
        on_reload_result=lambda result: metrics.index_reloads.labels(result).inc(),
        model=config.model,
    )


def _add_middleware(app: FastAPI, services: Services) -> None:
    config = services.config
    guard = GuardSettings(
        body_limit=config.max_upload_bytes + _BODY_SLACK,
        shown_limit=config.max_upload_bytes,
        api_key=config.api_key,
        key_header=API_KEY_HEADER,
        allowed_hosts=config.allowed_hosts,
    )
    # the last added is the outermost: Observe counts what Guard refuses
    app.add_middleware(Guard, settings=guard)
    app.add_middleware(Observe, metrics=services.metrics, before=services.holder.maybe_reload)

    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unexpected error on %s", request.url.path)
        return JSONResponse({"detail": "internal error"}, status_code=500)

    app.add_exception_handler(Exception, unexpected)


def _include_routes(app: FastAPI, config: ServeConfig) -> None:
    # routers carry their full paths (route templates label the metrics)
    key = [Depends(require_key)] if config.api_key else []
    app.include_router(items.router, dependencies=key)
    app.include_router(search.search_router(config), dependencies=key)
    app.include_router(ops.router)
    app.mount("/static", StaticFiles(directory=str(ops.STATIC)), name="static")


def create_app(config: ServeConfig) -> FastAPI:
    """Builds the app and loads the index (a missing index only makes ``/readyz`` fail)."""
    metrics = Metrics()
    holder = _holder(config, metrics)
    holder.check()
    if config.preload_models and holder.snapshot is not None:
        holder.snapshot.models.preload()
    services = Services(
        config=config,
        holder=holder,
        metrics=metrics,
        slots=DecodeSlots(config.max_decodes, config.decode_wait_s),
    )
    needs_key = f"Every /api/* request needs the `{API_KEY_HEADER}` header."
    app = FastAPI(
        title="vlray search",
        version="1",
        description="Nearest-neighbour search over a vlray index by text, image, id or raw "
        "vector. " + (needs_key if config.api_key else ""),
    )
    app.state.services = services
    app.state.config = config
    app.state.holder = holder
    app.state.metrics = metrics
    app.state.decode_slots = services.slots
    _add_middleware(app, services)
    _include_routes(app, config)
    return app
