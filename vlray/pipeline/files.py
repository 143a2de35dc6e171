"""Ray Data stages that only move rows and files: read tasks and write tasks.

Kept apart from the model stages (``vlray.pipeline.stages``) so that the worker processes running
them import pyarrow only, not torch: read tasks are on the critical path at start-up.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa

from vlray.config import InputConfig
from vlray.pipeline.kept import KEPT_COLUMN, from_cells
from vlray.pipeline.sources import dataset_rows, read_task_rows, task_from_row
from vlray.schema import (
    ERRORS_SCHEMA,
    MASKS_SCHEMA,
    STAGES,
    SYSTEMIC,
    TOKENS_SCHEMA,
    TRANSIENT,
    UNCOMMITTED_STAGES,
    embeddings_schema,
    thumbnail_name,
)
from vlray.storage import Location, write_bytes_atomic, write_parquet_atomic

THUMBNAIL_WRITERS = 16
"""Thumbnails are one small file (one PUT on S3) per image: written this many at a time."""


def id_array(ids: np.ndarray) -> pa.Array:
    """Ids as an Arrow string array, exactly: ``astype(str)`` would cut trailing NUL bytes."""
    return pa.array([str(i) for i in ids], pa.string())


def one_line(exc: BaseException) -> str:
    """An exception as one short line, without a stack."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:300]


class ReadStage:
    """Read tasks (one Parquet row group or a chunk of files) -> rows in ``ROW_SCHEMA``."""

    def __init__(
        self, root: Location, config: InputConfig, prompt_columns: tuple[str, ...] = ()
    ) -> None:
        self.root, self.config, self.prompt_columns = root, config, prompt_columns

    def __call__(self, batch: dict[str, np.ndarray]) -> Any:
        for task in batch["task"]:
            task = task_from_row(task)
            yield from read_task_rows(task, self.root, self.config, self.prompt_columns)


class DatasetRowsStage:
    """A batch of a user's Ray Dataset (an id and an image column, ``vlray.embed``) -> rows in
    ``ROW_SCHEMA``, with the ``kept`` columns packed."""

    def __init__(self, config: InputConfig, kept: tuple[str, ...] = ()) -> None:
        self.config, self.kept = config, kept

    def __call__(self, batch: pa.Table) -> pa.Table:
        return dataset_rows(batch, self.config, self.kept)


def output_rows(batch: dict[str, np.ndarray], dim: int) -> pa.Table:
    """``vlray.embed``'s rows: id, embedding (fixed_size_list<float32>[dim], null on error
    rows), width, height (the original image's, after EXIF orientation), error ('' when
    embedded), then the kept columns typed as in the input."""
    errors = batch["error"].astype(str)
    failed = errors != ""
    emb = np.asarray(batch["embedding"], dtype=np.float32).reshape(-1)
    table = pa.table(
        {
            "id": id_array(batch["id"]),
            "embedding": pa.FixedSizeListArray.from_arrays(
                pa.array(emb), dim, mask=pa.array(failed)
            ),
            "width": pa.array(batch["width"], pa.int32()),
            "height": pa.array(batch["height"], pa.int32()),
            "error": pa.array(errors, pa.string()),
        }
    )
    kept = from_cells(list(batch[KEPT_COLUMN])) if KEPT_COLUMN in batch else None
    if kept is not None:
        for name, column in zip(kept.column_names, kept.columns, strict=True):
            table = table.append_column(kept.schema.field(name), column)
    return table


def part_name(ids: Sequence[str], sources: Sequence[str] = ()) -> str:
    """``part-<digest>.parquet`` named by the batch's ids and the rows' sources (``file#row=N``
    or the image's URI), each length-prefixed (UTF-8 bytes with surrogates escaped), then the
    id count, so two different batches never share a name, not even two holding the same ids
    (an input that repeats ids across files: the later rows are ``duplicate id`` errors, whose
    part must not replace the first rows' errors), while a write task that Ray retries rewrites
    the same file, never a twin."""
    digest = hashlib.blake2b(digest_size=16)
    for value in [*ids, *sources]:
        data = value.encode("utf-8", "surrogatepass")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    digest.update(len(ids).to_bytes(8, "little"))
    return f"part-{digest.hexdigest()}.parquet"


