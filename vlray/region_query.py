"""Region queries: the best regions (several per image allowed) for a text, an image or an id.

``RegionSearcher`` is a :class:`vlray.query.Searcher` over ``OUT/index/regions/``: the same model
(the one the manifest records), text and image queries encoded the same way; an ``--id`` query
uses the image's whole-image vector from ``OUT/index/``. Hits carry ``id``, ``mask_id`` (joins
``masks/``), ``bbox`` (x, y, w, h of the crop embedded) and ``score``.
"""

from __future__ import annotations

import json
import posixpath
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from vlray.config import S3Config
from vlray.index import SearchIndex
from vlray.query import QueryError, Searcher, _local_index_dir
from vlray.region_index import META_FILE, REGIONS_DIR, region_key
from vlray.storage import scrub

OVERSAMPLE = 8
"""With ``per_image``, candidates fetched per hit wanted (many regions of one image score alike)."""


class RegionSearcher(Searcher):
    """Searches regions; ``per_image`` (0: no limit) caps the hits of one image."""

    def __init__(
        self,
        regions: SearchIndex,
        images: SearchIndex,
        boxes: dict[str, list[int]],
        s3: S3Config | None = None,
        model: str | None = None,
        per_image: int = 0,
    ) -> None:
        super().__init__(regions, s3, model)
        self.images = images
        self.boxes = boxes
        self.per_image = per_image

    @classmethod
    def open(
        cls, uri: str, s3: S3Config | None = None, model: str | None = None, per_image: int = 0
    ) -> RegionSearcher:
        """Loads ``uri`` (the image index, as for :class:`Searcher`) and its regions/ index."""
        images = Searcher.open(uri, s3, model).index  # its own errors for the image index
        return cls.beside(images, uri, s3, model, per_image)

    @classmethod
    def beside(
        cls,
        images: SearchIndex,
        uri: str,
        s3: S3Config | None = None,
        model: str | None = None,
        per_image: int = 0,
    ) -> RegionSearcher:
        """The region index of the image index ``images`` loaded from ``uri``.

        Raises:
            QueryError: ``uri`` has no region index, or it cannot be read.
        """
        regions_uri = posixpath.join(uri.rstrip("/"), REGIONS_DIR)
        try:
            local = _local_index_dir(regions_uri, s3, files=(META_FILE,))
            regions = SearchIndex.load(local)
            meta = pq.read_table(
                posixpath.join(local, META_FILE), columns=["id", "mask_id", "bbox"]
            )
        except QueryError:  # no manifest.json there
            raise QueryError(
                f"{uri} has no region index (run the job with --set regions.enabled=true and "
                "sam.name)"
            ) from None
        except (OSError, ValueError) as exc:
            raise QueryError(f"cannot load region index of {uri}: {scrub(str(exc), s3)}") from None
        boxes = {
            region_key(i, m): b
            for i, m, b in zip(
                meta.column("id").to_pylist(),
                meta.column("mask_id").to_pylist(),
                meta.column("bbox").to_pylist(),
                strict=True,
            )
        }
        return cls(regions, images, boxes, s3, model, per_image)

    def search_vector(
        self, vector: np.ndarray, k: int, probability: Any = None, per_image: int | None = None
    ) -> list[dict[str, Any]]:
        """The ``k`` best regions of one unit vector (``per_image``: this query's cap, else the
        searcher's), each ``{"id", "mask_id", "bbox", "score"[, "probability"]}``."""
        cap = self.per_image if per_image is None else per_image
        wanted = k * OVERSAMPLE if cap else k
        hits = super()._search(vector, wanted, probability)
        out: list[dict[str, Any]] = []
        seen: dict[str, int] = {}
        for hit in hits:
            item_id, mask_id = json.loads(hit["id"])
            if cap and seen.get(item_id, 0) >= cap:
                continue
            seen[item_id] = seen.get(item_id, 0) + 1
            out.append({**hit, "id": item_id, "mask_id": mask_id, "bbox": self.boxes[hit["id"]]})
            if len(out) == k:
                break
        return out

    def _search(self, vector: np.ndarray, k: int, probability: Any = None) -> list[dict[str, Any]]:
        return self.search_vector(vector, k, probability)

    def by_id(self, item_id: str, k: int) -> list[dict[str, Any]]:
        """Regions nearest to an indexed image's whole-image vector."""
        vector = self.images.vector(item_id)
        if vector is None:
            raise QueryError(f"id {item_id!r} is not in the index")
        return self._search(np.asarray(vector), k)
