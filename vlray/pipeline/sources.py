"""Plan the input (driver side, no pixels touched) and read it (inside Ray read tasks).

Input is a Parquet file / folder / glob, a folder of image files, or WebDataset tar shards (a
folder, glob or ``{00000..00099}`` brace pattern; see ``vlray.pipeline.webdataset``), local or on
S3. The plan is a list of small read tasks (a range of at most ``input.rows_per_task`` rows of
one Parquet row group, a chunk of image paths, or a byte range of one shard), so reading is
spread over the cluster, never arrives as one giant block, and output is committed as the job
goes.

Problems of the input as a whole (a missing column, an image or id column of a type that cannot
be read, ids that are not UTF-8) are found here from the footers, before Ray starts, and raised as
one-line ``InputError``s. Problems of some rows become error rows: a row group that cannot be
read, a null cell, a repeated id, a path leaving the dataset's folder. A file whose footer cannot
be read (not Parquet, truncated) holds rows nobody can name: it is listed in
``InputPlan.unreadable`` and left out, and the rest of the job proceeds.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import math
import posixpath
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from vlray.config import InputConfig, S3Config
from vlray.pipeline.kept import KEPT_COLUMN, RESERVED, empty_cells, to_cells
from vlray.schema import ROW_SCHEMA, TRANSIENT
from vlray.storage import Listing, Location, is_transient, locate, scrub, walk_files

logger = logging.getLogger(__name__)

READ_BUFFER = 4 << 20
"""Bytes read at a time per column by read tasks (a range of a big row group stops early)."""
SPLIT_READ_BUDGET = 8 << 30
"""A row group is split into at most this many bytes / its size ranges (but at least
``MIN_SPLIT``): each range re-reads the group up to its start, so the re-reading of one group
stays within about half this budget."""
MIN_SPLIT = 4
READ_ERRORS = (OSError, ValueError, pa.ArrowException, MemoryError, EOFError)
"""What a corrupt or unreachable Parquet file raises while it is read (ArrowInvalid is a
ValueError, ArrowIOError an OSError)."""
_NOT_IMAGES = frozenset({"BUFR", "GRIB", "HDF5", "MPEG", "WMF", "EPS", "FITS"})
"""Pillow formats that are data, video or vector files, not raster images."""


def _image_extensions() -> frozenset[str]:
    """Every file extension Pillow opens (.jpg, .jpe, .jfif, .png, .tif, ...), lower case."""
    Image.init()
    return frozenset(
        ext.lower()
        for ext, fmt in Image.registered_extensions().items()
        if fmt in Image.OPEN and fmt not in _NOT_IMAGES
    )


FOLDER_EXTENSIONS = _image_extensions()
"""Files of a folder input that are images (formats vlray does not decode become error rows)."""


class InputError(ValueError):
    """The input cannot be read at all (missing path, no images, missing column, bad types)."""


@dataclass(frozen=True)
class ReadTask:
    """One unit of reading: a range of rows of a Parquet row group, or a chunk of image files."""

    kind: str
    file: str = ""
    rel: str = ""
    row_group: int = -1
    row_offset: int = 0
    """Row of the file the task starts at."""
    group_start: int = 0
    """Row of the row group the task starts at."""
    num_rows: int = 0
    paths: tuple[str, ...] = ()
    ids: tuple[str, ...] = ()
    duplicate_rows: tuple[int, ...] = ()
    skip_rows: tuple[int, ...] = ()
    """Rows already done by an earlier run: not emitted at all."""
    id_error: str = ""
    """Why the planner could not read this row group's ids: every row is an error row."""
    byte_start: int = 0
    """WebDataset: where the task's first sample starts in the shard (its first header)."""
    byte_stop: int = 0
    """WebDataset: where the task's bytes end (the next task's first header, or the shard's end)."""
    kept_schema: bytes = b""
    """The kept columns (``input.keep_columns``) and their types, as a serialized Arrow schema."""


def task_from_row(row: dict[str, Any] | ReadTask) -> ReadTask:
    """A ``ReadTask`` back from a row of Ray's item table (sequences arrive as NumPy arrays)."""
    if isinstance(row, ReadTask):
        return row
    return ReadTask(
        **{k: tuple(v.tolist()) if isinstance(v, np.ndarray) else v for k, v in row.items()}
    )


@dataclass
class InputPlan:
    """Where the input is and the tasks that read it."""

    root: Location
    kind: str
    tasks: list[ReadTask] = field(default_factory=list)
    rows: int = 0
    """Rows this run will process (done rows excluded)."""
    skipped: int = 0
    """Input rows left out because their id is already in the output."""
    skipped_files: dict[str, int] = field(default_factory=dict)
    """Entries of the input folder that are not input, by reason (``hidden``, ``broken_link``,
    ``repeated_folder``, ``not_regular``, ``unreadable``, ``unsupported_extension``,
    ``images_beside_parquet``)."""
    unreadable: list[str] = field(default_factory=list)
    """One line per Parquet file left out because its footer cannot be read (or per shard
    whose tar headers cannot be read, or read only up to a point)."""
    kept: pa.Schema = field(default_factory=lambda: pa.schema([]))
    """The kept columns and their types in the input (``embeddings/`` gets them too)."""


