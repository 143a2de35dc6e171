"""SigLIP2 NaFlex (google/siglip2-base-patch16-naflex, so400m naflex).

Reference: transformers' ``Siglip2ImageProcessor`` resizes each image to
``get_image_size_for_max_num_patches`` (bilinear, antialias, on uint8), normalizes, cuts it into
``patch_size`` patches in (row, col, [py, px, c]) order and pads every image to
``max_num_patches``. Here a same-shape group is patchified in one tensor op and not padded at
all: without padding no attention mask is needed and the encoder output is the same as the
reference's padded, masked forward (tested).
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from vlray.families.base import (
    ImageEncoder,
    Normalization,
    TextEncoder,
    TwoTowerFamily,
)
from vlray.families.checkpoint import Checkpoint, load_vision_tower, vision_config
from vlray.families.siglip import IMAGENET_STANDARD, SiglipTextEncoder

if TYPE_CHECKING:
    from transformers import PreTrainedConfig


@lru_cache(maxsize=65536)
def size_for_max_num_patches(
    height: int, width: int, patch_size: int, max_num_patches: int, eps: float = 1e-5
) -> tuple[int, int]:
    """The reference's ``get_image_size_for_max_num_patches``: the largest patch-aligned size
    with the source's aspect ratio and at most ``max_num_patches`` patches (binary search on the
    scale, same arithmetic, so the same answer for every input)."""

    def scaled(scale: float, size: int) -> int:
        return int(max(patch_size, math.ceil(size * scale / patch_size) * patch_size))

    lo, hi = eps / 10, 100.0
    while (hi - lo) >= eps:
        scale = (lo + hi) / 2
        h, w = scaled(scale, height), scaled(scale, width)
        if (h / patch_size) * (w / patch_size) <= max_num_patches:
            lo = scale
        else:
            hi = scale
    return scaled(lo, height), scaled(lo, width)


class Siglip2ImageEncoder(ImageEncoder):
    """The SigLIP2 vision tower, run on unpadded same-shape groups without an attention mask.

    Position embeddings are resized once per target shape (the reference resizes them once per
    image) and cached.
    """

    def __init__(self, checkpoint: Checkpoint, device: torch.device, dtype: torch.dtype) -> None:
        from transformers import Siglip2Model, Siglip2VisionModel

        self.vision = load_vision_tower(checkpoint, Siglip2Model, Siglip2VisionModel, dtype).to(
            device
        )
        self.device, self.dtype = device, dtype
        self.dim = int(self.vision.config.hidden_size)
        self._positions: dict[tuple[int, int], torch.Tensor] = {}

    def _position_embeddings(self, nh: int, nw: int) -> torch.Tensor:
        key = (nh, nw)
        if key not in self._positions:
            emb = self.vision.embeddings
            table = emb.position_embedding.weight.reshape(
                emb.position_embedding_size, emb.position_embedding_size, -1
            )
            shapes = torch.tensor([[nh, nw]], device=table.device)
            self._positions[key] = emb.resize_positional_embeddings(table, shapes, nh * nw)
        return self._positions[key]

    @torch.inference_mode()
    def embed(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """pixel_values (B, N, p*p*3) float32 of one shape + spatial_shapes (B, 2) -> (B, dim)
        unit vectors on the device."""
        pixels = inputs["pixel_values"].to(self.device, self.dtype, non_blocking=True)
        nh, nw = (int(v) for v in inputs["spatial_shapes"][0])
        if nh * nw != pixels.shape[1]:
            raise ValueError("siglip2 encoder expects unpadded same-shape groups")
        emb = self.vision.embeddings
        hidden = emb.patch_embedding(pixels) + self._position_embeddings(nh, nw)
        hidden = self.vision.encoder(inputs_embeds=hidden, attention_mask=None).last_hidden_state
        hidden = self.vision.post_layernorm(hidden)
        pooled = self.vision.head(hidden)
        return F.normalize(pooled.float(), dim=-1)


class Siglip2Family(TwoTowerFamily):
    """SigLIP2 NaFlex: aspect-preserving resize to at most ``max_num_patches`` patches."""

    name = "siglip2"
    default_resample = 2  # bilinear
    model_types = ("siglip2", "siglip2_vision_model")
    packed_groups = True  # 48 contiguous bytes per patch row instead of 3 (bench/preprocess)

    def __init__(self, checkpoint: Checkpoint) -> None:
        super().__init__(checkpoint)
        # the processor config rules; without a key, the model's own value (defaults applied)
        vision = vision_config(self.config)
        self.patch_size = int(self.processor.get("patch_size", vision.patch_size))
        self.max_num_patches = int(self.processor.get("max_num_patches", vision.num_patches))
        self.do_resize = bool(self.processor.get("do_resize", True))
        self.normalization = Normalization.from_processor(
            self.processor, IMAGENET_STANDARD, IMAGENET_STANDARD
        )

    @property
    def embedding_dim(self) -> int:
        """``get_image_features``' pooled output (the attention-pooling head): the vision
        tower's ``hidden_size``."""
        return int(vision_config(self.config).hidden_size)

    def resident_module(self) -> tuple[Any, PreTrainedConfig]:
        """The vision tower (the encoder drops the text tower after loading)."""
        from transformers import Siglip2VisionModel

        return Siglip2VisionModel, vision_config(self.config)

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        """The reference's NaFlex size for ``max_num_patches`` patches of ``patch_size``."""
        if not self.do_resize:
            return height, width
        return size_for_max_num_patches(height, width, self.patch_size, self.max_num_patches)

    def preprocess(self, images: torch.Tensor, pad: bool = False) -> dict[str, torch.Tensor]:
        """uint8 (B, 3, H, W) -> pixel_values float32 (B, H/p*W/p, p*p*3) and spatial_shapes.

        Normalizes straight from a patch-ordered view of the uint8 group into the output
        layout, with the same float32 arithmetic per element as the reference.

        Args:
            images: uint8 (B, 3, H, W), values in [0, 255], one target shape.
            pad: also pad to ``max_num_patches`` and return ``pixel_attention_mask``, exactly
                like the reference's output (for parity checks; the encoder does not need it).
        """
        b, c, h, w = images.shape
        p = self.patch_size
        # (b, nh, nw, py, px, c): a view of the uint8 group; normalized straight into the
        # patch layout (the uint8 -> float32 copy does the reordering)
        patches = images.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
        values = self.normalization.apply(patches, channel_dim=5).reshape(b, -1, p * p * c)
        n = values.shape[1]
        shapes = torch.tensor([[h // p, w // p]] * b, dtype=torch.int64)
        out = {"pixel_values": values, "spatial_shapes": shapes}
        if pad:
            if n > self.max_num_patches:
                raise ValueError(f"{n} patches exceed max_num_patches {self.max_num_patches}")
            out["pixel_values"] = F.pad(values, (0, 0, 0, self.max_num_patches - n))
            mask = torch.zeros(b, self.max_num_patches, dtype=torch.int32)
            mask[:, :n] = 1
            out["pixel_attention_mask"] = mask
        return out

    def _image_encoder(self, device: torch.device, dtype: torch.dtype) -> ImageEncoder:
        """The SigLIP2 vision tower, unpadded groups, no mask."""
        return Siglip2ImageEncoder(self.checkpoint, device, dtype)

    def _text_encoder(self, device: torch.device, dtype: torch.dtype) -> TextEncoder:
        """The SigLIP2 text tower (Gemma tokenizer), padded to 64 tokens."""
        from transformers import Siglip2Model

        return SiglipTextEncoder(self.checkpoint, Siglip2Model, device, dtype)
