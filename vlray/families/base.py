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
* ``capabilities``: what this checkpoint can do (:class:`Capability`): embed images, embed
  text, produce masks, produce token matrices. Callers ask it and load only what it lists:
  ``load_encoder`` (image embeddings; token matrices through the same encoder),
  ``load_text_encoder``, ``load_mask_generator``. Asking for a missing capability raises
  :class:`MissingCapability`, whose message names what to do instead.

The pipeline, the query code and the service see only this contract: they never name a
family or probe an object for methods.
"""

from __future__ import annotations

import enum
import functools
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

import numpy as np
import torch
from torchvision.transforms.v2 import InterpolationMode

from vlray.families.checkpoint import Checkpoint, meta_module_bytes, text_tower_problem
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


class Capability(enum.Enum):
    """What a checkpoint can do; a family lists its checkpoint's in ``Family.capabilities``."""

    IMAGE_EMBEDDINGS = "image embeddings"
    """``load_encoder``: same-shape groups -> L2-normalized vectors (``embedding_dim`` wide)."""
    TEXT_EMBEDDINGS = "text embeddings"
    """``load_text_encoder``: strings -> vectors in the image embedding space (a text tower
    and its tokenizer are in the checkpoint)."""
    MASKS = "masks"
    """``load_mask_generator``: image embeddings once per image, masks per prompt or grid."""
    TOKEN_MATRICES = "token matrices"
    """``ImageEncoder.embed_tokens``: the per-image token matrix beside the embedding."""


class MissingCapability(NotImplementedError):
    """A capability the family or this checkpoint lacks was asked for; the message says what
    to use instead. A configuration error: it is raised before any row is processed."""


_INSTEAD = {
    Capability.IMAGE_EMBEDDINGS: "it produces no embeddings (use it as sam.name for masks)",
    Capability.TEXT_EMBEDDINGS: "no text tower: query by --image or --id instead",
    Capability.MASKS: "it produces no masks (sam.name takes a SAM checkpoint)",
    Capability.TOKEN_MATRICES: "its encoder has no token matrix (model.store_tokens off)",
}


class TokenMatrices(NamedTuple):
    """One same-shape group's embeddings with the token matrices they pool."""

    embeddings: torch.Tensor
    """(B, dim) float32 unit vectors, on the encoder's device."""
    tokens: torch.Tensor
    """(B, grid_h * grid_w, dim) float32, on the encoder's device."""
    grid: tuple[int, int]
    """(grid_h, grid_w) of every image in the group (the token matrix is row-major)."""


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

    def embed_tokens(self, inputs: dict[str, torch.Tensor]) -> TokenMatrices:
        """``embed`` plus the token matrices it pools (``Capability.TOKEN_MATRICES``).

        Raises:
            MissingCapability: this encoder has no token matrix.
        """
        raise MissingCapability(f"{type(self).__name__}: {_INSTEAD[Capability.TOKEN_MATRICES]}")


