"""Clean stops: SIGINT / SIGTERM end the run with one line and exit 130 / 143, committed work is
kept, the lock released, and a rerun finishes every row exactly once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from subprocess import DEVNULL

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vlray import cli
from vlray.config import build_config
from vlray.pipeline.job import run_job
from vlray.pipeline.state import LOCK_NAME
from vlray.pipeline.stop import RunStopped, StopRequested, StopSignals
from vlray.testing.images import sample_photos

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_stop_signal_raises_in_the_driver_and_maps_to_its_exit_code(signum, code):
    before = signal.getsignal(signum)
    with StopSignals(), pytest.raises(StopRequested) as raised:
        os.kill(os.getpid(), signum)
        time.sleep(5)
    assert raised.value.signum == signum and signal.getsignal(signum) == before
    stopped = RunStopped(signum, 12)
    name = signal.Signals(signum).name
    assert (stopped.exit_code, str(stopped)) == (
        code,
        f"stopped by {name}: 12 rows committed, rerun resumes",
    )


def test_a_signal_during_a_held_section_stops_at_its_end():
    with StopSignals() as stops, pytest.raises(StopRequested):
        with stops.hold():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            finished = True
    assert finished


def test_the_cli_prints_one_line_and_exits_130_on_ctrl_c(monkeypatch, capsys, tmp_path):
    def stopped(config, *args, **kwargs):
        raise RunStopped(signal.SIGINT, 7)

    monkeypatch.setattr("vlray.pipeline.job.run_job", stopped)
    code = cli.embed_main(
        ["--input", str(tmp_path), "--output", str(tmp_path / "o"), "--model", "x"]
    )
    err = capsys.readouterr().err
    assert code == 130 and err == "stopped by SIGINT: 7 rows committed, rerun resumes\n"


def _ids(folder: Path) -> list[str]:
    files = sorted(folder.glob("*.parquet"))
    return sum((pq.read_table(f, columns=["id"]).column("id").to_pylist() for f in files), [])


def test_sigterm_mid_run_keeps_committed_rows_and_a_rerun_finishes(
    siglip2_checkpoint, ray_local, tmp_path
):
    photos = sample_photos(24, seed=3)
    ids = [f"r{i:04d}" for i in range(400)]
    blobs = [photos[i % len(photos)][1] for i in range(400)]
    data = tmp_path / "in.parquet"
    pq.write_table(pa.table({"id": ids, "image": pa.array(blobs, pa.binary())}), data)
    out = tmp_path / "out"
    # output.rows_per_file stays 2048: on the CPU a part commits per encoder batch (8 rows)
    sets = ["compute.encode_batch_size=8", "input.rows_per_task=16"]
    cmd = [sys.executable, str(REPO / "jobs" / "embed.py"), "--input", str(data)]
    cmd += ["--output", str(out), "--model", str(siglip2_checkpoint)]
    cmd += [arg for s in sets for arg in ("--set", s)]
    # the driver joins the session's Ray (a second cluster would cost ~10 s of CI); it still
    # installs its handlers before ray.init and again after (Ray sets its own SIGTERM one)
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    log = tmp_path / "stderr.txt"
    with open(log, "wb") as stderr:  # a file, not a pipe: Ray's progress lines cannot fill it
        proc = subprocess.Popen(
            cmd, env={**env, "PYTHONPATH": str(REPO)}, stdout=DEVNULL, stderr=stderr
        )
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not list(out.glob("embeddings/part-*.parquet")):
            assert proc.poll() is None, log.read_text()[-3000:]
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        proc.kill()
    err = log.read_text()
    tail = [line for line in err.splitlines() if line.strip()][-1]
    kept = _ids(out / "embeddings") + _ids(out / "errors")
    assert proc.returncode == 143, err[-3000:]
    assert tail == f"stopped by SIGTERM: {len(kept)} rows committed, rerun resumes", err[-3000:]
    assert "Traceback" not in err and "SIGABRT" not in err and "Stack trace" not in err, err
    assert 0 < len(kept) < 400 and not (out / LOCK_NAME).exists()
    assert json.loads((out / "_summary.json").read_text())["rows_committed"] == len(kept)
    overrides = {"input": {"uri": str(data), "rows_per_task": 64}, "output": {"uri": str(out)}}
    summary = run_job(build_config(None, {**overrides, "model": {"name": str(siglip2_checkpoint)}}))
    assert summary["skipped_done"] == len(kept) and summary["rows_in"] == 400 - len(kept)
    done = _ids(out / "embeddings") + _ids(out / "errors")
    assert sorted(done) == ids, "every row exactly once"
