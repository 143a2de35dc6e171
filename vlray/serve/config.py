"""Settings of the search service (``jobs/serve.py``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

DEFAULT_HOST = "127.0.0.1"


@dataclass(frozen=True)
class ServeConfig:
    """Everything :func:`vlray.serve.create_app` needs; plain values so Ray can ship it.

    Attributes:
        index: The job's ``OUT/index`` folder (local path or ``s3://`` prefix).
        api_key: When set, every ``/api/*`` request must send it in the ``x-api-key`` header.
        reload_interval_s: Check ``manifest.json`` for a new index at most this often; 0 turns
            reloading off.
        max_upload_bytes: Largest accepted image upload (and request body).
        max_pixels: Largest accepted ``width * height`` of an uploaded image (header check,
            before any pixel is decoded).
        max_k: Largest ``k`` a request may ask for.
        max_offset: Largest paging ``offset``.
        max_text_chars: Longest text query.
        preload_models: Load the image and text encoders at start instead of on first use.
        model: Load the model from this folder or hub id instead of the one the index records
            (it must hold the same weights: the manifest's fingerprint is checked).
    """

    index: str
    api_key: str | None = None
    reload_interval_s: float = 10.0
    max_upload_bytes: int = 20 << 20
    max_pixels: int = 50_000_000
    max_k: int = 1000
    max_offset: int = 10_000
    max_text_chars: int = 1000
    preload_models: bool = False
    model: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (the Ray Serve deployment's constructor argument)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ServeConfig:
        """The inverse of :meth:`to_dict`; unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown serve settings: {sorted(unknown)}")
        return cls(**values)
