"""SAM (facebook/sam-vit-base, -large, -huge): promptable and automatic masks, no embeddings.

Reference: transformers' ``SamImageProcessor`` resizes the longest side to ``size.longest_edge``
(bilinear, antialias, on uint8), normalizes and pads bottom/right to ``pad_size``;
``SamProcessor`` scales prompts from original pixels to the resized frame; ``SamModel`` runs the
vision encoder once per image and the prompt encoder + mask decoder per prompt batch;
``post_process_masks`` upsamples the 256x256 logits to the pad size, crops the resized frame and
upsamples to the original size. The ``mask-generation`` pipeline adds a point grid, an IoU and a
stability filter and box NMS, with a per-batch RLE of every candidate on the CPU.

Here the same arithmetic runs batched on the device: the IoU filter runs before any upsampling
(only survivors are upsampled), candidates keep their low-resolution logits, and only the masks
that survive NMS are upsampled again and run-length encoded, in one batched call.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torchvision.ops import batched_nms

from vlray.families.base import (
    Capability,
    Family,
    MaskGenerator,
    Normalization,
    UnsupportedImage,
)
from vlray.families.checkpoint import Checkpoint, load_model
from vlray.ops.memory import empty_huge
from vlray.ops.rle import mask_area, mask_to_bbox_xywh, masks_to_rle

if TYPE_CHECKING:
    from transformers import PreTrainedConfig

IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)
UPSAMPLE_BYTES = 256 * 2**20
"""Memory budget of one chunk of float32 masks being upsampled (bounds peak memory)."""


def preprocess_shape(height: int, width: int, longest_edge: int) -> tuple[int, int]:
    """The reference's ``_get_preprocess_shape``: longest side -> ``longest_edge``, rounded."""
    scale = longest_edge * 1.0 / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def _sizes(sizes: torch.Tensor | tuple[int, int] | list[Any], batch: int) -> torch.Tensor:
    """(H, W) or per-image sizes -> int64 (B, 2) on the CPU."""
    out = torch.as_tensor(sizes, dtype=torch.int64).reshape(-1, 2)
    return out.expand(batch, 2) if out.shape[0] == 1 else out


