"""The model-family plug-in: resize policy, batched preprocessing, image and text encoders.

A family is pure torch (no Ray). The pipeline only talks to this interface:

* ``target_size(h, w)`` maps an (EXIF-oriented) source size to the model's target shape. The
  target shape is the bucket key: decode actors resize to it in uint8, encoders group by it.
* ``resize_size(h, w)`` is the shape of that uint8 resize when a centre crop follows it
  (CLIP, DINOv2); by default the target shape itself. ``fit(pixels)`` does both, so every
  caller (decode actors, queries, the service) crops the same way and the bucket key is the
  final shape.
* ``preprocess(images)`` turns a same-shape uint8 group ``(B, 3, H, W)`` into model inputs with
  single tensor ops (no per-image loop).
* ``load_encoder(...)`` builds the image encoder (and ``load_text_encoder`` the text tower).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from torchvision.transforms.v2 import InterpolationMode

from vlray.families.checkpoint import Checkpoint, meta_module_bytes
from vlray.ops.memory import empty_huge
from vlray.ops.resize import center_crop_hwc, resize_uint8

if TYPE_CHECKING:
    from transformers import PreTrainedConfig

# PIL resample codes used in preprocessor_config.json -> torchvision interpolation.
_RESAMPLE = {
    0: InterpolationMode.NEAREST_EXACT,
    1: InterpolationMode.LANCZOS,
    2: InterpolationMode.BILINEAR,
    3: InterpolationMode.BICUBIC,
    4: InterpolationMode.BOX,
    5: InterpolationMode.HAMMING,
}


def interpolation_from_resample(resample: int | str | None, default: int) -> InterpolationMode:
    """Maps a PIL resample code (as in preprocessor_config.json) to a torchvision mode."""
    if resample is None:
        resample = default
    if isinstance(resample, str):
        return InterpolationMode(resample.lower())
    try:
        return _RESAMPLE[int(resample)]
    except KeyError:
        raise ValueError(f"unsupported resample code {resample!r} (expected 0-5)") from None


class UnsupportedImage(ValueError):
    """The model cannot take this image (e.g. an aspect ratio it rejects); becomes an error row."""


def _size_dict(value: Any, default_to_square: bool) -> dict[str, int]:
    """A processor config's ``size`` / ``crop_size`` as transformers' ``get_size_dict`` reads
    it: an int is ``{"shortest_edge": n}`` (or square with ``default_to_square``, as old
    configs such as openai/clip-* write ``"size": 224, "crop_size": 224``), a pair is
    (height, width)."""
    if isinstance(value, dict):
        return {k: int(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return {"height": int(value[0]), "width": int(value[1])}
    if default_to_square:
        return {"height": int(value), "width": int(value)}
    return {"shortest_edge": int(value)}


@dataclass(frozen=True)
class ResizeCrop:
    """The resize + centre crop of transformers' generic ``TorchvisionBackend`` (CLIP, BiT
    for DINOv2): ``size`` as ``shortest_edge`` (aspect kept, the long side rounded down) or
    ``height``/``width``, then an optional ``crop_size`` centre crop."""

    shortest_edge: int | None
    size: tuple[int, int] | None
    crop: tuple[int, int] | None

    @classmethod
    def from_processor(
        cls, processor: dict[str, Any], size: dict[str, int], crop: dict[str, int]
    ) -> ResizeCrop:
        """Reads do_resize / size / do_center_crop / crop_size; ``size`` and ``crop`` are the
        reference class's defaults, used where the processor config has no such key.

        Raises:
            ValueError: a ``size`` of another kind (``longest_edge``, ``max_height``, ...).
        """
        resize = _size_dict(processor.get("size") or size, default_to_square=False)
        cropped = _size_dict(processor.get("crop_size") or crop, default_to_square=True)
        if set(resize) != {"shortest_edge"} and not {"height", "width"} <= set(resize):
            raise ValueError(f"size must be shortest_edge or height and width, got {resize}")
        do_resize = processor.get("do_resize", True)
        do_crop = processor.get("do_center_crop", True)
        return cls(
            shortest_edge=resize.get("shortest_edge") if do_resize else None,
            size=(resize["height"], resize["width"]) if do_resize and "height" in resize else None,
            crop=(cropped["height"], cropped["width"]) if do_crop else None,
        )

    def resize_size(self, height: int, width: int) -> tuple[int, int]:
        """Source (height, width) -> the resized (height, width), before the crop; the
        arithmetic of transformers' ``get_resize_output_image_size``."""
        if self.size is not None:
            return self.size
        if self.shortest_edge is None:
            return height, width
        short, long = (width, height) if width <= height else (height, width)
        new_long = int(self.shortest_edge * long / short)
        if width <= height:
            return new_long, self.shortest_edge
        return self.shortest_edge, new_long

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        """Source (height, width) -> the final (height, width): the crop, else the resize."""
        return self.crop if self.crop is not None else self.resize_size(height, width)


