"""Test helpers: moto's S3 server on 127.0.0.1 (real HTTP) and a fault-injecting proxy before it."""

from __future__ import annotations

import http.client
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ACCESS_KEY = "AKIAVLRAYTESTKEY0001"
SECRET_KEY = "vlray-test-SECRET-do-not-leak-7f3a9c"
"""The fake credentials of the test S3 server (a test checks the secret never leaks)."""
BUCKET = "vlray-test"

SLOW_DOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)
ACCESS_DENIED = (
    b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>AccessDenied</Code>'
    b"<Message>Access Denied</Message></Error>"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _ProxyServer

    def log_message(self, format, *args):  # noqa: A002 - quiet
        pass

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _reply(self, status: int, payload: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", "0" if self.command == "HEAD" else str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    def _handle(self) -> None:
        body = self._read_body()
        proxy = self.server.proxy
        n, action = proxy.decide(self.command, self.path)
        if action == "drop":
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return
        if action == "503":
            self._reply(503, SLOW_DOWN)
            return
        if action == "403":
            self._reply(403, ACCESS_DENIED)
            return
        headers = {
            k: v
            for k, v in self.headers.items()
            if k.lower() not in ("transfer-encoding", "connection", "expect", "content-length")
        }
        if body or self.command in ("PUT", "POST"):
            headers["Content-Length"] = str(len(body))
        conn = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=60)
        try:
            conn.request(self.command, self.path, body=body or None, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        self.send_response(resp.status, resp.reason)
        for key, value in resp.getheaders():
            if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(key, value)
        length = resp.getheader("Content-Length") if self.command == "HEAD" else None
        self.send_header("Content-Length", length or str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle


class _ProxyServer(ThreadingHTTPServer):
    daemon_threads = True
    proxy: FaultProxy


class FaultProxy:
    """A loopback HTTP proxy in front of an S3 server that misbehaves on purpose.

    Every ``fail_every``-th request gets a 503 SlowDown, every ``drop_every``-th has its
    connection closed without an answer, and requests whose path contains one of ``deny``
    get a 403 AccessDenied. The first ``fail_first`` requests get a 503, then the first
    ``grace`` requests pass untouched. An outage: once ``outage_after`` requests whose path
    contains ``outage_path`` have passed, every such request has its connection dropped for
    ``outage_s`` seconds (a source that goes away for a while, then comes back).
    """

    def __init__(
        self,
        upstream_port: int,
        fail_every: int = 0,
        drop_every: int = 0,
        deny: tuple[str, ...] = (),
        grace: int = 0,
        fail_first: int = 0,
        outage_path: str = "",
        outage_after: int = 0,
        outage_s: float = 0.0,
    ) -> None:
        self.upstream_port = upstream_port
        self.fail_every, self.drop_every, self.deny, self.grace = (
            fail_every,
            drop_every,
            deny,
            grace,
        )
        self.fail_first = fail_first
        self.outage_path, self.outage_after, self.outage_s = outage_path, outage_after, outage_s
        self.outage_seen = 0
        self.outage_until: float | None = None
        self.requests = self.failed = self.dropped = self.denied = 0
        self.log: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._server = _ProxyServer(("127.0.0.1", 0), _Handler)
        self._server.proxy = self
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def decide(self, method: str, path: str) -> tuple[int, str]:
        with self._lock:
            self.requests += 1
            n = self.requests
            self.log.append((method, path))
            if any(d in path for d in self.deny):
                self.denied += 1
                return n, "403"
            if self._in_outage(path):
                self.dropped += 1
                return n, "drop"
            if n <= self.fail_first:
                self.failed += 1
                return n, "503"
            if n <= self.grace:
                return n, "pass"
            if self.drop_every and n % self.drop_every == 0:
                self.dropped += 1
                return n, "drop"
            if self.fail_every and n % self.fail_every == 0:
                self.failed += 1
                return n, "503"
            return n, "pass"

    def _in_outage(self, path: str) -> bool:
        if not self.outage_path or self.outage_path not in path:
            return False
        self.outage_seen += 1
        if self.outage_until is None and self.outage_seen > self.outage_after:
            self.outage_until = time.monotonic() + self.outage_s
        return self.outage_until is not None and time.monotonic() < self.outage_until

    def start(self) -> FaultProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class MotoS3:
    """moto's threaded S3 server on a free loopback port."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        self.port = free_port()
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> MotoS3:
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop()
