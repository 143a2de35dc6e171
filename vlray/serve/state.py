"""The served index and models: loaded once, swapped atomically when a new index appears.

A request takes one :class:`Snapshot` reference at its start and uses only that, so a swap
(a single attribute assignment, atomic in Python) never mixes two indexes inside one request
and never makes a request fail: the old snapshot stays alive until its last request ends.
"""

from __future__ import annotations

import json
import logging
import posixpath
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from vlray.encoders import Encoders
from vlray.index.build import MANIFEST_FILE
from vlray.index.search import IdLookup
from vlray.query import QueryError, Searcher
from vlray.region_index import REGIONS_DIR
from vlray.region_query import RegionSearcher
from vlray.schema import thumbnail_name
from vlray.serve.masks import MaskLookup
from vlray.storage import Location, list_files, locate, read_bytes

logger = logging.getLogger(__name__)

# Manifest keys that decide which model (and preprocessing) a query must use.
_MODEL_KEYS = (
    "model",
    "model_path",
    "revision",
    "fingerprint",
    "family",
    "weights",
    "seed",
    "processor",
)


class ItemSizes:
    """id -> (width, height) from the job's ``embeddings/*.parquet`` (Arrow columns)."""

    def __init__(self, table: pa.Table | None) -> None:
        if table is None or table.num_rows == 0:
            table = pa.table(
                {
                    "id": pa.array([], pa.large_string()),
                    "width": pa.array([], pa.int64()),
                    "height": pa.array([], pa.int64()),
                }
            )
        self._ids = IdLookup(table.column("id").cast(pa.large_string()).combine_chunks())
        self._width = table.column("width").combine_chunks().fill_null(-1).to_numpy()
        self._height = table.column("height").combine_chunks().fill_null(-1).to_numpy()

    def __len__(self) -> int:
        return len(self._ids)

    def get(self, item_id: str) -> tuple[int | None, int | None]:
        """(width, height) of an item, (None, None) when unknown."""
        i = self._ids.find(item_id)
        if i is None:
            return None, None
        w, h = int(self._width[i]), int(self._height[i])
        return (w if w >= 0 else None, h if h >= 0 else None)

    @classmethod
    def load(cls, folder: Location) -> ItemSizes:
        """Reads id/width/height of every ``*.parquet`` under ``folder`` (missing: empty)."""
        tables = []
        for path in list_files(folder, (".parquet",)):
            table = pq.read_table(path, columns=["id", "width", "height"], filesystem=folder.fs)
            tables.append(
                pa.table(
                    {
                        "id": table.column("id").cast(pa.large_string()),
                        "width": table.column("width").cast(pa.int64()),
                        "height": table.column("height").cast(pa.int64()),
                    }
                )
            )
        if not tables:
            return cls(None)
        return cls(pa.concat_tables(tables))


Models = Encoders
"""The served model's encoders: the same holder as the query CLI's (:class:`Encoders`)."""


@dataclass
class Snapshot:
    """One loaded index with everything a request needs about it."""

    searcher: Searcher
    models: Encoders
    sizes: ItemSizes
    thumbnails: Location | None
    manifest_bytes: bytes
    masks: MaskLookup = field(default_factory=lambda: MaskLookup(None))
    regions: RegionSearcher | None = None
    """The region index beside the image index (``index/regions/``), when the job made one."""
    loaded_at: float = field(default_factory=time.time)

    @property
    def manifest(self) -> dict[str, Any]:
        return self.searcher.manifest

    @property
    def count(self) -> int:
        return self.searcher.index.count

    @property
    def dim(self) -> int:
        return self.searcher.index.dim

    def search(self, vector: np.ndarray, n: int) -> list[tuple[str, float]]:
        """The ``n`` best (id, score) pairs for one unit vector."""
        return self.searcher.index.search(np.asarray(vector, np.float32).reshape(1, -1), n)[0]

    def thumbnail(self, item_id: str) -> Location | None:
        """The item's thumbnail file when ``OUT/thumbnails/<sha1(id)>.jpg`` exists."""
        if self.thumbnails is None:
            return None
        location = self.thumbnails.join(thumbnail_name(item_id))
        try:
            info = location.fs.get_file_info(location.path)
        except OSError:
            return None
        return location if info.type == pafs.FileType.File else None


_REGIONS_SEPARATOR = b"\n\x00regions\x00\n"  # never inside a JSON document


def _parent_uri(uri: str) -> str:
    uri = uri.rstrip("/")
    if uri.startswith("s3://"):
        return posixpath.dirname(uri)
    return posixpath.dirname(locate(uri).path)


def _warm(searcher: Searcher) -> None:
    """Builds SearchIndex's lazy id lookup (and direct map) before the index is shared.

    ``SearchIndex.position``/``vector`` initialise these on first call without a lock; doing it
    here, on the loading thread, keeps concurrent first requests from racing on them.
    """
    index = searcher.index
    index.position("")
    if index.count:
        hits = index.search(np.zeros((1, index.dim), np.float32), 1)[0]
        if hits:
            try:
                index.vector(hits[0][0])
            except NotImplementedError:
                pass


def _model_key(manifest: dict[str, Any]) -> str:
    return json.dumps({k: manifest.get(k) for k in _MODEL_KEYS}, sort_keys=True, default=str)


