"""Ray Data model stages: thin adapters from Arrow / NumPy batches to the pure code in vlray.

Each stage turns per-row problems into ``error`` / ``stage`` values and passes them on, so a bad
image never raises across a stage boundary and every input row reaches the writer exactly once.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from vlray.config import InputConfig, S3Config, SamConfig
from vlray.families import Capability, Checkpoint, UnsupportedImage, family_for
from vlray.ops.decode import (
    DecodeError,
    decode_draft,
    decode_pixels,
    large_pil_blocks,
    plain_jpeg_size,
)
from vlray.ops.thumbnail import make_thumbnail, thumbnail_size
from vlray.pipeline.files import one_line
from vlray.pipeline.masking import mask_batch
from vlray.pipeline.runtime import (
    INPUT_ERRORS,
    decode_group,
    encode_batch,
    group_failure,
    resolve_dtype,
    stack_group,
    to_device,
)
from vlray.schema import EMBEDDING_IMAGES, MASK_IMAGES, TRANSIENT, Col, StatCol, pass_through
from vlray.storage import TransientError, fetch_bytes, scrub

logger = logging.getLogger(__name__)

__all__ = [
    "INPUT_ERRORS",
    "DecodeEncodeStage",
    "DecodeStage",
    "EncodeStage",
    "MaskStage",
    "decode_group",
    "group_failure",
    "resolve_dtype",
    "stack_group",
    "to_device",
]


class DecodeStage:
    """Fetch, probe and decode each image once; uint8-resize it to each model's target shape.

    Output rows are sorted by the embedding model's target shape, so encoder batches split into
    few same-shape groups. Per model (prefix ``""`` or ``"sam_"``): ``th``, ``tw``, ``pixels``;
    with ``thumbnails`` (a longest side), ``thumb``: JPEG bytes of a preview.
    """

    def __init__(
        self,
        checkpoint: Checkpoint | None,
        max_pixels: int,
        s3: S3Config,
        sam_checkpoint: Checkpoint | None = None,
        decode: str = "exact",
        thumbnails: int = 0,
        max_bytes: int = InputConfig.max_bytes,
        frames: bool = False,
    ) -> None:
        torch.set_num_threads(1)
        self.max_bytes = max_bytes
        self.frames = frames  # regions: the decoded frame itself travels on (uint8 RGB bytes)
        large_pil_blocks()
        self.thumbnails = thumbnails
        self.draft = decode == "draft"
        self.gpu = decode == "gpu"  # plain JPEGs pass through encoded, for the encoder's GPU
        # one decode feeds every model: the embedding model's images, the mask model's
        self.families = [
            (images, family_for(c))
            for images, c in ((EMBEDDING_IMAGES, checkpoint), (MASK_IMAGES, sam_checkpoint))
            if c is not None
        ]
        self.max_pixels = max_pixels
        self.s3 = s3
        self._pool: ThreadPoolExecutor | None = None

    def _needed(self, height: int, width: int) -> tuple[int, int]:
        """The largest resize over the models (draft decoding never goes below it)."""
        try:
            sizes = [family.resize_size(height, width) for _, family in self.families]
        except (UnsupportedImage, ValueError):
            return height, width  # the error is reported by the resize step
        if self.thumbnails:
            sizes.append(thumbnail_size(height, width, self.thumbnails))
        return max(h for h, _ in sizes), max(w for _, w in sizes)

    def _fetch(self, uri: str) -> bytes | tuple[str, str]:
        """The bytes at ``uri`` (transient errors retried), or (one-line reason, stage): stage
        ``read`` for a permanent problem, ``transient`` for an outage that outlasted the retries."""
        try:
            return fetch_bytes(uri, self.s3, max_bytes=self.max_bytes)
        except FileNotFoundError:
            return f"missing file or object: {scrub(uri, self.s3)}", "read"
        except PermissionError:
            return f"access denied: {scrub(uri, self.s3)}", "read"
        except TransientError as exc:
            return f"unreachable for now: {scrub(one_line(exc), self.s3)}", TRANSIENT
        except OSError as exc:
            return f"cannot read: {scrub(one_line(exc), self.s3)}", "read"

    def _fetch_all(self, uris: list[str]) -> list[bytes | tuple[str, str]]:
        """Fetches a batch's URIs concurrently, at most ``s3.fetch_concurrency`` in flight; rows
        failing transiently are tried again in rounds (waits 2, 4, 8, ... s) for up to
        ``s3.transient_retry_s`` before they are left undone."""
        results = self._fetch_round(uris)
        deadline = time.monotonic() + self.s3.transient_retry_s
        wait = 2.0
        while True:
            again = [i for i, r in enumerate(results) if isinstance(r, tuple) and r[1] == TRANSIENT]
            if not again or time.monotonic() + wait > deadline:
                return results
            logger.warning("%d images unreachable, retrying in %.0f s", len(again), wait)
            time.sleep(wait)
            wait *= 2
            for i, r in zip(again, self._fetch_round([uris[i] for i in again]), strict=True):
                results[i] = r

    def _fetch_round(self, uris: list[str]) -> list[bytes | tuple[str, str]]:
        if len(uris) <= 1 or self.s3.fetch_concurrency <= 1:
            return [self._fetch(u) for u in uris]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.s3.fetch_concurrency, "vlray-fetch")
        return list(self._pool.map(self._fetch, uris))

    def _one(self, data: bytes, row: dict[str, Any]) -> tuple[str, str]:
        """Decodes ``data`` into ``row``; returns (error, stage), empty when fine."""
        if self.gpu:
            try:
                size = plain_jpeg_size(data, max_pixels=self.max_pixels)
            except DecodeError as exc:
                return one_line(exc), "decode"
            if size is not None:
                return self._pass_encoded(data, size, row)
        try:
            # decode_pixels probes the header (pixel limit) before decoding, then decodes
            # plain JPEGs with simplejpeg (same pixels as PIL, faster) and the rest with PIL
            if self.draft:
                pixels, (row[Col.HEIGHT], row[Col.WIDTH]) = decode_draft(
                    data, max_pixels=self.max_pixels, needed=self._needed
                )
            else:
                pixels = decode_pixels(data, max_pixels=self.max_pixels)
                row[Col.HEIGHT], row[Col.WIDTH] = pixels.shape[:2]
        except DecodeError as exc:
            return one_line(exc), "decode"
        for images, family in self.families:
            try:
                resized = family.fit(pixels, (row[Col.HEIGHT], row[Col.WIDTH]))
                th, tw = resized.shape[:2]
            except (UnsupportedImage, ValueError, RuntimeError) as exc:
                return one_line(exc), "preprocess"
            row[images.th], row[images.tw] = th, tw
            # a flat view: pa.array copies it once into the column (tobytes was a copy more)
            row[images.pixels] = resized.reshape(-1).data
        if self.thumbnails:
            row[Col.THUMB] = make_thumbnail(pixels, self.thumbnails)
        if self.frames:
            row[Col.FRAME] = np.ascontiguousarray(pixels[..., :3]).reshape(-1).data
        return "", ""

    def _pass_encoded(
        self, data: bytes, size: tuple[int, int], row: dict[str, Any]
    ) -> tuple[str, str]:
        """A plain JPEG for the encoder to decode on its GPU: its bytes where the pixels go,
        ``encoded`` 1, the target shape from the header."""
        row[Col.HEIGHT], row[Col.WIDTH] = size
        for images, family in self.families:
            try:
                row[images.th], row[images.tw] = family.target_size(*size)
            except (UnsupportedImage, ValueError) as exc:
                return one_line(exc), "preprocess"
            row[images.pixels] = data
        row[Col.ENCODED] = 1
        return "", ""

    def __call__(self, batch: pa.Table) -> pa.Table:
        start = time.perf_counter()
        n = batch.num_rows
        data = batch.column(Col.DATA).to_pylist()
        uris = batch.column(Col.URI).to_pylist()
        errors = batch.column(Col.ERROR).to_pylist()
        stages = batch.column(Col.STAGE).to_pylist()
        todo = [i for i in range(n) if not errors[i] and data[i] is None]
        for i, fetched in zip(todo, self._fetch_all([uris[i] for i in todo]), strict=True):
            if isinstance(fetched, tuple):
                errors[i], stages[i] = fetched
            else:
                data[i] = fetched
        types = self._produced()
        cols: dict[str, list] = {k: [] for k in types}
        for i in range(n):
            row: dict[str, Any] = {}
            if not errors[i]:
                errors[i], stages[i] = self._one(data[i], row)
            if errors[i]:
                row = {Col.WIDTH: row.get(Col.WIDTH, 0), Col.HEIGHT: row.get(Col.HEIGHT, 0)}
            for key, typ in types.items():
                cols[key].append(row.get(key, b"" if typ == pa.binary() else 0))
        # every input column passes through but the image bytes and the replaced error/stage
        table = dict(zip(batch.column_names, batch.columns, strict=True))
        for name in (Col.DATA, Col.URI, Col.ERROR, Col.STAGE):
            table.pop(name, None)
        table[Col.ERROR] = pa.array(errors, pa.string())
        table[Col.STAGE] = pa.array(stages, pa.string())
        table[StatCol.DECODE_S] = pa.array(np.full(n, (time.perf_counter() - start) / max(n, 1)))
        for key, typ in types.items():
            table[key] = pa.array(cols[key], typ)
        first = self.families[0][0]  # rows sorted by the first model's shape: few groups
        return pa.table(table).sort_by([(first.th, "ascending"), (first.tw, "ascending")])

    def _produced(self) -> dict[str, pa.DataType]:
        """The columns this stage adds, with their Arrow types."""
        types: dict[str, pa.DataType] = {Col.WIDTH: pa.int32(), Col.HEIGHT: pa.int32()}
        for images, _ in self.families:
            types.update({images.th: pa.int32(), images.tw: pa.int32(), images.pixels: pa.binary()})
        if self.thumbnails:
            types[Col.THUMB] = pa.binary()
        if self.frames:
            types[Col.FRAME] = pa.binary()
        if self.gpu:
            types[Col.ENCODED] = pa.int32()
        return types


class EncodeStage:
    """Group a batch by target shape; per group: batched preprocessing + one forward.

    Groups are capped at ``max_group_size`` rows. Each row carries the size of its group and of
    its batch, from which the summary derives groups per batch and mean group size.
    """

    def __init__(
        self,
        checkpoint: Checkpoint,
        device: str,
        dtype: str,
        max_group_size: int,
        threads: int,
        store_tokens: bool = False,
    ) -> None:
        if threads > 0:
            torch.set_num_threads(threads)
        self.family = family_for(checkpoint)
        self.device = torch.device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.encoder = self.family.load_encoder(self.device, self.dtype)
        self.max_group_size = max_group_size
        self.store_tokens = store_tokens
        if store_tokens:
            self.family.require(Capability.TOKEN_MATRICES)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        start = time.perf_counter()
        n = len(batch[Col.ID])
        images = EMBEDDING_IMAGES
        result = encode_batch(
            self.family,
            self.encoder,
            batch[images.pixels],
            (batch[images.th], batch[images.tw]),
            batch[Col.ERROR],
            batch[Col.STAGE],
            max_group_size=self.max_group_size,
            encoded=batch.get(Col.ENCODED),
            store_tokens=self.store_tokens,
        )
        out = pass_through(batch, (*images.names, Col.ENCODED))
        out.update(
            {
                Col.EMBEDDING: result.embeddings,
                Col.ERROR: result.errors.astype(str),
                Col.STAGE: result.stages.astype(str),
                StatCol.GROUP_SIZE: result.group_size,
                StatCol.BATCH_ROWS: np.full(n, n, dtype=np.int32),
                StatCol.ENCODE_S: np.full(n, (time.perf_counter() - start) / max(n, 1)),
            }
        )
        if self.store_tokens:
            out.update({Col.TOKENS: result.tokens, Col.TOKEN_GRID: result.grids})
        return out


class DecodeEncodeStage:
    """:class:`DecodeStage` and :class:`EncodeStage` in one actor (``compute.fuse``).

    On CPU both stages compete for the same cores; fused, each actor decodes a batch and encodes
    it in place: no object-store hop for the resized pixels, one process per core instead of
    decode and encoder processes time-sharing them. Same rows and columns out as the two stages.
    """

    def __init__(
        self,
        checkpoint: Checkpoint,
        max_pixels: int,
        s3: S3Config,
        device: str,
        dtype: str,
        max_group_size: int,
        threads: int,
        store_tokens: bool = False,
        decode: str = "exact",
        thumbnails: int = 0,
        max_bytes: int = InputConfig.max_bytes,
    ) -> None:
        self.decode = DecodeStage(
            checkpoint, max_pixels, s3, decode=decode, thumbnails=thumbnails, max_bytes=max_bytes
        )
        self.encode = EncodeStage(checkpoint, device, dtype, max_group_size, threads, store_tokens)

    def __call__(self, batch: pa.Table) -> dict[str, np.ndarray]:
        table = self.decode(batch)
        return self.encode(
            {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}
        )


class MaskStage:
    """SAM masks: image embeddings once per image (batched per same-shape group), then every
    prompt of the row (prompted) or a point grid (automatic) through the mask decoder.

    Adds ``masks`` (JSON list of mask records per row) and ``mask_count``.
    """

    def __init__(
        self, checkpoint: Checkpoint, device: str, dtype: str, settings: SamConfig, threads: int
    ) -> None:
        if threads > 0:
            torch.set_num_threads(threads)
        self.family = family_for(checkpoint)
        self.device = torch.device(device)
        self.generator = self.family.load_mask_generator(
            self.device, resolve_dtype(dtype, self.device)
        )
        self.settings = settings

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        start = time.perf_counter()
        n = len(batch[Col.ID])
        images = MASK_IMAGES
        result = mask_batch(
            self.family,
            self.generator,
            self.settings,
            batch[images.pixels],
            (batch[images.th], batch[images.tw]),
            (batch[Col.HEIGHT], batch[Col.WIDTH]),
            batch[Col.PROMPTS],
            batch[Col.ERROR],
            batch[Col.STAGE],
            self.device,
        )
        out = pass_through(batch, images.names)
        out.update(
            {
                Col.MASKS: result.masks.astype(str),
                Col.MASK_COUNT: result.counts,
                Col.ERROR: result.errors.astype(str),
                Col.STAGE: result.stages.astype(str),
                StatCol.MASK_S: np.full(n, (time.perf_counter() - start) / max(n, 1)),
            }
        )
        return out