@dataclass(frozen=True)
class Normalization:
    """Rescale + normalize exactly as transformers' TorchvisionBackend does (fused)."""

    do_rescale: bool
    rescale_factor: float
    do_normalize: bool
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def from_processor(
        cls, processor: dict[str, Any], mean: tuple[float, ...], std: tuple[float, ...]
    ) -> Normalization:
        """Reads do_rescale / rescale_factor / do_normalize / image_mean / image_std."""
        return cls(
            do_rescale=bool(processor.get("do_rescale", True)),
            rescale_factor=float(processor.get("rescale_factor", 1 / 255)),
            do_normalize=bool(processor.get("do_normalize", True)),
            mean=tuple(float(v) for v in processor.get("image_mean", mean)),
            std=tuple(float(v) for v in processor.get("image_std", std)),
        )

    def apply(self, images: torch.Tensor, channel_dim: int) -> torch.Tensor:
        """uint8 images -> float32 model units.

        Args:
            images: uint8 (any layout), values in [0, 255]; channels along ``channel_dim``.
            channel_dim: the axis holding the 3 colour channels.

        Returns:
            float32 tensor of the same shape, bit-identical to the reference processor's values.
        """
        return self.apply_into(images, None, channel_dim)

    def apply_into(
        self, images: torch.Tensor, out: torch.Tensor | None, channel_dim: int
    ) -> torch.Tensor:
        """``apply``, writing into ``out`` (a float32 tensor or view of ``images``' shape).

        The same float32 operations as the reference (uint8 -> float32 copy, subtract, divide),
        so bit-identical values, arranged for speed: the work runs in chunks small enough to
        stay in the CPU cache between the three passes (one pass over memory instead of
        three): along the first axis, or, when one image is much larger than a chunk and
        channels come first in the output (SAM's 1024x1024 frames), image by image, channel by
        channel, in blocks of rows. When few elements follow the channel axis (channels
        last) the statistics are repeated over them so the in-place arithmetic runs over long
        contiguous rows instead of 3-element ones.
        """
        if out is None:
            out = empty_huge(tuple(images.shape), device=images.device)
        channel_dim %= images.dim()
        shift, scale, multiply = self._statistics(images, channel_dim)
        on_cpu = images.device.type == "cpu"
        if channel_dim == 0 or not on_cpu:  # the statistics vary along the first axis
            _normalize(images, out, shift, scale, multiply, chunk=None)
        elif channel_dim == 1 and images.dim() >= 3 and images[0].numel() > _LARGE_IMAGE:
            for i in range(images.shape[0]):
                for c in range(images.shape[1]):
                    _normalize(
                        images[i, c],
                        out[i, c],
                        None if shift is None else shift[c],
                        scale[c] if isinstance(scale, torch.Tensor) else scale,
                        multiply,
                        chunk=CHUNK_ELEMENTS,
                    )
        else:
            _normalize(images, out, shift, scale, multiply, chunk=CHUNK_ELEMENTS)
        return out

    def _statistics(
        self, images: torch.Tensor, channel_dim: int
    ) -> tuple[torch.Tensor | None, torch.Tensor | float | None, bool]:
        """(shift, scale, multiply) broadcastable over ``images``: x -> (x - shift) / scale, or
        x * scale when ``multiply`` (rescale only), with the reference's float32 constants."""
        shape = [1] * (images.dim() - channel_dim)
        shape[0] = -1
        if not self.do_normalize:
            return None, (self.rescale_factor if self.do_rescale else None), self.do_rescale
        multiply = False
        shift, scale = _channel_statistics(self, images.device)
        shift, scale = shift.view(shape), scale.view(shape)
        if math.prod(images.shape[channel_dim + 1 :]) < _LONG_ROW:
            # channels (nearly) last: materialize the statistics over the trailing axes, from
            # the first axis after which at least _LONG_ROW elements follow
            first = channel_dim
            while first > 1 and math.prod(images.shape[first:]) < _LONG_ROW:
                first -= 1
            trailing = images.shape[first:]
            shift = shift.expand(trailing).contiguous()
            scale = scale.expand(trailing).contiguous()
        return shift, scale, multiply


