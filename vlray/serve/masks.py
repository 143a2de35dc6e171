"""id -> the item's SAM masks, from the job's ``OUT/masks/*.parquet`` (no scan per request).

At load, only the ``id`` column of each file is read: the writer stores an image's masks as one
run of consecutive rows, so each (file, first row, row count) run is indexed by its id. A
request then reads one file (a few recent files stay cached) and slices its run.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from vlray.index.search import IdLookup
from vlray.storage import Location, list_files

MASK_FIELDS = (
    "mask_id",
    "segmentation",
    "bbox",
    "area",
    "predicted_iou",
    "stability_score",
    "point",
    "prompt_index",
)


class MaskLookup:
    """The masks of each id in ``folder`` (``OUT/masks``); empty when there is none."""

    def __init__(self, folder: Location | None, cached_files: int = 4) -> None:
        self._folder = folder
        self._files: list[str] = []
        run_ids: list[pa.Array] = []
        file_of: list[np.ndarray] = []
        starts: list[np.ndarray] = []
        lengths: list[np.ndarray] = []
        if folder is not None and _is_dir(folder):
            for path in list_files(folder, (".parquet",)):
                with folder.fs.open_input_file(path) as f:
                    ids = pq.read_table(f, columns=["id"]).column("id").combine_chunks()
                n = len(ids)
                if n == 0:
                    continue
                change = np.zeros(n, dtype=bool)
                change[0] = True
                if n > 1:
                    differs = pc.not_equal(ids.slice(1), ids.slice(0, n - 1))
                    change[1:] = differs.to_numpy(zero_copy_only=False)
                first = np.flatnonzero(change)
                run_ids.append(ids.take(pa.array(first)).cast(pa.large_string()))
                file_of.append(np.full(len(first), len(self._files), dtype=np.int32))
                starts.append(first.astype(np.int64))
                lengths.append(np.diff(np.append(first, n)).astype(np.int64))
                self._files.append(path)
        empty = pa.array([], pa.large_string())
        self._lookup = IdLookup(pa.concat_arrays(run_ids) if run_ids else empty)
        self._file_of = np.concatenate(file_of) if file_of else np.empty(0, np.int32)
        self._start = np.concatenate(starts) if starts else np.empty(0, np.int64)
        self._length = np.concatenate(lengths) if lengths else np.empty(0, np.int64)
        self._cache: OrderedDict[int, pa.Table] = OrderedDict()
        self._cached_files = cached_files
        self._lock = threading.Lock()

    def __len__(self) -> int:
        """Images with at least one mask."""
        return len(self._lookup)

    def has(self, item_id: str) -> bool:
        return self._lookup.find(item_id) is not None

    def _table(self, file_index: int) -> pa.Table:
        with self._lock:
            table = self._cache.get(file_index)
            if table is not None:
                self._cache.move_to_end(file_index)
                return table
        assert self._folder is not None
        with self._folder.fs.open_input_file(self._files[file_index]) as f:
            table = pq.read_table(f)
        with self._lock:
            self._cache[file_index] = table
            while len(self._cache) > self._cached_files:
                self._cache.popitem(last=False)
        return table

    def masks(self, item_id: str) -> list[dict[str, Any]] | None:
        """The item's mask records (``masks/`` columns, ``id`` left out), or None without any."""
        row = self._lookup.find(item_id)
        if row is None:
            return None
        table = self._table(int(self._file_of[row]))
        part = table.slice(int(self._start[row]), int(self._length[row]))
        names = [name for name in MASK_FIELDS if name in part.column_names]
        return part.select(names).to_pylist()


def _is_dir(location: Location) -> bool:
    try:
        info = location.fs.get_file_info(location.path)
    except OSError:
        return False
    return info.type == pafs.FileType.Directory
