"""Tiny random-weight checkpoints saved with ``save_pretrained`` (tests, demo, benchmarks).

They go through the same loading path as a user's checkpoint. The tokenizer is built locally
with the ``tokenizers`` library, so nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

WORDS = (
    "a photo of the cat dog astronaut rocket coffee cup person woman man car tree sky red green "
    "blue white black small large image picture drawing grey on in with and"
).split()


def save_tiny_tokenizer(folder: str | Path) -> None:
    """A word-level tokenizer over a small vocabulary, saved as a fast tokenizer."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, "<s>": 3}
    for word in WORDS:
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        bos_token="<s>",
        model_max_length=64,
    )
    fast.save_pretrained(str(folder))


def _vision_text(hidden: int, layers: int, heads: int, vocab: int) -> tuple[dict, dict]:
    text = {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": hidden * 2,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "max_position_embeddings": 64,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "bos_token_id": 3,
    }
    vision = {
        "hidden_size": hidden,
        "intermediate_size": hidden * 2,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
    }
    return text, vision


def save_tiny_siglip2(
    folder: str | Path,
    *,
    patch_size: int = 16,
    max_num_patches: int = 64,
    hidden: int = 32,
    layers: int = 2,
    seed: int = 0,
    random_marker: bool = False,
) -> Path:
    """A tiny SigLIP2 NaFlex checkpoint (model, processor, tokenizer) in ``folder``."""
    from transformers import Siglip2Config, Siglip2ImageProcessor, Siglip2Model

    folder = Path(folder)
    text, vision = _vision_text(hidden, layers, 4, len(WORDS) + 8)
    vision.update(patch_size=patch_size, num_patches=max(max_num_patches, 16))
    torch.manual_seed(seed)
    model = Siglip2Model(Siglip2Config(text_config=text, vision_config=vision))
    model.save_pretrained(str(folder))
    Siglip2ImageProcessor(patch_size=patch_size, max_num_patches=max_num_patches).save_pretrained(
        str(folder)
    )
    save_tiny_tokenizer(folder)
    if random_marker:
        (folder / "vlray_random_weights.json").write_text(json.dumps({"seed": seed}))
    return folder


def save_tiny_siglip(
    folder: str | Path,
    *,
    image_size: int = 64,
    patch_size: int = 16,
    hidden: int = 32,
    layers: int = 2,
    seed: int = 0,
) -> Path:
    """A tiny fixed-resolution SigLIP checkpoint (model, processor, tokenizer) in ``folder``."""
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel

    folder = Path(folder)
    text, vision = _vision_text(hidden, layers, 4, len(WORDS) + 8)
    vision.update(patch_size=patch_size, image_size=image_size)
    torch.manual_seed(seed)
    model = SiglipModel(SiglipConfig(text_config=text, vision_config=vision))
    model.save_pretrained(str(folder))
    SiglipImageProcessor(size={"height": image_size, "width": image_size}).save_pretrained(
        str(folder)
    )
    save_tiny_tokenizer(folder)
    return folder


def save_tiny_qwen2_vl(
    folder: str | Path,
    *,
    seed: int = 0,
    min_pixels: int = 28 * 28 * 4,
    max_pixels: int = 56 * 56 * 4,
    hidden: int = 32,
    layers: int = 2,
) -> Path:
    """A tiny full Qwen2-VL checkpoint (vision tower + language model + processor) in ``folder``.

    Saved by ``Qwen2VLForConditionalGeneration.save_pretrained``, i.e. in the hub layout
    (``visual.*``, ``model.*``, ``lm_head.*``). The small ``max_pixels`` keeps images at a few
    dozen patches.
    """
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor

    folder = Path(folder)
    heads = 4
    text = {
        "vocab_size": 96,
        "hidden_size": hidden,
        "intermediate_size": hidden * 2,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        # M-RoPE sections (t, h, w) must sum to head_dim / 2.
        "rope_scaling": {"type": "mrope", "mrope_section": [2, 1, 1]},
    }
    vision = {
        "depth": layers,
        "embed_dim": hidden,
        "hidden_size": hidden,
        "num_heads": heads,
        "mlp_ratio": 2,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    }
    config = Qwen2VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=90,
        video_token_id=91,
        vision_start_token_id=92,
        vision_end_token_id=93,
    )
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config)
    model.save_pretrained(str(folder))
    Qwen2VLImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels).save_pretrained(str(folder))
    return folder


def save_tiny_sam(
    folder: str | Path,
    *,
    hidden: int = 32,
    layers: int = 2,
    initializer_range: float = 0.4,
    seed: int = 0,
) -> Path:
    """A tiny SAM checkpoint (model + ``SamImageProcessor``) in ``folder``.

    The vision tower keeps the real 1024 frame and 16-pixel patches (so the processor, the
    64x64 embedding grid and the 256x256 mask logits have their real shapes) with a ``hidden``
    wide, ``layers`` deep encoder; prompt encoder and mask decoder are ``hidden`` wide too.
    ``num_pos_feats`` is ``hidden // 2`` so the shared positional embedding matches them. The
    large ``initializer_range`` (SAM's is 0.02) gives mask logits and IoU scores of order 1, so
    the stability and IoU filters have something to filter; at 0.02 every logit is ~1e-5.
    """
    from transformers import SamConfig, SamImageProcessor, SamModel

    folder = Path(folder)
    config = SamConfig(
        vision_config={
            "hidden_size": hidden,
            "output_channels": hidden,
            "num_hidden_layers": layers,
            "num_attention_heads": 4,
            "mlp_dim": hidden * 2,
            "global_attn_indexes": [layers - 1],
            "num_pos_feats": hidden // 2,
        },
        prompt_encoder_config={"hidden_size": hidden, "mask_input_channels": 8},
        mask_decoder_config={
            "hidden_size": hidden,
            "mlp_dim": hidden * 2,
            "num_attention_heads": 2,
            "iou_head_hidden_dim": hidden,
        },
        initializer_range=initializer_range,
    )
    torch.manual_seed(seed)
    model = SamModel(config)
    model.save_pretrained(str(folder))
    SamImageProcessor().save_pretrained(str(folder))
    return folder
