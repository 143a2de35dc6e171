"""Run state under an output: the ids already done, the run lock, stale temp files.

Done ids are kept as a sorted array of 16-byte BLAKE2b digests (``numpy`` dtype ``S16``), not a
Python set of strings: 16 bytes per id whatever the id's length, membership by binary search,
one vectorized ``searchsorted`` per batch. 100 million done ids take 1.6 GB; the chance that a
new id collides with a done one is below 1e-20 at that size.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import posixpath
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from vlray.config import S3Config
from vlray.storage import (
    Location,
    StorageError,
    list_files,
    one_line,
    resolved_endpoint,
    s3_environment,
    scrub,
)

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
    left undone, an accounting mismatch, the lock lost): exit 1. Committed work stays;
    ``summary`` says what."""

    def __init__(self, message: str, summary: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.summary = summary


class LockLost(RunFailed):
    """Another run took the output over while this one ran: stop at once, write nothing more."""


@dataclass(frozen=True)
class HeldLock:
    """The lock as read: its body, a version to make a conditional write against, its raw age."""

    body: dict[str, Any]
    version: str
    mtime: float


class LocalLockStore:
    """``_lock.json`` on a local (or NFS) filesystem.

    Created by ``link(2)`` of a complete temp file (fails if the name exists, so exactly one
    creator wins and nobody reads a half-written lock). Replacing and deleting compare the
    current bytes with the version read, under an ``flock`` on the output folder, so a
    takeover or heartbeat cannot overwrite a lock that changed since it was read.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.folder = os.path.dirname(path)

    @contextlib.contextmanager
    def _guard(self) -> Iterator[None]:
        os.makedirs(self.folder, exist_ok=True)
        fd = os.open(self.folder, os.O_RDONLY)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError:  # no flock here (some network filesystems): creation stays exclusive
                pass
            yield
        finally:
            os.close(fd)

    def _temp(self, data: bytes) -> str:
        tmp = os.path.join(self.folder, f".tmp-{uuid.uuid4().hex}-{LOCK_NAME}")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return tmp

    def _read(self) -> HeldLock | None:
        try:
            with open(self.path, "rb") as f:
                data = f.read()
                mtime = os.fstat(f.fileno()).st_mtime
        except FileNotFoundError:
            return None
        return HeldLock(_parse(data), hashlib.blake2b(data, digest_size=16).hexdigest(), mtime)

    def read(self) -> HeldLock | None:
        """The lock, or None when there is none."""
        return self._read()

    def create(self, data: bytes) -> str | None:
        """Writes the lock if there is none: its version, or None when one exists."""
        with self._guard():
            tmp = self._temp(data)
            try:
                os.link(tmp, self.path)
            except FileExistsError:
                return None
            except OSError:  # no hard links here: exclusive create, then the bytes
                if not self._create_exclusive(data):
                    return None
            finally:
                _unlink(tmp)
        return hashlib.blake2b(data, digest_size=16).hexdigest()

    def _create_exclusive(self, data: bytes) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return True

    def replace(self, data: bytes, version: str) -> str | None:
        """Overwrites the lock if it is still ``version``: the new version, or None."""
        with self._guard():
            held = self._read()
            if held is None or held.version != version:
                return None
            try:
                os.replace(self._temp(data), self.path)
            except FileNotFoundError:  # our temp file was cleaned up by a run that holds it
                return None
        return hashlib.blake2b(data, digest_size=16).hexdigest()

    def delete(self, version: str) -> bool:
        """Removes the lock if it is still ``version``."""
        with self._guard():
            held = self._read()
            if held is None or held.version != version:
                return False
            _unlink(self.path)
        return True


class S3LockStore:
    """``_lock.json`` on S3 with conditional writes: ``If-None-Match: *`` creates it (exactly one
    creator wins), ``If-Match: <etag>`` replaces or deletes it only if unchanged since read.

    Needs a store that honours them (AWS S3, MinIO, Cloudflare R2, moto ...). A request the SDK
    retried after its first try had in fact landed answers 412; the caller re-reads and finds
    its own token.
    """

    def __init__(self, location: Location, s3: S3Config | None) -> None:
        self.bucket, _, self.key = location.path.partition("/")
        self.client = _s3_client(s3 or S3Config())

    def read(self) -> HeldLock | None:
        """The lock, or None when there is none."""
        try:
            resp = self.client.get_object(Bucket=self.bucket, Key=self.key)
        except Exception as exc:
            if _s3_status(exc) == 404:
                return None
            raise _s3_error("read", self.bucket, self.key, exc) from None
        data = resp["Body"].read()
        return HeldLock(_parse(data), resp["ETag"], resp["LastModified"].timestamp())

    def _put(self, data: bytes, **condition: str) -> str | None:
        try:
            resp = self.client.put_object(Bucket=self.bucket, Key=self.key, Body=data, **condition)
        except Exception as exc:
            if _s3_status(exc) in (404, 409, 412):  # changed, gone, or a concurrent write
                return None
            raise _s3_error("write", self.bucket, self.key, exc) from None
        return resp["ETag"]

    def create(self, data: bytes) -> str | None:
        """Writes the lock if there is none: its ETag, or None when one exists."""
        return self._put(data, IfNoneMatch="*")

    def replace(self, data: bytes, version: str) -> str | None:
        """Overwrites the lock if its ETag is still ``version``: the new ETag, or None."""
        return self._put(data, IfMatch=version)

    def delete(self, version: str) -> bool:
        """Removes the lock if its ETag is still ``version``."""
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=version)
        except Exception as exc:
            if _s3_status(exc) in (404, 409, 412):
                return False
            raise _s3_error("delete", self.bucket, self.key, exc) from None
        return True


def _s3_client(s3: S3Config) -> Any:
    """A botocore S3 client with the job's endpoint, region, credentials, retries and timeouts
    (unset ones from the AWS SDK's default chain); one per settings (clients are thread-safe)."""
    env = s3_environment()
    with _CLIENTS_LOCK:
        key = (s3, env)
        if key not in _CLIENTS:
            _CLIENTS[key] = _new_s3_client(s3)
        return _CLIENTS[key]


_CLIENTS: dict[tuple[S3Config, tuple[str, ...]], Any] = {}
_CLIENTS_LOCK = threading.Lock()


def _new_s3_client(s3: S3Config) -> Any:
    import botocore
    import botocore.session
    from botocore.config import Config

    options: dict[str, Any] = {
        "connect_timeout": s3.connect_timeout_s,
        "read_timeout": s3.request_timeout_s,
        "retries": {"max_attempts": max(1, s3.max_attempts), "mode": "standard"},
    }
    if s3.anonymous:
        options["signature_version"] = botocore.UNSIGNED
    kwargs: dict[str, Any] = {"config": Config(**options)}
    if s3.key and s3.secret:
        kwargs.update(aws_access_key_id=s3.key, aws_secret_access_key=s3.secret)
    region = s3.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    return botocore.session.get_session().create_client(
        "s3", region_name=region or None, endpoint_url=resolved_endpoint(s3) or None, **kwargs
    )


def _s3_status(exc: Exception) -> int:
    response = getattr(exc, "response", None) or {}
    return int(response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)


def _s3_error(action: str, bucket: str, key: str, exc: Exception) -> StorageError:
    return StorageError(f"cannot {action} the run lock s3://{bucket}/{key}: {scrub(one_line(exc))}")


def _parse(data: bytes) -> dict[str, Any]:
    try:
        body = json.loads(data)
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # someone else's process, or we cannot tell
    return True


_ACTIVE_TOKENS: set[str] = set()
"""Tokens of the locks this process holds now (a lock with our pid but another token is left
over from an earlier run in this process that ended without releasing it)."""


def lock_store(output: Location, s3: S3Config | None = None) -> LocalLockStore | S3LockStore:
    """The lock store of an output: exclusive files locally, conditional writes on S3."""
    location = output.join(LOCK_NAME)
    if output.is_s3:
        return S3LockStore(location, s3)
    if output.is_local:
        return LocalLockStore(location.path)
    raise StorageError(f"{output.uri}: no run lock for this kind of storage")


class RunLock:
    """``OUTPUT/_lock.json``: exclusive, with a heartbeat that checks it is still ours.

    Every write is conditional (see the stores), so of two runs that race to create it, or to
    take over a stale one, exactly one wins. A lock is stale when its heartbeat is older than
    ``stale_seconds``, or at once when its run's process is gone on this host. Each heartbeat
    replaces the lock only if unchanged since our last write; when it was taken over (or
    removed), ``lost`` is set and ``on_lost`` called (from the heartbeat thread) so the driver
    stops. A heartbeat that keeps failing for ``stale_seconds`` counts as lost too: another
    run may have taken over unseen.
    """

    def __init__(
        self,
        output: Location,
        s3: S3Config | None = None,
        stale_seconds: float | None = None,
        heartbeat_seconds: float | None = None,
        on_lost: Callable[[LockLost], None] | None = None,
        store: LocalLockStore | S3LockStore | None = None,
    ) -> None:
        self.uri = output.join(LOCK_NAME).uri
        self.store = store or lock_store(output, s3)
        self.stale_seconds = LOCK_STALE_SECONDS if stale_seconds is None else stale_seconds
        self.heartbeat_seconds = (
            HEARTBEAT_SECONDS if heartbeat_seconds is None else heartbeat_seconds
        )
        self.on_lost = on_lost
        self.token = uuid.uuid4().hex
        self.version: str | None = None
        self.lost: LockLost | None = None
        self._started = time.time()
        self._last_beat = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def run_id(self) -> str:
        """A short name of this run (the start of its token)."""
        return self.token[:12]

    def _body(self) -> bytes:
        body = {
            "token": self.token,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": self._started,
            "heartbeat": time.time(),
        }
        return json.dumps(body).encode()

    def _takeover(self, held: HeldLock) -> str:
        """Why ``held`` may be taken over ("" when its run is alive)."""
        body, pid = held.body, held.body.get("pid")
        if body.get("host") == socket.gethostname() and isinstance(pid, int) and pid > 0:
            if not _pid_alive(pid):
                return f"its process {pid} is gone"
            if pid == os.getpid() and body.get("token") not in _ACTIVE_TOKENS:
                return "an earlier run in this process left it"
        age = time.time() - _heartbeat(held)
        if age >= self.stale_seconds:
            return f"its heartbeat is {age:.0f} s old"
        return ""

    def _refuse(self, held: HeldLock) -> OutputLocked:
        body = held.body
        age = time.time() - _heartbeat(held)
        return OutputLocked(
            f"{self.uri.rsplit('/', 1)[0]} is in use by another vlray run "
            f"(run {str(body.get('token', '?'))[:12]}, host {body.get('host')}, "
            f"pid {body.get('pid')}, heartbeat {age:.0f} s ago); "
            f"wait for it to finish, or remove {LOCK_NAME} if that run is gone "
            f"(a dead run's lock expires after {self.stale_seconds:.0f} s, at once on its host)"
        )

    def _try_acquire(self) -> bool:
        """One conditional attempt: True when the lock is ours."""
        held = self.store.read()
        if held is None:
            self.version = self.store.create(self._body())
            return self.version is not None
        if held.body.get("token") == self.token:  # our own write, retried by the SDK
            self.version = held.version
            return True
        reason = self._takeover(held)
        if not reason:
            raise self._refuse(held)
        self.version = self.store.replace(self._body(), held.version)
        if self.version:
            logger.warning(
                "took over the lock of run %s (host %s, pid %s): %s",
                str(held.body.get("token", "?"))[:12],
                held.body.get("host"),
                held.body.get("pid"),
                reason,
            )
        return self.version is not None

    def acquire(self) -> None:
        """Takes the lock, or raises OutputLocked at once if a live run holds it."""
        _ACTIVE_TOKENS.add(self.token)  # before it can be seen: no one in this process takes it
        try:
            for _ in range(5):  # each lost race re-reads: the winner's live lock refuses us
                if self._try_acquire():
                    break
            else:
                raise OutputLocked(f"{self.uri}: other runs kept taking the lock at once")
        except BaseException:
            _ACTIVE_TOKENS.discard(self.token)
            raise
        self._last_beat = time.time()
        self._thread = threading.Thread(target=self._beat_loop, name="vlray-lock", daemon=True)
        self._thread.start()

    def beat(self) -> bool:
        """One heartbeat: rewrites the lock if it is still ours. False (and ``lost`` set) when
        another run took it over or it was removed."""
        if self.lost or self.version is None:
            return False
        version = self.store.replace(self._body(), self.version)
        if version is None:
            held = self.store.read()
            if held is not None and held.body.get("token") == self.token:
                version = held.version  # our own write, retried by the SDK
            else:
                self._lose(held)
                return False
        self.version, self._last_beat = version, time.time()
        return True

    def _lose(self, held: HeldLock | None) -> None:
        if held is None:
            what = f"lock lost: {self.uri} was removed while this run held it"
        else:
            body = held.body
            what = (
                f"lock lost to run {str(body.get('token', '?'))[:12]} "
                f"(host {body.get('host')}, pid {body.get('pid')})"
            )
        self._set_lost(LockLost(what + "; stopped, committed work is kept"))

    def _set_lost(self, exc: LockLost) -> None:
        self.lost = exc
        self._stop.set()
        if self.on_lost:
            self.on_lost(exc)

    def _beat_loop(self) -> None:
        while not self._stop.wait(self.heartbeat_seconds):
            try:
                if not self.beat():
                    return
            except Exception as exc:  # a missed beat risks a takeover: lost past the stale age
                logger.warning("lock heartbeat failed: %s", scrub(one_line(exc)))
                silent = time.time() - self._last_beat
                if silent >= self.stale_seconds:
                    self._set_lost(
                        LockLost(
                            f"lock lost: no heartbeat could be written for {silent:.0f} s "
                            f"({scrub(one_line(exc))}); another run may have taken over"
                        )
                    )
                    return

    def release(self) -> None:
        """Stops the heartbeat and removes the lock if it is still ours."""
        self._stop.set()
        if self._thread and self._thread is not threading.current_thread():
            self._thread.join(timeout=self.heartbeat_seconds + 5)
        _ACTIVE_TOKENS.discard(self.token)
        if self.lost or self.version is None:
            return
        try:
            self.store.delete(self.version)
        except OSError as exc:
            logger.warning("could not remove the run lock: %s", scrub(one_line(exc)))
        self.version = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _heartbeat(held: HeldLock) -> float:
    """When the lock's run last proved alive (its recorded heartbeat, else the file's time)."""
    value = held.body.get("heartbeat")
    return float(value) if isinstance(value, (int, float)) else held.mtime


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


SIDE_FOLDERS = ("masks", "tokens", "regions")
"""Folders whose part files are written before the batch's done marker (``embeddings/``, or
``segmented/`` for SAM alone) under the same part name: committed only once that marker is."""


def remove_orphan_parts(output: Location, done_folder: str) -> int:
    """Deletes side parts (masks, tokens, regions) whose batch never committed its done part (a
    run killed between the two writes): their rows are redone, maybe in batches of another name,
    and must not appear twice. Returns how many files were removed (we hold the lock)."""
    done = {posixpath.basename(p) for p in list_files(output.join(done_folder), (".parquet",))}
    removed = 0
    for folder in SIDE_FOLDERS:
        for path in list_files(output.join(folder), (".parquet",)):
            if posixpath.basename(path) not in done:
                output.fs.delete_file(path)
                removed += 1
    return removed
