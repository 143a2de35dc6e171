"""Nearest-neighbour queries by text, image or id, with the job's own model and preprocessing."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vlray.config import S3Config
from vlray.families import CheckpointError, family_for, resolve_checkpoint
from vlray.index import SearchIndex
from vlray.ops.decode import DecodeError, decode_image
from vlray.ops.resize import resize_uint8
from vlray.storage import list_files, locate, read_bytes, resolved_endpoint, scrub

INDEX_FILES = ("index.faiss", "ids.parquet", "manifest.json")


class QueryError(ValueError):
    """A query that cannot be answered; the message says why."""


def _local_index_dir(uri: str, s3: S3Config | None) -> str:
    """The index folder on local disk; an ``s3://`` index is cached and reused while unchanged."""
    location = locate(uri, s3)
    if location.is_local:
        if not os.path.exists(os.path.join(location.path, "manifest.json")):
            raise QueryError(f"{uri} is not a vlray index (no manifest.json)")
        return location.path
    from vlray.demo import demo_home

    # keyed by endpoint + URI: the same bucket name on two stores must not share a cache
    key = f"{resolved_endpoint(s3)}|{location.uri}"
    cache = demo_home() / "index-cache" / hashlib.sha256(key.encode()).hexdigest()[:16]
    cache.mkdir(parents=True, exist_ok=True)
    try:
        manifest = read_bytes(location.join("manifest.json"))
    except FileNotFoundError:
        raise QueryError(f"{uri} is not a vlray index (no manifest.json)") from None
    # the job uploads manifest.json last and the cache writes it last: an equal manifest means
    # every file in the cache is the one the manifest belongs to
    if (cache / "manifest.json").exists() and (cache / "manifest.json").read_bytes() == manifest:
        return str(cache)
    for name in INDEX_FILES:
        (cache / f".{name}").write_bytes(
            read_bytes(location.join(name)) if name != "manifest.json" else manifest
        )
        (cache / f".{name}").replace(cache / name)
    return str(cache)


class Searcher:
    """An index plus (lazily) the model that made it."""

    def __init__(self, index: SearchIndex, s3: S3Config | None = None) -> None:
        self.index = index
        self.manifest: dict[str, Any] = index.manifest
        self.load_seconds = float(getattr(index, "load_seconds", 0.0))
        self.last_query_seconds = 0.0
        self.s3 = s3
        self._family: Any = None
        self._image_encoder: Any = None
        self._text_encoder: Any = None

    @classmethod
    def open(cls, uri: str, s3: S3Config | None = None) -> Searcher:
        """Loads the index at ``uri`` (a local folder or an ``s3://`` prefix)."""
        try:
            return cls(SearchIndex.load(_local_index_dir(uri, s3)), s3)
        except (OSError, ValueError) as exc:
            if isinstance(exc, QueryError):
                raise
            raise QueryError(f"cannot load index {uri}: {scrub(str(exc), s3)}") from None

    @property
    def family(self) -> Any:
        """The model family, from the manifest (loaded on first use)."""
        if self._family is None:
            m = self.manifest
            name = (
                m.get("model_path")
                if m.get("model_path") and Path(m["model_path"]).exists()
                else m.get("model")
            )
            try:
                checkpoint = resolve_checkpoint(
                    name,
                    weights="random"
                    if m.get("weights") == "random" and not Path(name).exists()
                    else "pretrained"
                    if any(Path(name).glob("*.safetensors"))
                    else "random",
                    processor_overrides=m.get("processor") or {},
                    seed=int(m.get("seed", 0)),
                )
            except CheckpointError as exc:
                raise QueryError(str(exc)) from None
            self._family = family_for(checkpoint)
        return self._family

    def _search(self, vector: np.ndarray, k: int, probability: Any = None) -> list[dict[str, Any]]:
        start = time.perf_counter()
        hits = self.index.search(vector.reshape(1, -1).astype(np.float32), k)[0]
        self.last_query_seconds += time.perf_counter() - start
        out = []
        for hit_id, score in hits:
            row: dict[str, Any] = {"id": hit_id, "score": float(score)}
            if probability is not None:
                row["probability"] = float(probability(torch.tensor(score)).item())
            out.append(row)
        return out

    def by_id(self, item_id: str, k: int) -> list[dict[str, Any]]:
        """Neighbours of an indexed item, by its stored vector."""
        vector = self.index.vector(item_id)
        if vector is None:
            raise QueryError(f"id {item_id!r} is not in the index")
        return self._search(np.asarray(vector), k)

    def by_text(self, text: str, k: int) -> list[dict[str, Any]]:
        """Neighbours of a text query (SigLIP families): cosine score and SigLIP's probability."""
        if not text.strip():
            raise QueryError("empty text query")
        start = time.perf_counter()
        if self._text_encoder is None:
            try:
                self._text_encoder = self.family.load_text_encoder(
                    torch.device("cpu"), torch.float32
                )
            except NotImplementedError as exc:
                raise QueryError(str(exc)) from None
        vector = self._text_encoder.encode([text])[0].numpy()
        self.last_query_seconds = time.perf_counter() - start
        return self._search(vector, k, self._text_encoder.probability)

    def by_image(self, uri: str, k: int) -> list[dict[str, Any]]:
        """Neighbours of an image file or URI, preprocessed exactly as the job does."""
        start = time.perf_counter()
        try:
            data = read_bytes(locate(uri, self.s3))
        except (OSError, FileNotFoundError) as exc:
            raise QueryError(f"cannot read image {uri}: {exc}") from None
        family = self.family
        try:
            pixels = decode_image(data, max_pixels=200_000_000)
        except DecodeError as exc:
            raise QueryError(f"{uri}: {exc}") from None
        size = family.target_size(pixels.shape[0], pixels.shape[1])
        resized = resize_uint8(pixels, size, family.interpolation)
        if self._image_encoder is None:
            self._image_encoder = family.load_encoder(torch.device("cpu"), torch.float32)
        inputs = family.preprocess(torch.from_numpy(resized).permute(2, 0, 1)[None])
        vector = self._image_encoder.encode(inputs)[0].numpy()
        self.last_query_seconds = time.perf_counter() - start
        return self._search(vector, k)


__all__ = ["QueryError", "Searcher", "list_files"]
