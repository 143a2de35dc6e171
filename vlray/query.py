"""Nearest-neighbour queries by text, image or id, with the job's own model and preprocessing."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vlray.config import S3Config
from vlray.encoders import Encoders
from vlray.families import Checkpoint, CheckpointError, Family, family_for, resolve_checkpoint
from vlray.families.fingerprint import fingerprint_difference, weights_fingerprint
from vlray.index import SearchIndex
from vlray.metadata import HitMetadata
from vlray.ops.decode import DecodeError, decode_image
from vlray.storage import (
    download_file,
    list_files,
    locate,
    read_bytes,
    resolved_endpoint,
    scrub,
)

logger = logging.getLogger(__name__)

INDEX_FILES = ("index.faiss", "ids.parquet", "manifest.json")


class QueryError(ValueError):
    """A query that cannot be answered; the message says why."""


def _local_index_dir(uri: str, s3: S3Config | None, files: tuple[str, ...] = ()) -> str:
    """The index folder on local disk; an ``s3://`` index is cached and reused while unchanged
    (its index files, and ``files`` beside them)."""
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
    (cache / "manifest.json").unlink(missing_ok=True)  # the old files are going
    refine = json.loads(manifest).get("refine") or {}
    vectors = (refine["file"],) if refine.get("file") else ()
    for name in (*files, *INDEX_FILES[:-1], *vectors):  # streamed: vectors may be many GB
        download_file(location.join(name), str(cache / name))
    (cache / ".manifest.json").write_bytes(manifest)  # last
    (cache / ".manifest.json").replace(cache / "manifest.json")
    return str(cache)


def _where_recorded(manifest: dict[str, Any]) -> list[tuple[str, str | None]]:
    """(name, revision) candidates for the recorded weights: the folder the job loaded, when it
    exists here, else the recorded name (a hub id, resolved at the recorded revision)."""
    path = manifest.get("model_path")
    if path and Path(path).is_dir():
        return [(path, None)]
    name = manifest.get("model")
    return [(name, manifest.get("revision"))] if name else []


def manifest_checkpoint(manifest: dict[str, Any], model: str | None = None) -> Checkpoint:
    """The checkpoint of exactly the weights an index was built with.

    From ``model`` when given (a folder or hub id), else the recorded folder, else the recorded
    hub id at the recorded revision (the Hugging Face cache when offline). Weights the job
    loaded from files must match the manifest's fingerprint; seeded random weights (manifest
    ``weights: random`` with no fingerprint) are rebuilt from the config and seed.

    Raises:
        QueryError: not found here, or a fingerprint mismatch; the message says what to pass.
    """
    recorded = manifest.get("fingerprint")
    pinned = "fingerprint" in manifest  # indexes from before fingerprints: trust the name
    seeded = manifest.get("weights") == "random" and (recorded is None)
    candidates = [(model, None)] if model else _where_recorded(manifest)
    if not candidates:
        raise QueryError("the index manifest names no model; pass --model PATH_OR_ID")
    name, revision = candidates[0]
    hint = "pass --model PATH_OR_ID with the checkpoint the index was built with"
    try:
        checkpoint = resolve_checkpoint(
            name,
            weights="random" if seeded else "pretrained",
            processor_overrides=manifest.get("processor") or {},
            seed=int(manifest.get("seed", 0)),
            revision=revision,
        )
    except CheckpointError as exc:
        where = manifest.get("model_path") or manifest.get("model")
        raise QueryError(
            f"cannot load the weights this index was built with ({where}): {exc}; {hint}"
        ) from None
    if pinned and not seeded:
        problem = fingerprint_difference(recorded, weights_fingerprint(checkpoint.path))
        if problem:
            raise QueryError(
                f"{checkpoint.path} holds other weights than the index was built with "
                f"({problem}); {hint}"
            )
    elif not pinned:
        logger.warning("index manifest has no weights fingerprint: using %s unverified", name)
    return checkpoint


class Searcher:
    """An index plus (lazily, in an :class:`~vlray.encoders.Encoders`) the model that made it."""

    def __init__(
        self, index: SearchIndex, s3: S3Config | None = None, model: str | None = None
    ) -> None:
        """``model``: the checkpoint (folder or hub id) to use instead of the recorded one; it
        must hold the same weights (same fingerprint)."""
        self.index = index
        self.model = model
        self.manifest: dict[str, Any] = index.manifest
        self.load_seconds = float(getattr(index, "load_seconds", 0.0))
        self.last_query_seconds = 0.0
        self.s3 = s3
        self.encoders = Encoders(self.resolve_family)
        self.metadata: HitMetadata | None = None
        """Kept input columns of the hits (set by ``open``)."""

    @classmethod
    def open(cls, uri: str, s3: S3Config | None = None, model: str | None = None) -> Searcher:
        """Loads the index at ``uri`` (a local folder or an ``s3://`` prefix); ``model``
        overrides where its weights are loaded from (see :func:`manifest_checkpoint`)."""
        try:
            searcher = cls(SearchIndex.load(_local_index_dir(uri, s3)), s3, model)
        except (OSError, ValueError) as exc:
            if isinstance(exc, QueryError):
                raise
            raise QueryError(f"cannot load index {uri}: {scrub(str(exc), s3)}") from None
        searcher.metadata = HitMetadata.for_index(uri, s3)
        return searcher

    def resolve_family(self) -> Family:
        """The model family of the weights the index was built with.

        Raises:
            QueryError: those weights cannot be found here, or differ from the recorded ones.
        """
        checkpoint = manifest_checkpoint(self.manifest, self.model)
        try:
            return family_for(checkpoint)
        except CheckpointError as exc:
            raise QueryError(str(exc)) from None

    @property
    def family(self) -> Family:
        """The model family (resolved once, on first use; see :meth:`resolve_family`)."""
        return self.encoders.family

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
        return self.metadata.attach(out) if self.metadata else out

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
        try:
            vector, probability = self.encoders.encode_text(text)
        except NotImplementedError as exc:  # MissingCapability: no text tower
            raise QueryError(str(exc)) from None
        self.last_query_seconds = time.perf_counter() - start
        return self._search(vector, k, probability)

    def by_image(self, uri: str, k: int) -> list[dict[str, Any]]:
        """Neighbours of an image file or URI, preprocessed exactly as the job does."""
        start = time.perf_counter()
        try:
            data = read_bytes(locate(uri, self.s3))
        except (OSError, FileNotFoundError) as exc:
            raise QueryError(f"cannot read image {uri}: {exc}") from None
        self.encoders.family  # noqa: B018 - a missing model is reported before decoding
        try:
            pixels = decode_image(data, max_pixels=200_000_000)
        except DecodeError as exc:
            raise QueryError(f"{uri}: {exc}") from None
        vector = self.encoders.encode_pixels([pixels])[0]  # the job's resize, crop, preprocess
        self.last_query_seconds = time.perf_counter() - start
        return self._search(vector, k)


__all__ = ["QueryError", "Searcher", "list_files"]
