"""The service under hostile requests: body limits on received bytes, the key before the body,
allowed hosts, the decode cap, an unreadable index, and no absolute paths in what it shows."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import threading
import time

import httpx
import pytest
from serve_helpers import running

from vlray.serve import guard as guard_module
from vlray.serve.cli import allowed_hosts
from vlray.serve.config import LOOPBACK_HOSTS, ServeConfig, is_loopback
from vlray.serve.guard import Guard, GuardSettings, host_allowed
from vlray.serve.public import load_error, model_name, redact
from vlray.serve.slots import DecodeSlots, SlotsBusy

KEY = "s3cret"
UPLOAD = 200_000
LIMIT = UPLOAD + (64 << 10)  # the body limit: the upload limit plus multipart slack


@pytest.fixture(scope="module")
def guarded(out_dir):
    """(url, app): a server with an API key, loopback hosts only and one decode slot."""
    from vlray.serve import create_app

    config = ServeConfig(
        index=str(out_dir / "index"),
        api_key=KEY,
        max_upload_bytes=UPLOAD,
        allowed_hosts=LOOPBACK_HOSTS,
        max_decodes=1,
        decode_wait_s=0.3,
    )
    app = create_app(config)
    with running(app) as url:
        yield url, app


def _connect(url: str) -> socket.socket:
    port = int(url.rsplit(":", 1)[1])
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    return sock


def _read_head(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """The status, headers and whatever body bytes came with them."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, rest