def masks_table(ids: np.ndarray, masks: np.ndarray) -> pa.Table:
    """Per-row JSON lists of mask records -> one ``MASKS_SCHEMA`` row per mask."""
    cols: dict[str, list] = {name: [] for name in MASKS_SCHEMA.names}
    for row_id, text in zip(ids, masks, strict=True):
        for rec in json.loads(text) if text else []:
            cols["id"].append(str(row_id))
            cols["mask_id"].append(rec["mask_id"])
            cols["segmentation"].append(rec["segmentation"])
            cols["bbox"].append(rec["bbox"])
            cols["area"].append(rec["area"])
            cols["predicted_iou"].append(rec["predicted_iou"])
            cols["stability_score"].append(rec["stability_score"])
            cols["point"].append(rec.get("point"))
            cols["prompt_index"].append(rec.get("prompt_index"))
    return pa.table(cols, schema=MASKS_SCHEMA)


def embeddings_table(
    batch: dict[str, np.ndarray], ok: np.ndarray, schema: pa.Schema, dim: int, dtype: str
) -> pa.Table:
    """``embeddings/`` rows of the rows selected by ``ok``: id, embedding, width, height, then
    the kept input columns (``input.keep_columns``) typed as in the input."""
    emb = np.asarray(batch["embedding"][ok], dtype=np.float16 if dtype == "float16" else np.float32)
    table = pa.table(
        {
            "id": id_array(batch["id"][ok]),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), dim),
            "width": pa.array(batch["width"][ok], pa.int32()),
            "height": pa.array(batch["height"][ok], pa.int32()),
        },
        schema=schema,
    )
    kept = from_cells(list(batch[KEPT_COLUMN][ok])) if KEPT_COLUMN in batch else None
    if kept is not None:
        for name, column in zip(kept.column_names, kept.columns, strict=True):
            table = table.append_column(kept.schema.field(name), column)
    return table


def tokens_table(batch: dict[str, np.ndarray], ok: np.ndarray, dim: int) -> pa.Table:
    """``TOKENS_SCHEMA`` rows for the rows selected by ``ok``."""
    matrices = [np.frombuffer(blob, np.float32) for blob in batch["tokens"][ok]]
    grids = batch["token_grid"][ok]
    return pa.table(
        {
            "id": id_array(batch["id"][ok]),
            "grid_h": pa.array(grids[:, 0], pa.int32()),
            "grid_w": pa.array(grids[:, 1], pa.int32()),
            "dim": pa.array(np.full(len(matrices), dim, dtype=np.int32)),
            "tokens": pa.array(matrices, pa.list_(pa.float32())),
        },
        schema=TOKENS_SCHEMA,
    )


def errors_table(
    batch: dict[str, np.ndarray], failed: np.ndarray, stage: np.ndarray, errors: np.ndarray
) -> pa.Table:
    """``ERRORS_SCHEMA`` rows for the rows selected by ``failed``."""
    return pa.table(
        {
            "id": id_array(batch["id"][failed]),
            "stage": pa.array(stage[failed]),
            "error": pa.array(errors[failed]),
            "source": pa.array(batch["source"][failed].astype(str)),
        },
        schema=ERRORS_SCHEMA,
    )


