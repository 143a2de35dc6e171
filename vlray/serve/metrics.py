"""Prometheus metrics of one app instance (its own registry, so several apps can coexist)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

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
