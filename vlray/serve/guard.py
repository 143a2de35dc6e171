"""The checks every request passes before the app sees it (a plain ASGI middleware).

In order: the ``Host`` header against the allowed names (DNS rebinding), the API key on
``/api/*`` (before any of the body is read: FastAPI parses a form before it runs dependencies),
the declared ``Content-Length``, then the body bytes as they arrive, whatever the framing
(chunked, or a ``Content-Length`` that lies): the request stops with 413 at the limit.

An early answer to a request whose body is still coming is sent with ``Connection: close``;
the rest of the body is then read and dropped, up to :data:`LINGER_BYTES` or
:data:`LINGER_S` seconds, so that a client still uploading gets to read it (nginx's lingering
close), and the connection is closed.
"""

from __future__ import annotations

import hmac
import json
import time
from collections.abc import Iterable
from dataclasses import dataclass

import anyio
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

LINGER_BYTES = 32 << 20
LINGER_S = 2.0
_CLOSE = (b"connection", b"close")


class BodyTooLarge(HTTPException):
    """Raised by the guarded ``receive`` once the body passes the limit."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body too large (limit {limit} bytes)")


@dataclass(frozen=True)
class GuardSettings:
    """What :class:`Guard` enforces.

    Attributes:
        body_limit: Most body bytes a request may send.
        shown_limit: The limit the 413 message names (the upload limit).
        api_key: Required in ``key_header`` on ``key_prefix`` paths when set.
        key_header: The header that carries the key (lower case).
        key_prefix: Paths (below the root path) that need the key.
        allowed_hosts: ``Host`` names answered (the port is ignored; ``*.example.com`` matches
            subdomains); None answers any.
    """

    body_limit: int
    shown_limit: int
    api_key: str | None = None
    key_header: str = "x-api-key"
    key_prefix: str = "/api"
    allowed_hosts: tuple[str, ...] | None = None


def host_name(value: str) -> str:
    """The name of a ``Host`` header value: no port, no IPv6 brackets, lower case."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else value
    if value.count(":") == 1:
        value = value.split(":", 1)[0]
    return value.rstrip(".")


def host_allowed(value: str | None, allowed: Iterable[str] | None) -> bool:
    """Whether a ``Host`` header value names one of ``allowed`` (None: any host)."""
    if allowed is None:
        return True
    name = host_name(value or "")
    if not name:
        return False
    for pattern in allowed:
        pattern = pattern.lower()
        if pattern == "*" or pattern == name:
            return True
        if pattern.startswith("*.") and name.endswith(pattern[1:]):
            return True
    return False


def _relative_path(scope: Scope) -> str:
    path: str = scope.get("path", "")
    root: str = scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root) :]
    return path


def _expects_body(headers: Headers) -> bool:
    length = headers.get("content-length")
    return "chunked" in headers.get("transfer-encoding", "").lower() or (
        length is not None and length.strip() != "0"
    )


class Guard:
    """ASGI middleware: allowed hosts, API key before the body, body limit on received bytes."""

    def __init__(self, app: ASGIApp, settings: GuardSettings) -> None:
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        early = self._refusal(scope, headers)
        if early is not None:
            status, detail, extra = early
            await _refuse(receive, send, status, detail, extra, _expects_body(headers))
            return
        limited = _Limited(self.app, self.settings, body_done=not _expects_body(headers))
        await limited.run(scope, receive, send)

    def _refusal(self, scope: Scope, headers: Headers) -> tuple[int, str, dict[str, str]] | None:
        s = self.settings
        host = headers.get("host")
        if not host_allowed(host, s.allowed_hosts):
            shown = host_name(host or "")[:100] or "(none)"
            return 400, f"host {shown!r} is not allowed (see --allowed-hosts)", {}
        path = _relative_path(scope)
        if s.api_key is not None and (path == s.key_prefix or path.startswith(s.key_prefix + "/")):
            key = headers.get(s.key_header)
            if key is None or not hmac.compare_digest(key.encode(), s.api_key.encode()):
                return (
                    401,
                    f"missing or invalid API key (send it in the {s.key_header} header)",
                    {"www-authenticate": "ApiKey"},
                )
        length = headers.get("content-length")
        if length is not None and (not length.strip().isdigit() or int(length) > s.body_limit):
            return 413, f"request body too large (limit {s.shown_limit} bytes)", {}
        return None


class _Limited:
    """One request: counts the body bytes the app receives and answers 413 past the limit."""

    def __init__(self, app: ASGIApp, settings: GuardSettings, body_done: bool) -> None:
        self.app = app
        self.settings = settings
        self.received = 0
        self.tripped = False
        self.started = False
        self.body_done = body_done
        self.closing = False

    async def run(self, scope: Scope, receive: Receive, send: Send) -> None:
        self._receive = receive
        try:
            await self.app(scope, self.receive, self._sender(send))
        except Exception:
            if not self.tripped or self.started:
                raise
            detail = f"request body too large (limit {self.settings.shown_limit} bytes)"
            await _refuse(receive, send, 413, detail, {}, not self.body_done)

    async def receive(self) -> Message:
        if self.tripped:
            raise BodyTooLarge(self.settings.shown_limit)
        message = await self._receive()
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            self.body_done = not message.get("more_body", False)
            if self.received > self.settings.body_limit:
                self.tripped = True
                raise BodyTooLarge(self.settings.shown_limit)
        return message

    def _sender(self, send: Send) -> Send:
        async def guarded(message: Message) -> None:
            if message["type"] == "http.response.start":
                if self.tripped:  # the app answered the error its own way: ours replaces it
                    raise BodyTooLarge(self.settings.shown_limit)
                self.started = True
                if not self.body_done:  # answered before the end of the body: close after it
                    self.closing = True
                    message = {**message, "headers": [*message.get("headers", []), _CLOSE]}
            last = message["type"] == "http.response.body" and not message.get("more_body")
            if not (last and self.closing):
                await send(message)
                return
            await send({**message, "more_body": True})
            await _drain(self._receive)
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        return guarded


async def _refuse(
    receive: Receive,
    send: Send,
    status: int,
    detail: str,
    extra: dict[str, str],
    pending_body: bool,
) -> None:
    """A JSON error answer; with a body still coming, a lingering close (see the module)."""
    payload = json.dumps({"detail": detail}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(payload)).encode()),
        *((k.encode(), v.encode()) for k, v in extra.items()),
    ]
    if pending_body:
        headers.append(_CLOSE)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload, "more_body": pending_body})
    if pending_body:
        await _drain(receive)
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _drain(receive: Receive) -> None:
    """Reads and drops the rest of a body, at most LINGER_BYTES within LINGER_S seconds."""
    dropped = 0
    deadline = time.monotonic() + LINGER_S
    with anyio.move_on_after(LINGER_S):
        while dropped <= LINGER_BYTES and time.monotonic() < deadline:
            message = await receive()
            if message["type"] != "http.request":
                return
            dropped += len(message.get("body", b""))
            if not message.get("more_body", False):
                return