class IndexHolder:
    """Owns the current :class:`Snapshot` and replaces it when the index on disk changes.

    ``maybe_reload()`` is cheap and non-blocking: at most every ``interval`` seconds it starts
    one background check, which reads ``manifest.json`` and, when its bytes changed (a new
    ``created_at``), loads the new index fully and then swaps the reference.
    """

    def __init__(
        self,
        uri: str,
        interval: float,
        on_swap: Callable[[Snapshot], None] | None = None,
        on_model_load: Callable[[str, float], None] | None = None,
        on_reload_result: Callable[[str], None] | None = None,
        model: str | None = None,
    ) -> None:
        self.uri = uri
        self.model = model
        self.interval = interval
        self._root = locate(uri)
        self._out = locate(_parent_uri(uri))
        self._on_swap = on_swap or (lambda s: None)
        self._on_model_load = on_model_load or (lambda kind, s: None)
        self._on_result = on_reload_result or (lambda r: None)
        self._snapshot: Snapshot | None = None
        self.error: str | None = None
        self._lock = threading.Lock()  # one check at a time
        self._last_check = 0.0
        self._checking = False

    @property
    def snapshot(self) -> Snapshot | None:
        """The current snapshot (None until the first successful load)."""
        return self._snapshot

    def _read_manifest(self) -> bytes | None:
        """The image index's manifest bytes, then the region index's (when there is one): a
        change of either is a new index to load."""
        try:
            manifest = read_bytes(self._root.join(MANIFEST_FILE))
        except (OSError, FileNotFoundError):
            return None
        try:
            regions = read_bytes(self._root.join(REGIONS_DIR).join(MANIFEST_FILE))
        except (OSError, FileNotFoundError):
            return manifest
        return manifest + _REGIONS_SEPARATOR + regions

    def _regions(self, searcher: Searcher, manifest_bytes: bytes) -> RegionSearcher | None:
        if _REGIONS_SEPARATOR not in manifest_bytes:
            return None
        try:
            regions = RegionSearcher.beside(searcher.index, self.uri, model=self.model)
        except QueryError as exc:  # the images stay searchable
            logger.warning("serving without regions: %s", exc)
            return None
        regions.encoders = searcher.encoders  # text and image queries encode once for both
        return regions

    def _load(self, manifest_bytes: bytes) -> Snapshot:
        searcher = Searcher.open(self.uri, model=self.model)
        _warm(searcher)
        current = self._snapshot
        if current is not None and _model_key(current.manifest) == _model_key(searcher.manifest):
            models = current.models  # same model: keep the encoders already in memory
        else:
            models = Encoders(searcher.resolve_family, self._on_model_load)
        searcher.encoders = models  # one holder per model, shared by the snapshot's searcher
        sizes = ItemSizes.load(self._out.join("embeddings"))
        thumbs = self._out.join("thumbnails")
        info = thumbs.fs.get_file_info(thumbs.path)
        return Snapshot(
            searcher=searcher,
            models=models,
            sizes=sizes,
            thumbnails=thumbs if info.type == pafs.FileType.Directory else None,
            manifest_bytes=manifest_bytes,
            masks=MaskLookup(self._out.join("masks")),
            regions=self._regions(searcher, manifest_bytes),
        )

    def check(self) -> bool:
        """Loads the index if ``manifest.json`` changed; True when a new snapshot went live."""
        with self._lock:
            self._last_check = time.monotonic()
            before = self._read_manifest()
            if before is None:
                if self._snapshot is None:
                    self.error = f"{self.uri} has no manifest.json (yet)"
                return False
            if self._snapshot is not None and before == self._snapshot.manifest_bytes:
                return False
            try:
                snapshot = self._load(before)
            except (QueryError, OSError, ValueError, pa.ArrowException) as exc:
                self.error = f"cannot load index {self.uri}: {exc}"
                logger.warning("%s (keeping the current index)", self.error)
                self._on_result("error")
                return False
            # A build that overlapped the load deletes manifest.json first and writes it last:
            # an unchanged manifest proves the files we read belong together.
            image_manifest = json.loads(before.split(_REGIONS_SEPARATOR)[0])
            if self._read_manifest() != before or snapshot.searcher.manifest != image_manifest:
                logger.info("index changed while loading; retrying at the next check")
                self._last_check = 0.0
                self._on_result("retry")
                return False
            self._snapshot = snapshot  # the atomic swap
            self.error = None
            self._on_result("ok")
            self._on_swap(snapshot)
            logger.info(
                "serving index %s: %d vectors (created %s)",
                self.uri,
                snapshot.count,
                snapshot.manifest.get("created_at"),
            )
            return True

    def maybe_reload(self) -> None:
        """Starts a background check when the last one is older than the interval."""
        if self.interval <= 0 and self._snapshot is not None:
            return
        now = time.monotonic()
        if self._checking or now - self._last_check < max(self.interval, 0.05):
            return
        self._checking = True
        self._last_check = now

        def run() -> None:
            try:
                self.check()
            except Exception:  # never let the watcher thread die silently
                logger.exception("index reload check failed")
            finally:
                self._checking = False

        threading.Thread(target=run, name="vlray-index-reload", daemon=True).start()
