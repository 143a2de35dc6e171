"""Filesystems for local paths, ``file://`` and ``s3://`` URIs, and atomic (commit-on-close) writes.

Everything that reads or writes job data goes through here, so S3 settings (endpoint, region,
credentials) are applied in one place and never logged.
"""

from __future__ import annotations

import io
import os
import posixpath
import uuid
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from vlray.config import S3Config


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

    def join(self, *parts: str) -> Location:
        """A child location."""
        path = posixpath.join(self.path, *parts)
        uri = self.uri.rstrip("/") + "/" + "/".join(parts)
        return Location(self.fs, path, uri)


def s3_filesystem(s3: S3Config | None = None) -> pafs.S3FileSystem:
    """A pyarrow S3 filesystem from config keys, falling back to the standard AWS environment."""
    s3 = s3 or S3Config()
    kwargs: dict[str, object] = {}
    endpoint = (
        s3.endpoint_url
        or os.environ.get("AWS_ENDPOINT_URL_S3")
        or os.environ.get("AWS_ENDPOINT_URL")
    )
    if endpoint:
        kwargs["endpoint_override"] = endpoint
        if endpoint.startswith("http://"):
            kwargs["scheme"] = "http"
    region = s3.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        kwargs["region"] = region
    if s3.anonymous:
        kwargs["anonymous"] = True
    elif s3.key and s3.secret:
        kwargs["access_key"] = s3.key
        kwargs["secret_key"] = s3.secret
    kwargs["retry_strategy"] = pafs.AwsStandardS3RetryStrategy(max_attempts=8)
    return pafs.S3FileSystem(**kwargs)


def locate(uri: str, s3: S3Config | None = None) -> Location:
    """Resolves ``uri`` (local path, ``file://`` or ``s3://``) to a filesystem and path."""
    if uri.startswith("s3://"):
        return Location(s3_filesystem(s3), uri[len("s3://") :].rstrip("/"), uri.rstrip("/"))
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    path = str(Path(uri).expanduser().resolve())
    return Location(pafs.LocalFileSystem(), path, path)


def read_bytes(location: Location) -> bytes:
    """The whole file."""
    with location.fs.open_input_stream(location.path) as stream:
        return stream.read()


def write_bytes_atomic(location: Location, data: bytes) -> None:
    """Writes a file so that readers see all of it or nothing.

    Local: write a hidden temp file beside it, then rename. S3: one PUT (objects appear whole).
    """
    parent = posixpath.dirname(location.path)
    location.fs.create_dir(parent, recursive=True)
    if location.is_local:
        tmp = posixpath.join(parent, f".tmp-{uuid.uuid4().hex}-{posixpath.basename(location.path)}")
        with location.fs.open_output_stream(tmp) as out:
            out.write(data)
        os.replace(tmp, location.path)
    else:
        with location.fs.open_output_stream(location.path) as out:
            out.write(data)


def write_parquet_atomic(location: Location, table: pa.Table) -> None:
    """Writes ``table`` as one Parquet file, atomically (see ``write_bytes_atomic``)."""
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    write_bytes_atomic(location, sink.getvalue())


def list_files(location: Location, suffixes: tuple[str, ...] | None = None) -> list[str]:
    """Paths of the files under a folder, recursively, sorted; hidden files and temp files skipped."""
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
