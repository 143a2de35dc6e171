"""The whole job against moto's S3 server over real HTTP: inputs, outputs, index, faults, secrets.

Four job runs (local baseline, Parquet bytes from an S3 glob, Parquet of s3:// URIs through a
faulty proxy, an S3 prefix of image files) are shared by the tests below.
"""

from __future__ import annotations

import io
import json
import logging
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from s3_server import SECRET_KEY, FaultProxy, free_port

from vlray.config import S3Config, build_config, to_dict
from vlray.pipeline.job import run_job
from vlray.pipeline.sources import InputError
from vlray.query import Searcher
from vlray.storage import fetch_bytes, scrub
from vlray.testing.images import sample_photos

pytestmark = pytest.mark.slow

N = 10


def _config(input_uri, output_uri, model, s3: S3Config | None = None, **sections):
    overrides = {
        "input": {"uri": str(input_uri), "rows_per_block": 4},
        "output": {"uri": str(output_uri)},
        "model": {"name": str(model)},
        "compute": {"decode_batch_size": 4, "encode_batch_size": 8},
    }
    if s3 is not None:
        overrides["s3"] = {
            k: getattr(s3, k)
            for k in ("endpoint_url", "region", "key", "secret", "fetch_concurrency")
        }
    for key, value in sections.items():
        overrides.setdefault(key, {}).update(value)
    return build_config(None, overrides)


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, row_group_size=3)
    return sink.getvalue()


def _read_s3(s3_env, prefix: str) -> pa.Table | None:
    fs = s3_env.fs
    fs.invalidate_cache()
    files = sorted(p for p in fs.find(f"{s3_env.bucket}/{prefix}") if p.endswith(".parquet"))
    tables = [pq.read_table(io.BytesIO(fs.cat_file(p))) for p in files]
    return pa.concat_tables(tables) if tables else None


def _vectors(table: pa.Table) -> dict[str, np.ndarray]:
    return {r["id"]: np.asarray(r["embedding"], dtype=np.float32) for r in table.to_pylist()}


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture(scope="module")
def captured_logs():
    handler = _Records()
    root = logging.getLogger()
    old = root.level
    root.setLevel(logging.INFO)
    root.addHandler(handler)
    yield handler.lines
    root.removeHandler(handler)
    root.setLevel(old)


@pytest.fixture(scope="module")
def corpus(s3_env, tmp_path_factory):
    """The same photos as local Parquet, S3 Parquet (bytes), S3 objects and a Parquet of URIs."""
    photos = sample_photos(N, seed=7)
    ids = [name for name, _ in photos]
    table = pa.table({"id": ids, "image": pa.array([b for _, b in photos], pa.binary())})
    local = tmp_path_factory.mktemp("local-in")
    b = s3_env.bucket
    for i, part in enumerate((table.slice(0, 6), table.slice(6))):
        data = _parquet_bytes(part)
        (local / f"part-{i}.parquet").write_bytes(data)
        s3_env.fs.pipe_file(f"{b}/in/bytes/part-{i}.parquet", data)
    for name, blob in photos:
        s3_env.fs.pipe_file(f"{b}/images/{name}", blob)
    s3_env.fs.pipe_file(f"{b}/restricted/{ids[0]}", photos[0][1])
    uris = pa.table(
        {
            "id": ids + ["missing-object", "denied-object"],
            "image": [f"s3://{b}/images/{n}" for n in ids]
            + [f"s3://{b}/images/no-such-photo.jpg", f"s3://{b}/restricted/{ids[0]}"],
        }
    )
    s3_env.fs.pipe_file(f"{b}/in/uris/uris.parquet", _parquet_bytes(uris))
    return {"ids": ids, "local": local}


@pytest.fixture(scope="module")
def local_run(corpus, siglip2_checkpoint, ray_local, tmp_path_factory):
    out = tmp_path_factory.mktemp("local-out")
    summary = run_job(_config(corpus["local"], out, siglip2_checkpoint))
    emb = pa.concat_tables(
        [pq.read_table(p) for p in sorted((out / "embeddings").glob("*.parquet"))]
    )
    return summary, _vectors(emb)


@pytest.fixture(scope="module")
def bytes_run(corpus, s3_env, siglip2_checkpoint, ray_local, captured_logs):
    """Parquet with image bytes, read from an S3 glob; outputs and index on S3."""
    out = f"s3://{s3_env.bucket}/out/bytes"
    summary = run_job(
        _config(f"s3://{s3_env.bucket}/in/bytes/*.parquet", out, siglip2_checkpoint, s3_env.s3)
    )
    return summary, out


