"""SAM-style masks for a batch, pure torch + NumPy (no Ray): image embeddings once per image,
batched per same-shape group, then every prompt of the row (prompted) or a point grid
(automatic) through the family's :class:`~vlray.families.MaskGenerator`.

:class:`vlray.pipeline.stages.MaskStage` is the thin Ray adapter over :func:`mask_batch`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from vlray.config import SamConfig
from vlray.families import Family, MaskGenerator
from vlray.pipeline.files import one_line
from vlray.pipeline.runtime import group_failure, shape_groups, stack_group


@dataclass
class MaskedBatch:
    """What :func:`mask_batch` made of one batch of ``n`` rows."""

    masks: np.ndarray
    """(n,) object: JSON list of each row's mask records ('' for rows that failed)."""
    counts: np.ndarray
    """(n,) int32: masks per row."""
    errors: np.ndarray
    """(n,) object: '' or a one-line error."""
    stages: np.ndarray
    """(n,) object: the stage of each error."""


def mask_batch(
    family: Family,
    generator: MaskGenerator,
    settings: SamConfig,
    pixels: np.ndarray,
    sizes: tuple[np.ndarray, np.ndarray],
    originals: tuple[np.ndarray, np.ndarray],
    prompts: np.ndarray,
    errors: np.ndarray,
    stages: np.ndarray,
    device: torch.device,
) -> MaskedBatch:
    """Masks for the good rows of a batch.

    Args:
        family: the mask model's family (its ``preprocess``).
        generator: its loaded mask generator.
        settings: the ``sam`` settings (mode, thresholds, batch sizes).
        pixels: (n,) packed RGB uint8 cells at the rows' target shapes.
        sizes: (th, tw) of each row's resized image.
        originals: (height, width) of each decoded image (EXIF-oriented).
        prompts: (n,) JSON prompt cells in original pixels ('' without).
        errors, stages: incoming error / stage values; rows with an error are skipped.
        device: the generator's device (each group's uint8 pixels are copied there).

    Returns:
        Per row the mask records and their count; a group whose embedding fails gets error
        rows (or systemic ones, see ``group_failure``), a row whose prompts are bad or whose
        decoding fails an error row of its own.
    """
    n = len(errors)
    out = MaskedBatch(
        np.full(n, "", dtype=object),
        np.zeros(n, dtype=np.int32),
        errors.astype(object),
        stages.astype(object),
    )
    ok = np.flatnonzero(out.errors == "")
    for size, group in shape_groups(sizes[0], sizes[1], ok, settings.batch_size):
        try:
            images = stack_group(pixels, group, size, device)
            inputs = family.preprocess(images)
            embeddings = generator.image_embeddings(inputs["pixel_values"])
        except Exception as exc:  # a bad group must not lose the batch
            out.errors[group], out.stages[group] = group_failure(exc, group, "encode")
            continue
        for j, i in enumerate(group):
            original = (int(originals[0][i]), int(originals[1][i]))
            try:
                records = image_masks(
                    generator, settings, embeddings[j], str(prompts[i]), original, size
                )
            except (ValueError, RuntimeError, TypeError) as exc:
                bad_prompt = isinstance(exc, (ValueError, TypeError))
                out.errors[i] = one_line(exc)
                out.stages[i] = "preprocess" if bad_prompt else "encode"
                continue
            out.masks[i] = json.dumps(records)
            out.counts[i] = len(records)
    return out


def image_masks(
    generator: MaskGenerator,
    settings: SamConfig,
    embedding: torch.Tensor,
    prompts: str,
    original: tuple[int, int],
    reshaped: tuple[int, int],
) -> list[dict[str, Any]]:
    """One image's mask records: its prompts (prompted, or ``auto`` with prompts) or a point
    grid (automatic, or ``auto`` without prompts).

    Raises:
        ValueError: ``sam.mode: prompted`` and the row has no points or boxes; bad prompts.
    """
    cfg = settings
    cells = json.loads(prompts) if prompts else {}
    has_prompts = bool(cells.get("points") or cells.get("boxes"))
    if cfg.mode == "prompted" and not has_prompts:
        raise ValueError("no points or boxes in this row (sam.mode is prompted)")
    if has_prompts and cfg.mode != "automatic":
        points, labels, boxes = prompt_tensors(cells)
        points, labels, boxes = generator.scale_prompts(points, labels, boxes, original)
        return generator.prompted(
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
    return generator.automatic(
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


def prompt_tensors(
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
