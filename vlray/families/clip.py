"""CLIP (openai/clip-vit-base-patch32, -large-patch14(-336), LAION's transformers-format ViT-H/14
and ViT-bigG).

Reference: transformers' ``CLIPImageProcessor`` (shortest edge to ``size``, bicubic antialias on
uint8, centre crop to ``crop_size``, fused rescale + normalize) and
``CLIPModel.get_image_features`` (the vision tower's pooled output through
``visual_projection``: the projection dimension, not the hidden size). Text queries go through
``CLIPTokenizer`` and ``get_text_features`` into the same space.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from vlray.families.base import (
    ImageEncoder,
    Normalization,
    ResizeCrop,
    ResizeCropFamily,
    TextEncoder,
    TwoTowerFamily,
)
from vlray.families.checkpoint import Checkpoint, load_model, vision_config

if TYPE_CHECKING:
    from transformers import PreTrainedConfig

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ClipImageEncoder(ImageEncoder):
    """``CLIPModel.get_image_features``: the vision tower's pooled output projected to
    ``projection_dim``, L2-normalized (the text tower is dropped after loading)."""

    def __init__(self, checkpoint: Checkpoint, device: torch.device, dtype: torch.dtype) -> None:
        from transformers import CLIPModel

        model = load_model(checkpoint, CLIPModel, dtype)
        self.vision = model.vision_model.to(device)
        self.projection = model.visual_projection.to(device)
        self.device, self.dtype = device, dtype
        self.dim = int(self.projection.out_features)

    @torch.inference_mode()
    def embed(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """pixel_values (B, 3, H, W) float32 -> (B, projection_dim) float32 unit vectors on the
        device."""
        pixels = inputs["pixel_values"].to(self.device, self.dtype, non_blocking=True)
        pooled = self.vision(pixel_values=pixels).pooler_output
        return F.normalize(self.projection(pooled).float(), dim=-1)


class ClipTextEncoder(TextEncoder):
    """``CLIPModel.get_text_features`` with the checkpoint's ``CLIPTokenizer`` (truncated to the
    text tower's positions, 77 for the published models); the vision tower is dropped."""

    def __init__(self, checkpoint: Checkpoint, device: torch.device, dtype: torch.dtype) -> None:
        from transformers import AutoTokenizer, CLIPModel

        self.tokenizer = AutoTokenizer.from_pretrained(checkpoint.path)
        model = load_model(checkpoint, CLIPModel, dtype)
        self.text = model.text_model.to(device)
        self.projection = model.text_projection.to(device)
        self.max_length = int(model.config.text_config.max_position_embeddings)
        self.device = device

    @torch.inference_mode()
    def encode(self, texts: list[str]) -> torch.Tensor:
        """Strings -> (B, projection_dim) float32 unit vectors on CPU."""
        tokens = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        pooled = self.text(
            input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]
        ).pooler_output
        return F.normalize(self.projection(pooled).float(), dim=-1).cpu()


class ClipFamily(ResizeCropFamily, TwoTowerFamily):
    """CLIP: shortest edge to ``size``, centre crop to ``crop_size`` (224x224 for ViT-B/32),
    bicubic; every image ends at the crop size, so a whole batch is one group."""

    name = "clip"
    model_types = ("clip",)

    def __init__(self, checkpoint: Checkpoint) -> None:
        super().__init__(checkpoint)
        # the processor config rules; without one, the model's own image size (defaults applied)
        side = int(vision_config(self.config).image_size)
        self.policy = ResizeCrop.from_processor(
            self.processor, {"shortest_edge": side}, {"height": side, "width": side}
        )
        self.normalization = Normalization.from_processor(
            self.processor, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
        )

    @property
    def embedding_dim(self) -> int:
        """``get_image_features``' width: the model's ``projection_dim``."""
        return int(self.config.projection_dim)

    def resident_module(self) -> tuple[Any, PreTrainedConfig]:
        """The vision tower and its projection (the encoder drops the text tower)."""
        from transformers import CLIPVisionModelWithProjection

        config = copy.deepcopy(vision_config(self.config))
        config.projection_dim = self.embedding_dim  # CLIPModel's, not the sub-config's default
        return CLIPVisionModelWithProjection, config

    def _image_encoder(self, device: torch.device, dtype: torch.dtype) -> ImageEncoder:
        """The vision tower + ``visual_projection`` of ``CLIPModel``."""
        return ClipImageEncoder(self.checkpoint, device, dtype)

    def _text_encoder(self, device: torch.device, dtype: torch.dtype) -> TextEncoder:
        """The text tower + ``text_projection`` of ``CLIPModel``, with ``CLIPTokenizer``."""
        return ClipTextEncoder(self.checkpoint, device, dtype)