def scale_prompts(
    points: torch.Tensor | None,
    labels: torch.Tensor | None,
    boxes: torch.Tensor | None,
    original_size: torch.Tensor | tuple[int, int],
    target_size: int = 1024,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Scales prompts from original pixels to the resized frame, as ``SamProcessor`` does.

    Args:
        points: (B, N, P, 2) ``[x, y]`` in original pixels, or None.
        labels: (B, N, P) 1 foreground, 0 background, -10 padding (its point is kept as is), or
            None (all foreground when points are given, as the model assumes).
        boxes: (B, N, 4) ``[x1, y1, x2, y2]`` in original pixels, or None.
        original_size: (H, W) of every image, or int (B, 2) per image.
        target_size: the processor's ``size.longest_edge``.

    Returns:
        points float64 (B, N, P, 2), labels int64 (B, N, P), boxes float64 (B, N, 4), each None
        when not given, in the frame whose longest side is ``target_size``.
    """
    batch = next((t.shape[0] for t in (points, boxes) if t is not None), 1)
    sizes = _sizes(original_size, batch).to(torch.float64)
    old_h, old_w = sizes[:, 0], sizes[:, 1]
    scale = target_size * 1.0 / torch.maximum(old_h, old_w)
    new_h, new_w = torch.floor(old_h * scale + 0.5), torch.floor(old_w * scale + 0.5)
    ratio = torch.stack([new_w / old_w, new_h / old_h], dim=-1)  # (B, 2) x, y
    if points is not None:
        device = points.device
        points = points.to(torch.float64)
        scaled = points * ratio.to(device)[:, None, None, :]
        if labels is not None:
            scaled = torch.where(labels.to(device)[..., None] == -10, points, scaled)
        points = scaled
        if labels is None:
            labels = torch.ones(points.shape[:-1], dtype=torch.int64, device=device)
    if labels is not None:
        labels = labels.to(torch.int64)
    if boxes is not None:
        # The reference goes through float32 before scaling boxes in float64.
        boxes = boxes.to(torch.float32).to(torch.float64)
        boxes = boxes * ratio.to(boxes.device).repeat(1, 2)[:, None, :]
    return points, labels, boxes


def build_point_grid(points_per_side: int) -> torch.Tensor:
    """Evenly spaced points in [0, 1]^2, row by row: float32 (points_per_side**2, 2) ``[x, y]``."""
    offset = 1 / (2 * points_per_side)
    side = torch.linspace(offset, 1 - offset, points_per_side)
    xs = torch.tile(side[None, :], (points_per_side, 1))
    ys = torch.tile(side[:, None], (1, points_per_side))
    return torch.stack([xs, ys], dim=-1).reshape(-1, 2)


def stability_score(logits: torch.Tensor, mask_threshold: float, offset: float) -> torch.Tensor:
    """IoU of the masks thresholded at ``mask_threshold +- offset``: float32 (N,) from (N, H, W)."""
    inter = (logits > (mask_threshold + offset)).flatten(1).sum(1, dtype=torch.int32)
    union = (logits > (mask_threshold - offset)).flatten(1).sum(1, dtype=torch.int32)
    return inter / union


def mask_to_box_xyxy(masks: torch.Tensor) -> torch.Tensor:
    """The reference's ``_batched_mask_to_box``: int64 (N, 4) inclusive ``[x0, y0, x1, y1]``.

    Args:
        masks: bool (N, H, W); empty masks give ``[0, 0, 0, 0]``.
    """
    n, h, w = masks.shape
    if masks.numel() == 0:
        return torch.zeros(n, 4, dtype=torch.int64, device=masks.device)
    rows = masks.any(dim=2).to(torch.uint8)
    cols = masks.any(dim=1).to(torch.uint8)
    y0, y1 = rows.argmax(1), h - 1 - rows.flip(1).argmax(1)
    x0, x1 = cols.argmax(1), w - 1 - cols.flip(1).argmax(1)
    return torch.stack([x0, y0, x1, y1], dim=1) * rows.any(1, keepdim=True)


class SamMaskGenerator(MaskGenerator):
    """SamModel on a device: image embeddings once per image, masks per prompt batch.

    All outputs are in the original image's pixels; ``original_size`` is the decoded image's
    (H, W) and ``reshaped_input_size`` the (H, W) it was resized to (``family.target_size``).
    """

    def __init__(
        self,
        checkpoint: Checkpoint,
        device: torch.device,
        dtype: torch.dtype,
        pad_size: tuple[int, int] = (1024, 1024),
        longest_edge: int = 1024,
    ) -> None:
        from transformers import SamModel

        self.model = load_model(checkpoint, SamModel, dtype).to(device)
        self.device, self.dtype = torch.device(device), dtype
        self.pad_size = pad_size
        self.longest_edge = longest_edge
        with torch.inference_mode():
            self._positional = self.model.get_image_wide_positional_embeddings()

    def scale_prompts(
        self,
        points: torch.Tensor | None,
        labels: torch.Tensor | None,
        boxes: torch.Tensor | None,
        original_size: tuple[int, int],
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """:func:`scale_prompts` with this checkpoint's ``longest_edge``."""
        return scale_prompts(points, labels, boxes, original_size, self.longest_edge)

    @torch.inference_mode()
    def image_embeddings(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values float32 (B, 3, pad_h, pad_w) -> (B, 256, 64, 64) on the device, model dtype."""
        pixels = pixel_values.to(self.device, self.dtype, non_blocking=True)
        return self.model.get_image_embeddings(pixels)

    def _decode(
        self,
        embeddings: torch.Tensor,
        points: torch.Tensor | None,
        labels: torch.Tensor | None,
        boxes: torch.Tensor | None,
        multimask_output: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One image's prompts -> logits float32 (N, K, 256, 256) and IoU scores float32 (N, K)."""
        embeddings = embeddings.reshape(1, *embeddings.shape[-3:]).to(self.device, self.dtype)
        if points is not None:
            points = points.reshape(1, *points.shape[-3:]).to(self.device)
            labels = labels.reshape(1, *labels.shape[-2:]).to(self.device)
        if boxes is not None:
            boxes = boxes.reshape(1, -1, 4).to(self.device)
        sparse, dense = self.model.prompt_encoder(
            input_points=points, input_labels=labels, input_boxes=boxes, input_masks=None
        )
        logits, iou = self.model.mask_decoder(
            image_embeddings=embeddings,
            image_positional_embeddings=self._positional,
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask_output,
        )
        return logits[0].float(), iou[0].float()

    def upsample(
        self,
        logits: torch.Tensor,
        original_size: tuple[int, int],
        reshaped_input_size: tuple[int, int],
    ) -> torch.Tensor:
        """``post_process_masks`` without the threshold, for a batch of one image's masks.

        Args:
            logits: float32 (M, 256, 256) low-resolution mask logits.
            original_size: (H, W) of the original image.
            reshaped_input_size: (h, w) of the resized image inside the padded frame.

        Returns:
            float32 (M, H, W) logits at the original size.
        """
        rh, rw = reshaped_input_size
        up = F.interpolate(logits[:, None], self.pad_size, mode="bilinear", align_corners=False)
        up = up[..., :rh, :rw]
        up = F.interpolate(up, tuple(original_size), mode="bilinear", align_corners=False)
        return up[:, 0]

    def _chunk(self, original_size: tuple[int, int]) -> int:
        pixels = max(self.pad_size[0] * self.pad_size[1], original_size[0] * original_size[1])
        return max(1, UPSAMPLE_BYTES // (4 * pixels))

    def _records(
        self,
        logits: torch.Tensor,
        original_size: tuple[int, int],
        reshaped_input_size: tuple[int, int],
        mask_threshold: float,
    ) -> tuple[list[dict[str, Any]], torch.Tensor, torch.Tensor]:
        """Low-res logits (M, 256, 256) -> RLE, bbox, area for each mask (upsampled in chunks)."""
        rles: list[dict[str, Any]] = []
        bboxes, areas = [], []
        for start in range(0, logits.shape[0], self._chunk(original_size)):
            chunk = logits[start : start + self._chunk(original_size)]
            masks = self.upsample(chunk, original_size, reshaped_input_size) > mask_threshold
            rles += masks_to_rle(masks)
            bboxes.append(mask_to_bbox_xywh(masks))
            areas.append(mask_area(masks))
        empty = logits.new_zeros
        bbox = torch.cat(bboxes).cpu() if bboxes else empty((0, 4)).cpu()
        area = torch.cat(areas).cpu() if areas else empty(0, dtype=torch.int64).cpu()
        return rles, bbox, area

    @torch.inference_mode()
    def prompted(
        self,
        embeddings: torch.Tensor,
        points: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        boxes: torch.Tensor | None = None,
        *,
        original_size: tuple[int, int],
        reshaped_input_size: tuple[int, int],
        multimask_output: bool = True,
        mask_threshold: float = 0.0,
        stability_score_offset: float = 1.0,
        prompts_per_batch: int = 64,
    ) -> list[dict[str, Any]]:
        """Masks for prompts of one image (already scaled with ``scale_prompts``).

        Args:
            embeddings: (256, 64, 64) or (1, 256, 64, 64), from ``image_embeddings``.
            points: (N, P, 2) or (1, N, P, 2) ``[x, y]`` in the resized frame, or None.
            labels: (N, P) or (1, N, P), or None (all foreground).
            boxes: (N, 4) or (1, N, 4) ``[x1, y1, x2, y2]`` in the resized frame, or None.
            original_size: (H, W) of the original image.
            reshaped_input_size: (h, w) of the resized image.
            multimask_output: 3 masks per prompt (True) or 1.
            mask_threshold: logit threshold of the binary masks.
            stability_score_offset: offset of the reported stability score.
            prompts_per_batch: prompts run through the decoder at once.

        Returns:
            N * K mask records ordered by prompt then mask: ``mask_id``, ``prompt_index``,
            ``segmentation`` (COCO RLE), ``bbox`` [x, y, w, h], ``area``, ``predicted_iou``,
            ``stability_score``.
        """
        prompts = _prompt_tensors(points, labels, boxes)
        low, iou, stability = self._prompt_masks(
            embeddings,
            prompts,
            (original_size, reshaped_input_size),
            multimask_output,
            (mask_threshold, stability_score_offset),
            prompts_per_batch,
        )
        per_prompt = iou.numel() // prompts[3]  # K masks per prompt
        return self._mask_records(
            low,
            iou,
            stability,
            (original_size, reshaped_input_size, mask_threshold),
            prompt_index=[i // per_prompt for i in range(iou.numel())],
        )

    def _prompt_masks(
        self,
        embeddings: torch.Tensor,
        prompts: tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, int],
        sizes: tuple[tuple[int, int], tuple[int, int]],
        multimask_output: bool,
        thresholds: tuple[float, float],
        prompts_per_batch: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The low-resolution logits (N * K, 256, 256), predicted IoUs and stability scores (at
        the original size, in chunks) of ``prompts`` (``_prompt_tensors``' points, labels,
        boxes and count), ``prompts_per_batch`` prompts at a time."""
        original_size, reshaped_input_size = sizes
        mask_threshold, stability_score_offset = thresholds
        chunk = self._chunk(original_size)
        *tensors, n = prompts
        logits, ious, stabilities = [], [], []
        for start in range(0, n, prompts_per_batch):
            batch = [None if p is None else p[start : start + prompts_per_batch] for p in tensors]
            low, iou = self._decode(embeddings, *batch, multimask_output)
            low = low.flatten(0, 1)
            for c in range(0, low.shape[0], chunk):
                up = self.upsample(low[c : c + chunk], original_size, reshaped_input_size)
                stabilities.append(stability_score(up, mask_threshold, stability_score_offset))
            logits.append(low)
            ious.append(iou.flatten())
        return torch.cat(logits), torch.cat(ious), torch.cat(stabilities)

    def _mask_records(
        self,
        logits: torch.Tensor,
        iou: torch.Tensor,
        stability: torch.Tensor,
        frame: tuple[tuple[int, int], tuple[int, int], float],
        **extra: list[Any],
    ) -> list[dict[str, Any]]:
        """One record per mask: ``mask_id``, ``segmentation`` (COCO RLE), ``bbox`` [x, y, w, h],
        ``area``, ``predicted_iou``, ``stability_score``, and the ``extra`` fields (one list
        entry per mask)."""
        rles, bbox, area = self._records(logits, *frame)
        iou_values, stability_values = iou.cpu().tolist(), stability.cpu().tolist()
        return [
            {
                "mask_id": i,
                "segmentation": rles[i],
                "bbox": bbox[i].tolist(),
                "area": int(area[i]),
                "predicted_iou": iou_values[i],
                "stability_score": stability_values[i],
                **{name: values[i] for name, values in extra.items()},
            }
            for i in range(len(rles))
        ]

    def _grid_masks(
        self,
        embeddings: torch.Tensor,
        scaled: torch.Tensor,
        original_size: tuple[int, int],
        reshaped_input_size: tuple[int, int],
        points_per_batch: int,
        thresholds: tuple[float, float, float, float],
    ) -> tuple[list[torch.Tensor], ...] | None:
        """The grid points' masks that pass the IoU and stability filters, ``points_per_batch``
        points at a time: (logits, iou, stability, xyxy boxes, point index) lists, or None."""
        pred_iou_thresh, stability_score_thresh, stability_score_offset, mask_threshold = thresholds
        h, w = original_size
        rh, rw = reshaped_input_size
        chunk = self._chunk((h, w))
        kept_logits, kept_iou, kept_stability, kept_boxes, kept_point = [], [], [], [], []
        for start in range(0, scaled.shape[0], points_per_batch):
            pts = scaled[start : start + points_per_batch, None, :]  # (b, 1, 2)
            labels = torch.ones(pts.shape[:-1], dtype=torch.int64, device=self.device)
            low, iou = self._decode(embeddings, pts, labels, None, True)
            k = low.shape[1]
            low, iou = low.flatten(0, 1), iou.flatten()
            point = torch.arange(start, start + pts.shape[0], device=self.device).repeat_interleave(
                k
            )
            if pred_iou_thresh > 0.0:
                keep = iou > pred_iou_thresh
                low, iou, point = low[keep], iou[keep], point[keep]
            for c in range(0, low.shape[0], chunk):
                up = self.upsample(low[c : c + chunk], (h, w), (rh, rw))
                stab = stability_score(up, mask_threshold, stability_score_offset)
                keep = (
                    stab > stability_score_thresh
                    if stability_score_thresh > 0.0
                    else torch.ones_like(stab, dtype=torch.bool)
                )
                kept_boxes.append(mask_to_box_xyxy(up[keep] > mask_threshold))
                kept_logits.append(low[c : c + chunk][keep])
                kept_iou.append(iou[c : c + chunk][keep])
                kept_stability.append(stab[keep])
                kept_point.append(point[c : c + chunk][keep])
        if not kept_logits:
            return None
        return kept_logits, kept_iou, kept_stability, kept_boxes, kept_point

    @torch.inference_mode()
    def automatic(
        self,
        embeddings: torch.Tensor,
        original_size: tuple[int, int],
        reshaped_input_size: tuple[int, int],
        points_per_side: int = 32,
        points_per_batch: int = 64,
        pred_iou_thresh: float = 0.88,
        stability_score_thresh: float = 0.95,
        stability_score_offset: float = 1.0,
        box_nms_thresh: float = 0.7,
        mask_threshold: float = 0.0,
    ) -> list[dict[str, Any]]:
        """Segment everything in one image, as the ``mask-generation`` pipeline (one crop).

        A ``points_per_side``^2 grid of foreground points runs through the decoder
        ``points_per_batch`` at a time (3 masks each); masks with a predicted IoU above
        ``pred_iou_thresh`` and a stability score (at the original size) above
        ``stability_score_thresh`` are kept (a threshold <= 0 disables its filter, as in the
        reference) and deduplicated by box NMS at ``box_nms_thresh``.

        Args:
            embeddings: (256, 64, 64) or (1, 256, 64, 64), from ``image_embeddings``.
            original_size: (H, W) of the original image.
            reshaped_input_size: (h, w) of the resized image.

        Returns:
            Mask records, best predicted IoU first (NMS order): ``mask_id``, ``segmentation``
            (COCO RLE), ``bbox`` [x, y, w, h], ``area``, ``predicted_iou``, ``stability_score``,
            ``point`` [x, y] (the grid point in original pixels).
        """
        h, w = (int(v) for v in original_size)
        rh, rw = (int(v) for v in reshaped_input_size)
        grid = build_point_grid(points_per_side) * torch.tensor([w, h])  # original pixels
        scaled = (grid * torch.tensor([rw / w, rh / h])).to(self.device)
        kept = self._grid_masks(
            embeddings,
            scaled,
            (h, w),
            (rh, rw),
            points_per_batch,
            (pred_iou_thresh, stability_score_thresh, stability_score_offset, mask_threshold),
        )
        if kept is None:
            return []
        kept_logits, kept_iou, kept_stability, kept_boxes, kept_point = kept
        iou = torch.cat(kept_iou)
        order = batched_nms(
            torch.cat(kept_boxes).float(),
            iou,
            torch.zeros_like(iou, dtype=torch.int64),
            box_nms_thresh,
        )
        return self._mask_records(
            torch.cat(kept_logits)[order],
            iou[order],
            torch.cat(kept_stability)[order],
            ((h, w), (rh, rw), mask_threshold),
            point=grid[torch.cat(kept_point)[order].cpu()].tolist(),
        )


def _prompt_tensors(
    points: torch.Tensor | None, labels: torch.Tensor | None, boxes: torch.Tensor | None
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, int]:
    """Prompts as (N, P, 2) points, (N, P) labels (all foreground when None), (N, 4) boxes,
    and N; one box per point prompt when both are given."""
    if points is None and boxes is None:
        raise ValueError("prompted masks need points or boxes")
    if points is not None:
        points = points.reshape(-1, *points.shape[-2:])
        labels = (
            torch.ones(points.shape[:-1], dtype=torch.int64)
            if labels is None
            else labels.reshape(-1, labels.shape[-1])
        )
    if boxes is not None:
        boxes = boxes.reshape(-1, 4)
    n = points.shape[0] if points is not None else boxes.shape[0]
    if points is not None and boxes is not None and boxes.shape[0] != n:
        raise ValueError(f"{n} point prompts but {boxes.shape[0]} boxes: pass one box per prompt")
    return points, labels, boxes, n


class SamFamily(Family):
    """SAM: longest side -> ``size.longest_edge``, normalized, padded bottom/right to ``pad_size``."""

    name = "sam"
    default_resample = 2  # bilinear
    model_types = ("sam",)
    capabilities = frozenset({Capability.MASKS})
    """Masks only: no embedding (``embedding_dim`` 0), no text tower."""

    def __init__(self, checkpoint: Checkpoint) -> None:
        super().__init__(checkpoint)
        # the processor config rules; without a key, the model's frame (defaults applied)
        frame = int(self.config.vision_config.image_size)
        size = self.processor.get("size") or {"longest_edge": frame}
        if isinstance(size, int):
            size = {"longest_edge": size}
        self.longest_edge = int(size.get("longest_edge", size.get("height", frame)))
        pad = self.processor.get("pad_size") or {"height": frame, "width": frame}
        if isinstance(pad, int):
            pad = {"height": pad, "width": pad}
        self.pad_size = (int(pad["height"]), int(pad["width"]))
        self.do_resize = bool(self.processor.get("do_resize", True))
        self.do_pad = bool(self.processor.get("do_pad", True))
        self.normalization = Normalization.from_processor(
            self.processor, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
        )

    @property
    def embedding_dim(self) -> int:
        """0: SAM produces masks, no embedding (no ``Capability.IMAGE_EMBEDDINGS``)."""
        return 0

    def resident_module(self) -> tuple[Any, PreTrainedConfig]:
        """The whole ``SamModel``: the mask generator keeps every part."""
        from transformers import SamModel

        return SamModel, self.config

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        """Longest side -> ``longest_edge``, aspect kept, rounded as the reference.

        Raises:
            UnsupportedImage: without resizing, an image larger than the pad size.
        """
        if not self.do_resize:
            if self.do_pad and (height > self.pad_size[0] or width > self.pad_size[1]):
                raise UnsupportedImage(f"{height}x{width} image exceeds the SAM pad size")
            return height, width
        return preprocess_shape(height, width, self.longest_edge)

    def preprocess(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """uint8 (B, 3, h, w) -> pixel_values float32 (B, 3, pad_h, pad_w), reshaped_input_sizes.

        Args:
            images: uint8 (B, 3, h, w), values in [0, 255], one target shape.

        Returns:
            ``pixel_values`` normalized and zero-padded bottom/right (as the reference, padding
            after normalization) and ``reshaped_input_sizes`` int64 (B, 2) = (h, w).
        """
        b, c, h, w = images.shape
        if self.do_pad:
            ph, pw = self.pad_size
            if h > ph or w > pw:
                raise ValueError(f"{h}x{w} images exceed the pad size {ph}x{pw}")
            # normalize straight into the image area of the output and zero only the padding
            # (zeroing the whole 12 MiB frame first was 60% of the time)
            values = empty_huge((b, c, ph, pw), device=images.device)
            values[:, :, :h, w:] = 0
            values[:, :, h:, :] = 0
            self.normalization.apply_into(images, values[:, :, :h, :w], channel_dim=1)
        else:
            values = self.normalization.apply(images, channel_dim=1)
        sizes = torch.tensor([[h, w]] * b, dtype=torch.int64)
        return {"pixel_values": values, "reshaped_input_sizes": sizes}

    def scale_prompts(
        self,
        points: torch.Tensor | None,
        labels: torch.Tensor | None,
        boxes: torch.Tensor | None,
        original_size: torch.Tensor | tuple[int, int],
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """``scale_prompts`` with this checkpoint's ``longest_edge``."""
        return scale_prompts(points, labels, boxes, original_size, self.longest_edge)

    def _mask_generator(self, device: torch.device, dtype: torch.dtype) -> SamMaskGenerator:
        """SamModel on ``device`` in ``dtype``, for prompted and automatic masks."""
        return SamMaskGenerator(self.checkpoint, device, dtype, self.pad_size, self.longest_edge)
