"""Scheduled, incremental runs: skip done ids, retry errors, index updates, the lock, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vlray.config import build_config
from vlray.pipeline.job import run_job
from vlray.pipeline.state import LOCK_NAME, OutputLocked, done_ids, hash_ids, is_done
from vlray.storage import locate
from vlray.testing.images import bad_images, sample_photos

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


def _config(input_uri, output_uri, model, **extra):
    overrides = {
        "input": {"uri": str(input_uri), "rows_per_block": 8},
        "output": {"uri": str(output_uri), "rows_per_file": 8},
        "model": {"name": str(model)},
        "compute": {"decode_batch_size": 8, "encode_batch_size": 16},
        **extra,
    }
    return build_config(None, overrides)


def _table(folder):
    files = sorted(Path(folder).glob("*.parquet"))
    return (
        pa.concat_tables([pq.read_table(f) for f in files])
        if files
        else pa.table({"id": pa.array([], pa.string())})
    )


def _write(path, rows):
    pq.write_table(
        pa.table(
            {"id": [r[0] for r in rows], "image": pa.array([r[1] for r in rows], pa.binary())}
        ),
        path,
    )


def test_done_id_set_is_sorted_digests():
    done = np.unique(hash_ids(["a", "b", "c"]))
    assert done.dtype == np.dtype("S16")
    assert is_done(hash_ids(["b", "z", "a", ""]), done).tolist() == [True, False, True, False]
    assert is_done(hash_ids(["x"]), np.empty(0, "S16")).tolist() == [False]


import numpy as np  # noqa: E402


def test_incremental_runs_retry_and_index_updates(siglip2_checkpoint, ray_local, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    photos = sample_photos(30, seed=5)
    bad = bad_images()
    _write(data / "day1.parquet", photos[:12] + [("broken", bad["truncated.jpg"])])
    out = tmp_path / "out"

    first = run_job(_config(data, out, siglip2_checkpoint))
    assert (first["rows_in"], first["embedded"], first["errors"]) == (13, 12, 1)
    assert first["index"]["mode"] == "rebuild"

    again = run_job(_config(data, out, siglip2_checkpoint))
    assert (again["rows_in"], again["skipped_done"], again["embedded"]) == (0, 13, 0)
    assert again["index"]["count"] == 12

    # new images arrive (one repeats an id that is already done: it is left out)
    _write(data / "day2.parquet", photos[12:20] + [photos[0]])
    second = run_job(_config(data, out, siglip2_checkpoint))
    assert (second["rows_in"], second["embedded"], second["skipped_done"]) == (8, 8, 14)
    assert second["index"] == {"factory": "Flat", "count": 20, "dim": 32, "mode": "add"}
    ids = _table(out / "embeddings").column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 20
    manifest = json.loads((out / "index" / "manifest.json").read_text())
    assert [r["mode"] for r in manifest["runs"]] == ["rebuild", "add", "add"]
    assert [r["rows_added"] for r in manifest["runs"]] == [12, 0, 8]

    # the broken image is fixed at the source; --retry-errors embeds it and clears its error row
    _write(data / "day1.parquet", photos[:12] + [("broken", photos[25][1])])
    retry = run_job(_config(data, out, siglip2_checkpoint, retry_errors=True))
    assert (retry["rows_in"], retry["embedded"], retry["errors"]) == (1, 1, 0)
    assert retry["errors_retried_and_removed"] == 1
    assert _table(out / "errors").num_rows == 0
    assert "broken" in _table(out / "embeddings").column("id").to_pylist()
    assert json.loads((out / "index" / "manifest.json").read_text())["count"] == 21

    # an explicit factory that differs from the existing index forces a rebuild
    rebuilt = run_job(_config(data, out, siglip2_checkpoint, index={"factory": "HNSW32,Flat"}))
    assert rebuilt["index"]["mode"] == "rebuild" and rebuilt["index"]["count"] == 21


def test_lock_refuses_a_second_run_and_expires(siglip2_checkpoint, ray_local, tmp_path):
    data = tmp_path / "in.parquet"
    _write(data, sample_photos(3))
    out = tmp_path / "out"
    out.mkdir()
    live = {"token": "x", "host": "other", "pid": 1, "heartbeat": time.time()}
    (out / LOCK_NAME).write_text(json.dumps(live))
    start = time.time()
    with pytest.raises(OutputLocked, match="in use by another vlray run"):
        run_job(_config(data, out, siglip2_checkpoint))
    assert time.time() - start < 10
    (out / LOCK_NAME).write_text(json.dumps({**live, "heartbeat": time.time() - 3600}))
    summary = run_job(_config(data, out, siglip2_checkpoint))
    assert summary["embedded"] == 3 and not (out / LOCK_NAME).exists()


def test_driver_killed_midway_resumes_exactly_once(siglip2_checkpoint, ray_local, tmp_path):
    data = tmp_path / "big.parquet"
    photos = sample_photos(24, seed=9)
    rows = [(f"r{i:04d}", photos[i % len(photos)][1]) for i in range(400)]
    pq.write_table(
        pa.table(
            {"id": [r[0] for r in rows], "image": pa.array([r[1] for r in rows], pa.binary())}
        ),
        data,
        row_group_size=16,
    )
    out = tmp_path / "out"
    # the killed driver joins the session's Ray: its actors die with it, nothing is orphaned
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address,
    }
    cmd = [
        sys.executable,
        str(REPO / "jobs" / "embed.py"),
        "--input",
        str(data),
        "--output",
        str(out),
        "--model",
        str(siglip2_checkpoint),
        "--set",
        "output.rows_per_file=8",
        "--set",
        "compute.encode_batch_size=8",
    ]
    proc = subprocess.Popen(
        cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.time() + 240
        while time.time() < deadline and len(list((out / "embeddings").glob("part-*.parquet"))) < 3:
            assert proc.poll() is None, "the job ended before it could be killed"
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    partial = _table(out / "embeddings").num_rows
    assert 0 < partial < 400
    # the dead run's lock is stale after its heartbeat stops; here we expire it by hand
    lock = out / LOCK_NAME
    if lock.exists():
        held = json.loads(lock.read_text())
        lock.write_text(json.dumps({**held, "heartbeat": 0}))
    summary = run_job(_config(data, out, siglip2_checkpoint))
    assert summary["skipped_done"] == partial and summary["rows_in"] == 400 - partial
    ids = _table(out / "embeddings").column("id").to_pylist()
    assert sorted(ids) == [r[0] for r in rows], "every row exactly once"
    assert not list(out.rglob(".tmp-*"))
    assert len(done_ids(locate(str(out)), include_errors=True)) == 400


def _pids_of(marker: str) -> list[int]:
    """Processes whose command line contains ``marker`` (Ray names actor processes ray::Class)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def _run_and_kill_encoder(model, tmp_path, n_rows, fuse):
    """Runs the job in a thread and SIGKILLs the encoder actors' processes while they work."""
    import threading

    photos = sample_photos(24, seed=9)
    rows = [(f"r{i:05d}", photos[i % len(photos)][1]) for i in range(n_rows)]
    pq.write_table(
        pa.table(
            {"id": [r[0] for r in rows], "image": pa.array([r[1] for r in rows], pa.binary())}
        ),
        tmp_path / "in.parquet",
        row_group_size=16,
    )
    out = tmp_path / "out"
    result = {}

    def run():
        try:
            config = _config(tmp_path / "in.parquet", out, model)
            config = replace(config, compute=replace(config.compute, fuse=fuse))
            result["summary"] = run_job(config)
        except Exception as exc:  # surfaced by the caller's assertion
            result["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    killed, seen = [], None
    while thread.is_alive() and not killed:
        pids = _pids_of(
            "MapBatches(DecodeEncodeStage)" if fuse == "on" else "MapBatches(EncodeStage)"
        )
        seen = seen or (time.time() if pids else None)
        # kill once the actor has had time to load and take work, or at the first commit
        if pids and (any((out / "embeddings").glob("part-*.parquet")) or time.time() - seen > 2):
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
            killed = pids
        time.sleep(0.02)
    thread.join(timeout=600)
    return rows, out, killed, result


@pytest.mark.parametrize("fuse", ["off", "on"])
def test_encoder_actor_killed_midway_every_row_once(siglip2_checkpoint, ray_local, tmp_path, fuse):
    """Separate encoder actors (fuse off) or the fused decode+encode actors (fuse on)."""
    for attempt, n_rows in enumerate(
        (900, 2700)
    ):  # a second, longer run if the first was too quick
        (tmp_path / str(attempt)).mkdir()
        rows, out, killed, result = _run_and_kill_encoder(
            siglip2_checkpoint, tmp_path / str(attempt), n_rows, fuse
        )
        if killed:
            break
    assert killed, "the encoder actor was not found while the job ran"
    assert "error" not in result, result.get("error")
    summary = result["summary"]
    assert (summary["rows_in"], summary["embedded"], summary["errors"]) == (len(rows), len(rows), 0)
    ids = _table(out / "embeddings").column("id").to_pylist()
    assert sorted(ids) == [r[0] for r in rows], "every row exactly once after the actor died"
