"""Filesystems for local paths, ``file://`` and ``s3://`` URIs, and atomic (commit-on-close) writes.

Everything that reads or writes job data goes through here, so S3 settings (endpoint, region,
credentials, retries, timeouts) are applied in one place and never logged. Messages that may
echo a request (pyarrow / AWS SDK errors) pass through ``scrub`` before they reach a log, an
error row or an exception.
"""

from __future__ import annotations

import functools
import io
import os
import posixpath
import re
import shutil
import socket
import stat
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from vlray.config import S3Config

COPY_CHUNK = 8 << 20
"""Bytes per read/write when streaming a file between stores."""

_ENV_KEYS = (
    "AWS_ENDPOINT_URL_S3",
    "AWS_ENDPOINT_URL",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
)


def s3_environment() -> tuple[str, ...]:
    """The AWS variables a client depends on (endpoint, region, credentials, profile), as a
    cache key part: a client made under other values is not reused."""
    return tuple(os.environ.get(k, "") for k in _ENV_KEYS)


_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
_TRANSIENT = re.compile(
    r"NETWORK_CONNECTION|SLOW_DOWN|SlowDown|SERVICE_UNAVAILABLE|ServiceUnavailable|"
    r"INTERNAL_FAILURE|InternalError|THROTTL|Throttl|REQUEST_TIMEOUT|RequestTimeout|"
    r"curlCode|Connection reset|timed out|HTTP response code: 5\d\d|HTTP status 50[0-4]",
)
_DENIED = re.compile(
    r"ACCESS_DENIED|AccessDenied|Forbidden|HTTP status 403|response code: 403|INVALID_ACCESS_KEY|SignatureDoesNotMatch"
)


class StorageError(OSError):
    """Storage that cannot be used at all (unreachable endpoint, missing bucket, no access)."""


@dataclass(frozen=True)
class Location:
    """A filesystem and a path inside it (no scheme)."""

    fs: pafs.FileSystem
    path: str
    uri: str

    @property
    def is_local(self) -> bool:
        """True for the local filesystem."""
        return isinstance(self.fs, pafs.LocalFileSystem)

    @property
    def is_s3(self) -> bool:
        """True for S3 (and S3-compatible stores)."""
        return isinstance(self.fs, pafs.S3FileSystem)

    def join(self, *parts: str) -> Location:
        """A child location."""
        path = posixpath.join(self.path, *parts)
        uri = self.uri.rstrip("/") + "/" + "/".join(parts)
        return Location(self.fs, path, uri)

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        # pyarrow's S3FileSystem pickles without its retry strategy (workers would fall back to
        # 3 attempts): rebuild it with ours on the other side.
        if isinstance(self.fs, pafs.S3FileSystem):
            options = dict(self.fs.__reduce__()[1][0])
            return _rebuild_s3_location, (
                options,
                _ATTEMPTS.get(id(self.fs), 10),
                self.path,
                self.uri,
            )
        return Location, (self.fs, self.path, self.uri)


_ATTEMPTS: dict[int, int] = {}


def _rebuild_s3_location(options: dict[str, Any], attempts: int, path: str, uri: str) -> Location:
    fs = pafs.S3FileSystem(
        **options, retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=attempts)
    )
    _ATTEMPTS[id(fs)] = attempts
    return Location(fs, path, uri)


def resolved_endpoint(s3: S3Config | None = None) -> str:
    """The S3 endpoint URL in effect (config key, then AWS_ENDPOINT_URL[_S3]); '' for AWS."""
    s3 = s3 or S3Config()
    return (
        s3.endpoint_url
        or os.environ.get("AWS_ENDPOINT_URL_S3")
        or os.environ.get("AWS_ENDPOINT_URL")
        or ""
    )


def _region(s3: S3Config) -> str:
    return s3.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or ""


