"""Ray Data model stages: thin adapters from Arrow / NumPy batches to the pure code in vlray.

Each stage turns per-row problems into ``error`` / ``stage`` values and passes them on, so a bad
image never raises across a stage boundary and every input row reaches the writer exactly once.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as tvF

from vlray.config import InputConfig, S3Config, SamConfig
from vlray.families import Checkpoint, UnsupportedImage, family_for
from vlray.ops.decode import (
    DecodeError,
    decode_draft,
    decode_pixels,
    large_pil_blocks,
    plain_jpeg_size,
)
from vlray.ops.resize import center_crop_chw, center_crop_hwc, resize_uint8
from vlray.ops.thumbnail import make_thumbnail, thumbnail_size
from vlray.pipeline.files import one_line
from vlray.schema import SYSTEMIC, TRANSIENT
from vlray.storage import TransientError, fetch_bytes, scrub

logger = logging.getLogger(__name__)


HEADS = ("", "sam_")
"""Column prefixes of the resized images: the embedding model's, and SAM's (one pass, two models)."""


INPUT_ERRORS = (UnsupportedImage, ValueError, RuntimeError)
"""Exceptions that one image can cause (torch reports bad shapes as RuntimeError); any other
exception is a failure of the code or its environment."""


def group_failure(
    exc: BaseException, group: np.ndarray, stage: str, systemic: bool = False
) -> tuple[str, str]:
    """(error, stage) for the rows of a same-shape group whose preprocessing or forward raised.

    One image can only be to blame when it is alone in its group and the exception is one an
    image can cause: then it is an error row of ``stage``. Otherwise (a whole group failing with
    one error, or a programming or environment error) the rows get stage ``systemic``: they are
    not committed and the run stops (exit 1), so the rerun does them once the cause is fixed.
    """
    if systemic or len(group) > 1 or not isinstance(exc, INPUT_ERRORS):
        example = f"{stage}: {type(exc).__name__}: {one_line(exc)}"
        logger.error("%s failed for a group of %d rows: %s", stage, len(group), example)
        return example, SYSTEMIC
    return one_line(exc), stage


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
    ) -> None:
        torch.set_num_threads(1)
        self.max_bytes = max_bytes
        large_pil_blocks()
        self.thumbnails = thumbnails
        self.draft = decode == "draft"
        self.gpu = decode == "gpu"  # plain JPEGs pass through encoded, for the encoder's GPU
        self.families = [
            (prefix, family_for(c))
            for prefix, c in zip(HEADS, (checkpoint, sam_checkpoint), strict=True)
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
            # plain JPEGs with torchvision (same pixels as PIL, faster) and the rest with PIL
            if self.draft:
                pixels, (row["height"], row["width"]) = decode_draft(
                    data, max_pixels=self.max_pixels, needed=self._needed
                )
            else:
                pixels = decode_pixels(data, max_pixels=self.max_pixels)
                row["height"], row["width"] = pixels.shape[:2]
        except DecodeError as exc:
            return one_line(exc), "decode"
        for prefix, family in self.families:
            try:
                resized = family.fit(pixels, (row["height"], row["width"]))
                th, tw = resized.shape[:2]
            except (UnsupportedImage, ValueError, RuntimeError) as exc:
                return one_line(exc), "preprocess"
            row[f"{prefix}th"], row[f"{prefix}tw"] = th, tw
            # a flat view: pa.array copies it once into the column (tobytes was a copy more)
            row[f"{prefix}pixels"] = resized.reshape(-1).data
        if self.thumbnails:
            row["thumb"] = make_thumbnail(pixels, self.thumbnails)
        return "", ""

    def _pass_encoded(
        self, data: bytes, size: tuple[int, int], row: dict[str, Any]
    ) -> tuple[str, str]:
        """A plain JPEG for the encoder to decode on its GPU: its bytes where the pixels go,
        ``encoded`` 1, the target shape from the header."""
        row["height"], row["width"] = size
        for prefix, family in self.families:
            try:
                row[f"{prefix}th"], row[f"{prefix}tw"] = family.target_size(*size)
            except (UnsupportedImage, ValueError) as exc:
                return one_line(exc), "preprocess"
            row[f"{prefix}pixels"] = data
        row["encoded"] = 1
        return "", ""

    def __call__(self, batch: pa.Table) -> pa.Table:
        start = time.perf_counter()
        n = batch.num_rows
        data = batch.column("data").to_pylist()
        uris = batch.column("uri").to_pylist()
        errors = batch.column("error").to_pylist()
        stages = batch.column("stage").to_pylist()
        todo = [i for i in range(n) if not errors[i] and data[i] is None]
        for i, fetched in zip(todo, self._fetch_all([uris[i] for i in todo]), strict=True):
            if isinstance(fetched, tuple):
                errors[i], stages[i] = fetched
            else:
                data[i] = fetched
        keys = ["width", "height"] + [
            f"{p}{k}" for p, _ in self.families for k in ("th", "tw", "pixels")
        ]
        if self.thumbnails:
            keys.append("thumb")
        if self.gpu:
            keys.append("encoded")
        cols: dict[str, list] = {k: [] for k in keys}
        for i in range(n):
            row: dict[str, Any] = {}
            if not errors[i]:
                errors[i], stages[i] = self._one(data[i], row)
            if errors[i]:
                row = {"width": row.get("width", 0), "height": row.get("height", 0)}
            for key in keys:
                blank = b"" if key.endswith(("pixels", "thumb")) else 0
                cols[key].append(row.get(key, blank))
        table = {
            "id": batch.column("id"),
            "source": batch.column("source"),
            "error": pa.array(errors, pa.string()),
            "stage": pa.array(stages, pa.string()),
            "prompts": batch.column("prompts"),
            "decode_s": pa.array(np.full(n, (time.perf_counter() - start) / max(n, 1))),
            **{c: batch.column(c) for c in ("kept",) if c in batch.column_names},
        }
        for key in keys:
            typ = pa.binary() if key.endswith(("pixels", "thumb")) else pa.int32()
            table[key] = pa.array(cols[key], typ)
        prefix = self.families[0][0]
        return pa.table(table).sort_by([(f"{prefix}th", "ascending"), (f"{prefix}tw", "ascending")])


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
        if store_tokens and not hasattr(self.encoder, "merged_tokens"):
            raise ValueError(
                f"model.store_tokens: the {self.family.name} encoder has no token matrix"
            )

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        start = time.perf_counter()
        n = len(batch["id"])
        errors = batch["error"].astype(object)
        stages = batch["stage"].astype(object)
        embeddings = np.zeros((n, self.encoder.dim), dtype=np.float32)
        group_size = np.zeros(n, dtype=np.int32)
        tokens = np.full(n, b"", dtype=object)
        grids = np.zeros((n, 2), dtype=np.int32)
        ok = np.flatnonzero(errors == "")
        keys = batch["th"][ok].astype(np.int64) * 1_000_000 + batch["tw"][ok]
        encoded = batch.get("encoded")  # input.decode gpu: 1 where pixels holds JPEG bytes
        pending: list[tuple[np.ndarray, torch.Tensor]] = []  # embeddings still on the device
        for key in np.unique(keys):
            rows = ok[keys == key]
            th, tw = divmod(int(key), 1_000_000)
            for s in range(0, len(rows), self.max_group_size):
                group = rows[s : s + self.max_group_size]
                try:
                    if encoded is not None and encoded[group].any():
                        images, group, failed = decode_group(
                            batch["pixels"],
                            group,
                            encoded,
                            (th, tw),
                            self.device,
                            self.family.interpolation,
                            resize_size=self.family.resize_size,
                        )
                        for row, (message, stage) in failed.items():
                            errors[row], stages[row] = message, stage
                        if not len(group):
                            continue
                    else:
                        images = stack_group(batch["pixels"], group, (th, tw), self.device)
                    inputs = self.family.preprocess(images)
                except Exception as exc:  # a bad group must not lose the batch
                    errors[group], stages[group] = group_failure(exc, group, "preprocess")
                    continue
                try:
                    if self.store_tokens:
                        matrix = self.encoder.merged_tokens(inputs).float().cpu()
                        vectors = torch.nn.functional.normalize(matrix.mean(dim=1), dim=-1)
                        embeddings[group] = vectors.numpy()
                        cell = self.family.patch_size * self.family.merge_size
                        for j, i in enumerate(group):
                            tokens[i] = matrix[j].numpy().tobytes()
                            grids[i] = (th // cell, tw // cell)
                        group_size[group] = len(group)
                    else:
                        pending.append((group, self.encoder.embed(inputs)))
                except torch.cuda.OutOfMemoryError:
                    raise
                except Exception as exc:
                    errors[group], stages[group] = group_failure(exc, group, "encode")
        if pending:
            try:
                with torch.inference_mode():  # one copy back (and wait) per batch
                    vectors = torch.cat([v for _, v in pending]).cpu().numpy()
            except torch.cuda.OutOfMemoryError:
                raise
            except Exception as exc:  # an asynchronous device error surfaces here
                for group, _ in pending:
                    errors[group], stages[group] = group_failure(exc, group, "encode", True)
            else:
                start_row = 0
                for group, _ in pending:
                    embeddings[group] = vectors[start_row : start_row + len(group)]
                    group_size[group] = len(group)
                    start_row += len(group)
        out = {k: v for k, v in batch.items() if k not in ("pixels", "th", "tw", "encoded")}
        out.update(
            embedding=embeddings,
            error=errors.astype(str),
            stage=stages.astype(str),
            group_size=group_size,
            batch_rows=np.full(n, n, dtype=np.int32),
            encode_s=np.full(n, (time.perf_counter() - start) / max(n, 1)),
        )
        if self.store_tokens:
            out.update(tokens=tokens, token_grid=grids)
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


def _prompt_tensors(
    prompts: dict[str, Any],
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Prompt cells (original pixels) -> (1, N, P, 2) points, (1, N, P) labels, (1, N, 4) boxes."""
    points = labels = boxes = None
    if prompts.get("points"):
        points = torch.tensor(prompts["points"], dtype=torch.float64)
        if points.dim() != 3 or points.shape[-1] != 2:
            raise ValueError(
                f"points must be objects x points x [x, y], got shape {list(points.shape)}"
            )
        points = points[None]
        if prompts.get("labels"):
            labels = torch.tensor(prompts["labels"], dtype=torch.int64)[None]
            if labels.shape != points.shape[:-1]:
                raise ValueError(
                    f"labels shape {list(labels.shape[1:])} does not match points {list(points.shape[1:-1])}"
                )
    if prompts.get("boxes"):
        boxes = torch.tensor(prompts["boxes"], dtype=torch.float64)
        if boxes.dim() != 2 or boxes.shape[-1] != 4:
            raise ValueError(
                f"boxes must be objects x [x1, y1, x2, y2], got shape {list(boxes.shape)}"
            )
        boxes = boxes[None]
    return points, labels, boxes


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

    def _masks(
        self,
        embedding: torch.Tensor,
        prompts: str,
        original: tuple[int, int],
        reshaped: tuple[int, int],
    ) -> list[dict[str, Any]]:
        cfg = self.settings
        cells = json.loads(prompts) if prompts else {}
        has_prompts = bool(cells.get("points") or cells.get("boxes"))
        if cfg.mode == "prompted" and not has_prompts:
            raise ValueError("no points or boxes in this row (sam.mode is prompted)")
        if has_prompts and cfg.mode != "automatic":
            points, labels, boxes = _prompt_tensors(cells)
            points, labels, boxes = self.family.scale_prompts(points, labels, boxes, original)
            return self.generator.prompted(
                embedding,
                None if points is None else points[0].float(),
                None if labels is None else labels[0],
                None if boxes is None else boxes[0].float(),
                original_size=original,
                reshaped_input_size=reshaped,
                multimask_output=cfg.multimask_output,
                mask_threshold=cfg.mask_threshold,
                stability_score_offset=cfg.stability_score_offset,
                prompts_per_batch=cfg.points_per_batch,
            )
        return self.generator.automatic(
            embedding,
            original,
            reshaped,
            points_per_side=cfg.points_per_side,
            points_per_batch=cfg.points_per_batch,
            pred_iou_thresh=cfg.pred_iou_thresh,
            stability_score_thresh=cfg.stability_score_thresh,
            stability_score_offset=cfg.stability_score_offset,
            box_nms_thresh=cfg.box_nms_thresh,
            mask_threshold=cfg.mask_threshold,
        )

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        start = time.perf_counter()
        n = len(batch["id"])
        errors = batch["error"].astype(object)
        stages = batch["stage"].astype(object)
        masks = np.full(n, "", dtype=object)
        counts = np.zeros(n, dtype=np.int32)
        ok = np.flatnonzero(errors == "")
        keys = batch["sam_th"][ok].astype(np.int64) * 1_000_000 + batch["sam_tw"][ok]
        for key in np.unique(keys):
            rows = ok[keys == key]
            th, tw = divmod(int(key), 1_000_000)
            for s in range(0, len(rows), self.settings.batch_size):
                group = rows[s : s + self.settings.batch_size]
                try:
                    images = stack_group(batch["sam_pixels"], group, (th, tw), self.device)
                    inputs = self.family.preprocess(images)
                    embeddings = self.generator.image_embeddings(inputs["pixel_values"])
                except Exception as exc:  # a bad group must not lose the batch
                    errors[group], stages[group] = group_failure(exc, group, "encode")
                    continue
                for j, i in enumerate(group):
                    original = (int(batch["height"][i]), int(batch["width"][i]))
                    try:
                        records = self._masks(
                            embeddings[j], str(batch["prompts"][i]), original, (th, tw)
                        )
                    except (ValueError, RuntimeError, TypeError) as exc:
                        errors[i], stages[i] = (
                            one_line(exc),
                            "preprocess" if isinstance(exc, (ValueError, TypeError)) else "encode",
                        )
                        continue
                    masks[i] = json.dumps(records)
                    counts[i] = len(records)
        out = {k: v for k, v in batch.items() if k not in ("sam_pixels", "sam_th", "sam_tw")}
        out.update(
            masks=masks.astype(str),
            mask_count=counts,
            error=errors.astype(str),
            stage=stages.astype(str),
            mask_s=np.full(n, (time.perf_counter() - start) / max(n, 1)),
        )
        return out