@pytest.fixture(scope="module")
def uris_run(corpus, s3_env, siglip2_checkpoint, ray_local, captured_logs):
    """Parquet of s3:// URIs, everything through a proxy that answers 503 to every 9th request,
    drops every 29th connection and denies one prefix."""
    proxy = FaultProxy(
        s3_env.server.port, fail_every=9, drop_every=29, deny=("/restricted/",), grace=4
    ).start()
    try:
        s3 = s3_env.config(endpoint_url=proxy.url, fetch_concurrency=4)
        out = f"s3://{s3_env.bucket}/out/uris"
        summary = run_job(
            _config(f"s3://{s3_env.bucket}/in/uris/uris.parquet", out, siglip2_checkpoint, s3)
        )
    finally:
        proxy.stop()
    return summary, out, proxy


@pytest.fixture(scope="module")
def prefix_run(corpus, s3_env, siglip2_checkpoint, ray_local, captured_logs):
    """An S3 prefix of image files; the index is turned off to keep it short."""
    out = f"s3://{s3_env.bucket}/out/prefix"
    summary = run_job(
        _config(
            f"s3://{s3_env.bucket}/images/",
            out,
            siglip2_checkpoint,
            s3_env.s3,
            index={"enabled": False},
        )
    )
    return summary, out


def test_parquet_bytes_from_s3_match_local(corpus, local_run, bytes_run, s3_env):
    local_summary, local_vectors = local_run
    summary, _ = bytes_run
    assert local_summary["embedded"] == N and local_summary["errors"] == 0
    assert (summary["rows_in"], summary["embedded"], summary["errors"]) == (N, N, 0)
    emb = _read_s3(s3_env, "out/bytes/embeddings")
    assert _read_s3(s3_env, "out/bytes/errors") is None
    ids = emb.column("id").to_pylist()
    assert sorted(ids) == sorted(local_vectors) and len(set(ids)) == N
    for item, vector in _vectors(emb).items():
        np.testing.assert_allclose(vector, local_vectors[item], atol=1e-5)
    names = {p.rsplit("/", 1)[-1] for p in s3_env.fs.find(f"{s3_env.bucket}/out/bytes")}
    assert {"_summary.json", "index.faiss", "ids.parquet", "manifest.json"} <= names
    assert not [n for n in names if n.startswith(".tmp")], "no temporary objects"
    saved = json.loads(s3_env.fs.cat_file(f"{s3_env.bucket}/out/bytes/_summary.json"))
    assert saved["accounted"] and saved["embedded"] == N