def s3_filesystem(
    s3: S3Config | None = None, bucket: str = "", probe: bool = False
) -> pafs.S3FileSystem:
    """A pyarrow S3 filesystem from config keys, falling back to the standard AWS environment.

    Credentials not given as keys come from the AWS SDK's default chain (environment, shared
    config/credentials files and profile, instance metadata). Filesystems are cached per
    settings, so decode actors fetching thousands of objects reuse one client.

    Args:
        s3: the job's S3 settings.
        bucket: on AWS (no endpoint) with no region configured, the bucket's region is looked up.
        probe: a fail-fast variant for reachability checks (3 attempts, short timeouts).
    """
    s3 = s3 or S3Config()
    env = s3_environment()
    region = _region(s3)
    if not region and bucket and not resolved_endpoint(s3) and not probe:
        region = _bucket_region(bucket)
    return _s3_filesystem(s3, env, region, probe)


@functools.lru_cache(maxsize=256)
def _bucket_region(bucket: str) -> str:
    try:
        return pafs.resolve_s3_region(bucket)
    except (OSError, ValueError):
        return ""


@functools.lru_cache(maxsize=64)
def _s3_filesystem(
    s3: S3Config, env: tuple[str, ...], region: str, probe: bool
) -> pafs.S3FileSystem:
    kwargs: dict[str, object] = {}
    endpoint = resolved_endpoint(s3)
    if endpoint:
        kwargs["endpoint_override"] = endpoint
        if endpoint.startswith("http://"):
            kwargs["scheme"] = "http"
    if region:
        kwargs["region"] = region
    if s3.anonymous:
        kwargs["anonymous"] = True
    elif s3.key and s3.secret:
        kwargs["access_key"] = s3.key
        kwargs["secret_key"] = s3.secret
    attempts = 3 if probe else max(1, s3.max_attempts)
    # delayed open: an object smaller than one part is uploaded at close by a single PutObject
    kwargs["allow_delayed_open"] = True
    kwargs["connect_timeout"] = (
        min(s3.connect_timeout_s, s3.check_timeout_s) if probe else s3.connect_timeout_s
    )
    kwargs["request_timeout"] = s3.check_timeout_s if probe else s3.request_timeout_s
    kwargs["retry_strategy"] = pafs.AwsStandardS3RetryStrategy(max_attempts=attempts)
    fs = pafs.S3FileSystem(**kwargs)
    _ATTEMPTS[id(fs)] = attempts
    return fs


def locate(uri: str, s3: S3Config | None = None) -> Location:
    """Resolves ``uri`` (local path, ``file://`` or ``s3://``) to a filesystem and path."""
    if uri.startswith("s3://"):
        path = uri[len("s3://") :].rstrip("/")
        return Location(s3_filesystem(s3, bucket=path.split("/", 1)[0]), path, uri.rstrip("/"))
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    path = str(Path(uri).expanduser().resolve())
    return Location(pafs.LocalFileSystem(), path, path)


def scrub(text: str, s3: S3Config | None = None) -> str:
    """``text`` with every credential we know of (config keys, AWS env, URL user info) masked."""
    secrets = [os.environ.get(k, "") for k in _SECRET_ENV]
    if s3 is not None:
        secrets += [s3.secret]
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    return re.sub(r"(\w+://)[^/@\s]+@", r"\1***@", text)


def read_bytes(location: Location) -> bytes:
    """The whole file."""
    with location.fs.open_input_stream(location.path) as stream:
        return stream.read()


class TooLarge(OSError):
    """A file or object over the size cap (``input.max_bytes``): not read."""


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def _check_size(size: int, max_bytes: int) -> None:
    if max_bytes and size > max_bytes:
        raise TooLarge(f"{size} bytes is over input.max_bytes ({max_bytes})")


