"""The region index: ``OUT/index/regions/``, a FAISS index over every committed region.

The same files and rules as the image index (``index.faiss``, ``ids.parquet``, ``manifest.json``
written last, the type chosen by ``choose_factory`` within the memory budget, S3 outputs staged
in a local folder), plus ``regions.parquet``: for FAISS position i the image ``id``, ``mask_id``
and ``bbox`` of the region. The index's own ids are ``json.dumps([id, mask_id])``: unambiguous
whatever characters the image ids hold. Rebuilt from ``regions/`` on each run that has regions.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vlray.storage import Location, list_files, write_bytes_atomic

REGIONS_DIR = "regions"
"""The region index's folder inside ``OUT/index/``."""
META_FILE = "regions.parquet"
INDEX_FILES = ("index.faiss", "ids.parquet", META_FILE, "manifest.json")  # manifest last


def region_key(item_id: str, mask_id: int) -> str:
    """The region index's id of mask ``mask_id`` of image ``item_id``."""
    return json.dumps([item_id, int(mask_id)], ensure_ascii=False)


def _region_batches(output: Location) -> Callable[[], Iterator[tuple[list[str], np.ndarray]]]:
    files = list_files(output.join("regions"), (".parquet",))

    def batches() -> Iterator[tuple[list[str], np.ndarray]]:
        for path in files:
            with output.fs.open_input_file(path) as f:
                table = pq.read_table(f, columns=["id", "mask_id", "embedding"])
            if not table.num_rows:
                continue
            emb = table.column("embedding").combine_chunks()
            vectors = emb.values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
            keys = [
                region_key(i, m)
                for i, m in zip(
                    table.column("id").to_pylist(), table.column("mask_id").to_pylist(), strict=True
                )
            ]
            yield keys, vectors.reshape(-1, emb.type.list_size)

    return batches


def _meta(output: Location) -> pa.Table:
    tables = []
    for path in list_files(output.join("regions"), (".parquet",)):
        with output.fs.open_input_file(path) as f:
            tables.append(pq.read_table(f, columns=["id", "mask_id", "bbox", "area"]))
    if not tables:
        return pa.table({"id": [], "mask_id": [], "bbox": [], "area": []})
    return pa.concat_tables(tables)


def build_region_index(
    output: Location, dim: int, memory_budget_bytes: int, manifest: dict[str, Any]
) -> dict[str, Any] | None:
    """(Re)builds ``OUT/index/regions/`` from every committed ``regions/`` part; returns its
    manifest, or None when there are no regions."""
    from vlray.index import build_index, choose_factory

    meta = _meta(output)
    if not meta.num_rows:
        return None
    index_loc = output.join("index", REGIONS_DIR)
    staging = index_loc.path if index_loc.is_local else tempfile.mkdtemp(prefix="vlray-regions-")
    try:
        os.makedirs(staging, exist_ok=True)
        # regions.parquet first: positions follow the same file order as the batches
        pq.write_table(meta, os.path.join(staging, META_FILE))
        result = build_index(
            _region_batches(output),
            staging,
            dim=dim,
            count=meta.num_rows,
            factory=choose_factory(meta.num_rows, dim, memory_budget_bytes),
            memory_budget_bytes=memory_budget_bytes,
            manifest={**manifest, "kind": "regions"},
        )
        if not index_loc.is_local:
            for name in INDEX_FILES:
                with open(os.path.join(staging, name), "rb") as f:
                    write_bytes_atomic(index_loc.join(name), f.read())
    finally:
        if not index_loc.is_local:
            shutil.rmtree(staging, ignore_errors=True)
    return result