def _has_glob(path: str) -> bool:
    return any(ch in path for ch in "*?[")


def _brace_root(location: Location) -> Location:
    """The folder above the first ``{`` of a brace pattern."""
    prefix = location.path[: location.path.rfind("/", 0, location.path.index("{"))]
    return Location(
        location.fs, prefix, location.uri[: len(location.uri) - len(location.path)] + prefix
    )


def _expand_braces(location: Location) -> tuple[Location, Listing]:
    """(root folder, listing) of a brace pattern; shards it names that do not exist are
    listed as skipped ``missing``."""
    from pyarrow.fs import FileType

    from vlray.pipeline.webdataset import expand_braces

    root = _brace_root(location)
    paths = list(dict.fromkeys(expand_braces(location.path)))
    infos = location.fs.get_file_info(paths)
    found = [i.path for i in infos if i.type == FileType.File]
    missing = [(i.path, "missing") for i in infos if i.type != FileType.File]
    return root, Listing(found, missing)


def _expand(location: Location) -> tuple[Location, Listing]:
    """(root folder, listing) for a file, a folder, a glob or a brace pattern."""
    from pyarrow.fs import FileType

    if "{" in location.path and "}" in location.path:
        return _expand_braces(location)
    if _has_glob(location.path):
        prefix = location.path
        for i, ch in enumerate(location.path):
            if ch in "*?[":
                prefix = location.path[: location.path.rfind("/", 0, i)]
                break
        root = Location(
            location.fs, prefix, location.uri[: len(location.uri) - len(location.path)] + prefix
        )
        listing = walk_files(root)
        return root, Listing(
            [p for p in listing.files if fnmatch.fnmatch(p, location.path)],
            [(p, why) for p, why in listing.skipped if fnmatch.fnmatch(p, location.path)],
        )
    info = location.fs.get_file_info(location.path)
    if info.type == FileType.File:
        parent = posixpath.dirname(location.path)
        root = Location(location.fs, parent, location.uri.rsplit("/", 1)[0])
        return root, Listing([location.path], [])
    if info.type == FileType.Directory:
        return location, walk_files(location)
    raise InputError(f"input {location.uri}: no such file or folder")


def plan_input(
    config: InputConfig, s3: S3Config | None = None, done: np.ndarray | None = None
) -> InputPlan:
    """Lists the input and splits it into read tasks, leaving out rows whose id is done.

    Args:
        config: the input section.
        s3: S3 settings.
        done: sorted ``S16`` digests of ids already in the output (see ``vlray.pipeline.state``).

    Raises:
        InputError: missing input, nothing to read, a missing image column, an image or id
            column of an unusable type, ids that are not UTF-8; one line each.
    """
    location = locate(config.uri, s3)
    root, listing = _expand(location)
    reasons = Counter(why for _, why in listing.skipped)
    parquet = [p for p in listing.files if p.lower().endswith(".parquet")]
    images = [p for p in listing.files if posixpath.splitext(p)[1].lower() in FOLDER_EXTENSIONS]
    shards = [p for p in listing.files if p.lower().endswith(".tar")]
    if shards:  # img2dataset writes a .parquet and a _stats.json beside each shard
        from vlray.pipeline.webdataset_source import plan_webdataset

        plan = plan_webdataset(root, shards, config, done, reasons)
        reasons["beside_tar_shards"] += len(listing.files) - len(shards)
    elif parquet:
        plan = _plan_parquet(root, parquet, config, done)
        reasons["images_beside_parquet"] += len(images)
        reasons["unsupported_extension"] += len(listing.files) - len(parquet) - len(images)
    elif images:
        if config.keep_columns:
            raise InputError(
                f"input.keep_columns {list(config.keep_columns)}: a folder of image files has "
                "no columns to keep (use Parquet or WebDataset input)"
            )
        plan = _plan_folder(root, images, config, done)
        reasons["unsupported_extension"] += len(listing.files) - len(images)
    else:
        raise InputError(
            f"input {config.uri}: no Parquet files, WebDataset .tar shards or images (.jpg, "
            ".png, .webp, .gif, .tif, .bmp and the other extensions Pillow opens) found"
        )
    plan.skipped_files = {k: v for k, v in sorted(reasons.items()) if v}
    if plan.skipped_files:
        logger.warning("input: left out %s", plan.skipped_files)
    return plan


def _cell_kind(typ: pa.DataType) -> str:
    """``bytes``, ``path`` or ``null`` for a cell type an image column may hold, else ''."""
    if pa.types.is_dictionary(typ):
        typ = typ.value_type
    if pa.types.is_null(typ):
        return "null"
    if (
        pa.types.is_binary(typ)
        or pa.types.is_large_binary(typ)
        or pa.types.is_binary_view(typ)
        or pa.types.is_fixed_size_binary(typ)
    ):
        return "bytes"
    if pa.types.is_string(typ) or pa.types.is_large_string(typ) or pa.types.is_string_view(typ):
        return "path"
    return ""