def stack_group(
    cells: np.ndarray | list[Any], rows: np.ndarray, size: tuple[int, int], device: torch.device
) -> torch.Tensor:
    """Rows' packed RGB pixel cells (bytes or uint8 arrays) of one target size -> uint8
    (B, 3, H, W) on ``device``.

    A channels-last view of one stacked copy. For a GPU the copy goes to page-locked host
    memory and on to the device without blocking: the GPU gets uint8 (a quarter of the float32
    bytes) and preprocesses there, while the CPU goes on to the next group. Torch's pinned
    allocator keeps the buffer until its copy is done.

    Raises:
        ValueError: a cell whose length is not ``height * width * 3``.
    """
    height, width = size
    pinned = device.type == "cuda"
    host = torch.empty((len(rows), height, width, 3), dtype=torch.uint8, pin_memory=pinned)
    view = host.numpy()
    for slot, row in enumerate(rows):
        view[slot] = np.frombuffer(cells[row], np.uint8).reshape(height, width, 3)
    images = to_device(host, device) if pinned else host
    return images.permute(0, 3, 1, 2)


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A page-locked CPU tensor -> ``device``, copied on a side stream.

    On the compute stream the copy would run only after the forward queued before it; on its
    own stream it runs alongside that forward (the previous group's), and only the compute
    work queued after it waits for it.
    """
    compute = torch.cuda.current_stream(device)
    side = _copy_stream(device)
    # no wait for compute first: the side stream allocates from its own pool, whose blocks
    # the caching allocator hands out again only after the streams recorded on them are done
    with torch.cuda.stream(side):
        out = host.to(device, non_blocking=True)
    compute.wait_stream(side)
    out.record_stream(compute)  # allocated on the side stream, used (and freed) on compute
    return out


@lru_cache(maxsize=8)
def _copy_stream(device: torch.device) -> torch.cuda.Stream:
    return torch.cuda.Stream(device)


GPU_DECODE_CHUNK = 64
"""JPEGs decoded per batched call: bounds the full-size frames held on the device at once."""


def decode_group(
    cells: np.ndarray,
    rows: np.ndarray,
    encoded: np.ndarray,
    size: tuple[int, int],
    device: torch.device,
    interpolation: InterpolationMode,
    resize_size: Callable[[int, int], tuple[int, int]] | None = None,
) -> tuple[torch.Tensor, np.ndarray, dict[int, tuple[str, str]]]:
    """Rows of one target size, some holding JPEG bytes (``encoded``), -> uint8 (B, 3, H, W)
    on ``device``, the rows it holds, and ``{row: (error, stage)}`` for the rows it dropped.

    ``input.decode: gpu``: the JPEGs are decoded by torchvision's batched ``decode_jpeg`` on
    ``device`` (nvJPEG on a GPU) and resized there (antialiased, the family's filter); a
    chunk the decoder refuses is retried image by image, and an image it refuses is decoded
    on the CPU as ``exact`` does (PIL's error for bad data). Rows holding pixels are used as
    they are; everything from the host goes to the device in one ``stack_group`` copy.
    With ``resize_size`` (the family's, for families that crop) each JPEG is resized to
    ``resize_size(h, w)`` and centre-cropped to ``size``; without, resized to ``size``.
    """
    from torchvision.io import ImageReadMode, decode_jpeg

    height, width = size
    fit = resize_size or (lambda h, w: size)
    jpegs = [int(r) for r in rows if encoded[r]]
    decoded: dict[int, torch.Tensor | None] = {}
    for s in range(0, len(jpegs), GPU_DECODE_CHUNK):
        chunk = jpegs[s : s + GPU_DECODE_CHUNK]
        datas = [torch.frombuffer(bytearray(cells[r]), dtype=torch.uint8) for r in chunk]
        try:
            frames = list(decode_jpeg(datas, mode=ImageReadMode.RGB, device=device))
        except RuntimeError:
            frames = []
            for data in datas:
                try:
                    frames.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
                except RuntimeError:
                    frames.append(None)
        for r, frame in zip(chunk, frames, strict=True):
            decoded[r] = None if frame is None else _fit_frame(frame, size, interpolation, fit)
    # the rest (pixels from the decode stage, JPEGs the device refused) as uint8 arrays on the
    # host, then stacked and copied in one go (per-image blocking copies would wait for the
    # device's queue each time)
    failed: dict[int, tuple[str, str]] = {}
    host: dict[int, Any] = {}
    for r in (int(r) for r in rows):
        if decoded.get(r) is not None:
            continue
        try:
            if r not in decoded:  # packed pixels from the decode stage (a view)
                host[r] = np.frombuffer(cells[r], np.uint8).reshape(height, width, 3)
            else:
                pixels = decode_pixels(cells[r], max_pixels=1 << 62)  # limit checked already
                resized = resize_uint8(pixels, fit(*pixels.shape[:2]), interpolation)
                host[r] = center_crop_hwc(resized, size)
        except DecodeError as exc:
            failed[r] = (one_line(exc), "decode")
        except ValueError as exc:
            failed[r] = (one_line(exc), "preprocess")
    if host:
        uploaded = stack_group(list(host.values()), np.arange(len(host)), size, device)
        decoded.update(zip(host, uploaded, strict=True))
    kept = np.array([r for r in rows if decoded.get(int(r)) is not None], dtype=rows.dtype)
    if not len(kept):
        return torch.empty((0, 3, height, width), dtype=torch.uint8), kept, failed
    return torch.stack([decoded[int(r)] for r in kept]), kept, failed


def _fit_frame(
    frame: torch.Tensor,
    size: tuple[int, int],
    interpolation: InterpolationMode,
    resize_size: Callable[[int, int], tuple[int, int]],
) -> torch.Tensor:
    """A decoded (3, H, W) uint8 frame resized to ``resize_size(H, W)`` (antialiased) and
    centre-cropped to ``size``, on its device."""
    shape = tuple(resize_size(*frame.shape[1:]))
    if tuple(frame.shape[1:]) != shape:
        frame = tvF.resize(frame, list(shape), interpolation, antialias=True)
    return center_crop_chw(frame, size)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` is bf16 on GPU and fp32 on CPU."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)