def _multipart(data: bytes, boundary: str = "vlrayboundary") -> tuple[bytes, str]:
    body = (
        (
            f"--{boundary}\r\nContent-Disposition: form-data; name=file; filename=q.jpg\r\n"
            f"Content-Type: image/jpeg\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, f"multipart/form-data; boundary={boundary}"


def _chunks(body: bytes, size: int = 16 << 10):
    for i in range(0, len(body), size):
        yield body[i : i + size]


# -- body limit on received bytes -------------------------------------------------------------


def test_chunked_upload_within_limit_works(guarded, photos):
    url, _ = guarded
    name, data = photos[2]
    body, ctype = _multipart(data)
    with httpx.Client(base_url=url, timeout=30) as c:
        r = c.post(
            "/api/search/image",
            content=_chunks(body),  # a generator: Transfer-Encoding: chunked
            headers={"content-type": ctype, "x-api-key": KEY},
        )
    assert r.status_code == 200, r.text
    assert r.json()["hits"][0]["id"] == name


def test_chunked_upload_over_limit_is_413(guarded):
    url, _ = guarded
    body, ctype = _multipart(b"\xff\xd8" + b"\0" * (3 * LIMIT))
    with httpx.Client(base_url=url, timeout=30) as c:
        r = c.post(
            "/api/search/image",
            content=_chunks(body),
            headers={"content-type": ctype, "x-api-key": KEY},
        )
        assert r.status_code == 413 and "too large" in r.json()["detail"]
        assert c.get("/healthz").status_code == 200


@pytest.mark.parametrize("valid", [True, False])
def test_endless_chunked_body_is_cut_off(guarded, monkeypatch, valid):
    """413 once the limit is passed (400 for a body the app refuses early), and the connection
    is closed soon after while the client is still sending: only a bounded amount is read and
    dropped after the answer."""
    monkeypatch.setattr(guard_module, "LINGER_BYTES", 256 << 10)
    url, _ = guarded
    sock = _connect(url)
    part = _multipart(b"")[0].split(b"\r\n\r\n")[0] + b"\r\n\r\n" if valid else b"\0"
    sock.sendall(
        b"POST /api/search/image HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n"
        b"Content-Type: multipart/form-data; boundary=vlrayboundary\r\nx-api-key: "
        + KEY.encode()
        + b"\r\n\r\n"
        + b"%x\r\n%s\r\n" % (len(part), part)
    )
    chunk = b"%x\r\n" % (64 << 10) + b"\0" * (64 << 10) + b"\r\n"
    sent, closed = 0, False
    deadline = time.monotonic() + 10
    try:
        while time.monotonic() < deadline:
            sock.sendall(chunk)
            sent += len(chunk)
    except OSError:
        closed = True
    try:
        status, headers, _ = _read_head(sock)
    except OSError:  # reset before the answer could be read: the cut-off still happened
        status, headers = (413 if valid else 400), {"connection": "close"}
    sock.close()
    assert closed, f"server kept reading: {sent} bytes sent"
    assert sent < 200 << 20
    assert status == (413 if valid else 400) and headers.get("connection") == "close"


@pytest.mark.parametrize(
    "head",
    [
        b"Content-Length: 10\r\n",  # a lie: far more follows
        b"Content-Length: 10\r\nTransfer-Encoding: chunked\r\n",  # both framings
        b"Content-Length: 10\r\nContent-Length: 900000\r\n",
        b"Content-Length: abc\r\n",
    ],
)
def test_lying_framing_never_reaches_the_app(guarded, head):
    url, app = guarded
    before = _count(app, "200")
    sock = _connect(url)
    payload = b"\xff\xd8" + b"\0" * (2 * LIMIT)
    try:
        sock.sendall(
            b"POST /api/search/image HTTP/1.1\r\nHost: 127.0.0.1\r\nx-api-key: "
            + KEY.encode()
            + b"\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            + head
            + b"\r\n"
            + payload
        )
    except OSError:
        pass
    status, _, _ = _read_head(sock)
    sock.close()
    assert status in (400, 413, 422)
    assert _count(app, "200") == before
    with httpx.Client(base_url=url, timeout=10) as c:
        assert c.get("/healthz").status_code == 200


def test_declared_length_over_limit_is_413_before_the_body(guarded):
    url, _ = guarded
    sock = _connect(url)
    sock.sendall(
        b"POST /api/search/image HTTP/1.1\r\nHost: 127.0.0.1\r\nx-api-key: "
        + KEY.encode()
        + b"\r\nContent-Length: 9999999999\r\n\r\n"
    )
    status, headers, body = _read_head(sock)  # no body byte sent
    sock.close()
    assert status == 413 and headers["connection"] == "close"
    assert str(UPLOAD) in body.decode()


def _count(app, status: str) -> float:
    metric = app.state.metrics.requests
    return sum(
        s.value
        for m in metric.collect()
        for s in m.samples
        if s.name.endswith("_total")
        and s.labels["route"] == "/api/search/image"
        and s.labels["status"] == status
    )


class _Script:
    """An ASGI receive that hands out ``n`` chunks and counts what was taken."""

    def __init__(self, n: int, size: int) -> None:
        self.left, self.size, self.taken = n, size, 0

    async def __call__(self) -> dict:
        if self.left == 0:
            return {"type": "http.disconnect"}
        self.left -= 1
        self.taken += self.size
        return {"type": "http.request", "body": b"x" * self.size, "more_body": self.left > 0}


def _run_guard(settings: GuardSettings, headers: list, receive: _Script) -> tuple[list, int]:
    seen = [0]

    async def app(scope, rcv, send):
        while True:
            message = await rcv()
            seen[0] += len(message.get("body", b""))
            if not message.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    sent: list = []

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "path": "/api/x", "root_path": "", "headers": headers}
    asyncio.run(Guard(app, settings)(scope, receive, send))
    return sent, seen[0]


def test_guard_counts_received_bytes(monkeypatch):
    """The app never gets more than the limit plus one chunk; the rest is dropped, bounded."""
    monkeypatch.setattr(guard_module, "LINGER_BYTES", 5000)
    settings = GuardSettings(body_limit=2500, shown_limit=2000)
    script = _Script(n=100, size=1000)
    sent, seen = _run_guard(settings, [(b"transfer-encoding", b"chunked")], script)
    assert sent[0]["status"] == 413 and (b"connection", b"close") in sent[0]["headers"]
    assert json.loads(sent[1]["body"])["detail"].endswith("(limit 2000 bytes)")
    assert seen <= 3000 and script.taken <= 3000 + 6000
    sent, seen = _run_guard(settings, [], _Script(n=2, size=1000))
    assert sent[0]["status"] == 200 and seen == 2000


# -- the key before the body ------------------------------------------------------------------


def test_key_is_checked_before_the_body(guarded):
    url, _ = guarded
    for key in (b"", b"x-api-key: wrong\r\n"):
        sock = _connect(url)
        sock.sendall(
            b"POST /api/search/image HTTP/1.1\r\nHost: 127.0.0.1\r\n" + key + b"Content-Length: "
            b"150000\r\nExpect: 100-continue\r\nContent-Type: multipart/form-data; boundary=b"
            b"\r\n\r\n"
        )
        status, headers, body = _read_head(sock)  # answered with no body byte sent
        sock.close()
        assert status == 401 and "API key" in json.loads(body)["detail"]
        assert headers["www-authenticate"] == "ApiKey"
    with httpx.Client(base_url=url, timeout=10) as c:
        assert c.get("/api/nope").status_code == 401  # nothing about /api/* without the key
        assert c.get("/api/info", headers={"x-api-key": KEY}).status_code == 200
        assert c.get("/readyz").status_code == 200


# -- allowed hosts ----------------------------------------------------------------------------


def test_allowed_hosts(guarded):
    url, _ = guarded
    port = url.rsplit(":", 1)[1]
    with httpx.Client(base_url=url, timeout=10) as c:
        for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.nip.io", "localhost.evil"):
            r = c.get("/healthz", headers={"host": host})
            assert r.status_code == 400 and "not allowed" in r.json()["detail"], host
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", "LOCALHOST"):
            assert c.get("/healthz", headers={"host": host}).status_code == 200, host
        assert c.get("/metrics", headers={"host": "evil.example"}).status_code == 400


def test_host_rules():
    assert host_allowed("a.example.com:80", ["*.example.com"])
    assert not host_allowed("example.com.evil", ["*.example.com"])
    assert host_allowed("anything", ["*"]) and host_allowed(None, None)
    assert not host_allowed(None, LOOPBACK_HOSTS) and not host_allowed("", LOOPBACK_HOSTS)
    assert allowed_hosts(None, "127.0.0.1") == LOOPBACK_HOSTS
    assert allowed_hosts(None, "127.0.0.2") == (*LOOPBACK_HOSTS, "127.0.0.2")
    assert allowed_hosts(None, "0.0.0.0") is None
    assert allowed_hosts("search.example.com, *.corp", "0.0.0.0") == (
        "search.example.com",
        "*.corp",
    )
    assert allowed_hosts("*", "127.0.0.1") is None
    assert is_loopback("::1") and not is_loopback("10.0.0.1")
    assert ServeConfig(index="x", allowed_hosts=["A.com"]).allowed_hosts == ("a.com",)
    shipped = json.loads(json.dumps(ServeConfig(index="x", allowed_hosts=("a.com",)).to_dict()))
    assert ServeConfig.from_dict(shipped).allowed_hosts == ("a.com",)  # as Ray Serve ships it


# -- the decode cap ---------------------------------------------------------------------------


def test_decode_cap_answers_503_with_retry_after(guarded, photos, monkeypatch):
    url, app = guarded
    models = app.state.holder.snapshot.models
    gate = threading.Event()
    real = models.encode_image

    def held(data, max_pixels):
        gate.wait(10)
        return real(data, max_pixels)

    monkeypatch.setattr(models, "encode_image", held)
    files = {"file": ("q.jpg", photos[1][1], "image/jpeg")}
    results: list[int] = []

    def first() -> None:
        with httpx.Client(base_url=url, timeout=30, headers={"x-api-key": KEY}) as c:
            results.append(c.post("/api/search/image", files=files).status_code)

    thread = threading.Thread(target=first)
    thread.start()
    slots = app.state.decode_slots
    deadline = time.monotonic() + 10
    while slots.in_use == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    with httpx.Client(base_url=url, timeout=30, headers={"x-api-key": KEY}) as c:
        r = c.post("/api/search/image", files=files)
        assert r.status_code == 503 and "retry" in r.json()["detail"]
        assert int(r.headers["retry-after"]) >= 1
        gate.set()
        thread.join(30)
        assert results == [200]
        assert c.post("/api/search/image", files=files).status_code == 200
        assert "vlray_serve_image_busy_total 1.0" in c.get("/metrics").text


def test_decode_slots_wait_then_give_up():
    async def scenario() -> list[str]:
        slots = DecodeSlots(1, wait_s=0.5, max_waiting=1)
        log: list[str] = []

        async def hold(name: str, seconds: float) -> None:
            try:
                async with slots.slot():
                    log.append(name)
                    await asyncio.sleep(seconds)
            except SlotsBusy as exc:
                log.append(f"{name} busy {exc.headers['Retry-After']}")

        first = asyncio.create_task(hold("a", 0.1))
        await asyncio.sleep(0.01)
        waiter = asyncio.create_task(hold("b", 0))  # waits 0.1 s, then gets the slot
        await asyncio.sleep(0.01)
        await hold("c", 0)  # a second waiter: over max_waiting
        await asyncio.gather(first, waiter)
        assert slots.in_use == 0 and slots.waiting == 0
        return log

    assert asyncio.run(scenario()) == ["a", "c busy 1", "b"]


# -- an unreadable index, and no absolute paths -----------------------------------------------


def _copy_index(out_dir, tmp_path):
    target = tmp_path / "deep" / "secret-folder" / "index"
    shutil.copytree(out_dir / "index", target)
    return target


def test_corrupt_index_is_503_with_a_reason(out_dir, tmp_path):
    from fastapi.testclient import TestClient

    from vlray.serve import create_app

    index = _copy_index(out_dir, tmp_path)
    (index / "index.faiss").write_bytes(b"garbage, not a faiss index")
    app = create_app(ServeConfig(index=str(index), reload_interval_s=0))  # does not raise
    with TestClient(app) as c:
        for path in ("/readyz", "/api/info", "/api/search/id?id=x"):
            r = c.get(path)
            detail = r.json()["detail"]
            assert r.status_code == 503 and "faiss index file is unreadable" in detail, detail
            assert str(tmp_path) not in r.text and "secret-folder" not in r.text
            assert "/project/" not in detail
        assert c.get("/healthz").status_code == 200
        metrics = c.get("/metrics").text
        assert 'vlray_serve_index_reloads_total{result="error"} 0.0' not in metrics
        assert 'vlray_serve_index_reloads_total{result="error"}' in metrics


def test_no_absolute_paths_shown(client, out_dir, serve_checkpoint, tmp_path):
    info = client.get("/api/info")
    assert info.json()["model"] == serve_checkpoint.name
    for r in (info, client.get("/readyz")):
        assert str(out_dir) not in r.text and str(serve_checkpoint) not in r.text

    from fastapi.testclient import TestClient

    from vlray.serve import create_app

    missing = create_app(ServeConfig(index=str(tmp_path / "secret-folder" / "index")))
    with TestClient(missing) as c:
        r = c.get("/readyz")
        assert r.status_code == 503 and "manifest" in r.json()["detail"]
        assert str(tmp_path) not in r.text and "secret-folder" not in r.text


def test_missing_model_error_has_no_path(out_dir, tmp_path):
    from fastapi.testclient import TestClient

    from vlray.serve import create_app

    index = _copy_index(out_dir, tmp_path)
    manifest = json.loads((index / "manifest.json").read_text())
    gone = str(tmp_path / "models" / "gone-model")
    manifest.update(model=gone, model_path=gone)
    (index / "manifest.json").write_text(json.dumps(manifest))
    with TestClient(create_app(ServeConfig(index=str(index), reload_interval_s=0))) as c:
        info = c.get("/api/info").json()
        assert info["model"] == "gone-model"
        r = c.get("/api/search/text", params={"q": "a cat"})
        assert r.status_code == 503 and "model not available" in r.json()["detail"]
        assert str(tmp_path) not in r.text


def test_public_text():
    assert model_name("google/siglip2-base-patch16-224") == "google/siglip2-base-patch16-224"
    assert model_name("/srv/models/tiny/") == "tiny" and model_name("s3://b/m/x") == "x"
    assert model_name("~/models/x") == "x" and model_name(None) is None
    text = "cannot open /srv/out/index/index.faiss (s3://bucket/p/q) or C:\\data\\m"
    assert redact(text) == "cannot open index.faiss (q) or m"
    assert redact("image/jpeg and a/b stay") == "image/jpeg and a/b stay"
    err = RuntimeError(
        "Error in faiss::read_index_up(IOReader*, int) at /project/faiss/impl/index_read.cpp:1685:"
        " Error: 'ret == (1)' failed: read error in /srv/out/index/index.faiss: 0 != 1"
    )
    shown = load_error("/srv/out/index", err)
    assert shown.startswith("cannot load index index: the faiss index file is unreadable")
    assert "/srv" not in shown and "/project" not in shown