def image_kind(typ: pa.DataType, column: str) -> str:
    """``bytes``, ``path``, ``null`` or ``struct`` ({bytes, path}, the Hugging Face layout).

    Raises:
        InputError: any other type, in one line.
    """
    if pa.types.is_struct(typ):
        fields = {typ.field(i).name: _cell_kind(typ.field(i).type) for i in range(typ.num_fields)}
        blobs, paths = fields.get("bytes", "null"), fields.get("path", "null")
        ok = blobs in ("bytes", "null") and paths in ("path", "null")
        if ok and ("bytes" in fields or "path" in fields):
            return "struct"
    elif _cell_kind(typ):
        return _cell_kind(typ)
    raise InputError(
        f"image column {column!r}: type {typ} is not binary (image bytes), string (paths) or a "
        "{bytes: binary, path: string} struct; set input.image_column or convert the column"
    )


def check_id_type(typ: pa.DataType, column: str) -> None:
    """Ids are strings, UTF-8 binary or integers (cast to their decimal string).

    Raises:
        InputError: any other type (floats, dates, lists...), in one line.
    """
    value = typ.value_type if pa.types.is_dictionary(typ) else typ
    kind = _cell_kind(value)
    if kind in ("bytes", "path") or pa.types.is_integer(value):
        return
    raise InputError(
        f"id column {column!r}: type {typ} cannot be an id (use strings or integers; "
        "a float id would make 1 and 1.0 the same); set input.id_column or convert the column"
    )


def id_strings(values: pa.Array | pa.ChunkedArray, where: str) -> pa.Array | pa.ChunkedArray:
    """An id column as strings, exactly (NUL bytes kept; integers as decimal strings).

    Raises:
        InputError: ids that are not valid UTF-8, in one line naming ``where``.
    """
    try:
        return pc.cast(values, pa.string())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise InputError(
            f"{where}: not valid UTF-8 ({_one_line(exc)}); a binary id column must hold text"
        ) from None


def _one_line(exc: BaseException) -> str:
    return (" ".join(str(exc).split()) or type(exc).__name__)[:300]


def _derived_ids(rel: str, start: int, n: int) -> list[str]:
    """Ids of rows without an id column (or whose ids cannot be read): ``<file>:<row>``."""
    return [f"{rel}:{r}" for r in range(start, start + n)]


@dataclass
class _ParquetFile:
    path: str
    rel: str
    meta: pq.FileMetaData
    bad_groups: dict[int, str] = field(default_factory=dict)
    """Row groups whose id column cannot be read -> why."""


def _plan_parquet(
    root: Location, paths: list[str], config: InputConfig, done: np.ndarray | None
) -> InputPlan:
    from vlray.pipeline.state import hash_ids, is_done

    plan = InputPlan(root=root, kind="parquet")
    files = _read_footers(root, paths, config, plan)
    has_ids = _check_schemas(files, config)
    plan.kept = _parquet_kept(files, config)
    skip: dict[int, np.ndarray] = {}
    duplicates: dict[int, np.ndarray] = {}
    if has_ids or (done is not None and len(done)):
        table = _scan_ids(root, files, config.id_column if has_ids else None)
        done_mask = np.zeros(table.num_rows, dtype=bool)
        if done is not None and len(done):
            ids = table.column("id").to_pylist()
            done_mask = is_done(hash_ids(i if i is not None else "" for i in ids), done)
            done_mask &= np.asarray(table.column("id").is_valid())
        plan.skipped = int(done_mask.sum())
        skip = _rows_by_file(table, done_mask)
        if has_ids:
            dup_mask = _duplicate_mask(table) & ~done_mask
            duplicates = _rows_by_file(table, dup_mask)
            if dup_mask.any():
                logger.warning(
                    "%d input rows repeat an earlier id; they become error rows",
                    int(dup_mask.sum()),
                )
    columns = _read_columns(config, has_ids) | set(plan.kept.names)
    for i, file in enumerate(files):
        _file_tasks(plan, file, config.rows_per_task, columns, skip.get(i), duplicates.get(i))
    return plan


def _read_footers(
    root: Location, paths: list[str], config: InputConfig, plan: InputPlan
) -> list[_ParquetFile]:
    """The files whose footer reads; the others are listed in ``plan.unreadable``."""
    files = []
    for path in paths:
        rel = posixpath.relpath(path, root.path)
        try:
            with root.fs.open_input_file(path) as f:
                meta = pq.ParquetFile(f).metadata
            meta.schema.to_arrow_schema()
        except READ_ERRORS as exc:
            reason = scrub(_one_line(exc))
            if is_transient(exc):
                raise InputError(f"{root.uri}/{rel}: unreachable for now ({reason})") from None
            plan.unreadable.append(f"{rel}: not a readable Parquet file ({reason})")
            continue
        files.append(_ParquetFile(path, rel, meta))
    if plan.unreadable:
        logger.warning("input: %d files left out: %s", len(plan.unreadable), plan.unreadable[0])
    if not files:
        raise InputError(f"input {config.uri}: no readable Parquet file ({plan.unreadable[0]})")
    return files


