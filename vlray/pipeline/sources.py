"""Plan the input (driver side, no pixels touched) and read it (inside Ray read tasks).

Input is a Parquet file / folder / glob, or a folder of image files, local or on S3. The plan is a
list of small read tasks (one Parquet row group, or a chunk of image paths), so reading is spread
over the cluster and never arrives as one giant block.
"""

from __future__ import annotations

import fnmatch
import logging
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from vlray.config import InputConfig, S3Config
from vlray.ops.decode import IMAGE_EXTENSIONS
from vlray.schema import ROW_SCHEMA
from vlray.storage import Location, list_files, locate

logger = logging.getLogger(__name__)

FILES_PER_TASK = 256


class InputError(ValueError):
    """The input cannot be read at all (missing path, no images, missing column)."""


@dataclass(frozen=True)
class ReadTask:
    """One unit of reading: a Parquet row group, or a chunk of image files."""

    kind: str
    file: str = ""
    rel: str = ""
    row_group: int = -1
    row_offset: int = 0
    paths: tuple[str, ...] = ()
    ids: tuple[str, ...] = ()
    duplicate_rows: tuple[int, ...] = ()


@dataclass
class InputPlan:
    """Where the input is and the tasks that read it."""

    root: Location
    kind: str
    tasks: list[ReadTask] = field(default_factory=list)
    rows: int = 0


def _has_glob(path: str) -> bool:
    return any(ch in path for ch in "*?[")


def _expand(location: Location) -> tuple[Location, list[str]]:
    """(root folder, files) for a file, a folder or a glob."""
    from pyarrow.fs import FileType

    if _has_glob(location.path):
        prefix = location.path
        for i, ch in enumerate(location.path):
            if ch in "*?[":
                prefix = location.path[: location.path.rfind("/", 0, i)]
                break
        root = Location(
            location.fs, prefix, location.uri[: len(location.uri) - len(location.path)] + prefix
        )
        files = [p for p in list_files(root) if fnmatch.fnmatch(p, location.path)]
        return root, files
    info = location.fs.get_file_info(location.path)
    if info.type == FileType.File:
        parent = posixpath.dirname(location.path)
        return Location(location.fs, parent, location.uri.rsplit("/", 1)[0]), [location.path]
    if info.type == FileType.Directory:
        return location, list_files(location)
    raise InputError(f"input {location.uri}: no such file or folder")


def _find_duplicates(fs: Any, files: list[str], id_column: str) -> dict[str, list[int]]:
    """Rows whose id already appeared earlier in the input: {file: [row, ...]}.

    Reads only the id column. Sort-based (Arrow), so it does not build a Python set of ids.
    """
    tables = []
    for i, path in enumerate(files):
        with fs.open_input_file(path) as f:
            ids = pq.read_table(f, columns=[id_column]).column(0).cast(pa.string())
        n = len(ids)
        tables.append(
            pa.table(
                {
                    "id": ids,
                    "file": pa.array(np.full(n, i, dtype=np.int32)),
                    "row": pa.array(np.arange(n, dtype=np.int64)),
                }
            )
        )
    if not tables:
        return {}
    table = pa.concat_tables(tables).sort_by(
        [("id", "ascending"), ("file", "ascending"), ("row", "ascending")]
    )
    ids = table.column("id")
    same = (
        pc.equal(ids.slice(1), ids.slice(0, len(ids) - 1))
        if len(ids) > 1
        else pa.array([], pa.bool_())
    )
    mask = np.concatenate([[False], np.asarray(same.fill_null(False))])
    dup = table.filter(pa.array(mask))
    out: dict[str, list[int]] = {}
    for f, r in zip(dup.column("file").to_pylist(), dup.column("row").to_pylist(), strict=True):
        out.setdefault(files[f], []).append(r)
    return out


def plan_input(config: InputConfig, s3: S3Config | None = None) -> InputPlan:
    """Lists the input and splits it into read tasks.

    Raises:
        InputError: missing input, nothing to read, or a missing image column.
    """
    location = locate(config.uri, s3)
    root, files = _expand(location)
    parquet = [p for p in files if p.lower().endswith(".parquet")]
    images = [p for p in files if posixpath.splitext(p)[1].lower() in IMAGE_EXTENSIONS]
    if parquet:
        return _plan_parquet(root, parquet, config)
    if images:
        return _plan_folder(root, images)
    raise InputError(
        f"input {config.uri}: no Parquet files or images ({', '.join(sorted(IMAGE_EXTENSIONS))}) found"
    )


def _plan_parquet(root: Location, files: list[str], config: InputConfig) -> InputPlan:
    plan = InputPlan(root=root, kind="parquet")
    has_ids: bool | None = None
    for path in files:
        with root.fs.open_input_file(path) as f:
            meta = pq.ParquetFile(f).metadata
            schema = meta.schema.to_arrow_schema()
        if config.image_column not in schema.names:
            raise InputError(
                f"{path}: no image column {config.image_column!r} (columns: {', '.join(schema.names)}); "
                "set input.image_column"
            )
        has_ids = config.id_column in schema.names if has_ids is None else has_ids
        if has_ids != (config.id_column in schema.names):
            raise InputError(
                f"{path}: the id column {config.id_column!r} is in some files but not others"
            )
        rel = posixpath.relpath(path, root.path)
        offset = 0
        for rg in range(meta.num_row_groups):
            plan.tasks.append(
                ReadTask(kind="parquet", file=path, rel=rel, row_group=rg, row_offset=offset)
            )
            offset += meta.row_group(rg).num_rows
        plan.rows += meta.num_rows
    if has_ids:
        duplicates = _find_duplicates(root.fs, files, config.id_column)
        if duplicates:
            logger.warning(
                "%d input rows repeat an earlier id; they become error rows",
                sum(map(len, duplicates.values())),
            )
            plan.tasks = [_with_duplicates(t, duplicates.get(t.file, [])) for t in plan.tasks]
    return plan


