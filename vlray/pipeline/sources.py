"""Plan the input (driver side, no pixels touched) and read it (inside Ray read tasks).

Input is a Parquet file / folder / glob, or a folder of image files, local or on S3. The plan is a
list of small read tasks (one Parquet row group, or a chunk of image paths), so reading is spread
over the cluster and never arrives as one giant block.
"""

from __future__ import annotations

import fnmatch
import json
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
    skip_rows: tuple[int, ...] = ()
    """Rows already done by an earlier run: not emitted at all."""


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


def _scan_ids(fs: Any, files: list[str], rels: list[str], id_column: str | None) -> pa.Table:
    """(id, file, row) of every input row: the id column, or the derived ``<rel>:<row>``.

    Reads only the id column (or nothing but the footer, for derived ids).
    """
    tables = []
    for i, path in enumerate(files):
        with fs.open_input_file(path) as f:
            if id_column:
                ids = pq.read_table(f, columns=[id_column]).column(0).cast(pa.string())
                n = len(ids)
            else:
                n = pq.ParquetFile(f).metadata.num_rows
                ids = pa.array([f"{rels[i]}:{r}" for r in range(n)], pa.string())
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


def plan_input(
    config: InputConfig, s3: S3Config | None = None, done: np.ndarray | None = None
) -> InputPlan:
    """Lists the input and splits it into read tasks, leaving out rows whose id is done.

    Args:
        config: the input section.
        s3: S3 settings.
        done: sorted ``S16`` digests of ids already in the output (see ``vlray.pipeline.state``).

    Raises:
        InputError: missing input, nothing to read, or a missing image column.
    """
    location = locate(config.uri, s3)
    root, files = _expand(location)
    parquet = [p for p in files if p.lower().endswith(".parquet")]
    images = [p for p in files if posixpath.splitext(p)[1].lower() in IMAGE_EXTENSIONS]
    if parquet:
        return _plan_parquet(root, parquet, config, done)
    if images:
        return _plan_folder(root, images, done)
    raise InputError(
        f"input {config.uri}: no Parquet files or images ({', '.join(sorted(IMAGE_EXTENSIONS))}) found"
    )


def _plan_parquet(
    root: Location, files: list[str], config: InputConfig, done: np.ndarray | None
) -> InputPlan:
    from vlray.pipeline.state import hash_ids, is_done

    plan = InputPlan(root=root, kind="parquet")
    has_ids: bool | None = None
    metas = []
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
        metas.append(meta)
    rels = [posixpath.relpath(path, root.path) for path in files]
    skip: dict[int, set[int]] = {}
    duplicates: dict[int, set[int]] = {}
    if has_ids or (done is not None and len(done)):
        table = _scan_ids(root.fs, files, rels, config.id_column if has_ids else None)
        file_col = np.asarray(table.column("file"))
        row_col = np.asarray(table.column("row"))
        done_mask = np.zeros(table.num_rows, dtype=bool)
        if done is not None and len(done):
            ids = table.column("id").to_pylist()
            done_mask = is_done(hash_ids(i if i is not None else "" for i in ids), done)
            done_mask &= np.asarray(table.column("id").is_valid())
        for f, r in zip(file_col[done_mask], row_col[done_mask], strict=True):
            skip.setdefault(int(f), set()).add(int(r))
        plan.skipped = int(done_mask.sum())
        if has_ids:
            dup_mask = _duplicate_mask(table) & ~done_mask
            for f, r in zip(file_col[dup_mask], row_col[dup_mask], strict=True):
                duplicates.setdefault(int(f), set()).add(int(r))
            if dup_mask.any():
                logger.warning(
                    "%d input rows repeat an earlier id; they become error rows",
                    int(dup_mask.sum()),
                )
    for i, (path, meta) in enumerate(zip(files, metas, strict=True)):
        offset = 0
        for rg in range(meta.num_row_groups):
            n = meta.row_group(rg).num_rows
            rows = range(offset, offset + n)
            skipped = tuple(r for r in rows if r in skip.get(i, ()))
            if len(skipped) < n:
                plan.tasks.append(
                    ReadTask(
                        kind="parquet",
                        file=path,
                        rel=rels[i],
                        row_group=rg,
                        row_offset=offset,
                        duplicate_rows=tuple(r for r in rows if r in duplicates.get(i, ())),
                        skip_rows=skipped,
                    )
                )
            plan.rows += n - len(skipped)
            offset += n
    return plan


def _plan_folder(root: Location, images: list[str], done: np.ndarray | None) -> InputPlan:
    from vlray.pipeline.state import hash_ids, is_done

    ids = [posixpath.relpath(p, root.path) for p in images]
    plan = InputPlan(root=root, kind="files")
    if done is not None and len(done):
        keep = ~is_done(hash_ids(ids), done)
        plan.skipped = int((~keep).sum())
        images = [p for p, k in zip(images, keep, strict=True) if k]
        ids = [i for i, k in zip(ids, keep, strict=True) if k]
    plan.rows = len(images)
    for start in range(0, len(images), FILES_PER_TASK):
        plan.tasks.append(
            ReadTask(
                kind="files",
                paths=tuple(images[start : start + FILES_PER_TASK]),
                ids=tuple(ids[start : start + FILES_PER_TASK]),
            )
        )
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
                    "prompts": [""] * len(paths),
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
        columns += [c for c in prompt_columns if c in names]
        row = task.row_offset
        duplicates = set(task.duplicate_rows)
        skip = set(task.skip_rows)
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
            table = pa.table(
                {
                    "id": ids,
                    "source": [f"{source}#row={row + i}" for i in range(n)],
                    "data": pa.array(blobs, pa.binary()),
                    "uri": uris,
                    "error": errors,
                    "stage": stages,
                    "prompts": _prompts_json(batch, prompt_columns, n),
                },
                schema=ROW_SCHEMA,
            )
            if skip:
                table = table.filter(pa.array([(row + i) not in skip for i in range(n)]))
            yield table
            row += n
