"""Qwen2-VL vision tower (Qwen/Qwen2-VL-2B-Instruct, 7B): image embeddings, no text tower.

Reference: transformers' ``Qwen2VLImageProcessor`` resizes each image to ``smart_resize`` (sides
multiples of ``patch_size * merge_size``, pixel count within [min_pixels, max_pixels], bicubic
antialias on uint8), normalizes with the OpenAI CLIP mean/std, duplicates each image to
``temporal_patch_size`` frames and flattens it to ``(grid_h * grid_w, 3 * 2 * 14 * 14)`` patches,
ordered by 2x2 merge blocks. ``Qwen2VisionTransformerPretrainedModel`` embeds the patches, runs
its blocks on packed sequences (one attention segment per image, ``cu_seqlens``) and merges each
2x2 block into one token (``PatchMerger``). The embedding is the mean of an image's merged
tokens, L2-normalized.

Here a same-shape group is patchified in one tensor op, and the tower runs the group as a dense
batch ``(B, N, D)`` with one attention call per block instead of one per image: same-shape
images need neither packing nor a mask. Only the tower's tensors are read from the checkpoint
(``visual.*`` or ``model.visual.*``); the language model is never built.
"""

from __future__ import annotations

import json
import math
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from vlray.families.base import (
    CHUNK_ELEMENTS,
    Capability,
    Family,
    ImageEncoder,
    Normalization,
    TokenMatrices,
    UnsupportedImage,
)
from vlray.families.checkpoint import Checkpoint, CheckpointError
from vlray.ops.memory import empty_huge

if TYPE_CHECKING:
    from transformers import PreTrainedConfig

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Defaults of the reference class (Qwen2VLImageProcessor), used when the config lacks a key.
DEFAULT_MIN_PIXELS = 56 * 56
DEFAULT_MAX_PIXELS = 28 * 28 * 1280
MAX_ASPECT_RATIO = 200

VISION_PREFIXES = ("visual.", "model.visual.")
"""Key prefixes of the vision tower: hub layout, and re-saved ``Qwen2VLModel`` layout."""


