"""A source that goes away mid-run, end to end (moto's S3 server behind a proxy, real HTTP).

Rows whose images are fetched during the outage outlast the retries: they are neither
embeddings nor error rows, the run fails (RunFailed, exit 1) and says how many are undone, and
the next run, once the source is back, does exactly those rows.
"""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from s3_server import FaultProxy

from vlray.config import build_config
from vlray.pipeline.job import RunFailed, run_job
from vlray.testing.images import sample_photos

pytestmark = pytest.mark.slow

N = 12


def _ids(folder) -> list[str]:
    return [i for p in sorted(folder.glob("*.parquet")) for i in pq.read_table(p)["id"].to_pylist()]


def _config(uri: str, out, model, s3) -> object:
    s3_section = {
        k: getattr(s3, k) for k in ("endpoint_url", "region", "key", "secret", "fetch_concurrency")
    }
    # one SDK attempt per request, no retry rounds: the outage outlasts the retries at once
    s3_section.update(max_attempts=1, transient_retry_s=0)
    overrides = {
        "input": {"uri": uri, "rows_per_block": 4},
        "output": {"uri": str(out)},
        "model": {"name": str(model)},
        "compute": {"decode_batch_size": 4, "encode_batch_size": 8},
        "index": {"enabled": False},
        "s3": s3_section,
    }
    return build_config(None, overrides)


def test_rows_fetched_during_an_outage_are_left_undone_and_the_rerun_does_them(
    s3_env, siglip2_checkpoint, ray_local, tmp_path
):
    photos = sample_photos(N, seed=11)
    ids = [f"photo {i:02d}/{name}" for i, (name, _) in enumerate(photos)]
    bucket = s3_env.bucket
    for (name, blob), i in zip(photos, range(N), strict=True):
        s3_env.fs.pipe_file(f"{bucket}/outage/images/{i:02d}-{name}", blob)
    uris = [f"s3://{bucket}/outage/images/{i:02d}-{name}" for i, (name, _) in enumerate(photos)]
    sink = io.BytesIO()
    pq.write_table(pa.table({"id": ids, "image": uris}), sink)  # pyarrow's defaults
    s3_env.fs.pipe_file(f"{bucket}/outage/in.parquet", sink.getvalue())
    uri = f"s3://{bucket}/outage/in.parquet"
    out = tmp_path / "out"

    # the first 4 image requests pass, then the image source is down for 3 s
    proxy = FaultProxy(
        s3_env.server.port, outage_path="/outage/images/", outage_after=4, outage_s=3.0
    ).start()
    try:
        config = _config(uri, out, siglip2_checkpoint, s3_env.config(endpoint_url=proxy.url))
        with pytest.raises(RunFailed, match="rows left undone by transient failures") as failed:
            run_job(config)
    finally:
        proxy.stop()
    assert proxy.dropped > 0, "the proxy must have dropped connections"
    summary = failed.value.summary
    done = _ids(out / "embeddings")
    assert _ids(out / "errors") == [], "an outage is not a permanent error"
    assert 0 < summary["undone"] < N and summary["undone"] == N - len(done)
    assert len(set(done)) == len(done) and set(done) < set(ids)
    assert summary["accounted"] is True  # every row embedded, an error row or undone

    healthy = FaultProxy(s3_env.server.port).start()  # the source is back
    try:
        config = _config(uri, out, siglip2_checkpoint, s3_env.config(endpoint_url=healthy.url))
        rerun = run_job(config)
    finally:
        healthy.stop()
    assert rerun["skipped_done"] == len(done) and rerun["rows_in"] == N - len(done)
    assert (rerun["embedded"], rerun["errors"], rerun["undone"]) == (N - len(done), 0, 0)
    assert sorted(_ids(out / "embeddings")) == sorted(ids), "every row exactly once"
