"""Prometheus metrics of one app instance (its own registry, so several apps can coexist), and
the middleware that records the requests."""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    """Request counts and latencies, query latencies, index size, model and index load times."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "vlray_serve_requests",
            "HTTP requests by route template, method and status code.",
            ["route", "method", "status"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "vlray_serve_request_duration_seconds",
            "HTTP request latency by route template and method.",
            ["route", "method"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.query_seconds = Histogram(
            "vlray_serve_query_duration_seconds",
            "Query latency (encoding + search) by kind: text, image, id, vector.",
            ["kind"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.index_vectors = Gauge(
            "vlray_serve_index_vectors", "Vectors in the served index.", registry=r
        )
        self.index_dim = Gauge(
            "vlray_serve_index_dim", "Dimension of the served index.", registry=r
        )
        self.index_load_seconds = Gauge(
            "vlray_serve_index_load_seconds", "Load time of the served index.", registry=r
        )
        self.index_loaded_timestamp = Gauge(
            "vlray_serve_index_loaded_timestamp_seconds",
            "Unix time the served index went live.",
            registry=r,
        )
        self.index_reloads = Counter(
            "vlray_serve_index_reloads",
            "Index (re)load attempts by result: ok, error, retry.",
            ["result"],
            registry=r,
        )
        self.model_load_seconds = Gauge(
            "vlray_serve_model_load_seconds",
            "Load time of each encoder (text, image), set when it is loaded.",
            ["encoder"],
            registry=r,
        )
        self.image_busy = Counter(
            "vlray_serve_image_busy",
            "Image searches answered 503: no decode slot came free in time.",
            registry=r,
        )


class Observe:
    """ASGI middleware: counts and times every request by route template, method and status.

    ``before`` runs at the start of each request (the index holder's cheap reload check).
    """

    def __init__(self, app: ASGIApp, metrics: Metrics, before: Callable[[], None]) -> None:
        self.app = app
        self.metrics = metrics
        self.before = before

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        self.before()
        status = [500]

        async def observed(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, observed)
        finally:
            template = getattr(scope.get("route"), "path", None) or "unmatched"
            method = scope.get("method", "")
            self.metrics.requests.labels(template, method, str(status[0])).inc()
            self.metrics.request_seconds.labels(template, method).observe(
                time.perf_counter() - start
            )
