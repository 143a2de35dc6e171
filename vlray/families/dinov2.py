"""DINOv2 (facebook/dinov2-small/base/large/giant, and the ``-with-registers`` checkpoints).

Reference: transformers' ``BitImageProcessor`` (shortest edge to ``size``, 256 for the published
models, bicubic antialias on uint8, centre crop to ``crop_size``, 224, fused rescale +
normalize) and ``Dinov2Model`` / ``Dinov2WithRegistersModel``, whose ``pooler_output`` is the CLS
token after the final layer norm. Image-to-image search only: DINOv2 has no text tower.

Pooling (processor config key ``pooling``, e.g. ``model.processor: {pooling: cls_mean}``):

* ``cls`` (default): the CLS token, ``hidden_size`` wide.
* ``cls_mean``: the CLS token concatenated with the mean of the patch tokens (registers left
  out), ``2 * hidden_size`` wide: the input of DINOv2's linear classifiers
  (``Dinov2ForImageClassification``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from vlray.families.base import (
    ImageEncoder,
    Normalization,
    ResizeCrop,
    ResizeCropFamily,
)
from vlray.families.checkpoint import Checkpoint, load_model
from vlray.families.clip import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

if TYPE_CHECKING:
    from transformers import PreTrainedConfig

# BitImageProcessor's defaults (with CLIP's mean / std; the published checkpoints set
# ImageNet's, size 256 and crop 224)
DEFAULT_SIZE = {"shortest_edge": 224}
DEFAULT_CROP = {"height": 224, "width": 224}
POOLINGS = ("cls", "cls_mean")


def _model_class(model_type: str) -> Any:
    from transformers import Dinov2Model, Dinov2WithRegistersModel

    return Dinov2WithRegistersModel if model_type == "dinov2_with_registers" else Dinov2Model


class Dinov2ImageEncoder(ImageEncoder):
    """``Dinov2Model`` (or with registers): the CLS token after the final norm, optionally
    with the mean patch token beside it, L2-normalized."""

    def __init__(
        self, checkpoint: Checkpoint, pooling: str, device: torch.device, dtype: torch.dtype
    ) -> None:
        self.model = load_model(checkpoint, _model_class(checkpoint.model_type), dtype).to(device)
        self.pooling = pooling
        self.registers = int(getattr(self.model.config, "num_register_tokens", 0))
        self.device, self.dtype = device, dtype
        hidden = int(self.model.config.hidden_size)
        self.dim = 2 * hidden if pooling == "cls_mean" else hidden

    @torch.inference_mode()
    def embed(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """pixel_values (B, 3, H, W) float32 -> (B, dim) float32 unit vectors on the device."""
        pixels = inputs["pixel_values"].to(self.device, self.dtype, non_blocking=True)
        tokens = self.model(pixel_values=pixels).last_hidden_state  # (B, 1 + R + N, hidden)
        pooled = tokens[:, 0]
        if self.pooling == "cls_mean":
            patches = tokens[:, 1 + self.registers :]
            pooled = torch.cat([pooled, patches.mean(dim=1)], dim=-1)
        return F.normalize(pooled.float(), dim=-1)


class Dinov2Family(ResizeCropFamily):
    """DINOv2: shortest edge to ``size``, centre crop to ``crop_size``, bicubic; every image
    ends at the crop size, so a whole batch is one group."""

    name = "dinov2"
    model_types = ("dinov2", "dinov2_with_registers")

    def __init__(self, checkpoint: Checkpoint) -> None:
        super().__init__(checkpoint)
        self.policy = ResizeCrop.from_processor(self.processor, DEFAULT_SIZE, DEFAULT_CROP)
        self.normalization = Normalization.from_processor(
            self.processor, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
        )
        self.pooling = str(self.processor.get("pooling", "cls"))
        if self.pooling not in POOLINGS:
            raise ValueError(
                f"dinov2: pooling must be one of {', '.join(POOLINGS)}, got {self.pooling!r} "
                "(set model.processor.pooling)"
            )

    @property
    def embedding_dim(self) -> int:
        """``hidden_size`` (CLS), or twice it (``cls_mean``)."""
        hidden = int(self.config.hidden_size)
        return 2 * hidden if self.pooling == "cls_mean" else hidden

    def resident_module(self) -> tuple[Any, PreTrainedConfig]:
        """The whole model (it is a vision tower)."""
        return _model_class(self.checkpoint.model_type), self.config

    def _image_encoder(self, device: torch.device, dtype: torch.dtype) -> ImageEncoder:
        """``Dinov2Model`` (``Dinov2WithRegistersModel`` for registers checkpoints)."""
        return Dinov2ImageEncoder(self.checkpoint, self.pooling, device, dtype)
