"""Run state under an output: the ids already done, the run lock, stale temp files.

Done ids are kept as a sorted array of 16-byte BLAKE2b digests (``numpy`` dtype ``S16``), not a
Python set of strings: 16 bytes per id whatever the id's length, membership by binary search,
one vectorized ``searchsorted`` per batch. 100 million done ids take 1.6 GB; the chance that a
new id collides with a done one is below 1e-20 at that size.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterable
from typing import Any

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from vlray.storage import Location, list_files, read_bytes, write_bytes_atomic

logger = logging.getLogger(__name__)

LOCK_NAME = "_lock.json"
LOCK_STALE_SECONDS = 120.0
HEARTBEAT_SECONDS = 20.0


class OutputLocked(RuntimeError):
    """Another run holds the output."""


def hash_ids(ids: Iterable[str]) -> np.ndarray:
    """ids -> (n,) ``S16`` digests (BLAKE2b-128 of the UTF-8 id)."""
    digests = [hashlib.blake2b(i.encode(), digest_size=16).digest() for i in ids]
    return np.array(digests, dtype="S16") if digests else np.empty(0, dtype="S16")


def read_ids(output: Location, folder: str) -> Iterable[list[str]]:
    """Yields the ``id`` column of every committed Parquet file of ``output/folder``, per file."""
    for path in list_files(output.join(folder), (".parquet",)):
        with output.fs.open_input_file(path) as f:
            yield pq.read_table(f, columns=["id"]).column("id").to_pylist()


def done_ids(output: Location, include_errors: bool, folder: str = "embeddings") -> np.ndarray:
    """Sorted, unique ``S16`` digests of the ids in ``folder`` (and ``errors/``)."""
    parts = [hash_ids(ids) for ids in read_ids(output, folder)]
    if include_errors:
        parts += [hash_ids(ids) for ids in read_ids(output, "errors")]
    if not parts:
        return np.empty(0, dtype="S16")
    return np.unique(np.concatenate(parts))


def is_done(digests: np.ndarray, done: np.ndarray) -> np.ndarray:
    """Boolean mask: which ``digests`` are in the sorted array ``done``."""
    if len(done) == 0 or len(digests) == 0:
        return np.zeros(len(digests), dtype=bool)
    pos = np.searchsorted(done, digests)
    pos[pos == len(done)] = 0
    return done[pos] == digests


class RunFailed(RuntimeError):
    """The run stopped or ended without doing its work (error budget, a systemic failure, rows
    left undone, an accounting mismatch): exit 1. Committed work stays; ``summary`` says what."""

    def __init__(self, message: str, summary: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.summary = summary


class RunLock:
    """``OUTPUT/_lock.json`` with a heartbeat; a crashed run's lock goes stale and is taken over."""

    def __init__(self, output: Location, stale_seconds: float = LOCK_STALE_SECONDS) -> None:
        self.location = output.join(LOCK_NAME)
        self.stale_seconds = stale_seconds
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _body(self) -> bytes:
        return json.dumps(
            {
                "token": self.token,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "heartbeat": time.time(),
            }
        ).encode()

    def _current(self) -> dict | None:
        try:
            return json.loads(read_bytes(self.location))
        except (FileNotFoundError, OSError, ValueError):
            return None

    def acquire(self) -> None:
        """Takes the lock or raises OutputLocked at once if a live run holds it."""
        held = self._current()
        if held and time.time() - float(held.get("heartbeat", 0)) < self.stale_seconds:
            age = time.time() - float(held["heartbeat"])
            raise OutputLocked(
                f"{self.location.uri.rsplit('/', 1)[0]} is in use by another vlray run "
                f"(host {held.get('host')}, pid {held.get('pid')}, heartbeat {age:.0f} s ago); "
                f"wait for it to finish, or remove {LOCK_NAME} if that run is gone "
                f"(a dead run's lock expires after {self.stale_seconds:.0f} s)"
            )
        if held:
            logger.warning(
                "taking over a stale lock from host %s pid %s", held.get("host"), held.get("pid")
            )
        write_bytes_atomic(self.location, self._body())
        time.sleep(0.05)
        mine = self._current()
        if not mine or mine.get("token") != self.token:
            raise OutputLocked(f"{self.location.uri}: another run took the lock at the same moment")
        self._thread = threading.Thread(target=self._beat, name="vlray-lock", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            try:
                write_bytes_atomic(self.location, self._body())
            except OSError as exc:  # keep running; a missed beat only risks a takeover later
                logger.warning("lock heartbeat failed: %s", exc)

    def release(self) -> None:
        """Stops the heartbeat and removes the lock file (if still ours)."""
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)
        held = self._current()
        if held and held.get("token") == self.token:
            try:
                self.location.fs.delete_file(self.location.path)
            except OSError:
                pass

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def remove_stale_temp_files(output: Location) -> int:
    """Deletes hidden ``.tmp-*`` files a killed run left behind (we hold the lock)."""
    if not output.is_local:
        return 0  # S3 objects appear whole or not at all
    removed = 0
    selector = pafs.FileSelector(output.path, recursive=True, allow_not_found=True)
    for info in output.fs.get_file_info(selector):
        if info.type == pafs.FileType.File and os.path.basename(info.path).startswith(".tmp-"):
            output.fs.delete_file(info.path)
            removed += 1
    return removed
