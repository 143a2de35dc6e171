"""Column names and Arrow schemas of everything vlray reads and writes."""

from __future__ import annotations

import hashlib

import pyarrow as pa

STAGES = ("read", "decode", "preprocess", "encode", "write")

TRANSIENT = "transient"
"""``stage`` of a row that failed for a reason that may pass (a network outage outlasting the
retries): never committed to ``errors/``; the row stays undone and a later run retries it."""
SYSTEMIC = "systemic"
"""``stage`` of a row lost to a failure of the job itself (a whole group failing with one error, a
programming or environment error): never committed; the run stops with exit 1."""
UNCOMMITTED_STAGES = (TRANSIENT, SYSTEMIC)

ROW_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("source", pa.string()),
        ("data", pa.binary()),
        ("uri", pa.string()),
        ("error", pa.string()),
        ("stage", pa.string()),
        ("prompts", pa.string()),
    ]
)
"""Rows between the read and decode stages: bytes in ``data`` or a URI to fetch in ``uri``."""

ERRORS_SCHEMA = pa.schema(
    [("id", pa.string()), ("stage", pa.string()), ("error", pa.string()), ("source", pa.string())]
)


def embeddings_schema(dim: int, dtype: str = "float32") -> pa.Schema:
    """``embeddings/*.parquet``: id, embedding fixed_size_list<float>[dim], width, height."""
    value = pa.float16() if dtype == "float16" else pa.float32()
    return pa.schema(
        [
            ("id", pa.string()),
            ("embedding", pa.list_(value, dim)),
            ("width", pa.int32()),
            ("height", pa.int32()),
        ]
    )


def empty_rows() -> pa.Table:
    """A zero-row table in ``ROW_SCHEMA``."""
    return ROW_SCHEMA.empty_table()


MASKS_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("mask_id", pa.int32()),
        (
            "segmentation",
            pa.struct([("size", pa.list_(pa.int32())), ("counts", pa.string())]),
        ),
        ("bbox", pa.list_(pa.float32())),
        ("area", pa.int64()),
        ("predicted_iou", pa.float32()),
        ("stability_score", pa.float32()),
        ("point", pa.list_(pa.float32())),
        ("prompt_index", pa.int32()),
    ]
)
"""``masks/*.parquet``: one row per mask, COCO RLE; ``point`` (automatic) or ``prompt_index``."""


TOKENS_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("grid_h", pa.int32()),
        ("grid_w", pa.int32()),
        ("dim", pa.int32()),
        ("tokens", pa.list_(pa.float32())),
    ]
)
"""``tokens/*.parquet`` (``model.store_tokens``): merged tokens, row-major (grid_h * grid_w, dim)."""


def thumbnail_name(item_id: str) -> str:
    """File name of an item's thumbnail under ``OUT/thumbnails/``: ``sha1(id).jpg``."""
    return hashlib.sha1(item_id.encode("utf-8")).hexdigest() + ".jpg"