def _check_schemas(files: list[_ParquetFile], config: InputConfig) -> bool:
    """Checks every file's image and id columns from its footer; True if the files have ids."""
    has_ids: bool | None = None
    for file in files:
        schema = file.meta.schema.to_arrow_schema()
        if config.image_column not in schema.names:
            raise InputError(
                f"{file.rel}: no image column {config.image_column!r} (columns: "
                f"{', '.join(schema.names)}); set input.image_column"
            )
        try:
            image_kind(schema.field(config.image_column).type, config.image_column)
        except InputError as exc:
            raise InputError(f"{file.rel}: {exc}") from None
        present = config.id_column in schema.names
        if has_ids is not None and has_ids != present:
            raise InputError(
                f"{file.rel}: the id column {config.id_column!r} is in some files but not others"
            )
        has_ids = present
        if present:
            try:
                check_id_type(schema.field(config.id_column).type, config.id_column)
            except InputError as exc:
                raise InputError(f"{file.rel}: {exc}") from None
    return bool(has_ids)


def check_kept_names(names: tuple[str, ...], config: InputConfig) -> None:
    """Kept columns may not be the image, the id or an output column.

    Raises:
        InputError: in one line.
    """
    for name in names:
        if name in RESERVED or name in (config.image_column, config.id_column):
            raise InputError(
                f"input.keep_columns: {name!r} cannot be kept (it is the image or id column, or "
                f"a column vlray writes: {', '.join(sorted(RESERVED))})"
            )


def _parquet_kept(files: list[_ParquetFile], config: InputConfig) -> pa.Schema:
    """The kept columns and their types, the same in every file.

    Raises:
        InputError: a kept column missing from a file, or typed differently in two files.
    """
    names = tuple(config.keep_columns or ())
    check_kept_names(names, config)
    fields: dict[str, pa.Field] = {}
    for file in files:
        schema = file.meta.schema.to_arrow_schema()
        for name in names:
            if name not in schema.names:
                raise InputError(
                    f"{file.rel}: no column {name!r} to keep (columns: {', '.join(schema.names)});"
                    " fix input.keep_columns"
                )
            typ = schema.field(name).type
            if name in fields and fields[name].type != typ:
                raise InputError(
                    f"{file.rel}: kept column {name!r} is {typ}, {fields[name].type} in an "
                    "earlier file; convert the files to one type"
                )
            fields[name] = pa.field(name, typ)
    return pa.schema([fields[n] for n in names])


def _file_ids(root: Location, file: _ParquetFile, id_column: str) -> pa.ChunkedArray:
    """The file's ids as strings; a row group whose id column cannot be read gets derived ids
    and is recorded in ``file.bad_groups``."""
    try:
        with root.fs.open_input_file(file.path) as f:
            column = pq.read_table(f, columns=[id_column]).column(0)
        return id_strings(column, f"ids of {file.rel}")
    except READ_ERRORS as exc:
        if isinstance(exc, InputError):
            raise
        if is_transient(exc):
            raise InputError(f"{file.rel}: unreachable for now ({scrub(_one_line(exc))})") from None
    chunks, offset = [], 0  # some row group is unreadable: find which, one at a time
    for rg in range(file.meta.num_row_groups):
        n = file.meta.row_group(rg).num_rows
        try:
            with root.fs.open_input_file(file.path) as f:
                ids = pq.ParquetFile(f).read_row_group(rg, columns=[id_column]).column(0)
            chunks += id_strings(ids, f"ids of {file.rel} row group {rg}").chunks
        except READ_ERRORS as exc:
            if isinstance(exc, InputError):
                raise
            file.bad_groups[rg] = scrub(_one_line(exc))
            chunks.append(pa.array(_derived_ids(file.rel, offset, n), pa.string()))
        offset += n
    return pa.chunked_array(chunks, pa.string())


def _scan_ids(root: Location, files: list[_ParquetFile], id_column: str | None) -> pa.Table:
    """(id, file, row) of every input row: the id column, or the derived ``<rel>:<row>``.

    Reads only the id column (or nothing but the footer, for derived ids).
    """
    tables = []
    for i, file in enumerate(files):
        n = file.meta.num_rows
        if id_column:
            ids = _file_ids(root, file, id_column)
        else:
            ids = pa.chunked_array([pa.array(_derived_ids(file.rel, 0, n), pa.string())])
        tables.append(
            pa.table(
                {
                    "id": ids,
                    "file": pa.array(np.full(n, i, dtype=np.int32)),
                    "row": pa.array(np.arange(n, dtype=np.int64)),
                }
            )
        )
    return pa.concat_tables(tables)


