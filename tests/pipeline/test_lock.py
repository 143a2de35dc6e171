"""The run lock: exclusive under races (local files and S3 conditional writes on moto's server),
immediate takeover of a dead process's lock, a heartbeat that notices a takeover and stops the
driver. No Ray: seconds."""

from __future__ import annotations

import json
import random
import socket
import subprocess
import threading
import time

import numpy as np
import pytest

from vlray.config import OutputConfig
from vlray.pipeline.job import STAT_KEYS, drive
from vlray.pipeline.state import LOCK_NAME, LockLost, OutputLocked, RunLock, lock_store
from vlray.pipeline.stop import StopSignals
from vlray.storage import locate

TRIALS = 40


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def _slow(store, rng: random.Random):
    """The store with 0-15 ms of latency before and after each request (S3-like)."""
    for name in ("read", "create", "replace", "delete"):
        method = getattr(store, name)

        def slow(*args, _method=method):
            time.sleep(rng.random() * 0.015)
            result = _method(*args)
            time.sleep(rng.random() * 0.015)
            return result

        setattr(store, name, slow)
    return store


def _existing(scenario: str) -> dict | None:
    """The lock found by the racers: none, a stale one, or a fresh one of a dead local process."""
    if scenario == "none":
        return None
    if scenario == "stale":
        return {"token": "stale", "host": "elsewhere", "pid": 7, "heartbeat": time.time() - 999}
    return {
        "token": "dead",
        "host": socket.gethostname(),
        "pid": _dead_pid(),
        "heartbeat": time.time(),
    }


def _race(output, s3, existing: dict | None, seed: int) -> list[RunLock]:
    """Two runs take the lock at the same moment through slow stores: the winners."""
    if existing is not None:
        assert lock_store(output, s3).create(json.dumps(existing).encode())
    barrier, winners = threading.Barrier(2), []
    locks = [
        RunLock(output, s3, store=_slow(lock_store(output, s3), random.Random(seed * 2 + i)))
        for i in range(2)
    ]

    def take(lock: RunLock) -> None:
        barrier.wait()
        try:
            lock.acquire()
            winners.append(lock)
        except OutputLocked:
            pass

    threads = [threading.Thread(target=take, args=(lock,)) for lock in locks]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return winners


def _check_race(make_output, s3=None) -> None:
    scenarios = ("none", "stale", "dead")
    for trial in range(TRIALS):
        output = make_output(trial)
        winners = _race(output, s3, _existing(scenarios[trial % 3]), trial)
        assert len(winners) == 1, f"trial {trial} ({scenarios[trial % 3]}): {len(winners)} winners"
        held = lock_store(output, s3).read()
        assert held.body["token"] == winners[0].token
        winners[0].release()
        assert lock_store(output, s3).read() is None


def test_two_local_runs_racing_for_the_lock_one_wins(tmp_path):
    _check_race(lambda trial: locate(str(tmp_path / f"out{trial}")))


def test_two_s3_runs_racing_for_the_lock_one_wins(s3_env):
    _check_race(lambda trial: locate(f"s3://{s3_env.bucket}/race/{trial}", s3_env.s3), s3_env.s3)


def _take_over(output, s3) -> dict:
    """Another run replaces the lock (as if it had judged it stale): its body."""
    store = lock_store(output, s3)
    held = store.read()
    body = {
        "token": "f00dfeedcafe0000",
        "host": "other-host",
        "pid": 4242,
        "heartbeat": time.time(),
    }
    assert store.replace(json.dumps(body).encode(), held.version)
    return body


@pytest.mark.parametrize("where", ["local", "s3"])
def test_the_heartbeat_notices_a_takeover_and_leaves_the_new_lock(where, tmp_path, s3_env):
    s3 = s3_env.s3 if where == "s3" else None
    uri = f"s3://{s3_env.bucket}/beat" if s3 else str(tmp_path / "out")
    output = locate(uri, s3)
    lost = threading.Event()
    lock = RunLock(output, s3, heartbeat_seconds=0.05, on_lost=lambda exc: lost.set())
    with lock:
        time.sleep(0.15)
        assert lock.lost is None, "our own heartbeats keep the lock"
        _take_over(output, s3)
        assert lost.wait(5)
    assert str(lock.lost).startswith("lock lost to run f00dfeedcafe (host other-host, pid 4242)")
    assert lock_store(output, s3).read().body["token"] == "f00dfeedcafe0000", "release left it"


def test_a_live_lock_is_refused_and_a_dead_process_lock_taken_at_once(tmp_path):
    output = locate(str(tmp_path / "out"))
    store = lock_store(output)
    live = {"token": "live", "host": "elsewhere", "pid": 1, "heartbeat": time.time()}
    store.create(json.dumps(live).encode())
    with pytest.raises(OutputLocked, match=r"run live, host elsewhere, pid 1, heartbeat 0 s ago"):
        RunLock(output).acquire()
    dead = {**live, "host": socket.gethostname(), "pid": _dead_pid()}
    assert store.replace(json.dumps(dead).encode(), store.read().version)
    with RunLock(output) as lock:  # fresh heartbeat, but its process is gone
        assert json.loads((tmp_path / "out" / LOCK_NAME).read_text())["token"] == lock.token
    assert not (tmp_path / "out" / LOCK_NAME).exists()


class _Batches:
    """A stand-in for the write stage's stream: one batch of counts every ``pause`` seconds."""

    def __init__(self, n: int, pause: float = 0.0) -> None:
        self.n, self.pause, self.closed = n, pause, False

    def iter_batches(self, **_):
        try:
            for i in range(self.n):
                time.sleep(self.pause)
                yield {
                    **{k: np.array([1]) for k in STAT_KEYS},
                    "systemic_error": np.array([""]),
                    "file": np.array([f"part-{i}.parquet"]),
                }
        finally:
            self.closed = True


def test_drive_stops_when_the_lock_is_lost(tmp_path):
    lock = RunLock(locate(str(tmp_path / "out")), heartbeat_seconds=3600)
    with lock:
        _take_over(locate(str(tmp_path / "out")), None)
        assert not lock.beat()
        ds = _Batches(5)
        with pytest.raises(LockLost, match="lock lost to run f00dfeedcafe"):
            drive(ds, OutputConfig(), lock=lock)
        assert ds.closed, "the stream is closed, not left running"


def test_a_lost_lock_interrupts_a_driver_blocked_on_the_stream(tmp_path):
    output = locate(str(tmp_path / "out"))
    ds = _Batches(1000, pause=0.05)
    with StopSignals() as stops:
        lock = RunLock(output, heartbeat_seconds=0.05, on_lost=stops.interrupt)
        with lock:
            threading.Timer(0.2, _take_over, (output, None)).start()
            start = time.time()
            with pytest.raises(LockLost):
                drive(ds, OutputConfig())  # no lock passed: only the interrupt can stop it
            assert time.time() - start < 3
    assert ds.closed
