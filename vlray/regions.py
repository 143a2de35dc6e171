"""Regions: SAM masks turned into crops that an embedding family encodes like whole images.

Pure NumPy (no torch, no Ray). Per image: the masks kept (``select_masks``: best predicted IoU
first, at most ``max_per_image``, none under ``min_area`` of the image), each one's crop box
(``crop_box``: the mask's box grown by ``context`` of its size per side, clamped to the image,
rounded outward to whole pixels) and its pixels (``region_pixels``: the crop of the decoded,
EXIF-oriented frame; with ``background="gray"`` the pixels outside the mask take the
processor's mean colour). The crop then goes through the family's ``fit`` and ``preprocess``
exactly as a whole image of that size would, so its embedding is the reference model's on the
same crop of the original image.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from vlray.config import RegionsConfig
from vlray.ops.rle import rle_to_mask

RegionSettings = RegionsConfig
"""``regions.*`` (``vlray.config.RegionsConfig``): which masks become regions, how they are cropped."""


@dataclass(frozen=True)
class Region:
    """One region of an image: the mask it comes from and the crop actually embedded."""

    mask_id: int
    box: tuple[int, int, int, int]
    """(x, y, w, h) in original pixels, whole pixels, inside the image."""
    area: int
    score: float


def select_masks(
    records: Sequence[dict[str, Any]], height: int, width: int, settings: RegionSettings
) -> list[dict[str, Any]]:
    """The mask records that become regions: area >= ``min_area`` of the image, best
    ``predicted_iou`` first (ties by ``mask_id``), at most ``max_per_image``."""
    floor = settings.min_area * height * width
    kept = [r for r in records if r["area"] > 0 and r["area"] >= floor]
    kept.sort(key=lambda r: (-float(r["predicted_iou"]), int(r["mask_id"])))
    return kept[: settings.max_per_image]


def crop_box(
    bbox: Sequence[float], height: int, width: int, context: float
) -> tuple[int, int, int, int]:
    """(x, y, w, h) of the crop for a mask box ``bbox`` (x, y, w, h, in pixels): grown by
    ``context`` of its width / height on each side, clamped to the image, rounded outward to
    whole pixels, at least one pixel each way."""
    x, y, w, h = (float(v) for v in bbox)
    dx, dy = w * context, h * context
    x0 = max(0, math.floor(x - dx))
    y0 = max(0, math.floor(y - dy))
    x1 = min(width, math.ceil(x + w + dx))
    y1 = min(height, math.ceil(y + h + dy))
    x0, y0 = min(x0, width - 1), min(y0, height - 1)
    return x0, y0, max(1, x1 - x0), max(1, y1 - y0)


def mean_colour(image_mean: Sequence[float]) -> np.ndarray:
    """The processor's ``image_mean`` (0-1 per channel) as a uint8 RGB colour."""
    values = [float(v) for v in image_mean]
    if len(values) == 1:
        values *= 3
    return np.clip(np.rint(np.asarray(values[:3]) * 255.0), 0, 255).astype(np.uint8)


def region_pixels(
    frame: np.ndarray,
    box: tuple[int, int, int, int],
    segmentation: dict[str, Any] | None = None,
    fill: np.ndarray | None = None,
) -> np.ndarray:
    """The crop ``box`` of ``frame`` (H, W, 3 uint8, the decoded EXIF-oriented image) as a
    C-contiguous copy; with ``fill``, the pixels outside the mask ``segmentation`` (COCO RLE of
    the whole image) take that colour."""
    x, y, w, h = box
    crop = np.array(frame[y : y + h, x : x + w], order="C")
    if fill is not None:
        if segmentation is None:
            raise ValueError("a gray background needs the mask's segmentation")
        mask = rle_to_mask(segmentation)
        if mask.shape != frame.shape[:2]:
            raise ValueError(f"mask of shape {mask.shape} for an image of {frame.shape[:2]}")
        crop[~mask[y : y + h, x : x + w]] = fill
    return crop


def image_regions(
    frame: np.ndarray,
    records: Sequence[dict[str, Any]],
    settings: RegionSettings,
    image_mean: Sequence[float] = (0.5, 0.5, 0.5),
) -> list[tuple[Region, np.ndarray]]:
    """Every region of one image with its pixels, best first (see the module's docstring)."""
    height, width = frame.shape[:2]
    fill = mean_colour(image_mean) if settings.background == "gray" else None
    out = []
    for record in select_masks(records, height, width, settings):
        box = crop_box(record["bbox"], height, width, settings.context)
        pixels = region_pixels(frame, box, record.get("segmentation"), fill)
        region = Region(
            int(record["mask_id"]), box, int(record["area"]), float(record["predicted_iou"])
        )
        out.append((region, pixels))
    return out


def regions_schema(dim: int) -> pa.Schema:
    """``regions/*.parquet``: one row per region, joined to ``masks/`` by (id, mask_id)."""
    return pa.schema(
        [
            ("id", pa.string()),
            ("mask_id", pa.int32()),
            ("bbox", pa.list_(pa.float32())),  # whole pixels, as floats like masks/' bbox
            ("area", pa.int64()),
            ("score", pa.float32()),
            ("embedding", pa.list_(pa.float32(), dim)),
        ]
    )


def regions_table(
    ids: Sequence[str], regions: Sequence[Region], embeddings: np.ndarray
) -> pa.Table:
    """The rows of ``regions/`` for ``regions`` of images ``ids`` (one id per region) with their
    unit-norm ``embeddings`` (R, D)."""
    dim = int(embeddings.shape[1]) if embeddings.ndim == 2 else 0
    flat = pa.array(np.ascontiguousarray(embeddings, dtype=np.float32).reshape(-1))
    return pa.table(
        {
            "id": pa.array(list(ids), pa.string()),
            "mask_id": pa.array([r.mask_id for r in regions], pa.int32()),
            "bbox": pa.array([list(map(float, r.box)) for r in regions], pa.list_(pa.float32())),
            "area": pa.array([r.area for r in regions], pa.int64()),
            "score": pa.array([r.score for r in regions], pa.float32()),
            "embedding": pa.FixedSizeListArray.from_arrays(flat, dim),
        },
        schema=regions_schema(dim),
    )
