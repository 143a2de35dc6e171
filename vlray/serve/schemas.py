"""The service's request and response models (the OpenAPI schema).

No ``from __future__ import annotations``: pydantic and FastAPI read these annotations at runtime.
"""

from typing import Any

from pydantic import BaseModel, Field, create_model


class Hit(BaseModel):
    """One search result."""

    rank: int = Field(description="1-based rank over the whole result list (offset + i + 1)")
    id: str
    score: float = Field(description="cosine similarity (inner product of unit vectors)")
    probability: float | None = Field(
        None,
        description="the model's match probability, for text queries on models that define "
        "one (SigLIP's sigmoid of the scaled score)",
    )
    mask_id: int | None = Field(
        None, description="region searches: the region's SAM mask (joins /api/masks' mask_id)"
    )
    bbox: list[float] | None = Field(
        None,
        description="region searches: [x, y, w, h] in source pixels, the crop that was embedded",
    )
    width: int | None = Field(None, description="source image width (from embeddings/*.parquet)")
    height: int | None = Field(None, description="source image height")
    thumbnail: str | None = Field(None, description="link to the item's thumbnail, if one exists")
    masks: str | None = Field(None, description="link to the item's SAM masks, if it has any")
    metadata: dict[str, Any] | None = Field(
        None,
        description="the input columns the job kept (input.keep_columns), column -> JSON value; "
        "a WebDataset's caption is metadata.caption",
    )


class SearchResponse(BaseModel):
    """Hits of one query, best first."""

    kind: str = Field(description="text, image, id or vector")
    k: int
    offset: int
    min_score: float | None = None
    hits: list[Hit]
    next_offset: int | None = Field(
        None, description="offset of the next page; absent on the last page"
    )
    total_vectors: int = Field(description="vectors ranked: images, or regions with regions=true")
    regions: bool | None = Field(None, description="true when the hits are regions")
    index_created_at: str | None = None
    took_ms: float


class Item(BaseModel):
    """An indexed item."""

    id: str
    width: int | None = None
    height: int | None = None
    thumbnail: str | None = None
    masks: str | None = None
    metadata: dict[str, Any] | None = Field(
        None,
        description="the input columns the job kept (input.keep_columns), column -> JSON value; "
        "a WebDataset's caption is metadata.caption",
    )


class Segmentation(BaseModel):
    """COCO run-length encoding (column-major, pycocotools' compressed string)."""

    size: list[int] = Field(description="[height, width] of the source image")
    counts: str


class MaskRecord(BaseModel):
    """One mask of ``OUT/masks/*.parquet``."""

    mask_id: int
    segmentation: Segmentation
    bbox: list[float] = Field(description="[x, y, w, h] in source pixels (COCO)")
    area: int
    predicted_iou: float
    stability_score: float
    point: list[float] | None = Field(None, description="automatic mode: the prompt point")
    prompt_index: int | None = Field(None, description="prompted mode: the prompt's index")


class ItemMasks(BaseModel):
    """An item's SAM masks."""

    id: str
    width: int | None = None
    height: int | None = None
    masks: list[MaskRecord]


class IndexInfo(BaseModel):
    """The served index and the service's limits."""

    count: int
    dim: int
    factory: str | None = None
    model: str | None = None
    family: str | None = None
    weights: str | None = None
    created_at: str | None = None
    text_search: bool
    thumbnails: bool
    masks: int = Field(description="images with SAM masks in OUT/masks")
    regions: int = Field(0, description="region vectors searchable with regions=true (0: none)")
    max_k: int
    max_offset: int
    max_upload_bytes: int
    max_pixels: int
    api_key_required: bool


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    status: str
    count: int
    created_at: str | None = None


def vector_query_model(max_k: int, max_offset: int) -> Any:
    """The body model of ``POST /api/search/vector`` (its limits come from the config)."""
    return create_model(
        "VectorQuery",
        __doc__="A raw query vector (normalised to unit length by the server).",
        vector=(list[float], Field(min_length=1, max_length=1 << 16)),
        k=(int, Field(10, ge=1, le=max_k)),
        offset=(int, Field(0, ge=0, le=max_offset)),
        min_score=(float | None, Field(None, ge=-1.0, le=1.0)),
        regions=(bool, Field(False, description="search the SAM regions instead of the images")),
        per_image=(int, Field(0, ge=0, le=max_k, description="with regions: cap per image")),
    )
