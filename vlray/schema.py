"""Column names and Arrow schemas of everything vlray reads and writes."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

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


class Col:
    """Names of the columns passed between the pipeline's stages, declared once.

    Every stage reads the columns it needs, drops the ones it consumes and adds the ones it
    produces; any other column (kept input metadata, ``input.keep_columns``) passes through
    every stage unchanged, in the same row order as the stage's output
    (:func:`pass_through`).
    """

    ID = "id"
    SOURCE = "source"
    DATA = "data"
    """read -> decode: the encoded image bytes (or null with a ``URI`` to fetch)."""
    URI = "uri"
    ERROR = "error"
    STAGE = "stage"
    PROMPTS = "prompts"
    """JSON of the row's SAM prompt cells (points, labels, boxes), '' without."""
    WIDTH = "width"
    HEIGHT = "height"
    ENCODED = "encoded"
    """decode -> encode (``input.decode: gpu``): 1 where the pixels cell holds JPEG bytes."""
    THUMB = "thumb"
    FRAME = "frame"
    """decode -> regions (``regions.enabled``): the decoded frame, uint8 RGB, height x width x 3."""
    EMBEDDING = "embedding"
    TOKENS = "tokens"
    TOKEN_GRID = "token_grid"
    MASKS = "masks"
    """JSON list of a row's mask records."""
    MASK_COUNT = "mask_count"


class StatCol:
    """Per-row statistics columns (numbers), summed by the writer into typed counts."""

    GROUP_SIZE = "group_size"
    """int32: rows in the same-shape group the row was encoded in (0: not encoded)."""
    BATCH_ROWS = "batch_rows"
    """int32: rows in the encoder batch (sum of 1 / batch_rows = batches)."""
    DECODE_S = "decode_s"
    ENCODE_S = "encode_s"
    MASK_S = "mask_s"
    """float64 seconds: each row's share of its batch's time in that stage."""


@dataclass(frozen=True)
class ImageColumns:
    """The resized-image columns of one model head (decode -> its encoder): packed uint8
    pixels and the target shape ``th`` x ``tw``, under a prefix per head."""

    prefix: str

    @property
    def pixels(self) -> str:
        return f"{self.prefix}pixels"

    @property
    def th(self) -> str:
        return f"{self.prefix}th"

    @property
    def tw(self) -> str:
        return f"{self.prefix}tw"

    @property
    def names(self) -> tuple[str, str, str]:
        """(pixels, th, tw): what the head's encoder consumes."""
        return self.pixels, self.th, self.tw


EMBEDDING_IMAGES = ImageColumns("")
"""The embedding model's resized images."""
MASK_IMAGES = ImageColumns("sam_")
"""The mask model's resized images (the same decode feeds both)."""


def pass_through(batch: dict[str, Any], consumed: tuple[str, ...]) -> dict[str, Any]:
    """The batch's columns minus ``consumed``: the base of a stage's output, to which it adds
    (or in which it replaces) the columns it produces."""
    return {k: v for k, v in batch.items() if k not in consumed}