def test_query_s3_index_and_cache(corpus, bytes_run, s3_env, tmp_path, monkeypatch):
    _, out = bytes_run
    monkeypatch.setenv("VLRAY_HOME", str(tmp_path / "home"))
    searcher = Searcher.open(f"{out}/index", s3_env.s3)
    assert searcher.manifest["count"] == N
    for item in corpus["ids"][:3]:
        hits = searcher.by_id(item, 3)
        assert hits[0]["id"] == item and hits[0]["score"] == pytest.approx(1.0, abs=1e-4)
    cached = list((tmp_path / "home" / "index-cache").glob("*/index.faiss"))
    assert len(cached) == 1
    stamp = cached[0].stat().st_mtime_ns
    time.sleep(0.05)
    # unchanged index: reused, not downloaded again; credentials from the AWS environment
    for key, value in {
        "AWS_ENDPOINT_URL": s3_env.server.url,
        "AWS_ACCESS_KEY_ID": s3_env.s3.key,
        "AWS_SECRET_ACCESS_KEY": s3_env.s3.secret,
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(key, value)
    again = Searcher.open(f"{out}/index", S3Config())
    assert cached[0].stat().st_mtime_ns == stamp
    assert again.by_id(corpus["ids"][4], 1)[0]["id"] == corpus["ids"][4]
    # a changed manifest (a rebuilt index) is downloaded again
    manifest = json.loads(s3_env.fs.cat_file(f"{s3_env.bucket}/out/bytes/index/manifest.json"))
    s3_env.fs.pipe_file(
        f"{s3_env.bucket}/out/bytes/index/manifest.json",
        json.dumps({**manifest, "created_at": "changed"}).encode(),
    )
    Searcher.open(f"{out}/index", s3_env.s3)
    assert cached[0].stat().st_mtime_ns != stamp


def test_uri_column_with_faults(corpus, local_run, uris_run, s3_env):
    _, local_vectors = local_run
    summary, _, proxy = uris_run
    assert proxy.failed > 0 and proxy.dropped > 0, "the proxy must have injected faults"
    assert (summary["rows_in"], summary["embedded"], summary["errors"]) == (N + 2, N, 2)
    emb = _read_s3(s3_env, "out/uris/embeddings")
    ids = emb.column("id").to_pylist()
    assert len(ids) == N and set(ids) == set(corpus["ids"]), "every row exactly once"
    for item, vector in _vectors(emb).items():
        np.testing.assert_allclose(vector, local_vectors[item], atol=1e-5)
    errors = {r["id"]: r for r in _read_s3(s3_env, "out/uris/errors").to_pylist()}
    assert set(errors) == {"missing-object", "denied-object"}
    assert errors["missing-object"]["stage"] == "read"
    assert "missing" in errors["missing-object"]["error"]
    assert "no-such-photo.jpg" in errors["missing-object"]["error"]
    assert errors["denied-object"]["stage"] == "read"
    assert "access denied" in errors["denied-object"]["error"]


def test_image_prefix_matches_local(corpus, local_run, prefix_run, s3_env):
    _, local_vectors = local_run
    summary, _ = prefix_run
    assert (summary["rows_in"], summary["embedded"], summary["errors"]) == (N, N, 0)
    emb = _read_s3(s3_env, "out/prefix/embeddings")
    assert sorted(emb.column("id").to_pylist()) == sorted(corpus["ids"])
    for item, vector in _vectors(emb).items():
        np.testing.assert_allclose(vector, local_vectors[item], atol=1e-5)


def test_secret_never_written_or_logged(bytes_run, uris_run, prefix_run, s3_env, captured_logs):
    fs = s3_env.fs
    fs.invalidate_cache()
    secret = SECRET_KEY.encode()
    objects = fs.find(f"{s3_env.bucket}/out")
    assert len(objects) > 10
    for path in objects:
        assert secret not in fs.cat_file(path), path
    summary = json.loads(fs.cat_file(f"{s3_env.bucket}/out/bytes/_summary.json"))
    assert summary["config"]["s3"]["secret"] == "***"
    assert SECRET_KEY not in json.dumps(
        to_dict(
            build_config(
                None, {"s3": {"secret": SECRET_KEY}, "input": {"uri": "x"}, "model": {"name": "m"}}
            )
        )
    )
    assert captured_logs and not [line for line in captured_logs if SECRET_KEY in line]
    import ray

    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    checked = 0
    for path in logs.rglob("*"):
        if path.is_file():
            checked += 1
            assert secret not in path.read_bytes(), path
    assert checked
    assert SECRET_KEY not in repr(s3_env.s3)
    assert scrub(f"x {SECRET_KEY} http://user:pw@host/", s3_env.s3) == "x *** http://***@host/"


def test_unreachable_endpoint_fails_fast(siglip2_checkpoint, s3_env):
    closed = s3_env.config(endpoint_url=f"http://127.0.0.1:{free_port()}")
    start = time.perf_counter()
    with pytest.raises(InputError) as info:
        run_job(_config("s3://any-bucket/in/", "s3://any-bucket/out", siglip2_checkpoint, closed))
    assert time.perf_counter() - start < 15
    message = str(info.value)
    assert "cannot reach" in message and closed.endpoint_url in message
    assert SECRET_KEY not in message
    with pytest.raises(InputError, match="not found"):
        run_job(_config("s3://no-such-bucket-x/in/", "out", siglip2_checkpoint, s3_env.s3))


def test_fetch_retries_transient_errors(s3_env):
    s3_env.fs.pipe_file(f"{s3_env.bucket}/misc/blob.bin", b"x" * 1000)
    proxy = FaultProxy(s3_env.server.port, fail_first=2).start()
    try:
        s3 = s3_env.config(endpoint_url=proxy.url, max_attempts=1)  # only our retry layer
        assert fetch_bytes(f"s3://{s3_env.bucket}/misc/blob.bin", s3, backoff_s=0.01) == b"x" * 1000
        assert proxy.failed == 2
    finally:
        proxy.stop()
