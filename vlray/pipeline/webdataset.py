"""WebDataset input: tar shards of samples (``KEY.jpg`` beside ``KEY.txt`` / ``KEY.json``).

The planner (driver, before Ray starts) reads only the tar headers of each shard: the samples'
keys and where each sample starts, so ids are known for duplicate checks and incremental skips,
and a read task is a byte range of one shard holding at most ``input.rows_per_task`` samples.
The read task reads that range with a bounded read-ahead (one ranged GET per few MiB on S3) and
turns each sample into one row; a truncated or unreadable member becomes an error row for its
key. A shard whose first header cannot be read is left out and reported (``input_errors``).

Keys follow WebDataset's rule (``webdataset.tariterators.base_plus_ext``): a member's key is its
path up to the first dot of its file name (``dir/a.b.jpg`` -> key ``dir/a``, suffix ``b.jpg``);
consecutive members with the same key form one sample; ``__x__`` members and members without a
dot are not samples. The image is the sample's first member whose last suffix is an image
extension; ``.txt`` is the ``caption`` column (else the ``.json``'s ``caption`` field) and
``.json`` object fields are columns.
"""

from __future__ import annotations

import json
import logging
import posixpath
import re
import tarfile
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from vlray.pipeline.tarscan import Unusual, fast_members
from vlray.storage import Location, is_transient, scrub

logger = logging.getLogger(__name__)

CAPTION = "caption"
"""Kept column filled from a sample's ``.txt`` member."""
READ_AHEAD = 4 << 20
"""Bytes fetched at a time from a shard (S3: one ranged GET); bounds a read task's memory."""
SCAN_AHEAD = {True: 8 << 10, False: 4 << 20}
"""Read-ahead while the planner reads headers, local (True) or remote. Locally a sample's small
members (.txt, .json) share one read and big images are seeked over. On S3 each read is a
ranged GET with a fixed latency: a 225 MiB shard of 1000 230 KB photos took 1001 reads with
64 KiB ahead, 56 with 4 MiB (reading the shard through once)."""
SCAN_THREADS = 8
"""Shards whose headers are read at once (S3 latency, not CPU, bounds the planner)."""
JSON_SAMPLES = 16
"""``.json`` members read by the planner to type the kept JSON fields."""
_META = re.compile(r"__[^/]*__($|/)")
_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
_TAR_ERRORS = (tarfile.TarError, OSError, EOFError, ValueError)


def split_name(name: str) -> tuple[str, str] | None:
    """(key, lower-case suffix) of a member name by WebDataset's first-dot rule, or None."""
    if _META.match(name):
        return None
    match = _KEY.match(name)
    if not match:
        return None
    return match.group(1), match.group(2).lower()


