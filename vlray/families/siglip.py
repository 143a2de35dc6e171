"""SigLIP at a fixed resolution (google/siglip-so400m-patch14-384, fixed-res SigLIP2 checkpoints).

Reference: transformers' ``SiglipImageProcessor`` (resize to ``size`` with bicubic antialias on
uint8, fused rescale + normalize) and ``SiglipModel.get_image_features`` (pooled output).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from vlray.families.base import (
    ImageEncoder,
    Normalization,
    TextEncoder,
    TwoTowerFamily,
)
from vlray.families.checkpoint import (
    Checkpoint,
    load_model,
    load_vision_tower,
    vision_config,
)

if TYPE_CHECKING:
    from transformers import PreTrainedConfig

TEXT_MAX_LENGTH = 64
"""SigLIP text towers were trained on text padded to 64 tokens."""

IMAGENET_STANDARD = (0.5, 0.5, 0.5)


class SiglipTextEncoder(TextEncoder):
    """The SigLIP / SigLIP2 text tower with its tokenizer, padded to max_length 64."""

    def __init__(
        self, checkpoint: Checkpoint, model_cls: Any, device: torch.device, dtype: torch.dtype
    ) -> None:
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(checkpoint.path)
        self.model = load_model(checkpoint, model_cls, dtype).to(device)
        self.device = device

    @torch.inference_mode()
    def encode(self, texts: list[str]) -> torch.Tensor:
        """Strings -> (B, dim) float32 unit vectors on CPU."""
        tokens = self.tokenizer(
            texts,
            padding="max_length",
            max_length=TEXT_MAX_LENGTH,
            truncation=True,
            return_tensors="pt",
        ).to(self.device)
        out = self.model.get_text_features(**tokens)
        return F.normalize(out.pooler_output.float(), dim=-1).cpu()

    def probability(self, cosine: torch.Tensor) -> torch.Tensor:
        """SigLIP's match probability ``sigmoid(cos * exp(logit_scale) + logit_bias)``."""
        scale = self.model.logit_scale.detach().float().cpu().exp()
        bias = self.model.logit_bias.detach().float().cpu()
        return torch.sigmoid(cosine * scale + bias)


class SiglipImageEncoder(ImageEncoder):
    """``SiglipModel.vision_model`` pooled output, L2-normalized."""

    def __init__(self, checkpoint: Checkpoint, device: torch.device, dtype: torch.dtype) -> None:
        from transformers import SiglipModel, SiglipVisionModel

        self.vision = load_vision_tower(checkpoint, SiglipModel, SiglipVisionModel, dtype).to(
            device
        )
        self.device, self.dtype = device, dtype
        self.dim = int(self.vision.config.hidden_size)

    @torch.inference_mode()
    def embed(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """pixel_values (B, 3, H, W) float32 -> (B, dim) float32 unit vectors on the device."""
        pixels = inputs["pixel_values"].to(self.device, self.dtype, non_blocking=True)
        pooled = self.vision(pixel_values=pixels).pooler_output
        return F.normalize(pooled.float(), dim=-1)


class SiglipFamily(TwoTowerFamily):
    """Fixed-resolution SigLIP: every image is resized to ``size`` (e.g. 384x384), bicubic."""

    name = "siglip"
    model_types = ("siglip", "siglip_vision_model")

    def __init__(self, checkpoint: Checkpoint) -> None:
        super().__init__(checkpoint)
        # the processor config rules; without a size, the model's own (defaults applied)
        side = int(vision_config(self.config).image_size)
        size = self.processor.get("size") or {"height": side, "width": side}
        if "height" not in size or "width" not in size:
            raise ValueError(f"siglip: size must have height and width, got {size}")
        self.size = (int(size["height"]), int(size["width"]))
        self.do_resize = bool(self.processor.get("do_resize", True))
        self.normalization = Normalization.from_processor(
            self.processor, IMAGENET_STANDARD, IMAGENET_STANDARD
        )

    @property
    def embedding_dim(self) -> int:
        """``get_image_features``' pooled output: the vision tower's ``hidden_size`` (SigLIP has
        no projection; the attention-pooling head keeps the width)."""
        return int(vision_config(self.config).hidden_size)

    def resident_module(self) -> tuple[Any, PreTrainedConfig]:
        """The vision tower (the encoder drops the text tower after loading)."""
        from transformers import SiglipVisionModel

        return SiglipVisionModel, vision_config(self.config)

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        """Every image goes to the processor's fixed ``size``."""
        return self.size if self.do_resize else (height, width)

    def preprocess(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """uint8 (B, 3, H, W) -> ``pixel_values`` float32 (B, 3, H, W)."""
        return {"pixel_values": self.normalization.apply(images, channel_dim=1)}

    def _image_encoder(self, device: torch.device, dtype: torch.dtype) -> ImageEncoder:
        """The vision tower of ``SiglipModel``."""
        return SiglipImageEncoder(self.checkpoint, device, dtype)

    def _text_encoder(self, device: torch.device, dtype: torch.dtype) -> TextEncoder:
        """The text tower of ``SiglipModel``."""
        from transformers import SiglipModel

        return SiglipTextEncoder(self.checkpoint, SiglipModel, device, dtype)
