"""Query service latency: p50 / p99 and queries/s at 1, 8 and 32 concurrent clients on loopback.

An index of N random unit vectors (default 1,000,000 x 256) is built once per index type (exact
Flat, and IVF trained on a sample), served by ``vlray.serve`` (uvicorn, one process), and queried
over real HTTP with ``POST /api/search/vector`` (k=10) from client threads.

    python bench/serve_latency.py [--rows 1000000] [--dim 256] [--queries 200]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path

import benchutil
import numpy as np


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(index_dir: Path):
    import uvicorn

    from vlray.serve import create_app
    from vlray.serve.config import ServeConfig

    app = create_app(ServeConfig(index=str(index_dir), reload_interval_s=0))
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def load(url: str, clients: int, queries: int, dim: int) -> tuple[list[float], float]:
    import httpx

    rng = np.random.default_rng(1)
    vectors = rng.standard_normal((queries, dim)).astype(np.float32).tolist()
    latencies: list[float] = []
    lock = threading.Lock()
    per_client = max(1, queries // clients)

    def client(c: int) -> None:
        with httpx.Client(base_url=url, timeout=120) as http:
            for i in range(per_client):
                body = {"vector": vectors[(c * per_client + i) % queries], "k": 10}
                start = time.perf_counter()
                r = http.post("/api/search/vector", json=body)
                elapsed = time.perf_counter() - start
                assert r.status_code == 200, r.text
                with lock:
                    latencies.append(elapsed)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies, len(latencies) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--factories", default="Flat,IVF1024,Flat")
    args = parser.parse_args()
    from vlray.index import build_index

    print(
        benchutil.machine_line()
        if hasattr(benchutil, "machine_line")
        else f"machine: {os.cpu_count()} CPUs"
    )
    rng = np.random.default_rng(0)
    chunk = 100_000

    def batches():
        local = np.random.default_rng(0)
        for start in range(0, args.rows, chunk):
            n = min(chunk, args.rows - start)
            v = local.standard_normal((n, args.dim)).astype(np.float32)
            v /= np.linalg.norm(v, axis=1, keepdims=True)
            yield [f"v{start + i}" for i in range(n)], v

    del rng
    factories = (
        ["Flat", "IVF1024,Flat"]
        if args.factories == "Flat,IVF1024,Flat"
        else args.factories.split(";")
    )
    for factory in factories:
        tmp = Path(tempfile.mkdtemp(prefix="vlray-serve-bench-"))
        start = time.perf_counter()
        build_index(
            batches,
            tmp / "index",
            dim=args.dim,
            count=args.rows,
            factory=factory,
            manifest={"model": "none", "family": "siglip2", "weights": "random"},
        )
        built = time.perf_counter() - start
        with serving(tmp / "index") as url:
            load(url, 1, 5, args.dim)  # warm-up
            for clients in (1, 8, 32):
                lat, qps = load(url, clients, args.queries, args.dim)
                lat.sort()
                p50 = statistics.median(lat) * 1000
                p99 = lat[min(len(lat) - 1, int(0.99 * len(lat)))] * 1000
                print(
                    f"{factory:14s} {args.rows}x{args.dim} (built {built:.0f}s)  clients {clients:2d}: p50 {p50:7.1f} ms  p99 {p99:7.1f} ms  {qps:7.1f} queries/s",
                    flush=True,
                )
                print(
                    "RESULT "
                    + __import__("json").dumps(
                        {
                            "bench": "serve_latency",
                            "factory": factory,
                            "clients": clients,
                            "p50_ms": p50,
                            "p99_ms": p99,
                            "qps": qps,
                        }
                    )
                )


if __name__ == "__main__":
    main()