def expand_braces(pattern: str) -> list[str]:
    """Expands ``{00000..00099}`` (zero padding kept) and ``{a,b}`` groups, left to right."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if not match:
        return [pattern]
    head, tail, body = pattern[: match.start()], pattern[match.end() :], match.group(1)
    span = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if span:
        lo, hi = span.groups()
        width = len(lo) if lo.startswith("0") else 0
        options = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    else:
        options = body.split(",")
    return [e for o in options for e in expand_braces(head + o + tail)]


class _Window:
    """A read-only file object over bytes ``[start, stop)`` of a pyarrow random-access file,
    positions absolute, reading ahead ``ahead`` bytes at a time (tarfile makes many small reads)."""

    def __init__(self, raw: Any, start: int, stop: int, ahead: int) -> None:
        self.raw, self.stop, self.ahead = raw, stop, ahead
        self.pos = start
        self._buf, self._at = b"", start

    def tell(self) -> int:
        return self.pos

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = pos if whence == 0 else (self.pos + pos if whence == 1 else self.stop + pos)
        return self.pos

    def read(self, n: int = -1) -> bytes:
        n = self.stop - self.pos if n is None or n < 0 else min(n, self.stop - self.pos)
        if n <= 0:
            return b""
        lo = self.pos - self._at
        if lo < 0 or lo + n > len(self._buf):
            size = min(max(n, self.ahead), self.stop - self.pos)
            self._buf, self._at, lo = self.raw.read_at(size, self.pos), self.pos, 0
        out = self._buf[lo : lo + n]
        self.pos += len(out)
        return out


@dataclass
class Sample:
    """One sample of a shard: its key, the offset of its first header, its members by suffix."""

    key: str
    start: int
    members: list[tuple[str, tarfile.TarInfo]] = field(default_factory=list)


def tar_members(tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    """The members of an open tar, one at a time (tarfile keeps every header otherwise)."""
    while True:
        info = tar.next()
        tar.members = []
        if info is None:
            return
        yield info


def iter_samples(members: Iterator[tarfile.TarInfo], skipped: Counter) -> Iterator[Sample]:
    """Consecutive members grouped by key, in tar order. Members that are not samples are
    counted in ``skipped`` (directories are structure, not counted). A tar error after some
    samples raises after the sample in progress is yielded."""
    current: Sample | None = None
    try:
        for info in members:
            if info.isdir():
                continue
            if not info.isreg():
                skipped["tar_member_not_regular"] += 1
                continue
            parts = split_name(info.name)
            if parts is None:
                skipped["tar_member_not_a_sample"] += 1
                continue
            key, suffix = parts
            if current is None or key != current.key:
                if current is not None:
                    yield current
                current = Sample(key, info.offset)
            current.members.append((suffix, info))
    except _TAR_ERRORS:
        if current is not None:
            yield current
        raise
    if current is not None:
        yield current


@dataclass
class Shard:
    """What the planner knows of one shard: sample keys and byte offsets, from its headers."""

    path: str
    rel: str
    size: int = 0
    keys: list[str] = field(default_factory=list)
    starts: list[int] = field(default_factory=list)
    stop: int = 0
    """Where the last sample's bytes end (the file size, or the offset of an unreadable header)."""
    problem: str = ""
    skipped: Counter = field(default_factory=Counter)
    suffixes: Counter = field(default_factory=Counter)
    """Members by their last suffix (``b.txt`` counts as ``txt``)."""
    json_members: list[tarfile.TarInfo] = field(default_factory=list)


def _truncated_end(exc: BaseException) -> bool:
    return "unexpected end of data" in str(exc)


def _check_end(tar: tarfile.TarFile, raw: Any, shard: Shard) -> None:
    """tarfile stops quietly at a bad header after the first: past the last member a tar holds
    only zero blocks, so anything else there means the shard is corrupt from that byte on."""
    at = tar.offset
    if at < shard.size and raw.read_at(min(512, shard.size - at), at).strip(b"\0"):
        shard.problem, shard.stop = f"invalid header at byte {at}", at


def _record(shard: Shard, members: Iterator[tarfile.TarInfo]) -> None:
    for sample in iter_samples(members, shard.skipped):
        shard.keys.append(sample.key)
        shard.starts.append(sample.start)
        for suffix, info in sample.members:
            kind = suffix.rsplit(".", 1)[-1]  # b.txt is a txt member
            shard.suffixes[kind] += 1
            if kind == "json" and len(shard.json_members) < JSON_SAMPLES:
                shard.json_members.append(info)


def _scan(shard: Shard, raw: Any, ahead: int) -> None:
    """Records the shard's samples: the fast header reader, else (a header it leaves to
    tarfile) tarfile itself."""
    window = _Window(raw, 0, shard.size, ahead)
    try:
        _record(shard, fast_members(window, shard.size))
        return
    except Unusual as exc:
        logger.info("%s: %s, reading its headers with tarfile", shard.rel, exc)
    fresh = Shard(shard.path, shard.rel, shard.size, stop=shard.size)
    shard.__dict__.update(fresh.__dict__)
    window = _Window(raw, 0, shard.size, ahead)
    with tarfile.open(fileobj=window, mode="r:") as tar:  # type: ignore[call-overload]
        _record(shard, tar_members(tar))
        _check_end(tar, raw, shard)