@lru_cache(maxsize=64)
def _channel_statistics(
    normalization: Normalization, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(shift, scale) float32 (C,) on ``device``: the reference's constants, made once per
    device (a copy to a GPU per call would wait for the work queued before it)."""
    n = normalization
    shift, scale = torch.tensor(n.mean), torch.tensor(n.std)
    if n.do_rescale:
        # The reference fuses rescale into mean/std: (x - mean/r) / (std/r), in float32.
        shift, scale = shift * (1.0 / n.rescale_factor), scale * (1.0 / n.rescale_factor)
    return shift.to(device), scale.to(device)


def _normalize(
    images: torch.Tensor,
    out: torch.Tensor,
    shift: torch.Tensor | None,
    scale: torch.Tensor | float | None,
    multiply: bool,
    chunk: int | None,
) -> None:
    """out = (images - shift) / scale (or * scale), in pieces of about ``chunk`` elements along
    the first axis (None: in one piece)."""
    rows = images.shape[0]
    per_row = images[0].numel() if rows else 1
    step = rows if chunk is None else max(1, chunk // max(per_row, 1))
    for s in range(0, rows, max(step, 1)):
        piece = out[s : s + step]
        piece.copy_(images[s : s + step])
        if shift is not None:
            piece.sub_(shift)
        if scale is not None:
            piece.mul_(scale) if multiply else piece.div_(scale)


# elements per normalization chunk (float32: 1 MiB, inside a typical L2 cache)
CHUNK_ELEMENTS = 1 << 18
# above this many elements per image, channel-first outputs are normalized channel by channel
# in blocks of rows: 1.2-1.4x faster for SAM's frames; per-image chunks stay faster for
# SigLIP-384's 442k-element images (bench/preprocess.py)
_LARGE_IMAGE = 4 * CHUNK_ELEMENTS
# below this many elements after the channel axis, the statistics are materialized
_LONG_ROW = 64


class ImageEncoder(ABC):
    """Encodes preprocessed same-shape groups into L2-normalized embeddings."""

    dim: int
    device: torch.device
    dtype: torch.dtype

    @abstractmethod
    def embed(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Model inputs of one same-shape group (on any device) -> (B, dim) float32 unit
        vectors on the encoder's device, without waiting for the device: a caller encoding
        several groups copies them back once, and the GPU runs ahead of the CPU meanwhile."""

    def encode(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Model inputs of one same-shape group -> (B, dim) float32 unit vectors, on CPU."""
        return self.embed(inputs).cpu()


class TextEncoder(ABC):
    """Encodes text queries into the image embedding space."""

    @abstractmethod
    def encode(self, texts: list[str]) -> torch.Tensor:
        """Strings -> (B, dim) float32 unit vectors, on CPU."""

    def probability(self, cosine: torch.Tensor) -> torch.Tensor | None:
        """The model's own match probability for a cosine score, if it defines one."""
        return None


class Family(ABC):
    """One model family. Built from a checkpoint's processor config (light, picklable)."""

    name: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]
    produces_embeddings: ClassVar[bool] = True
    packed_groups: ClassVar[bool] = False
    """Whether ``preprocess`` reads packed RGB groups faster than PIL's 4-byte pixels (in
    ``batch.preprocess_images``): True where it gathers patches whose rows then hold 3 * patch
    contiguous bytes (SigLIP2: 3x); channel-first outputs read one channel at a time either
    way, and packing first is a copy more, one that holds the GIL in Pillow's packer."""

    def __init__(self, checkpoint: Checkpoint) -> None:
        self.checkpoint = checkpoint
        self.processor = checkpoint.processor

    @property
    def config(self) -> PreTrainedConfig:
        """The checkpoint's transformers config, defaults applied (cached, read-only)."""
        return self.checkpoint.config_object()

    @property
    @abstractmethod
    def embedding_dim(self) -> int:
        """Width of the embeddings ``load_encoder`` produces, from the config object (defaults
        applied, as the hub's config.json leaves them out); 0 for families without embeddings."""

    @property
    def model_bytes(self) -> int:
        """float32 bytes of the weights this family's encoder keeps resident (for memory
        planning), counted on the meta device from the config object."""
        module_cls, config = self.resident_module()
        return meta_module_bytes(module_cls, config)

    @abstractmethod
    def resident_module(self) -> tuple[Any, PreTrainedConfig]:
        """(transformers module class, its config): what ``load_encoder`` (or SAM's mask
        generator) keeps in memory, built as ``module_cls._from_config(config)``."""

    @property
    @abstractmethod
    def interpolation(self) -> InterpolationMode:
        """The filter of the uint8 resize to the target shape (antialiased, as the reference)."""

    @abstractmethod
    def target_size(self, height: int, width: int) -> tuple[int, int]:
        """Source (height, width) -> target (height, width), the bucket key.

        Raises:
            UnsupportedImage: the model rejects this image.
        """

    def resize_size(self, height: int, width: int) -> tuple[int, int]:
        """Source (height, width) -> the shape of the uint8 resize, which a centre crop then
        takes to ``target_size`` (families with a crop override this); by default the target
        shape itself (no crop).

        Raises:
            UnsupportedImage: the model rejects this image.
        """
        return self.target_size(height, width)

    def fit(
        self,
        pixels: np.ndarray,
        source_size: tuple[int, int] | None = None,
        pack: bool = True,
    ) -> np.ndarray:
        """One image -> its model-ready uint8 pixels: resized to ``resize_size``, then
        centre-cropped to ``target_size`` (the bucket key) as the reference processor does.

        Args:
            pixels: (H, W, 3|4) uint8, channels 0-2 RGB.
            source_size: the (height, width) the policy is computed from, when ``pixels`` is
                a draft-decoded reduction of the image; None: ``pixels``' own.
            pack: as :func:`vlray.ops.resize.resize_uint8`.

        Returns:
            (th, tw, 3|4) uint8, C-contiguous, (th, tw) == ``target_size(*source_size)``.

        Raises:
            UnsupportedImage: the model rejects this image.
        """
        height, width = source_size or pixels.shape[:2]
        target = self.target_size(height, width)
        resized = resize_uint8(pixels, self.resize_size(height, width), self.interpolation, pack)
        return center_crop_hwc(resized, target)

    @abstractmethod
    def preprocess(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """A same-shape group, uint8 (B, 3, H, W) with (H, W) == target_size -> model inputs."""

    @abstractmethod
    def load_encoder(self, device: torch.device, dtype: torch.dtype) -> ImageEncoder:
        """Builds the image encoder on ``device`` in ``dtype``."""

    def load_text_encoder(self, device: torch.device, dtype: torch.dtype) -> TextEncoder:
        """Builds the text tower; families or checkpoints without one raise a clear message."""
        raise NotImplementedError(
            f"{self.checkpoint.name} ({self.name}) has no text tower: query by --image or --id instead"
        )