def read_local(path: str, max_bytes: int = 0) -> bytes:
    """A regular local file, whole; never blocks on a FIFO or reads a device.

    Opened non-blocking and checked with ``fstat`` on the open descriptor (no race between the
    check and the read): anything but a regular file, or one over ``max_bytes`` (0: no cap), is
    refused before a byte is read.

    Raises:
        FileNotFoundError: no such file.
        PermissionError: not readable.
        TooLarge: over ``max_bytes``.
        OSError: not a regular file, an invalid path, or out of memory.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except ValueError:  # an embedded NUL byte
        raise OSError(f"invalid path {path!r}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(f"{_kind(info.st_mode)}, not a regular file")
        _check_size(info.st_size, max_bytes)
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(info.st_size + 1)
            if len(data) > info.st_size:  # it grew since fstat: read on, up to the cap
                data += f.read(max_bytes + 1 - len(data) if max_bytes else -1)
        _check_size(len(data), max_bytes)
        return data
    except MemoryError:
        raise OSError(f"out of memory reading {path}") from None
    finally:
        os.close(fd)


def _read_object(location: Location, max_bytes: int) -> bytes:
    """A whole object, its size checked against ``max_bytes`` (0: none) before reading."""
    with location.fs.open_input_file(location.path) as f:
        _check_size(f.size(), max_bytes)
        try:
            return f.read()
        except MemoryError:
            raise OSError(f"out of memory reading {location.uri} ({f.size()} bytes)") from None


def is_transient(exc: BaseException) -> bool:
    """True for errors worth retrying (5xx, throttling, dropped or refused connections)."""
    if isinstance(exc, (FileNotFoundError, PermissionError)):
        return False
    text = str(exc)
    return bool(_TRANSIENT.search(text)) and not _DENIED.search(text)


def is_denied(exc: BaseException) -> bool:
    """True for permission errors (HTTP 403, bad credentials)."""
    return isinstance(exc, PermissionError) or bool(_DENIED.search(str(exc)))


class TransientError(OSError):
    """A network or service failure that outlasted the retries (timeouts, dropped connections,
    5xx, throttling): the row is not done, and a later run tries it again."""


def fetch_bytes(
    uri: str,
    s3: S3Config | None = None,
    attempts: int = 3,
    backoff_s: float = 0.5,
    max_bytes: int = 0,
) -> bytes:
    """Reads a whole file or object, retrying transient errors (on top of the SDK's own retries).

    Local paths must be regular files (see ``read_local``); files and objects over
    ``max_bytes`` (0: no cap) are refused from their size, unread.

    Raises:
        FileNotFoundError: no such file or object.
        PermissionError: access denied (message scrubbed of credentials).
        TransientError: a transient failure that outlasted the retries (message scrubbed).
        TooLarge: over ``max_bytes``.
        OSError: anything else (message scrubbed).
    """
    local = not uri.startswith("s3://")
    path = os.path.expanduser(uri[len("file://") :] if uri.startswith("file://") else uri)
    for attempt in range(attempts):
        try:
            if local:
                return read_local(path, max_bytes)
            return _read_object(locate(uri, s3), max_bytes)
        except (FileNotFoundError, TooLarge):
            raise
        except OSError as exc:
            if is_denied(exc):
                raise PermissionError(f"access denied: {uri}") from None
            message = scrub(" ".join(str(exc).split()), s3)
            if not is_transient(exc):
                raise OSError(message) from None
            if attempt + 1 >= attempts:
                raise TransientError(message) from None
            time.sleep(backoff_s * (2**attempt))
    raise AssertionError("unreachable")


def _local_tmp(location: Location) -> str:
    """A hidden temporary name beside a local ``location`` (its folder created)."""
    parent = posixpath.dirname(location.path)
    location.fs.create_dir(parent, recursive=True)
    return posixpath.join(parent, f".tmp-{uuid.uuid4().hex}-{posixpath.basename(location.path)}")


def _write_error(location: Location, exc: OSError) -> OSError:
    """A one-line, secret-free error for a failed write to ``location``."""
    return OSError(f"cannot write {location.uri}: {scrub(' '.join(str(exc).split()))}")


def write_bytes_atomic(location: Location, data: bytes) -> None:
    """Writes a file so that readers see all of it or nothing.

    Local: write a hidden temp file beside it, then rename. S3: one PUT (objects appear whole;
    no directory-marker objects are created).
    """
    if location.is_local:
        tmp = _local_tmp(location)
        with location.fs.open_output_stream(tmp) as out:
            out.write(data)
        os.replace(tmp, location.path)
    elif location.is_s3:
        try:
            with location.fs.open_output_stream(location.path) as out:
                out.write(data)
        except OSError as exc:
            raise _write_error(location, exc) from None
    else:
        location.fs.create_dir(posixpath.dirname(location.path), recursive=True)
        with location.fs.open_output_stream(location.path) as out:
            out.write(data)


def download_file(location: Location, path: str) -> None:
    """Streams a file (of any size: never whole in memory) to local ``path``, replaced
    atomically."""
    tmp = f"{path}.part-{uuid.uuid4().hex}"
    try:
        with location.fs.open_input_stream(location.path) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, COPY_CHUNK)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def upload_file(path: str, location: Location) -> None:
    """Streams local ``path`` to ``location`` (S3: one multipart upload, visible whole when
    complete; local: a temp file renamed)."""
    if location.is_local:
        tmp = _local_tmp(location)
        shutil.copyfile(path, tmp)
        os.replace(tmp, location.path)
        return
    try:
        with open(path, "rb") as src, location.fs.open_output_stream(location.path) as dst:
            shutil.copyfileobj(src, dst, COPY_CHUNK)
    except OSError as exc:
        raise _write_error(location, exc) from None


def write_parquet_atomic(location: Location, table: pa.Table) -> None:
    """Writes ``table`` as one Parquet file, atomically (see ``write_bytes_atomic``)."""
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    write_bytes_atomic(location, sink.getvalue())


def list_files(location: Location, suffixes: tuple[str, ...] | None = None) -> list[str]:
    """Paths of the files under a folder, recursively, sorted; hidden files and temp files skipped.

    On S3 this is one paginated listing of the prefix (no per-object requests).
    """
    selector = pafs.FileSelector(location.path, recursive=True, allow_not_found=True)
    paths = []
    for info in location.fs.get_file_info(selector):
        if info.type != pafs.FileType.File:
            continue
        name = posixpath.basename(info.path)
        if name.startswith((".", "_")):
            continue
        if suffixes and not name.lower().endswith(suffixes):
            continue
        paths.append(info.path)
    return sorted(paths)


@dataclass
class Listing:
    """The files under a folder, and what was left out and why."""

    files: list[str]
    skipped: list[tuple[str, str]]
    """(path, reason): ``hidden``, ``broken_link``, ``repeated_folder`` (a folder link to a
    folder already listed: loops and aliases), ``not_regular`` (FIFO, device, socket),
    ``unreadable``."""


def walk_files(location: Location) -> Listing:
    """Every file under a folder, recursively, sorted; names starting with ``.`` are skipped.

    Locally, links are followed (to files, and to folders not yet listed: real paths are
    tracked, so a link loop is listed once); only regular files are listed. On S3 this is one
    paginated listing of the prefix.
    """
    if location.is_local:
        return _walk_local(location.path)
    files, skipped = [], []
    selector = pafs.FileSelector(location.path, recursive=True, allow_not_found=True)
    for info in location.fs.get_file_info(selector):
        if info.type != pafs.FileType.File:
            continue
        rel = posixpath.relpath(info.path, location.path)
        if any(part.startswith(".") for part in rel.split("/")):
            skipped.append((info.path, "hidden"))
        else:
            files.append(info.path)
    return Listing(sorted(files), sorted(skipped))


def _walk_local(root: str) -> Listing:
    files: list[str] = []
    skipped: list[tuple[str, str]] = []
    seen: set[str] = set()
    folders, links = [root], []  # linked folders after the real ones: a real path wins
    while folders or links:
        folder = folders.pop() if folders else links.pop()
        real = os.path.realpath(folder)
        if real in seen:
            skipped.append((folder, "repeated_folder"))
            continue
        seen.add(real)
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError:
            skipped.append((folder, "unreadable"))
            continue
        for entry in entries:
            kind = _entry_kind(entry)
            if kind == "folder":
                (links if entry.is_symlink() else folders).append(entry.path)
            elif kind == "file":
                files.append(entry.path)
            else:
                skipped.append((entry.path, kind))
    return Listing(sorted(files), sorted(skipped))


def _entry_kind(entry: os.DirEntry) -> str:
    """``file`` (regular, links followed), ``folder``, or why the entry is skipped."""
    if entry.name.startswith("."):
        return "hidden"
    try:
        if entry.is_dir():
            return "folder"
        if entry.is_file():
            return "file"
        if entry.is_symlink() and not os.path.exists(entry.path):
            return "broken_link"
    except OSError:
        return "unreadable"
    return "not_regular"


def _endpoint_address(s3: S3Config | None, bucket: str) -> tuple[str, int, str]:
    """(host, port, label) of the S3 endpoint a request for ``bucket`` goes to."""
    s3 = s3 or S3Config()
    endpoint = resolved_endpoint(s3)
    if endpoint:
        parts = urlsplit(endpoint if "://" in endpoint else "https://" + endpoint)
        port = parts.port or (80 if parts.scheme == "http" else 443)
        return parts.hostname or "", port, scrub(endpoint)
    region = _region(s3) or (_bucket_region(bucket) if bucket else "")
    host = f"s3.{region}.amazonaws.com" if region else "s3.amazonaws.com"
    return host, 443, f"https://{host}"


def check_reachable(location: Location, s3: S3Config | None = None, timeout_s: float = 0) -> None:
    """Fails fast when ``location`` (S3) cannot be used: endpoint down, bucket missing, no access.

    Local locations pass. One TCP connect, then one S3 request (3 attempts) with short
    timeouts, under a hard deadline of ``timeout_s`` (default ``s3.check_timeout_s``).

    Raises:
        StorageError: with a one-line message naming the endpoint and the fix, no credentials.
    """
    if not location.is_s3:
        return
    s3 = s3 or S3Config()
    timeout_s = timeout_s or s3.check_timeout_s
    bucket = location.path.split("/", 1)[0]
    host, port, label = _endpoint_address(s3, bucket)
    proxied = not resolved_endpoint(s3) and any(
        os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
    )
    if not proxied:
        try:
            with socket.create_connection((host, port), timeout=timeout_s):
                pass
        except OSError as exc:
            raise StorageError(
                f"cannot reach the S3 endpoint {label} for {location.uri} ({scrub(str(exc), s3)}); "
                "check s3.endpoint_url / AWS_ENDPOINT_URL and the network"
            ) from None
    result: dict[str, Any] = {}

    def probe() -> None:
        try:
            fs = s3_filesystem(s3, probe=True)
            result["info"] = fs.get_file_info(bucket)
        except Exception as exc:  # reported below, scrubbed
            result["error"] = exc

    thread = threading.Thread(target=probe, daemon=True, name="vlray-s3-check")
    thread.start()
    thread.join(timeout_s + 1)
    if thread.is_alive():
        raise StorageError(
            f"the S3 endpoint {label} did not answer within {timeout_s:g} s for {location.uri}; "
            "check s3.endpoint_url / AWS_ENDPOINT_URL and the network"
        )
    if "error" in result:
        exc = result["error"]
        reason = "access denied (check the credentials)" if is_denied(exc) else one_line(exc)
        raise StorageError(f"cannot use {location.uri} at {label}: {scrub(reason, s3)}")
    if result["info"].type == pafs.FileType.NotFound:
        raise StorageError(
            f"bucket {bucket!r} not found at {label} (or not visible with these credentials)"
        )


def one_line(exc: BaseException) -> str:
    """An exception as one short line."""
    return (" ".join(str(exc).split()) or type(exc).__name__)[:300]