def scan_shard(root: Location, path: str) -> Shard:
    """Reads the headers of one shard (no member data). A shard whose first header is unreadable
    has no keys and a ``problem``; one unreadable later keeps the samples before it."""
    shard = Shard(path, posixpath.relpath(path, root.path))
    try:
        with root.fs.open_input_file(path) as raw:
            shard.size = shard.stop = raw.size()
            try:
                _scan(shard, raw, SCAN_AHEAD[root.is_local])
            except _TAR_ERRORS as exc:
                if is_transient(exc):
                    raise
                if not (_truncated_end(exc) and shard.keys):  # a truncated last member: a row
                    shard.problem = " ".join(str(exc).split()) or type(exc).__name__
                    if shard.keys:
                        shard.stop = getattr(exc, "offset", shard.size)
    except OSError as exc:
        if is_transient(exc):
            raise
        shard.problem = " ".join(str(exc).split()) or type(exc).__name__
    shard.problem = scrub(shard.problem)
    return shard


def scan_shards(root: Location, paths: list[str]) -> list[Shard]:
    """``scan_shard`` over every shard, a few at a time, in input order."""
    if len(paths) <= 1:
        return [scan_shard(root, p) for p in paths]
    with ThreadPoolExecutor(SCAN_THREADS, "vlray-tar-scan") as pool:
        return list(pool.map(lambda p: scan_shard(root, p), paths))


def shard_ids(shards: list[Shard]) -> list[list[str]]:
    """Per shard, the ids of its samples: the key, or ``<shard>/<key>`` for a key an earlier
    shard (input order) already used, so ids stay unique across shards and an id never changes
    when shards are added after it. A key repeated inside one shard stays as it is (the
    planner's duplicate check makes the later one an error row)."""
    seen: set[str] = set()
    out = []
    for shard in shards:
        mine = set(shard.keys)
        out.append([f"{shard.rel}/{k}" if k in seen else k for k in shard.keys])
        seen |= mine
    return out


def _json_object(data: bytes) -> dict[str, Any]:
    value = json.loads(data)
    if not isinstance(value, dict):
        raise ValueError(f"a JSON {type(value).__name__}, not an object")
    return value


def sampled_json_fields(root: Location, shards: list[Shard]) -> dict[str, list[Any]]:
    """Field -> values seen in the first ``JSON_SAMPLES`` ``.json`` members (for typing)."""
    fields: dict[str, list[Any]] = {}
    taken = 0
    for shard in shards:
        if not shard.json_members or taken >= JSON_SAMPLES:
            continue
        with root.fs.open_input_file(shard.path) as raw:
            for info in shard.json_members[: JSON_SAMPLES - taken]:
                taken += 1
                if info.offset_data + info.size > shard.size:
                    continue
                try:
                    record = _json_object(raw.read_at(info.size, info.offset_data))
                except ValueError:
                    continue
                for name, value in record.items():
                    fields.setdefault(name, []).append(value)
    return fields


def json_field_type(values: list[Any]) -> pa.DataType:
    """The Arrow type of a JSON field's values (strings when they are only nulls)."""
    try:
        typ = pa.array(values).type
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return pa.string()
    return pa.string() if pa.types.is_null(typ) else typ


def kept_array(values: list[Any], typ: pa.DataType) -> tuple[pa.Array, int]:
    """(values as ``typ``, how many did not fit and became null; strings take JSON text)."""
    try:
        return pa.array(values, typ), 0
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
        pass
    out, bad = [], 0
    for value in values:
        if pa.types.is_string(typ) and value is not None and not isinstance(value, str):
            value = json.dumps(value)
        try:
            pa.array([value], typ)
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
            value, bad = None, bad + 1
        out.append(value)
    return pa.array(out, typ), bad


