"""WebDataset shards as a vlray input: the plan (driver) and the rows of a read task (worker).

Fits the accounting of the other inputs (``vlray.pipeline.sources``): the planner knows every
sample's id from the tar headers before Ray starts, so done ids are left out before any task
exists, a repeated id is an error row, and ``rows_in`` is exact. A read task yields exactly one
row per planned sample: the image bytes, or an error row (truncated or unreadable member, no
image member, a shard that changed since planning), never an exception.
"""

from __future__ import annotations

import logging
import tarfile
from collections import Counter
from collections.abc import Iterator

import numpy as np
import pyarrow as pa

from vlray.config import InputConfig
from vlray.pipeline.kept import empty_cells, to_cells
from vlray.pipeline.sources import (
    FOLDER_EXTENSIONS,
    READ_ERRORS,
    InputError,
    InputPlan,
    ReadTask,
    check_kept_names,
    kept_schema,
    rows_table,
    serialize_schema,
)
from vlray.pipeline.webdataset import (
    CAPTION,
    Shard,
    iter_range,
    json_field_type,
    kept_array,
    sampled_json_fields,
    scan_shards,
    shard_ids,
)
from vlray.schema import TRANSIENT
from vlray.storage import Location, is_transient, scrub

logger = logging.getLogger(__name__)


def _kept_schema(root: Location, shards: list[Shard], config: InputConfig) -> pa.Schema:
    """Kept columns and types: ``caption`` a string, JSON fields typed from sampled values.

    Raises:
        InputError: a kept column the samples do not have (no .txt members, a field no sampled
            .json object has).
    """
    suffixes = sum((s.suffixes for s in shards), Counter())
    if config.keep_columns is None:
        return pa.schema([(CAPTION, pa.string())] if suffixes["txt"] else [])
    names = tuple(config.keep_columns)
    check_kept_names(names, config)
    fields = sampled_json_fields(root, shards)
    out = []
    for name in names:
        if name == CAPTION:
            if not suffixes["txt"] and CAPTION not in fields:
                raise InputError(
                    "input.keep_columns: 'caption' comes from .txt members (or a 'caption' field "
                    "of the .json), and the shards have none"
                )
            out.append(pa.field(name, pa.string()))
        elif name in fields:
            out.append(pa.field(name, json_field_type(fields[name])))
        else:
            seen = ", ".join(sorted(fields)) or "none: the samples have no .json members"
            raise InputError(
                f"input.keep_columns: {name!r} is not 'caption' nor a field of the samples' "
                f".json objects (fields seen: {seen})"
            )
    return pa.schema(out)


def plan_webdataset(
    root: Location,
    paths: list[str],
    config: InputConfig,
    done: np.ndarray | None,
    reasons: Counter,
) -> InputPlan:
    """Reads every shard's headers and splits the samples into read tasks (byte ranges).

    Shards that cannot be read at all are listed in ``plan.unreadable`` (their samples cannot be
    named); one readable only up to a bad header is listed too, its samples before it planned.

    Raises:
        InputError: no shard readable, or a kept column the samples do not have.
    """
    from vlray.pipeline.sources import _duplicate_mask, _rows_by_file
    from vlray.pipeline.state import hash_ids, is_done

    plan = InputPlan(root=root, kind="webdataset")
    shards = []
    for shard in scan_shards(root, paths):
        reasons.update(shard.skipped)
        if shard.problem:
            where = f"after {len(shard.keys)} samples" if shard.keys else "at all"
            plan.unreadable.append(f"{shard.rel}: tar shard not readable {where} ({shard.problem})")
        if shard.keys:
            shards.append(shard)
    if not shards:
        detail = plan.unreadable[0] if plan.unreadable else "no samples in the shards"
        raise InputError(f"input {config.uri}: no readable WebDataset sample ({detail})")
    plan.kept = _kept_schema(root, shards, config)
    ids = shard_ids(shards)
    table = pa.table(
        {
            "id": pa.array([i for chunk in ids for i in chunk], pa.string()),
            "file": pa.array(np.repeat(np.arange(len(shards)), [len(c) for c in ids])),
            "row": pa.array(np.concatenate([np.arange(len(c)) for c in ids])),
        }
    )
    done_mask = np.zeros(table.num_rows, dtype=bool)
    if done is not None and len(done):
        done_mask = is_done(hash_ids(table.column("id").to_pylist()), done)
    plan.skipped = int(done_mask.sum())
    skip = _rows_by_file(table, done_mask)
    duplicates = _rows_by_file(table, _duplicate_mask(table) & ~done_mask)
    for i, shard in enumerate(shards):
        _shard_tasks(plan, shard, ids[i], config.rows_per_task, skip.get(i), duplicates.get(i))
    return plan


