"""The region index: ``OUT/index/regions/``, a FAISS index over every committed region.

The same files and rules as the image index (``index.faiss``, ``ids.parquet``, ``manifest.json``
written last, the type chosen by ``choose_factory`` within the memory budget, S3 outputs staged
in a local folder), plus ``regions.parquet``: for FAISS position i the image ``id``, ``mask_id``
and ``bbox`` of the region. The index's own ids are ``json.dumps([id, mask_id])``: unambiguous
whatever characters the image ids hold. Like the image index it is updated incrementally: a run
adds the region parts it committed (``regions.parquet`` gains their rows, in the same order) and
rebuilds from every part only when the type no longer fits, the model changed, or the index
lacks parts an earlier run committed.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from vlray.index import add_to_index, build_index, choose_factory
from vlray.index.build import Batches
from vlray.index.refine import VECTORS_FILE
from vlray.index.update import (
    committed_files,
    count_rows,
    iter_embeddings,
    read_manifest,
    rows_to_add,
    run_entry,
    same_model,
    stage_index,
    staged_index,
)
from vlray.storage import Location

REGIONS_DIR = "regions"
"""The region index's folder inside ``OUT/index/``."""
META_FILE = "regions.parquet"
META_COLUMNS = ("id", "mask_id", "bbox", "area")
"""``regions.parquet``'s columns: the region at each FAISS position."""
INDEX_FILES = (
    "index.faiss",
    "ids.parquet",
    VECTORS_FILE,
    META_FILE,
    "manifest.json",
)  # manifest last

logger = logging.getLogger(__name__)


def region_key(item_id: str, mask_id: int) -> str:
    """The region index's id of mask ``mask_id`` of image ``item_id``."""
    return json.dumps([item_id, int(mask_id)], ensure_ascii=False)


def _region_ids(batch: pa.RecordBatch) -> list[str]:
    ids, masks = batch.column("id").to_pylist(), batch.column("mask_id").to_pylist()
    return [region_key(i, m) for i, m in zip(ids, masks, strict=True)]


def _region_batches(output: Location, paths: list[str]) -> Batches:
    """``(region keys, vectors)`` of the parts ``paths``, one Parquet batch at a time."""
    return iter_embeddings(output, paths, key=(("id", "mask_id"), _region_ids))


def _meta_writer(
    output: Location, paths: list[str], keep: str | None = None
) -> Callable[[Path], None]:
    """Writes ``regions.parquet`` (atomically, before the manifest): the rows of ``keep`` (the
    index's current file, when adding) then the metadata of ``paths`` in their order, one
    batch at a time."""

    def write(out: Path) -> None:
        final = out / META_FILE
        tmp = out / f".{META_FILE}.{os.getpid()}.tmp"
        writer: pq.ParquetWriter | None = None
        try:
            for batch in _meta_batches(output, paths, keep):
                if writer is None:
                    writer = pq.ParquetWriter(tmp, batch.schema)
                writer.write_table(pa.Table.from_batches([batch]).cast(writer.schema))
            if writer is None:  # callers index at least one region
                raise ValueError("no region metadata to write")
            writer.close()
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)

    return write


def _meta_batches(output: Location, paths: list[str], keep: str | None) -> Iterator[pa.RecordBatch]:
    if keep is not None:
        yield from pq.ParquetFile(keep).iter_batches(batch_size=1 << 16)
    for path in paths:
        with output.fs.open_input_file(path) as f:
            yield from pq.ParquetFile(f).iter_batches(batch_size=1 << 16, columns=META_COLUMNS)


def build_region_index(
    output: Location,
    dim: int,
    memory_budget_bytes: int,
    manifest: dict[str, Any],
    new_files: list[str] | None = None,
) -> dict[str, Any] | None:
    """Brings ``OUT/index/regions/`` up to date with the committed ``regions/`` parts.

    Args:
        new_files: Names of the parts this run committed: added to the existing index when it
            still fits (same model, same kind of index for the new total). None: rebuild.

    Returns:
        The manifest plus ``mode`` (``add`` or ``rebuild``), or None when there are no regions.
    """
    paths = committed_files(output, "regions")
    total = count_rows(output, paths)
    if not total:
        return None
    index_loc = output.join("index", REGIONS_DIR)
    existing = same_model(read_manifest(index_loc), manifest)
    new_paths = None if new_files is None else committed_files(output, "regions", new_files)
    count = rows_to_add(
        output, existing, new_paths, dim=dim, total=total, budget=memory_budget_bytes
    )
    fields = {**manifest, "kind": "regions"}
    with staged_index(index_loc, INDEX_FILES, prefix="vlray-regions-") as staging:
        result = None
        if count is not None and existing is not None and new_paths is not None:
            result = _add(output, index_loc, staging, existing, new_paths, count, dim, fields)
        if result is None:
            added = total if new_paths is None else count_rows(output, new_paths)
            runs = list(existing.get("runs", [])) if existing else []
            result = _rebuild(
                output, staging, paths, total, dim, memory_budget_bytes, fields, runs, added
            )
    logger.info("region index %s: %s over %d regions", result["mode"], result.get("factory"), total)
    return result


def _add(
    output: Location,
    index_loc: Location,
    staging: str,
    existing: dict[str, Any],
    new_paths: list[str],
    count: int,
    dim: int,
    fields: dict[str, Any],
) -> dict[str, Any] | None:
    """The new parts added to the existing index; None when its ``regions.parquet`` does not
    hold a row per vector (then the caller rebuilds)."""
    keep = os.path.join(staging, META_FILE)
    try:  # a missing or unreadable metadata file (on S3: staging fails) means rebuild
        if not index_loc.is_local:
            stage_index(index_loc, staging, INDEX_FILES)
        held = pq.ParquetFile(keep).metadata.num_rows
    except (OSError, pa.ArrowInvalid):
        held = -1
    if held != int(existing.get("count", 0)):
        logger.warning(
            "%s holds %d rows for %s regions: rebuilding", META_FILE, held, existing.get("count")
        )
        return None
    runs = [*existing.get("runs", []), run_entry(count, "add", existing.get("factory"))]
    result = add_to_index(
        _region_batches(output, new_paths),
        staging,
        dim=dim,
        count=count,
        manifest={**fields, "runs": runs},
        before_manifest=_meta_writer(output, new_paths, keep),
    )
    return {**result, "mode": "add"}


def _rebuild(
    output: Location,
    staging: str,
    paths: list[str],
    total: int,
    dim: int,
    budget: int,
    fields: dict[str, Any],
    runs: list[dict[str, Any]],
    added: int,
) -> dict[str, Any]:
    """The region index built from every committed part."""
    factory = choose_factory(total, dim, budget)
    result = build_index(
        _region_batches(output, paths),
        staging,
        dim=dim,
        count=total,
        factory=factory,
        memory_budget_bytes=budget,
        manifest={**fields, "runs": [*runs, run_entry(added, "rebuild", factory)]},
        before_manifest=_meta_writer(output, paths),
    )
    return {**result, "mode": "rebuild"}