@lru_cache(maxsize=65536)
def smart_resize(
    height: int, width: int, factor: int, min_pixels: int, max_pixels: int
) -> tuple[int, int]:
    """The reference's ``smart_resize``: sides multiples of ``factor``, pixel count within
    [min_pixels, max_pixels], aspect ratio kept as closely as possible (same arithmetic).

    Raises:
        UnsupportedImage: aspect ratio over 200 (the reference raises ValueError).
    """
    if min(height, width) <= 0:
        raise UnsupportedImage(f"empty image {width}x{height}")
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT_RATIO:
        raise UnsupportedImage(
            f"aspect ratio {ratio:.1f} of a {width}x{height} image exceeds Qwen2-VL's limit of "
            f"{MAX_ASPECT_RATIO}"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def patch_rows(images: torch.Tensor, patch_size: int, merge_size: int) -> torch.Tensor:
    """Hugging Face's Qwen2-VL patch order, for a whole same-shape group at once.

    Args:
        images: (B, C, H, W), any dtype; H and W multiples of ``patch_size * merge_size``.

    Returns:
        (B * H/(p*m), W/(p*m), m, m, C, p, p), a view where the layout allows (channels-last
        input): per image, rows of merge blocks; flattening the leading five axes gives the
        reference's patch order (block row, block col, row in block, col in block), the images
        following one another.
    """
    b, c, h, w = images.shape
    p, m = patch_size, merge_size
    bh, bw = h // (p * m), w // (p * m)
    patches = images.reshape(b, c, bh, m, p, bw, m, p)
    # -> (b, block_h, block_w, m_h, m_w, c, py, px)
    return patches.permute(0, 2, 5, 3, 6, 1, 4, 7).reshape(b * bh, bw, m, m, c, p, p)


def _vision_keys(folder: Path) -> dict[str, list[str]]:
    """Safetensors file -> its vision-tower keys (shards without any are never opened)."""
    index = folder / "model.safetensors.index.json"
    files: dict[str, list[str]] = {}
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        for key, shard in weight_map.items():
            if key.startswith(VISION_PREFIXES):
                files.setdefault(str(folder / shard), []).append(key)
        return files
    from safetensors import safe_open

    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            keys = [k for k in f.keys() if k.startswith(VISION_PREFIXES)]
        if keys:
            files[str(path)] = keys
    return files


def read_vision_state_dict(folder: str | Path) -> dict[str, torch.Tensor]:
    """Reads only the vision tower's tensors of a full Qwen2-VL checkpoint.

    Args:
        folder: a ``save_pretrained`` folder (single file or sharded with an index).

    Returns:
        Tower keys (``blocks.0.attn.qkv.weight``, ...) -> CPU tensors in their stored dtype.

    Raises:
        CheckpointError: no vision tensors, or a key under both prefixes.
    """
    from safetensors import safe_open

    folder = Path(folder)
    state: dict[str, torch.Tensor] = {}
    for path, keys in _vision_keys(folder).items():
        with safe_open(path, framework="pt") as f:
            for key in keys:
                prefix = next(p for p in VISION_PREFIXES if key.startswith(p))
                name = key[len(prefix) :]
                if name in state:
                    raise CheckpointError(f"{folder}: vision tensor {name} is stored twice")
                state[name] = f.get_tensor(key)
    if not state:
        raise CheckpointError(
            f"{folder} has no vision tower tensors (keys starting with visual. or model.visual.)"
        )
    return state


def load_vision_tower(checkpoint: Checkpoint, dtype: torch.dtype) -> torch.nn.Module:
    """Builds ``Qwen2VisionTransformerPretrainedModel`` from ``config.vision_config`` alone.

    With ``weights: random`` the tower gets seeded random weights (the same in every process);
    otherwise its tensors are read from the checkpoint's safetensors and loaded strictly.

    Returns:
        The tower in eval mode, on CPU, in ``dtype``.

    Raises:
        CheckpointError: missing or unexpected vision tensors.
    """
    from transformers import Qwen2VLConfig
    from transformers.initialization import no_init_weights
    from transformers.models.qwen2_vl.modeling_qwen2_vl import (
        Qwen2VisionTransformerPretrainedModel,
    )

    vision_config = Qwen2VLConfig.from_pretrained(checkpoint.path).vision_config
    if checkpoint.weights == "random":
        # devices=[]: fork the CPU generator only (a device list names CUDA devices).
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(checkpoint.seed)
            tower = Qwen2VisionTransformerPretrainedModel._from_config(
                vision_config, dtype=torch.float32
            )
        return tower.to(dtype).eval()
    state = read_vision_state_dict(checkpoint.path)
    with no_init_weights():
        tower = Qwen2VisionTransformerPretrainedModel._from_config(vision_config, dtype=dtype)
    try:
        tower.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise CheckpointError(
            f"{checkpoint.path}: the vision tensors do not match config.json's vision_config "
            f"({first}: {str(exc)[len(first) :].strip()[:300]})"
        ) from None
    return tower.eval()


class Qwen2VLImageEncoder(ImageEncoder):
    """The Qwen2-VL vision tower on dense same-shape groups; mean of the merged tokens.

    Rotary position embeddings depend only on the grid, so they are computed once per target
    shape and cached.
    """

    def __init__(self, checkpoint: Checkpoint, device: torch.device, dtype: torch.dtype) -> None:
        self.tower = load_vision_tower(checkpoint, dtype).to(device)
        self.device, self.dtype = device, dtype
        self.dim = int(self.tower.config.hidden_size)
        self.merge_size = int(self.tower.spatial_merge_size)
        self._rotary: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def _rotary_embeddings(self, gh: int, gw: int) -> tuple[torch.Tensor, torch.Tensor]:
        key = (gh, gw)
        if key not in self._rotary:
            from transformers.vision_utils import get_vision_position_ids

            grid = torch.tensor([[1, gh, gw]], device=self.device)
            positions = get_vision_position_ids(grid, self.merge_size)
            anchor = torch.empty(0, device=self.device)
            self._rotary[key] = self.tower.rotary_pos_emb(anchor, positions)
        return self._rotary[key]

    def _block(
        self, block: torch.nn.Module, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> torch.Tensor:
        """``Qwen2VLVisionBlock`` on (B, N, D): one attention call for the whole group."""
        from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb_vision

        attn = block.attn
        b, n, d = hidden.shape
        qkv = attn.qkv(block.norm1(hidden)).reshape(b, n, 3, attn.num_heads, -1)
        q, k, v = qkv.unbind(2)  # (B, N, heads, head_dim) each
        q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=attn.scaling
        )
        hidden = hidden + attn.proj(out.transpose(1, 2).reshape(b, n, d))
        return hidden + block.mlp(block.norm2(hidden))

    @torch.inference_mode()
    def merged_tokens(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The tower's merged tokens (``PatchMerger`` output) of one same-shape group.

        Args:
            inputs: ``pixel_values`` float32 (B * grid_h * grid_w, 3 * 2 * p * p) and
                ``image_grid_thw`` int64 (B, 3), all rows equal, grid_t 1.

        Returns:
            (B, grid_h * grid_w / merge_size**2, dim) in the encoder's dtype, on its device.
        """
        grid = inputs["image_grid_thw"]
        t, gh, gw = (int(v) for v in grid[0])
        if t != 1 or not bool((grid == grid[0]).all()):
            raise ValueError("qwen2_vl encoder expects same-shape image groups (grid_t 1)")
        b = grid.shape[0]
        pixels = inputs["pixel_values"].to(self.device, self.dtype, non_blocking=True)
        hidden = self.tower.patch_embed(pixels).reshape(b, gh * gw, -1)
        cos, sin = self._rotary_embeddings(gh, gw)
        for block in self.tower.blocks:
            hidden = self._block(block, hidden, cos, sin)
        merged = self.tower.merger(hidden.reshape(b * gh * gw, -1))
        return merged.reshape(b, -1, merged.shape[-1])

    @torch.inference_mode()
    def embed(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """pixel_values + image_grid_thw of one group -> (B, dim) float32 unit vectors on the
        device."""
        pooled = self.merged_tokens(inputs).float().mean(dim=1)
        return F.normalize(pooled, dim=-1)

    @torch.inference_mode()
    def embed_tokens(self, inputs: dict[str, torch.Tensor]) -> TokenMatrices:
        """``embed`` and the merged-token matrices it averages, in one forward.

        Returns:
            embeddings (B, dim) and tokens (B, grid_h * grid_w, dim), float32 on the device;
            grid (H / (patch * merge), W / (patch * merge)).
        """
        tokens = self.merged_tokens(inputs).float()
        _, gh, gw = (int(v) for v in inputs["image_grid_thw"][0])
        grid = (gh // self.merge_size, gw // self.merge_size)
        return TokenMatrices(F.normalize(tokens.mean(dim=1), dim=-1), tokens, grid)


class Qwen2VLFamily(Family):
    """Qwen2-VL's vision tower: ``smart_resize`` shapes, 2-frame patches, mean merged token."""

    name = "qwen2_vl"
    model_types = ("qwen2_vl",)
    capabilities = frozenset({Capability.IMAGE_EMBEDDINGS, Capability.TOKEN_MATRICES})
    """The vision tower alone: no text tower; the merged tokens as the token matrix."""

    def __init__(self, checkpoint: Checkpoint) -> None:
        super().__init__(checkpoint)
        # the processor config rules; without a key, the tower's own value (defaults applied)
        vision = self.config.vision_config
        proc = self.processor
        self.patch_size = int(proc.get("patch_size", vision.patch_size))
        self.temporal_patch_size = int(proc.get("temporal_patch_size", vision.temporal_patch_size))
        self.merge_size = int(proc.get("merge_size", vision.spatial_merge_size))
        # As the reference's __init__: min_pixels / max_pixels override the size dict.
        size: dict[str, Any] = dict(proc.get("size") or {})
        min_pixels = proc.get("min_pixels")
        max_pixels = proc.get("max_pixels")
        if min_pixels is None:
            min_pixels = size.get("shortest_edge", size.get("min_pixels", DEFAULT_MIN_PIXELS))
        if max_pixels is None:
            max_pixels = size.get("longest_edge", size.get("max_pixels", DEFAULT_MAX_PIXELS))
        self.min_pixels, self.max_pixels = int(min_pixels), int(max_pixels)
        self.do_resize = bool(proc.get("do_resize", True))
        self.normalization = Normalization.from_processor(proc, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)

    @property
    def factor(self) -> int:
        """Target sides are multiples of this (patch_size * merge_size, 28 for the presets)."""
        return self.patch_size * self.merge_size

    @property
    def embedding_dim(self) -> int:
        """Width of the merged tokens (``PatchMerger``'s output, the language model's width):
        ``vision_config.hidden_size``, not the blocks' ``embed_dim``."""
        return int(self.config.vision_config.hidden_size)

    def resident_module(self) -> tuple[Any, PreTrainedConfig]:
        """The vision tower alone (the language model is never built)."""
        from transformers.models.qwen2_vl.modeling_qwen2_vl import (
            Qwen2VisionTransformerPretrainedModel,
        )

        return Qwen2VisionTransformerPretrainedModel, self.config.vision_config

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        """The reference's ``smart_resize`` for this checkpoint's min/max pixels.

        Raises:
            UnsupportedImage: aspect ratio over 200, or (without resizing) sides that are not
                multiples of ``factor``.
        """
        if not self.do_resize:
            if height % self.factor or width % self.factor:
                raise UnsupportedImage(
                    f"{width}x{height} is not a multiple of {self.factor} and do_resize is off"
                )
            return height, width
        return smart_resize(height, width, self.factor, self.min_pixels, self.max_pixels)

    def preprocess(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """uint8 (B, 3, H, W) -> the reference's ``pixel_values`` and ``image_grid_thw``.

        Patchifies the whole group in one op (in uint8), then normalizes with the reference's
        per-element float32 arithmetic, so the values are bit-identical to the reference's;
        the output is the concatenation of its per-image outputs.

        Returns:
            ``pixel_values`` float32 (B * H/p * W/p, 3 * temporal * p * p) on the images'
            device, and ``image_grid_thw`` int64 (B, 3) of rows (1, H/p, W/p).
        """
        b, c, h, w = images.shape
        if h % self.factor or w % self.factor:
            raise ValueError(f"group shape {h}x{w} is not a multiple of {self.factor}")
        p, m, t = self.patch_size, self.merge_size, self.temporal_patch_size
        source = patch_rows(images, p, m)  # uint8, a view of the group
        rows, bw = source.shape[:2]
        # Every image is its own t-frame clip: (patches, c, t, p, p), flattened in that order.
        # Normalize straight into frame 0 and copy it to the others, a block row at a time
        # (cache-sized), instead of patchify-copy + normalize + expand-copy of the whole group.
        shape = (rows, bw, m, m, c, t, p, p)
        out = empty_huge(shape, device=images.device)
        step = max(1, CHUNK_ELEMENTS // max(source[0].numel(), 1))
        if images.device.type != "cpu":  # no cache to fit: one launch per op for the group
            step = max(rows, 1)
        for s in range(0, rows, step):
            frames = out[s : s + step]
            self.normalization.apply_into(source[s : s + step], frames[..., 0, :, :], channel_dim=4)
            for frame in range(1, t):
                frames[..., frame, :, :].copy_(frames[..., 0, :, :])
        pixel_values = out.reshape(b * (h // p) * (w // p), c * t * p * p)
        grid = torch.tensor([[1, h // p, w // p]], dtype=torch.int64)
        return {"pixel_values": pixel_values, "image_grid_thw": grid.expand(b, 3).contiguous()}

    def _image_encoder(self, device: torch.device, dtype: torch.dtype) -> ImageEncoder:
        """The vision tower only (the language model is never built)."""
        return Qwen2VLImageEncoder(self.checkpoint, device, dtype)