class MaskGenerator(ABC):
    """Masks from image embeddings (``Capability.MASKS``); every output in original pixels.

    ``original_size`` is the decoded image's (H, W) and ``reshaped_input_size`` the (H, W) it
    was resized to (``family.target_size``); mask records are dicts of COCO RLE
    ``segmentation``, ``bbox`` [x, y, w, h], ``area``, ``predicted_iou``, ``stability_score``
    and ``point`` (automatic) or ``prompt_index`` (prompted).
    """

    @abstractmethod
    def image_embeddings(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The family's ``preprocess`` output ``pixel_values`` -> per-image embeddings (B, ...)
        on the generator's device."""

    @abstractmethod
    def scale_prompts(
        self,
        points: torch.Tensor | None,
        labels: torch.Tensor | None,
        boxes: torch.Tensor | None,
        original_size: tuple[int, int],
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """Prompts in original pixels, (1, N, P, 2) points, (1, N, P) labels, (1, N, 4) boxes
        -> the model's input frame."""

    @abstractmethod
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
        """One image's embedding and its (scaled) prompts -> mask records."""

    @abstractmethod
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
        """One image's embedding -> the filtered, deduplicated masks of a point grid."""


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
    default_resample: ClassVar[int] = 3
    """PIL resample code of the reference processor when its config names none (3 bicubic,
    2 bilinear)."""
    packed_groups: ClassVar[bool] = False
    """Whether ``preprocess`` reads packed RGB groups faster than PIL's 4-byte pixels (in
    ``batch.preprocess_images``): True where it gathers patches whose rows then hold 3 * patch
    contiguous bytes (SigLIP2: 3x); channel-first outputs read one channel at a time either
    way, and packing first is a copy more, one that holds the GIL in Pillow's packer."""

    def __init__(self, checkpoint: Checkpoint) -> None:
        self.checkpoint = checkpoint
        self.processor = checkpoint.processor

    @property
    def capabilities(self) -> frozenset[Capability]:
        """What this checkpoint can do; by default it embeds images and nothing else. Families
        whose text tower may be left out of a checkpoint check the checkpoint's files."""
        return frozenset({Capability.IMAGE_EMBEDDINGS})

    def supports(self, capability: Capability) -> bool:
        """Whether ``capability`` is in ``capabilities``."""
        return capability in self.capabilities

    def require(self, capability: Capability) -> None:
        """Raises MissingCapability (naming what to use instead) unless ``supports``."""
        if not self.supports(capability):
            why = self.why_missing(capability)
            raise MissingCapability(
                f"{self.checkpoint.name} ({self.name}): {_INSTEAD[capability]}"
                + (f" ({why})" if why else "")
            )

    def why_missing(self, capability: Capability) -> str:
        """Why this checkpoint lacks ``capability`` where the family could have it (e.g. no
        tokenizer files); empty when the family never has it."""
        return ""

    @property
    def produces_embeddings(self) -> bool:
        """``supports(Capability.IMAGE_EMBEDDINGS)``."""
        return self.supports(Capability.IMAGE_EMBEDDINGS)

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

    @functools.cached_property
    def interpolation(self) -> InterpolationMode:
        """The filter of the uint8 resize to the target shape (antialiased, as the reference):
        the processor config's ``resample``, else the family's ``default_resample``."""
        return interpolation_from_resample(self.processor.get("resample"), self.default_resample)

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

    def load_encoder(self, device: torch.device, dtype: torch.dtype) -> ImageEncoder:
        """Builds the image encoder on ``device`` in ``dtype`` (``Capability.IMAGE_EMBEDDINGS``;
        with ``TOKEN_MATRICES`` its ``embed_tokens`` works too).

        Raises:
            MissingCapability: the family produces no embeddings.
        """
        self.require(Capability.IMAGE_EMBEDDINGS)
        return self._image_encoder(device, dtype)

    def load_text_encoder(self, device: torch.device, dtype: torch.dtype) -> TextEncoder:
        """Builds the text tower (``Capability.TEXT_EMBEDDINGS``).

        Raises:
            MissingCapability: the family or this checkpoint has no text tower.
        """
        self.require(Capability.TEXT_EMBEDDINGS)
        return self._text_encoder(device, dtype)

    def load_mask_generator(self, device: torch.device, dtype: torch.dtype) -> MaskGenerator:
        """Builds the mask generator (``Capability.MASKS``).

        Raises:
            MissingCapability: the family produces no masks.
        """
        self.require(Capability.MASKS)
        return self._mask_generator(device, dtype)

    def _image_encoder(self, device: torch.device, dtype: torch.dtype) -> ImageEncoder:
        raise NotImplementedError(f"{self.name} lists image embeddings but builds no encoder")

    def _text_encoder(self, device: torch.device, dtype: torch.dtype) -> TextEncoder:
        raise NotImplementedError(f"{self.name} lists text embeddings but builds no text tower")

    def _mask_generator(self, device: torch.device, dtype: torch.dtype) -> MaskGenerator:
        raise NotImplementedError(f"{self.name} lists masks but builds no mask generator")


class ResizeCropFamily(Family):
    """A family whose processor resizes (``policy``: shortest edge, then an optional centre
    crop) and normalises channel-first (``normalization``), as CLIP's and DINOv2's do."""

    policy: ResizeCrop
    normalization: Normalization

    def resize_size(self, height: int, width: int) -> tuple[int, int]:
        """The shortest edge to the processor's ``size``, the long side rounded down."""
        return self.policy.resize_size(height, width)

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        """The processor's ``crop_size`` (the resize itself with ``do_center_crop`` off)."""
        return self.policy.target_size(height, width)

    def preprocess(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """uint8 (B, 3, H, W) -> ``pixel_values`` float32 (B, 3, H, W)."""
        return {"pixel_values": self.normalization.apply(images, channel_dim=1)}


class TwoTowerFamily(Family):
    """A family of image + text towers (SigLIP, CLIP): text embeddings only where the
    checkpoint holds the text tower and its tokenizer (a vision-only export has neither)."""

    @property
    def capabilities(self) -> frozenset[Capability]:
        """Image embeddings; text embeddings unless ``text_tower_problem`` finds one."""
        if text_tower_problem(self.checkpoint):
            return frozenset({Capability.IMAGE_EMBEDDINGS})
        return frozenset({Capability.IMAGE_EMBEDDINGS, Capability.TEXT_EMBEDDINGS})

    def why_missing(self, capability: Capability) -> str:
        """What the checkpoint lacks for text embeddings."""
        if capability is Capability.TEXT_EMBEDDINGS:
            return text_tower_problem(self.checkpoint)
        return ""
