"""The encoder's runtime, pure torch + NumPy (no Ray): group a batch by shape, stack each
group (pinned, copied to the device on a side stream), decode JPEGs on the device, and encode
a whole batch with one copy back.

The Ray stages in :mod:`vlray.pipeline.stages` are thin adapters over these functions; unit
tests call them directly.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as tvF

from vlray.families import Capability, Family, ImageEncoder, UnsupportedImage
from vlray.ops.decode import DecodeError, decode_pixels
from vlray.ops.resize import center_crop_chw, center_crop_hwc, resize_uint8
from vlray.pipeline.files import one_line
from vlray.schema import SYSTEMIC

logger = logging.getLogger(__name__)


def shape_groups(
    heights: np.ndarray, widths: np.ndarray, rows: np.ndarray, cap: int
) -> Iterator[tuple[tuple[int, int], np.ndarray]]:
    """((height, width), row indices) of each same-shape group among ``rows``, at most ``cap``
    rows per group, shapes in ascending order (``np.unique`` on one int64 key: no Ray
    sort/groupby barrier)."""
    keys = heights[rows].astype(np.int64) * 1_000_000 + widths[rows]
    for key in np.unique(keys):
        same = rows[keys == key]
        size = divmod(int(key), 1_000_000)
        for s in range(0, len(same), max(cap, 1)):
            yield size, same[s : s + cap]


@dataclass
class EncodedBatch:
    """What :func:`encode_batch` made of one batch of ``n`` rows."""

    embeddings: np.ndarray
    """(n, dim) float32; zero for rows that failed or came in failed."""
    errors: np.ndarray
    """(n,) object: '' or a one-line error."""
    stages: np.ndarray
    """(n,) object: the stage of each error ('' for good rows)."""
    group_size: np.ndarray
    """(n,) int32: the size of the group each embedded row ran in, 0 otherwise."""
    tokens: np.ndarray | None = None
    """(n,) object: float32 bytes of each row's token matrix (``store_tokens``)."""
    grids: np.ndarray | None = None
    """(n, 2) int32: (grid_h, grid_w) of each token matrix (``store_tokens``)."""


def encode_batch(
    family: Family,
    encoder: ImageEncoder,
    pixels: np.ndarray,
    sizes: tuple[np.ndarray, np.ndarray],
    errors: np.ndarray,
    stages: np.ndarray,
    *,
    max_group_size: int,
    encoded: np.ndarray | None = None,
    store_tokens: bool = False,
) -> EncodedBatch:
    """Embeds the good rows of a batch, one ``preprocess`` + forward per same-shape group.

    Args:
        family: the model family (``preprocess``, resize policy).
        encoder: its loaded image encoder; with ``store_tokens`` its ``embed_tokens``.
        pixels: (n,) cells of packed RGB uint8 (or JPEG bytes where ``encoded`` is 1).
        sizes: (th, tw) int arrays of the rows' target shapes.
        errors, stages: (n,) incoming error / stage values; rows with an error are skipped.
        max_group_size: the most rows per forward.
        encoded: (n,) 1 where ``pixels`` holds a JPEG for the device to decode.
        store_tokens: also return each row's token matrix.

    Returns:
        The embeddings and updated errors. A group whose preprocessing or forward raises
        gets error rows (or ``systemic`` ones, see :func:`group_failure`); vectors are copied
        back once for the batch, so the device runs ahead of the CPU meanwhile.

    Raises:
        torch.cuda.OutOfMemoryError: re-raised (Ray retries the actor).
    """
    if store_tokens:
        family.require(Capability.TOKEN_MATRICES)
    n = len(errors)
    errors, stages = errors.astype(object), stages.astype(object)
    out = EncodedBatch(
        np.zeros((n, encoder.dim), np.float32), errors, stages, np.zeros(n, np.int32)
    )
    if store_tokens:
        out.tokens, out.grids = np.full(n, b"", dtype=object), np.zeros((n, 2), np.int32)
    pending: list[tuple[np.ndarray, torch.Tensor]] = []  # embeddings still on the device
    ok = np.flatnonzero(errors == "")
    for size, group in shape_groups(sizes[0], sizes[1], ok, max_group_size):
        try:
            images, group = _group_images(family, encoder.device, pixels, group, size, encoded, out)
            if not len(group):
                continue
            inputs = family.preprocess(images)
        except Exception as exc:  # a bad group must not lose the batch
            errors[group], stages[group] = group_failure(exc, group, "preprocess")
            continue
        try:
            if store_tokens:
                _store_tokens(encoder, inputs, group, out)
            else:
                pending.append((group, encoder.embed(inputs)))
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as exc:
            errors[group], stages[group] = group_failure(exc, group, "encode")
    _copy_back(pending, out)
    return out


def _group_images(
    family: Family,
    device: torch.device,
    pixels: np.ndarray,
    group: np.ndarray,
    size: tuple[int, int],
    encoded: np.ndarray | None,
    out: EncodedBatch,
) -> tuple[torch.Tensor, np.ndarray]:
    """One group's uint8 (B, 3, H, W) on ``device`` and the rows it holds (device-decoded
    JPEGs the decoder refused become error rows in ``out``)."""
    if encoded is None or not encoded[group].any():
        return stack_group(pixels, group, size, device), group
    images, kept, failed = decode_group(
        pixels, group, encoded, size, device, family.interpolation, family.resize_size
    )
    for row, (message, stage) in failed.items():
        out.errors[row], out.stages[row] = message, stage
    return images, kept


def _store_tokens(
    encoder: ImageEncoder, inputs: dict[str, torch.Tensor], group: np.ndarray, out: EncodedBatch
) -> None:
    """Embeddings and token matrices of one group, copied back at once."""
    result = encoder.embed_tokens(inputs)
    matrices = result.tokens.cpu().numpy()
    out.embeddings[group] = result.embeddings.cpu().numpy()
    for j, i in enumerate(group):
        out.tokens[i] = matrices[j].tobytes()
        out.grids[i] = result.grid
    out.group_size[group] = len(group)


def _copy_back(pending: list[tuple[np.ndarray, torch.Tensor]], out: EncodedBatch) -> None:
    """The pending groups' vectors to the host in one copy (and one wait); an error that
    surfaces only there (asynchronous device errors) fails them all, as systemic."""
    if not pending:
        return
    try:
        with torch.inference_mode():
            vectors = torch.cat([v for _, v in pending]).cpu().numpy()
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception as exc:
        for group, _ in pending:
            out.errors[group], out.stages[group] = group_failure(exc, group, "encode", True)
        return
    start = 0
    for group, _ in pending:
        out.embeddings[group] = vectors[start : start + len(group)]
        out.group_size[group] = len(group)
        start += len(group)


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