def _rows_by_file(table: pa.Table, mask: np.ndarray) -> dict[int, np.ndarray]:
    """file index -> sorted rows of that file selected by ``mask``."""
    files = np.asarray(table.column("file"))[mask]
    rows = np.asarray(table.column("row"))[mask]
    return {int(f): np.sort(rows[files == f]) for f in np.unique(files)}


def _duplicate_mask(table: pa.Table) -> np.ndarray:
    """Rows whose (non-null) id already appeared earlier in the input (file, row order).

    Sort-based (Arrow), so it does not build a Python set of ids.
    """
    n = table.num_rows
    order = pc.sort_indices(
        table, sort_keys=[("id", "ascending"), ("file", "ascending"), ("row", "ascending")]
    )
    ids = table.column("id").take(order)
    mask = np.zeros(n, dtype=bool)
    if n > 1:
        same = pc.equal(ids.slice(1), ids.slice(0, n - 1)).fill_null(False)
        sorted_dup = np.concatenate([[False], np.asarray(same)])
        mask[np.asarray(order)[sorted_dup]] = True
    return mask


def _read_columns(config: InputConfig, has_ids: bool) -> set[str]:
    return {config.image_column} | ({config.id_column} if has_ids else set())


def group_ranges(rows: int, group_bytes: int, rows_per_task: int) -> list[tuple[int, int]]:
    """(start, count) ranges splitting a row group of ``rows`` rows into read tasks.

    At most ``rows_per_task`` rows each, unless the group is so large in bytes that re-reading
    its prefix for every range would cost more than ``SPLIT_READ_BUDGET``: then fewer, longer
    ranges (at least ``MIN_SPLIT``).
    """
    if rows <= rows_per_task:
        return [(0, rows)]
    ranges = math.ceil(rows / rows_per_task)
    ranges = min(ranges, max(MIN_SPLIT, SPLIT_READ_BUDGET // max(group_bytes, 1)))
    size = math.ceil(rows / ranges)
    return [(start, min(size, rows - start)) for start in range(0, rows, size)]


def _group_bytes(group: pq.RowGroupMetaData, columns: set[str]) -> int:
    """Uncompressed bytes of the column chunks a read task reads."""
    total = 0
    for j in range(group.num_columns):
        chunk = group.column(j)
        if chunk.path_in_schema.split(".", 1)[0] in columns:
            total += chunk.total_uncompressed_size
    return total


def _between(rows: np.ndarray | None, start: int, stop: int) -> tuple[int, ...]:
    if rows is None or not len(rows):
        return ()
    lo, hi = np.searchsorted(rows, [start, stop])
    return tuple(int(r) for r in rows[lo:hi])


def _file_tasks(
    plan: InputPlan,
    file: _ParquetFile,
    rows_per_task: int,
    columns: set[str],
    skip: np.ndarray | None,
    duplicates: np.ndarray | None,
) -> None:
    """Appends the read tasks of one file (ranges of its row groups) to ``plan``."""
    offset = 0
    for rg in range(file.meta.num_row_groups):
        group = file.meta.row_group(rg)
        for start, count in group_ranges(
            group.num_rows, _group_bytes(group, columns), rows_per_task
        ):
            first = offset + start
            skipped = _between(skip, first, first + count)
            if len(skipped) < count:
                plan.tasks.append(
                    ReadTask(
                        kind="parquet",
                        file=file.path,
                        rel=file.rel,
                        row_group=rg,
                        row_offset=first,
                        group_start=start,
                        num_rows=count,
                        duplicate_rows=_between(duplicates, first, first + count),
                        skip_rows=skipped,
                        id_error=file.bad_groups.get(rg, ""),
                        kept_schema=serialize_schema(plan.kept),
                    )
                )
            plan.rows += count - len(skipped)
        offset += group.num_rows


def serialize_schema(schema: pa.Schema) -> bytes:
    """A schema as bytes for a read task (b"" for no columns)."""
    return schema.serialize().to_pybytes() if len(schema) else b""


def kept_schema(task: ReadTask) -> pa.Schema:
    """The kept columns of a read task (none for b"")."""
    if not task.kept_schema:
        return pa.schema([])
    return pa.ipc.read_schema(pa.py_buffer(task.kept_schema))


def _plan_folder(
    root: Location, images: list[str], config: InputConfig, done: np.ndarray | None
) -> InputPlan:
    from vlray.pipeline.state import hash_ids, is_done

    ids = [posixpath.relpath(p, root.path) for p in images]
    plan = InputPlan(root=root, kind="files")
    if done is not None and len(done):
        keep = ~is_done(hash_ids(ids), done)
        plan.skipped = int((~keep).sum())
        images = [p for p, k in zip(images, keep, strict=True) if k]
        ids = [i for i, k in zip(ids, keep, strict=True) if k]
    plan.rows = len(images)
    per_task = config.rows_per_task
    for start in range(0, len(images), per_task):
        plan.tasks.append(
            ReadTask(
                kind="files",
                paths=tuple(images[start : start + per_task]),
                ids=tuple(ids[start : start + per_task]),
            )
        )
    return plan


def _plain(values: pa.Array) -> list[Any]:
    """Python values of a binary / string column of any encoding (dictionary, view, fixed)."""
    if pa.types.is_dictionary(values.type):
        values = values.dictionary_decode()
    return values.to_pylist()


def _inside(path: str, root: str) -> bool:
    root = root.rstrip("/")
    return path == root or path.startswith(root + "/")


def resolve_path(
    path: str, base_dir: str, root: Location, allow_outside_root: bool = False
) -> tuple[str, str]:
    """(uri to fetch, '') for a path cell, or ('', why it is refused).

    Relative paths are relative to the Parquet file's folder ``base_dir`` and must stay inside
    the dataset's folder ``root``; absolute local paths are refused in an ``s3://`` dataset.
    ``allow_outside_root`` lifts both rules. Other URIs (``s3://...``) pass as they are.
    """
    scheme = "s3://" if root.is_s3 else ""
    if path.startswith("file://"):
        path = path[len("file://") :]
    elif "://" in path:
        return path, ""
    if path.startswith("/"):
        if scheme and not allow_outside_root:
            return "", (
                f"local path {path!r} in an s3:// dataset (set input.allow_outside_root to read it)"
            )
        return path, ""
    full = posixpath.normpath(posixpath.join(base_dir, path))
    if not allow_outside_root and not _inside(full, root.path):
        return "", (
            f"path {path!r} leaves the dataset folder (set input.allow_outside_root to read it)"
        )
    return scheme + full, ""


def _image_cells(
    values: pa.Array, base_dir: str, root: Location, config: InputConfig
) -> tuple[list, list, list]:
    """(bytes or None, uri or '', error or '') per cell of an image column of any layout."""
    n = len(values)
    kind = image_kind(values.type, config.image_column)
    blobs: list[Any] = [None] * n
    paths: list[Any] = [None] * n
    if kind == "struct":
        names = {values.type.field(i).name for i in range(values.type.num_fields)}
        valid = values.is_valid().to_pylist()
        if "bytes" in names:
            blobs = [
                b if v else None for b, v in zip(_plain(values.field("bytes")), valid, strict=True)
            ]
        if "path" in names:
            paths = [
                p if v else None for p, v in zip(_plain(values.field("path")), valid, strict=True)
            ]
    elif kind == "bytes":
        blobs = _plain(values)
    elif kind == "path":
        paths = _plain(values)
    uris, errors = [""] * n, [""] * n
    for i, (blob, path) in enumerate(zip(blobs, paths, strict=True)):
        if blob is None and path:
            uris[i], errors[i] = resolve_path(path, base_dir, root, config.allow_outside_root)
    return blobs, uris, errors


def _prompts_json(batch: pa.RecordBatch, columns: tuple[str, ...], n: int) -> list[str]:
    """Per row, the SAM prompt cells as JSON ({"points", "labels", "boxes"}), or ''."""
    present = [c for c in columns if c in batch.schema.names]
    if not present:
        return [""] * n
    keys = dict(zip(columns, ("points", "labels", "boxes"), strict=False))
    values = {keys[c]: batch.column(c).to_pylist() for c in present}
    out = []
    for i in range(n):
        row = {k: v[i] for k, v in values.items() if v[i] is not None}
        out.append(json.dumps(row) if row else "")
    return out


def read_task_rows(
    task: ReadTask, root: Location, config: InputConfig, prompt_columns: tuple[str, ...] = ()
) -> Iterator[pa.Table]:
    """Yields the rows of one read task in blocks of ``config.rows_per_block``.

    Rows follow ``ROW_SCHEMA`` (id, source, data, uri, error, stage); a null image cell, a
    repeated id, a path outside the dataset, an unreadable row group become rows with ``error``
    set, never exceptions.
    """
    if task.kind == "files":
        yield from _file_rows(task, root, config)
    elif task.kind == "webdataset":
        from vlray.pipeline.webdataset_source import webdataset_rows

        yield from webdataset_rows(task, root, config)
    else:
        yield from _parquet_rows(task, root, config, prompt_columns)


def _file_rows(task: ReadTask, root: Location, config: InputConfig) -> Iterator[pa.Table]:
    scheme = "s3://" if root.is_s3 else ""
    for start in range(0, len(task.paths), config.rows_per_block):
        sl = slice(start, start + config.rows_per_block)
        uris = [scheme + p for p in task.paths[sl]]
        n = len(uris)
        yield _rows(list(task.ids[sl]), uris, [None] * n, uris, [""] * n, [""] * n, [""] * n)


def _rows(
    ids: list,
    sources: list,
    blobs: list,
    uris: list,
    errors: list,
    stages: list,
    prompts: list,
    kept: list[bytes] | None = None,
) -> pa.Table:
    table = pa.table(
        {
            "id": pa.array(ids, pa.string()),
            "source": sources,
            "data": pa.array(blobs, pa.binary()),
            "uri": uris,
            "error": errors,
            "stage": stages,
            "prompts": prompts,
        },
        schema=ROW_SCHEMA,
    )
    if kept is None:
        return table
    return table.append_column(KEPT_COLUMN, pa.array(kept, pa.binary()))


def rows_table(
    ids: list[str],
    sources: list[str],
    blobs: list[bytes | None],
    errors: list[str],
    stages: list[str],
    kept: list[bytes] | None = None,
) -> pa.Table:
    """``ROW_SCHEMA`` rows of bytes (no URIs, no prompts), plus ``kept`` cells when given."""
    n = len(ids)
    return _rows(ids, sources, blobs, [""] * n, errors, stages, [""] * n, kept)


def _range_batches(
    task: ReadTask, root: Location, config: InputConfig, prompt_columns: tuple[str, ...]
) -> Iterator[pa.RecordBatch]:
    """The task's rows of its row group, in batches of at most ``rows_per_block``; stops
    reading once past the range."""
    with root.fs.open_input_file(task.file) as f:
        parquet = pq.ParquetFile(f, pre_buffer=False, buffer_size=READ_BUFFER)
        names = parquet.schema_arrow.names
        columns = [config.image_column]
        columns += [c for c in (config.id_column, *prompt_columns) if c in names]
        columns += kept_schema(task).names
        columns = list(dict.fromkeys(columns))
        start, stop, pos = task.group_start, task.group_start + task.num_rows, 0
        for batch in parquet.iter_batches(
            batch_size=config.rows_per_block, row_groups=[task.row_group], columns=columns
        ):
            first, pos = pos, pos + batch.num_rows
            if pos > start:
                lo = max(start, first)
                yield batch.slice(lo - first, min(stop, pos) - lo)
            if pos >= stop:
                return


def _parquet_rows(
    task: ReadTask, root: Location, config: InputConfig, prompt_columns: tuple[str, ...]
) -> Iterator[pa.Table]:
    """The rows of a Parquet read task; rows it cannot read become ``read`` error rows (or are
    left undone, stage ``transient``, when the storage is unreachable)."""
    end = task.row_offset + task.num_rows
    if task.id_error:
        reason = f"unreadable row group {task.row_group} of {task.rel}: {task.id_error}"
        yield _failed_rows(task, root, config, task.row_offset, reason, "read", derived=True)
        return
    row = task.row_offset
    batches = _range_batches(task, root, config, prompt_columns)
    while row < end:
        try:
            batch = next(batches)
        except StopIteration:
            break
        except READ_ERRORS as exc:
            message = scrub(_one_line(exc))
            if is_transient(exc):
                reason, stage = f"unreachable for now: {message}", TRANSIENT
            else:
                reason = f"unreadable row group {task.row_group} of {task.rel}: {message}"
                stage = "read"
            yield _failed_rows(task, root, config, row, reason, stage)
            return
        yield _skip_done(_batch_rows(batch, task, row, root, config, prompt_columns), task, row)
        row += batch.num_rows


def _skip_done(table: pa.Table, task: ReadTask, row: int) -> pa.Table:
    if not len(task.skip_rows):
        return table
    skip = set(task.skip_rows)
    return table.filter(pa.array([(row + i) not in skip for i in range(table.num_rows)]))


def _batch_rows(
    batch: pa.RecordBatch,
    task: ReadTask,
    row: int,
    root: Location,
    config: InputConfig,
    prompt_columns: tuple[str, ...],
) -> pa.Table:
    """``ROW_SCHEMA`` rows of one batch starting at file row ``row``."""
    n = batch.num_rows
    names = batch.schema.names
    if config.id_column in names:
        ids = id_strings(batch.column(config.id_column), f"ids of {task.rel}").to_pylist()
    else:
        ids = _derived_ids(task.rel, row, n)
    blobs, uris, errors = _image_cells(
        batch.column(config.image_column), posixpath.dirname(task.file), root, config
    )
    stages = ["read" if e else "" for e in errors]
    duplicates = set(task.duplicate_rows)
    for i in range(n):
        if ids[i] is None:
            ids[i] = f"{task.rel}:{row + i}"
            errors[i], stages[i] = "null id", "read"
        elif (row + i) in duplicates:
            errors[i] = "duplicate id: an earlier input row has the same id"
            stages[i] = "read"
        elif blobs[i] is None and not uris[i] and not errors[i]:
            errors[i], stages[i] = "null image cell", "read"
    source = ("s3://" if root.is_s3 else "") + task.file
    kept = kept_schema(task)
    return _rows(
        ids,
        [f"{source}#row={row + i}" for i in range(n)],
        blobs,
        uris,
        errors,
        stages,
        _prompts_json(batch, prompt_columns, n),
        to_cells(pa.Table.from_batches([batch]).select(kept.names).cast(kept))
        if len(kept)
        else None,
    )


def _failed_rows(
    task: ReadTask,
    root: Location,
    config: InputConfig,
    row: int,
    reason: str,
    stage: str,
    derived: bool = False,
) -> pa.Table:
    """Error rows (``stage``) for the task's rows from file row ``row`` on, done rows left out.

    Their ids are read again, the id column alone (the planner read it), unless ``derived``
    or that fails too: then ``<file>:<row>``, as the planner named them.
    """
    end = task.row_offset + task.num_rows
    n = end - row
    ids = None if derived else _ids_alone(task, root, config, row - task.row_offset)
    if ids is None or len(ids) != n:
        ids = _derived_ids(task.rel, row, n)
    logger.warning("%s: %d rows are error rows (%s)", task.rel, n, reason)
    source = ("s3://" if root.is_s3 else "") + task.file
    table = _rows(
        ids,
        [f"{source}#row={r}" for r in range(row, end)],
        [None] * n,
        [""] * n,
        [reason] * n,
        [stage] * n,
        [""] * n,
        empty_cells(n) if task.kept_schema else None,
    )
    return _skip_done(table, task, row)


def _ids_alone(task: ReadTask, root: Location, config: InputConfig, skip: int) -> list | None:
    """The ids of the task's rows after the first ``skip``, read without the image column;
    None without an id column or when it cannot be read."""
    alone = InputConfig(image_column=config.id_column, rows_per_block=config.rows_per_block)
    rest = ReadTask(
        kind="parquet",
        file=task.file,
        row_group=task.row_group,
        group_start=task.group_start + skip,
        num_rows=task.num_rows - skip,
    )
    try:
        ids: list = []
        for batch in _range_batches(rest, root, alone, ()):
            ids += id_strings(batch.column(0), task.rel).to_pylist()
    except (*READ_ERRORS, InputError):
        return None
    with_nulls = [
        i if i is not None else f"{task.rel}:{task.row_offset + skip + k}"
        for k, i in enumerate(ids)
    ]
    return with_nulls


def dataset_rows(batch: pa.Table, config: InputConfig, kept: tuple[str, ...] = ()) -> pa.Table:
    """``ROW_SCHEMA`` rows (+ kept cells) of a batch of a user's dataset (``vlray.embed``).

    The id column (strings or integers) and the image column (bytes, a ``{bytes, path}`` struct,
    or absolute paths / URIs read as they are) are those of ``config``; a null id or image cell becomes an
    error row.

    Raises:
        InputError: a missing id or image column, or one of an unusable type, in one line.
    """
    names = batch.column_names
    for column, what in ((config.id_column, "id"), (config.image_column, "image")):
        if column not in names:
            raise InputError(
                f"no {what} column {column!r} in the dataset (columns: {', '.join(names)}); "
                f"pass {what}_column="
            )
    check_id_type(batch.schema.field(config.id_column).type, config.id_column)
    ids = id_strings(batch.column(config.id_column), "ids of the dataset").to_pylist()
    root = locate("/")
    free = InputConfig(image_column=config.image_column, allow_outside_root=True)
    values = batch.column(config.image_column).combine_chunks()
    if isinstance(values.type, pa.ExtensionType):  # Ray's tensor columns: decoded pixels
        blobs, errors = pixels_as_png(values)
        uris = [""] * len(blobs)
    else:
        blobs, uris, errors = _image_cells(values, "/", root, free)
    stages = ["read" if e else "" for e in errors]
    for i, row_id in enumerate(ids):
        if row_id is None:
            ids[i], errors[i], stages[i] = "", "null id", "read"
        elif blobs[i] is None and not uris[i] and not errors[i]:
            errors[i], stages[i] = "null image cell", "read"
    n = batch.num_rows
    cells = to_cells(batch.select(list(kept))) if kept else None
    return _rows(ids, list(ids), blobs, uris, errors, stages, [""] * n, cells)


def pixels_as_png(values: pa.Array) -> tuple[list[bytes | None], list[str]]:
    """(PNG bytes or None, error or '') per cell of a Ray tensor column of decoded images
    (``read_images``, ``read_webdataset``'s default decoder): HWC or HW uint8, re-encoded
    losslessly so the decode stage reads exactly these pixels."""
    import io

    blobs: list[bytes | None] = []
    errors: list[str] = []
    for pixels in values.to_numpy(zero_copy_only=False):
        arr = np.asarray(pixels) if pixels is not None else None
        if arr is None or arr.dtype != np.uint8 or arr.ndim not in (2, 3):
            what = "null" if arr is None else f"{arr.dtype} of shape {arr.shape}"
            blobs.append(None)
            errors.append(f"pixel array {what}: expected uint8 (height, width[, channels])")
            continue
        buf = io.BytesIO()
        Image.fromarray(arr[..., 0] if arr.ndim == 3 and arr.shape[2] == 1 else arr).save(
            buf, "PNG", compress_level=1
        )
        blobs.append(buf.getvalue())
        errors.append("")
    return blobs, errors