class WriteStage:
    """Writes the batch's masks, embeddings and errors files (each atomically), returns counts.

    Masks go first: a row counts as done once it is in ``embeddings/`` or ``errors/``, so a crash
    between the files re-does the row rather than losing its masks.
    """

    def __init__(self, output: Location, dim: int, dtype: str) -> None:
        self.output, self.dim, self.dtype = output, dim, dtype
        self.schema = embeddings_schema(dim, dtype) if dim else None
        self._pool: ThreadPoolExecutor | None = None

    def _write_thumbnails(self, ids: np.ndarray, blobs: np.ndarray) -> int:
        """``thumbnails/<sha1(id)>.jpg`` for each non-empty blob; returns how many."""
        jobs = [
            (self.output.join("thumbnails", thumbnail_name(str(i))), bytes(b))
            for i, b in zip(ids, blobs, strict=True)
            if len(b)
        ]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(THUMBNAIL_WRITERS, "vlray-thumbnails")
        for _ in self._pool.map(lambda job: write_bytes_atomic(*job), jobs):
            pass
        return len(jobs)

    def _write_masks(self, batch: dict[str, np.ndarray], ok: np.ndarray, name: str) -> int:
        """``masks/NAME`` (and, SAM alone, the done marker ``segmented/NAME``: a row with no
        mask is still done); returns how many masks."""
        table = masks_table(batch["id"][ok], batch["masks"][ok])
        if table.num_rows:
            write_parquet_atomic(self.output.join("masks", name), table)
        if self.schema is None:
            done = pa.table(
                {
                    "id": id_array(batch["id"][ok]),
                    "mask_count": pa.array(batch["mask_count"][ok], pa.int32()),
                }
            )
            write_parquet_atomic(self.output.join("segmented", name), done)
        return table.num_rows

    def _write_regions(self, batch: dict[str, np.ndarray], ok: np.ndarray, name: str) -> int:
        """``regions/NAME`` from the rows' region cells (before the embeddings part, like
        masks); returns how many regions."""
        from vlray.pipeline.regions_stage import read_regions_cell

        tables = [t for t in map(read_regions_cell, batch["regions"][ok]) if t is not None]
        if not tables:
            return 0
        table = pa.concat_tables(tables)
        write_parquet_atomic(self.output.join("regions", name), table)
        return table.num_rows

    def _commit(
        self,
        batch: dict[str, np.ndarray],
        ok: np.ndarray,
        failed: np.ndarray,
        stage_error: tuple[np.ndarray, np.ndarray],
    ) -> dict:
        """Writes the batch's files, side parts first (thumbnails, masks, regions, tokens: a row
        is done once it is in embeddings/ or errors/, so they must be there before); returns
        how many thumbnails, masks and regions, and the part's name ("" when it wrote none)."""
        name = part_name([str(i) for i in batch["id"]], [str(s) for s in batch["source"]])
        n_ok, n_err = int(ok.sum()), int(failed.sum())
        written = {"thumbnails": 0, "masks": 0, "regions": 0}
        if "thumb" in batch:
            written["thumbnails"] = self._write_thumbnails(batch["id"][ok], batch["thumb"][ok])
        if "masks" in batch and n_ok:
            written["masks"] = self._write_masks(batch, ok, name)
        if "regions" in batch and n_ok:
            written["regions"] = self._write_regions(batch, ok, name)
        if "tokens" in batch and n_ok:
            write_parquet_atomic(
                self.output.join("tokens", name), tokens_table(batch, ok, self.dim)
            )
        if n_ok and self.schema is not None:
            table = embeddings_table(batch, ok, self.schema, self.dim, self.dtype)
            write_parquet_atomic(self.output.join("embeddings", name), table)
        if n_err:
            stage, errors = stage_error
            write_parquet_atomic(
                self.output.join("errors", name), errors_table(batch, failed, stage, errors)
            )
        return {**written, "file": name if n_ok or n_err else ""}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        start = time.perf_counter()
        errors = batch["error"].astype(str)
        stage = batch["stage"].astype(str)
        ok = errors == ""
        held = np.isin(stage, UNCOMMITTED_STAGES) & ~ok  # left undone: not error rows
        failed = ~ok & ~held
        written = self._commit(batch, ok, failed, (stage, errors))
        n_ok = int(ok.sum())
        return {
            "rows": np.array([len(errors)]),
            "embedded": np.array([n_ok if self.schema is not None else 0]),
            "segmented": np.array([n_ok if "masks" in batch else 0]),
            **{key: np.array([written[key]]) for key in ("masks", "regions", "thumbnails")},
            "regions_skipped": np.array(
                [int(batch["regions_skipped"][ok].sum()) if "regions_skipped" in batch else 0]
            ),
            "errors": np.array([int(failed.sum())]),
            **_encoder_groups(batch, ok),
            **{
                key: np.array([float(batch[key].sum()) if key in batch else 0.0])
                for key in ("decode_s", "encode_s", "mask_s", "region_s")
            },
            "write_s": np.array([time.perf_counter() - start]),
            **{f"errors_{s}": np.array([int((stage[failed] == s).sum())]) for s in STAGES},
            **_undone(batch, stage, errors),
            "file": np.array([written["file"]]),
        }


def _encoder_groups(batch: dict[str, np.ndarray], ok: np.ndarray) -> dict[str, np.ndarray]:
    """The batch's share of encoder groups and batches (each row counts 1/size of its own)."""
    groups = batches = 0.0
    if "group_size" in batch:
        if ok.any():
            groups = float((1.0 / batch["group_size"][ok].astype(np.float64)).sum())
        batches = float((1.0 / batch["batch_rows"].astype(np.float64)).sum())
    return {"groups": np.array([groups]), "batches": np.array([batches])}


def _undone(batch: dict[str, np.ndarray], stage: np.ndarray, errors: np.ndarray) -> dict:
    """Rows left undone: transient failures, and systemic ones with the first one's error."""
    systemic = np.flatnonzero(stage == SYSTEMIC)
    first = int(systemic[0]) if len(systemic) else -1
    example = f"{errors[first]} (example id {batch['id'][first]!r})" if first >= 0 else ""
    return {
        "undone": np.array([int((stage == TRANSIENT).sum())]),
        "systemic": np.array([len(systemic)]),
        "systemic_error": np.array([example]),
    }