def _with_duplicates(task: ReadTask, rows: list[int]) -> ReadTask:
    if not rows:
        return task
    return ReadTask(**{**task.__dict__, "duplicate_rows": tuple(rows)})


def _plan_folder(root: Location, images: list[str]) -> InputPlan:
    plan = InputPlan(root=root, kind="files", rows=len(images))
    for start in range(0, len(images), FILES_PER_TASK):
        chunk = images[start : start + FILES_PER_TASK]
        ids = tuple(posixpath.relpath(p, root.path) for p in chunk)
        plan.tasks.append(ReadTask(kind="files", paths=tuple(chunk), ids=ids))
    return plan


def _image_cells(column: pa.ChunkedArray, base_dir: str, prefix: str) -> tuple[list, list]:
    """(bytes or None, uri or '') per cell of an image column of any supported layout."""
    typ = column.type
    if pa.types.is_struct(typ):
        names = [typ.field(i).name for i in range(typ.num_fields)]
        data = column.combine_chunks()
        blobs = data.field("bytes").to_pylist() if "bytes" in names else [None] * len(data)
        paths = data.field("path").to_pylist() if "path" in names else [None] * len(data)
        valid = data.is_valid().to_pylist()
        blobs = [b if v else None for b, v in zip(blobs, valid, strict=True)]
        paths = [p if v else None for p, v in zip(paths, valid, strict=True)]
    elif pa.types.is_binary(typ) or pa.types.is_large_binary(typ):
        blobs, paths = column.to_pylist(), [None] * len(column)
    elif pa.types.is_string(typ) or pa.types.is_large_string(typ):
        blobs, paths = [None] * len(column), column.to_pylist()
    else:
        raise InputError(
            f"image column type {typ} is not binary, string, or a {{bytes, path}} struct"
        )
    uris = []
    for blob, path in zip(blobs, paths, strict=True):
        if blob is not None or not path:
            uris.append("")
        elif "://" in path or path.startswith("/"):
            uris.append(path)
        else:
            uris.append(prefix + posixpath.normpath(posixpath.join(base_dir, path)))
    return blobs, uris


def read_task_rows(task: ReadTask, root: Location, config: InputConfig) -> Iterator[pa.Table]:
    """Yields the rows of one read task in blocks of ``config.rows_per_block``.

    Rows follow ``ROW_SCHEMA`` (id, source, data, uri, error, stage); a null image cell, a
    repeated id, an unreadable file become rows with ``error`` set, never exceptions.
    """
    if task.kind == "files":
        scheme = "s3://" if root.uri.startswith("s3://") else ""
        n = len(task.paths)
        for start in range(0, n, config.rows_per_block):
            sl = slice(start, start + config.rows_per_block)
            paths = task.paths[sl]
            yield pa.table(
                {
                    "id": list(task.ids[sl]),
                    "source": [scheme + p for p in paths],
                    "data": pa.nulls(len(paths), pa.binary()),
                    "uri": [scheme + p for p in paths],
                    "error": [""] * len(paths),
                    "stage": [""] * len(paths),
                },
                schema=ROW_SCHEMA,
            )
        return
    scheme = "s3://" if root.uri.startswith("s3://") else ""
    source = scheme + task.file
    with root.fs.open_input_file(task.file) as f:
        parquet = pq.ParquetFile(f)
        names = parquet.schema_arrow.names
        columns = [config.image_column] + ([config.id_column] if config.id_column in names else [])
        row = task.row_offset
        duplicates = set(task.duplicate_rows)
        for batch in parquet.iter_batches(
            batch_size=config.rows_per_block, row_groups=[task.row_group], columns=columns
        ):
            n = batch.num_rows
            if config.id_column in names:
                ids = batch.column(config.id_column).cast(pa.string()).to_pylist()
            else:
                ids = [f"{task.rel}:{row + i}" for i in range(n)]
            blobs, uris = _image_cells(
                pa.chunked_array([batch.column(config.image_column)]),
                posixpath.dirname(task.file),
                scheme,
            )
            errors, stages = [""] * n, [""] * n
            for i in range(n):
                if ids[i] is None:
                    ids[i] = f"{task.rel}:{row + i}"
                    errors[i], stages[i] = "null id", "read"
                elif (row + i) in duplicates:
                    errors[i], stages[i] = (
                        "duplicate id: an earlier input row has the same id",
                        "read",
                    )
                elif blobs[i] is None and not uris[i]:
                    errors[i], stages[i] = "null image cell", "read"
            yield pa.table(
                {
                    "id": ids,
                    "source": [f"{source}#row={row + i}" for i in range(n)],
                    "data": pa.array(blobs, pa.binary()),
                    "uri": uris,
                    "error": errors,
                    "stage": stages,
                },
                schema=ROW_SCHEMA,
            )
            row += n