def _shard_tasks(
    plan: InputPlan,
    shard: Shard,
    ids: list[str],
    per_task: int,
    skip: np.ndarray | None,
    duplicates: np.ndarray | None,
) -> None:
    from vlray.pipeline.sources import _between

    schema = serialize_schema(plan.kept)
    for first in range(0, len(ids), per_task):
        count = min(per_task, len(ids) - first)
        skipped = _between(skip, first, first + count)
        plan.rows += count - len(skipped)
        if len(skipped) == count:
            continue
        end = first + count
        plan.tasks.append(
            ReadTask(
                kind="webdataset",
                file=shard.path,
                rel=shard.rel,
                row_offset=first,
                num_rows=count,
                ids=tuple(ids[first:end]),
                duplicate_rows=_between(duplicates, first, end),
                skip_rows=skipped,
                byte_start=shard.starts[first],
                byte_stop=shard.starts[end] if end < len(ids) else shard.stop,
                kept_schema=schema,
            )
        )


class _Block:
    """Rows of a read task gathered until ``rows_per_block``."""

    def __init__(self, schema: pa.Schema) -> None:
        self.schema = schema
        self._clear()

    def _clear(self) -> None:
        self.ids: list[str] = []
        self.sources: list[str] = []
        self.blobs: list[bytes | None] = []
        self.errors: list[str] = []
        self.stages: list[str] = []
        self.kept: list[dict] = []

    def add(
        self, row_id: str, source: str, data: bytes | None, error: str, stage: str, kept: dict
    ) -> None:
        self.ids.append(row_id)
        self.sources.append(source)
        self.blobs.append(None if error else data)
        self.errors.append(error)
        self.stages.append(stage if error else "")
        self.kept.append({} if error else kept)

    def table(self) -> pa.Table:
        cells = None
        if len(self.schema):
            cells = empty_cells(len(self.ids))
            ok = [i for i, e in enumerate(self.errors) if not e]
            columns = {}
            for f in self.schema:
                values = [self.kept[i].get(f.name) for i in ok]
                columns[f.name], bad = kept_array(values, f.type)
                if bad:
                    logger.warning("kept column %r: %d values are not %s", f.name, bad, f.type)
            for i, cell in zip(ok, to_cells(pa.table(columns, schema=self.schema)), strict=True):
                cells[i] = cell
        table = rows_table(self.ids, self.sources, self.blobs, self.errors, self.stages, cells)
        self._clear()
        return table


def webdataset_rows(task: ReadTask, root: Location, config: InputConfig) -> Iterator[pa.Table]:
    """One row per planned sample of the task, in blocks of ``config.rows_per_block``; done
    samples are left out, a repeated id is an error row, a sample that cannot be read is an
    error row of stage ``read`` (``transient`` when the storage is unreachable: left undone)."""
    schema = kept_schema(task)
    block = _Block(schema)
    skip, duplicates = set(task.skip_rows), set(task.duplicate_rows)
    source = ("s3://" if root.is_s3 else "") + task.file
    samples = iter_range(
        root,
        task.file,
        task.byte_start,
        task.byte_stop,
        schema.names,
        FOLDER_EXTENSIONS,
        config.max_bytes,
    )
    i = 0
    failure, stage = "", "read"
    try:
        for sample in samples:
            if i >= task.num_rows:
                break
            row_id, index = task.ids[i], task.row_offset + i
            i += 1
            if index in skip:
                continue
            error = sample.error
            if row_id not in (sample.key, f"{task.rel}/{sample.key}"):
                error = f"sample {sample.key!r} where the plan had {row_id!r}: the shard changed"
            elif index in duplicates:
                error = "duplicate id: an earlier sample has the same key"
            block.add(row_id, f"{source}#{sample.key}", sample.data, error, "read", sample.kept)
            if len(block.ids) >= config.rows_per_block:
                yield block.table()
    except (*READ_ERRORS, tarfile.TarError) as exc:
        failure = scrub(" ".join(str(exc).split()) or type(exc).__name__)
        if is_transient(exc):
            failure, stage = f"unreachable for now: {failure}", TRANSIENT
        else:
            failure = f"unreadable tar data in {task.rel}: {failure}"
    if i < task.num_rows:
        failure = failure or f"{task.rel} holds fewer samples than planned: the shard changed"
        logger.warning("%s: %d samples are error rows (%s)", task.rel, task.num_rows - i, failure)
    for j in range(i, task.num_rows):
        if task.row_offset + j not in skip:
            block.add(task.ids[j], f"{source}#{task.ids[j]}", None, failure, stage, {})
    if block.ids:
        yield block.table()
