"""The cluster path: `ray job submit` of jobs/embed.py to a real two-node local Ray cluster."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vlray.testing.images import bad_images, sample_photos

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    if (Path.home() / ".ray" / "auth_token").exists():
        env["RAY_AUTH_MODE"] = "token"  # clusters started here use the existing token
    return env


def _ray(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "ray"), *args], env=_env(), capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture
def two_node_cluster():
    """A head (2 CPUs, dashboard/job server) plus a second worker node (1 CPU) on this machine."""
    temp = tempfile.mkdtemp(prefix="vlr", dir="/tmp")  # short: Ray's socket paths are limited
    port, dash = _free_port(), _free_port()

    def agent_ports() -> list[str]:
        # fixed defaults (52365, ...) clash with any other Ray on the machine: pick free ones
        return [
            f"--dashboard-agent-listen-port={_free_port()}",
            f"--dashboard-agent-grpc-port={_free_port()}",
            f"--metrics-export-port={_free_port()}",
            f"--runtime-env-agent-port={_free_port()}",
        ]

    try:
        head = _ray(
            "start",
            "--head",
            f"--port={port}",
            "--num-cpus=2",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash}",
            "--disable-usage-stats",
            f"--temp-dir={temp}",
            *agent_ports(),
        )
        assert head.returncode == 0, head.stderr[-2000:]
        worker = _ray(
            "start",
            f"--address=127.0.0.1:{port}",
            "--num-cpus=1",
            "--disable-usage-stats",
            *agent_ports(),
        )
        assert worker.returncode == 0, worker.stderr[-2000:]
        yield f"http://127.0.0.1:{dash}", f"127.0.0.1:{port}"
    finally:
        # `ray stop` would stop every Ray on the machine; kill only this cluster's processes
        subprocess.run(["pkill", "-9", "-f", temp], check=False)
        time.sleep(1)
        shutil.rmtree(temp, ignore_errors=True)


def test_ray_job_submit_on_two_nodes(two_node_cluster, siglip2_checkpoint, tmp_path):
    dashboard, gcs = two_node_cluster
    photos = sample_photos(40, seed=4)
    rows = photos + [("bad.jpg", bad_images()["random.jpg"])]
    pq.write_table(
        pa.table(
            {"id": [r[0] for r in rows], "image": pa.array([r[1] for r in rows], pa.binary())}
        ),
        tmp_path / "in.parquet",
        row_group_size=8,
    )
    out = tmp_path / "out"
    # right after `ray start` the job agent may not be up yet ("No available agent"): retry
    deadline = time.time() + 120
    attempt = 0
    while True:
        attempt += 1
        status = _ray(
            "job",
            "submit",
            f"--address={dashboard}",
            f"--submission-id=vlray-test-{attempt}",
            f"--working-dir={REPO}",
            "--",
            sys.executable,
            "jobs/embed.py",
            "--input",
            str(tmp_path / "in.parquet"),
            "--output",
            str(out),
            "--model",
            str(siglip2_checkpoint),
            "--set",
            "compute.decode_actors=2",
            "--set",
            "compute.decode_batch_size=8",
            timeout=400,
        )
        if (
            status.returncode == 0
            or "No available agent" not in status.stderr
            or time.time() > deadline
        ):
            break
        time.sleep(3)
    assert status.returncode == 0, (status.stdout + status.stderr)[-3000:]
    assert "41 in = 40 embedded + 1 errors" in status.stdout
    summary = json.loads((out / "_summary.json").read_text())
    assert summary["rows_in"] == 41 and summary["accounted"]
    nodes = _ray("status", f"--address={gcs}")
    assert nodes.stdout.count("node_") >= 2 or "2 node" in nodes.stdout or nodes.returncode == 0
    ids = pa.concat_tables(
        [pq.read_table(f) for f in (out / "embeddings").glob("*.parquet")]
    ).column("id")
    assert sorted(ids.to_pylist()) == sorted(n for n, _ in photos)
