"""Keep ``OUT/index`` up to date with the embeddings a job committed.

An incremental run reads only the embedding files it committed (plus the existing index);
every committed file is read only when the index is built for the first time or rebuilt
(the index type no longer fits the total, another model, or an index that missed rows).
S3 outputs are staged in a local folder and uploaded manifest last.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vlray.config import JobConfig
from vlray.families import Checkpoint
from vlray.families.fingerprint import hub_revision, weights_fingerprint
from vlray.index.build import (
    FLAT_MAX_ROWS,
    IDS_FILE,
    INDEX_FILE,
    MANIFEST_FILE,
    Batches,
    add_to_index,
    build_index,
    can_add,
    choose_factory,
)
from vlray.index.refine import VECTORS_FILE
from vlray.storage import Location, download_file, list_files, read_bytes, upload_file

logger = logging.getLogger(__name__)

INDEX_FILES = (INDEX_FILE, IDS_FILE, VECTORS_FILE, MANIFEST_FILE)
MODEL_KEYS = ("model", "family", "weights", "seed", "fingerprint")


def committed_files(
    output: Location, folder: str = "embeddings", names: Iterable[str] | None = None
) -> list[str]:
    """Paths of the committed Parquet parts in ``output/folder``: all of them, or those named
    ``names`` that exist (a run's part names cover errors/ too)."""
    paths = list_files(output.join(folder), (".parquet",))
    if names is None:
        return paths
    wanted = set(names)
    return [p for p in paths if os.path.basename(p) in wanted]


def plain_ids(batch: pa.RecordBatch) -> list[str]:
    """The index ids of an ``embeddings/`` batch: its ``id`` column."""
    return batch.column("id").to_pylist()


def iter_embeddings(
    output: Location,
    paths: list[str],
    batch_rows: int = 65536,
    key: tuple[tuple[str, ...], Callable[[pa.RecordBatch], list[str]]] = (("id",), plain_ids),
) -> Batches:
    """A callable yielding ``(ids, vectors)`` from ``paths``, one Parquet batch at a time.

    Vectors are float32 (n, d); float16 files are read as stored and widened per batch, so
    at most ``batch_rows`` rows are ever in memory. ``key``: the columns the index ids are
    made of and the function that makes them from a batch (regions: image id + mask id).
    """
    columns, ids = key

    def batches() -> Iterator[tuple[list[str], np.ndarray]]:
        for path in paths:
            with output.fs.open_input_file(path) as f:
                for batch in pq.ParquetFile(f).iter_batches(
                    batch_size=batch_rows, columns=[*columns, "embedding"]
                ):
                    emb = batch.column("embedding")
                    values = emb.values.to_numpy(zero_copy_only=False)
                    vectors = values.reshape(-1, emb.type.list_size).astype(np.float32, copy=False)
                    yield ids(batch), vectors

    return batches


def count_rows(output: Location, paths: list[str]) -> int:
    """Rows in the Parquet files ``paths`` (footers only)."""
    total = 0
    for path in paths:
        with output.fs.open_input_file(path) as f:
            total += pq.ParquetFile(f).metadata.num_rows
    return total


def index_manifest_fields(
    config: JobConfig, checkpoint: Checkpoint, family_name: str
) -> dict[str, Any]:
    """The model fields an index manifest records (queries load these weights)."""
    return {
        "model": checkpoint.name,
        "model_path": checkpoint.path,
        "family": family_name,
        "weights": "random" if checkpoint.random_weights else "pretrained",
        "revision": hub_revision(checkpoint.path),
        # the weight files loaded (None: seeded random weights built from the config)
        "fingerprint": weights_fingerprint(checkpoint.path)
        if checkpoint.weights == "pretrained"
        else None,
        "seed": checkpoint.seed,
        "processor": checkpoint.processor,
        "output_dtype": config.output.dtype,
    }


def read_manifest(index_loc: Location) -> dict[str, Any] | None:
    """The index's manifest, or None when there is none (or it cannot be read)."""
    try:
        return json.loads(read_bytes(index_loc.join(MANIFEST_FILE)))
    except (FileNotFoundError, OSError, ValueError):
        return None


def run_entry(rows_added: int, mode: str, factory: str | None) -> dict[str, Any]:
    """One ``runs`` entry of an index manifest."""
    at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return {"at": at, "rows_added": rows_added, "mode": mode, "factory": factory or "Flat"}


def stage_index(index_loc: Location, staging: str, names: tuple[str, ...] = INDEX_FILES) -> None:
    """Copies an S3 index's files into the local folder ``staging`` (to add to them),
    streamed; an optional file its manifest does not name is skipped."""
    manifest = json.loads(read_bytes(index_loc.join(MANIFEST_FILE)))
    for name in names:
        if name == VECTORS_FILE and not manifest.get("refine"):
            continue  # only SQ8 and PQ indexes keep one
        download_file(index_loc.join(name), os.path.join(staging, name))


def upload_index(index_loc: Location, staging: str, names: tuple[str, ...] = INDEX_FILES) -> None:
    """Uploads the files of ``staging`` to an S3 index, in order (``names`` ends with the
    manifest: a reader that sees the new manifest sees the new files)."""
    from vlray.pipeline.stop import hold_stops

    with hold_stops():
        for name in names:
            path = os.path.join(staging, name)
            if name == VECTORS_FILE and not os.path.exists(path):
                continue
            upload_file(path, index_loc.join(name))


def same_model(existing: dict[str, Any] | None, fields: dict[str, Any]) -> dict[str, Any] | None:
    """``existing`` when it was built from the same model as ``fields`` says, else None."""
    if existing is None or any(existing.get(k) != fields.get(k) for k in MODEL_KEYS):
        return None
    return existing


@contextmanager
def staged_index(
    index_loc: Location, names: tuple[str, ...] = INDEX_FILES, prefix: str = "vlray-index-"
) -> Iterator[str]:
    """A local folder to write the index in: its own folder when local; for S3 a temporary
    one, uploaded (``names`` in order, manifest last) when the block succeeds and removed
    either way."""
    if index_loc.is_local:
        os.makedirs(index_loc.path, exist_ok=True)
        yield index_loc.path
        return
    staging = tempfile.mkdtemp(prefix=prefix)
    try:
        yield staging
        upload_index(index_loc, staging, names)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def build_output_index(
    config: JobConfig,
    checkpoint: Checkpoint,
    family_name: str,
    output: Location,
    dim: int,
    rows_added: int,
    new_files: list[str] | None = None,
) -> dict[str, Any]:
    """Brings ``output/index`` up to date with every committed embedding (streamed).

    Args:
        new_files: Names of the part files this run committed; their embeddings are added
            to the existing index when it still fits the new total. None: unknown, rebuild.

    Returns:
        The index manifest plus ``mode``: ``add`` or ``rebuild``.
    """
    all_paths = committed_files(output)
    total = count_rows(output, all_paths)
    fields = index_manifest_fields(config, checkpoint, family_name)
    index_loc = output.join("index")
    budget = int(config.index.memory_budget_gb * (1 << 30))
    existing = same_model(read_manifest(index_loc), fields)
    runs = list(existing.get("runs", [])) if existing else []
    new_paths = None if new_files is None else committed_files(output, names=new_files)
    count = rows_to_add(
        output,
        existing,
        new_paths,
        dim=dim,
        total=total,
        budget=budget,
        factory=config.index.factory or None,
        flat_max=config.index.flat_max,
    )
    mode = "rebuild" if count is None else "add"
    with staged_index(index_loc) as staging:
        if count is not None and existing is not None and new_paths is not None:
            if not index_loc.is_local:
                stage_index(index_loc, staging)
            runs.append(run_entry(count, mode, existing.get("factory")))
            result = add_to_index(
                iter_embeddings(output, new_paths),
                staging,
                dim=dim,
                count=count,
                manifest={**fields, "runs": runs},
            )
        else:
            fields = {**fields, "runs": runs}
            batches = iter_embeddings(output, all_paths)
            result = _rebuild(config, batches, staging, dim, total, rows_added, fields)
    logger.info("index %s: %s over %d vectors", mode, result.get("factory"), result.get("count"))
    return {**result, "mode": mode}


def _rebuild(
    config: JobConfig,
    batches: Batches,
    staging: str,
    dim: int,
    total: int,
    rows_added: int,
    fields: dict[str, Any],
) -> dict[str, Any]:
    """A new index over every committed row (``batches``) in ``staging``; the manifest's
    ``runs`` (in ``fields``) gains this run's entry with the factory chosen."""
    budget = int(config.index.memory_budget_gb * (1 << 30))
    factory = config.index.factory or None
    if factory is None and total:
        factory = choose_factory(total, dim, budget, config.index.flat_max)
    fields["runs"].append(run_entry(rows_added, "rebuild", factory))
    return build_index(
        batches,
        staging,
        dim=dim,
        count=total,
        factory=factory,
        memory_budget_bytes=budget,
        manifest=fields,
    )


def rows_to_add(
    output: Location,
    existing: dict[str, Any] | None,
    new_paths: list[str] | None,
    *,
    dim: int,
    total: int,
    budget: int,
    factory: str | None = None,
    flat_max: int = FLAT_MAX_ROWS,
) -> int | None:
    """Rows of ``new_paths`` to add to the ``existing`` index (same model), or None when it
    must be rebuilt instead: no index, unknown new files, a type that no longer fits the
    total, or an index that lacks rows an earlier run committed."""
    if existing is None or new_paths is None:
        return None
    if not can_add(
        existing,
        total=total,
        dim=dim,
        memory_budget_bytes=budget,
        factory=factory,
        flat_max=flat_max,
    ):
        return None
    count = count_rows(output, new_paths)
    if int(existing.get("count", 0)) + count != total:
        # an earlier run committed rows but stopped before indexing them: the index lacks
        # files this run did not write
        logger.warning(
            "index holds %s rows, this run added %d, the output holds %d: rebuilding",
            existing.get("count"),
            count,
            total,
        )
        return None
    return count