@dataclass
class SampleRow:
    """A sample read for the pipeline: image bytes (or an error) and the kept values."""

    key: str
    data: bytes | None = None
    error: str = ""
    kept: dict[str, Any] = field(default_factory=dict)


def image_member(
    sample: Sample, image_suffixes: frozenset[str]
) -> tuple[str, tarfile.TarInfo] | None:
    """The first member whose last suffix is an image extension (``b.jpg`` counts as jpg)."""
    for suffix, info in sample.members:
        if "." + suffix.rsplit(".", 1)[-1] in image_suffixes:
            return suffix, info
    return None


def _by_type(members: dict[str, tarfile.TarInfo], kind: str) -> str:
    """The suffix of the member of type ``kind`` (``txt``, then ``b.txt`` style), or ''."""
    if kind in members:
        return kind
    return next((s for s in members if s.rsplit(".", 1)[-1] == kind), "")


def read_sample(
    tar: tarfile.TarFile,
    sample: Sample,
    size: int,
    kept: list[str],
    image_suffixes: frozenset[str],
    max_bytes: int,
) -> SampleRow:
    """Reads the image and the kept members of one sample; problems become ``error``."""
    row = SampleRow(sample.key)
    found = [suffix for suffix, _ in sample.members]
    repeated = [s for s, n in Counter(found).items() if n > 1]
    if repeated:
        row.error = f"sample {sample.key!r}: member {sample.key}.{repeated[0]} appears twice"
        return row
    image = image_member(sample, image_suffixes)
    if image is None:
        row.error = (
            f"sample {sample.key!r} has no image member (members: {', '.join(found) or 'none'})"
        )
        return row
    members = dict(sample.members)
    text, record_suffix = _by_type(members, "txt"), _by_type(members, "json")
    wanted = [image[0]]
    if CAPTION in kept and text:
        wanted.append(text)
    if record_suffix and any(k != CAPTION or not text for k in kept):
        wanted.append(record_suffix)  # a caption without .txt comes from the .json
    blobs: dict[str, bytes] = {}
    for suffix in wanted:
        info = members[suffix]
        name = f"{sample.key}.{suffix}"
        if info.offset_data + info.size > size:
            have = max(0, size - info.offset_data)
            row.error = f"truncated tar member {name}: {have} of {info.size} bytes in the shard"
            return row
        if info.size > max_bytes:
            row.error = f"tar member {name}: {info.size} bytes, over input.max_bytes {max_bytes}"
            return row
        handle = tar.extractfile(info)
        blobs[suffix] = handle.read() if handle is not None else b""
    row.data = blobs[image[0]]
    try:
        record = _json_object(blobs[record_suffix]) if record_suffix in blobs else {}
    except ValueError as exc:
        row.error = f"tar member {sample.key}.{record_suffix}: not a JSON object ({exc})"
        return row
    for name in kept:
        if name == CAPTION and text:
            row.kept[name] = blobs[text].decode("utf-8", "replace")
        else:
            row.kept[name] = record.get(name)
    return row


def iter_range(
    root: Location,
    path: str,
    start: int,
    stop: int,
    kept: list[str],
    image_suffixes: frozenset[str],
    max_bytes: int,
) -> Iterator[SampleRow]:
    """The samples of bytes ``[start, stop)`` of a shard, read with a bounded read-ahead.

    Raises:
        OSError, tarfile.TarError: the range cannot be read on (after the samples before it).
    """
    with root.fs.open_input_file(path) as raw:
        size = raw.size()
        window = _Window(raw, start, min(stop, size), READ_AHEAD)
        with tarfile.open(fileobj=window, mode="r:") as tar:  # type: ignore[call-overload]
            skipped: Counter = Counter()
            samples = iter_samples(tar_members(tar), skipped)
            try:
                for sample in samples:
                    yield read_sample(tar, sample, size, kept, image_suffixes, max_bytes)
            except tarfile.ReadError as exc:
                if not _truncated_end(exc):  # the truncated member was reported by its row
                    raise
