"""Tiny random-weight checkpoints (tests, demo, benchmarks), in two layouts.

``save_tiny_*`` write what transformers 5's ``save_pretrained`` writes (every config key).
``save_hub_*`` write the same tiny models the way the Hugging Face hub publishes them:
config.json with only the keys that differ from transformers' defaults (near-empty
sub-configs; Qwen2-VL's text settings flat at the root; SAM's verbose 4.x dump instead),
``preprocessor_config.json`` as the hub has it, Qwen2-VL weights under ``model.visual.*``, a
SentencePiece-only SigLIP tokenizer (``spiece.model``, no tokenizer.json) and, on request,
sharded safetensors with ``model.safetensors.index.json``. With the same arguments and seed
both layouts hold the same weights.

They go through the same loading path as a user's checkpoint. Tokenizers are built locally
(``tokenizers``, ``sentencepiece``'s trainer), so nothing is downloaded.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedConfig, PreTrainedModel

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


def _tiny_siglip2_model(
    patch_size: int, max_num_patches: int, hidden: int, layers: int, seed: int, vocab: int = 0
) -> PreTrainedModel:
    from transformers import Siglip2Config, Siglip2Model

    text, vision = _vision_text(hidden, layers, 4, vocab or len(WORDS) + 8)
    vision.update(patch_size=patch_size, num_patches=max(max_num_patches, 16))
    torch.manual_seed(seed)
    return Siglip2Model(Siglip2Config(text_config=text, vision_config=vision))


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
    from transformers import Siglip2ImageProcessor

    folder = Path(folder)
    model = _tiny_siglip2_model(patch_size, max_num_patches, hidden, layers, seed)
    model.save_pretrained(str(folder))
    Siglip2ImageProcessor(patch_size=patch_size, max_num_patches=max_num_patches).save_pretrained(
        str(folder)
    )
    save_tiny_tokenizer(folder)
    if random_marker:
        (folder / "vlray_random_weights.json").write_text(json.dumps({"seed": seed}))
    return folder


def _tiny_siglip_model(
    image_size: int, patch_size: int, hidden: int, layers: int, seed: int, vocab: int = 0
) -> PreTrainedModel:
    from transformers import SiglipConfig, SiglipModel

    text, vision = _vision_text(hidden, layers, 4, vocab or len(WORDS) + 8)
    vision.update(patch_size=patch_size, image_size=image_size)
    torch.manual_seed(seed)
    return SiglipModel(SiglipConfig(text_config=text, vision_config=vision))


def save_tiny_siglip(
    folder: str | Path,
    *,
    image_size: int = 64,
    patch_size: int = 16,
    hidden: int = 32,
    layers: int = 2,
    seed: int = 0,
    vocab: int = 0,
) -> Path:
    """A tiny fixed-resolution SigLIP checkpoint (model, processor, tokenizer) in ``folder``;
    ``vocab`` sizes the text tower (0: the word-level tokenizer's vocabulary and some)."""
    from transformers import SiglipImageProcessor

    folder = Path(folder)
    model = _tiny_siglip_model(image_size, patch_size, hidden, layers, seed, vocab)
    model.save_pretrained(str(folder))
    SiglipImageProcessor(size={"height": image_size, "width": image_size}).save_pretrained(
        str(folder)
    )
    save_tiny_tokenizer(folder)
    return folder


def _tiny_qwen2_vl_model(hidden: int, layers: int, seed: int) -> PreTrainedModel:
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

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
    return Qwen2VLForConditionalGeneration(config)


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
    from transformers import Qwen2VLImageProcessor

    folder = Path(folder)
    model = _tiny_qwen2_vl_model(hidden, layers, seed)
    model.save_pretrained(str(folder))
    Qwen2VLImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels).save_pretrained(str(folder))
    return folder


def _tiny_sam_model(
    hidden: int, layers: int, initializer_range: float, seed: int
) -> PreTrainedModel:
    from transformers import SamConfig, SamModel

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
    return SamModel(config)


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
    from transformers import SamImageProcessor

    folder = Path(folder)
    model = _tiny_sam_model(hidden, layers, initializer_range, seed)
    model.save_pretrained(str(folder))
    SamImageProcessor().save_pretrained(str(folder))
    return folder


# ---------------------------------------------------------------------------------------------
# The hub's layouts


_VOLATILE_KEYS = ("transformers_version", "architectures", "dtype", "torch_dtype", "_name_or_path")


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    """A config dict without the keys that say how it was saved rather than what it is."""
    return {
        k: (_comparable(v) if isinstance(v, dict) and k.endswith("_config") else v)
        for k, v in config.items()
        if k not in _VOLATILE_KEYS
    }


def _non_default(config: PreTrainedConfig) -> dict[str, Any]:
    """``config``'s keys that differ from a default instance of its class, sub-configs
    recursively (transformers 5's ``to_diff_dict`` writes every sub-config key)."""
    subs = getattr(type(config), "sub_configs", None) or {}
    current = config.to_dict()
    defaults = type(config)().to_dict()
    out: dict[str, Any] = {}
    for key, value in current.items():
        if key in _VOLATILE_KEYS:
            continue
        if key in subs and getattr(config, key, None) is not None:
            out[key] = _non_default(getattr(config, key))
        elif key == "model_type" or key not in defaults or defaults[key] != value:
            out[key] = value
    return out


def _drop_derived(config_cls: Any, written: dict[str, Any], expected: dict[str, Any]) -> None:
    """Removes (in place) every key of ``written`` and of its sub-configs whose absence loads
    the same config: values ``__post_init__`` derives from others (``layer_types``, ...)."""

    def loads_same() -> bool:
        try:
            loaded = config_cls.from_dict(json.loads(json.dumps(written)))
        except Exception:  # e.g. strict validation rejecting what remains
            return False
        return _comparable(loaded.to_dict()) == expected

    for scope in [written] + [v for k, v in written.items() if isinstance(v, dict)]:
        for key in list(scope):
            if key == "model_type" or (scope is written and isinstance(scope[key], dict)):
                continue
            value = scope.pop(key)
            if not loads_same():
                scope[key] = value


def hub_config_dict(config: PreTrainedConfig, *, flat_text: bool = False) -> dict[str, Any]:
    """config.json as the hub publishes it: only the keys that differ from transformers'
    defaults, sub-configs near-empty (``{"model_type": ..., <what makes it tiny>}``).

    Args:
        config: the (tiny) config the weights were made for.
        flat_text: write the text sub-config's keys at the root, as Qwen2-VL's hub configs do.

    Raises:
        AssertionError: the minimal dict would not load back as ``config``.
    """
    config_cls = type(config)
    expected = _comparable(config.to_dict())
    written = _non_default(config)
    if flat_text and "text_config" in written:
        text = written.pop("text_config")
        text.pop("model_type", None)
        if "rope_parameters" in text:  # 4.x's name, as the hub's Qwen2-VL configs have it
            text["rope_scaling"] = text.pop("rope_parameters")
        for key, value in text.items():
            written.setdefault(key, value)
    _drop_derived(config_cls, written, expected)
    loaded = _comparable(config_cls.from_dict(json.loads(json.dumps(written))).to_dict())
    assert loaded == expected, f"{config_cls.__name__}: minimal config does not load back"
    return written


def write_hub_config(
    config: PreTrainedConfig, folder: str | Path, *, flat_text: bool = False
) -> dict[str, Any]:
    """Writes ``hub_config_dict(config)`` as ``folder/config.json`` with the hub's bookkeeping
    keys (``architectures``, the 4.x ``torch_dtype``, an old ``transformers_version``)."""
    written = {
        "architectures": list(config.architectures or []),
        **hub_config_dict(config, flat_text=flat_text),
        "torch_dtype": "float32",
        "transformers_version": "4.47.0.dev0",
    }
    if not written["architectures"]:
        del written["architectures"]
    Path(folder).mkdir(parents=True, exist_ok=True)
    Path(folder, "config.json").write_text(json.dumps(written, indent=2, sort_keys=True) + "\n")
    return written


def check_config_loads(config: PreTrainedConfig, folder: str | Path) -> None:
    """Asserts that ``AutoConfig.from_pretrained(folder)`` gives back ``config`` (up to the
    bookkeeping keys and attributes the written file adds)."""
    from transformers import AutoConfig

    loaded = AutoConfig.from_pretrained(str(folder)).to_dict()
    expected = config.to_dict()

    def same(got: dict[str, Any], want: dict[str, Any], where: str) -> None:
        for key, value in want.items():
            if key in _VOLATILE_KEYS:
                continue
            if isinstance(value, dict) and key.endswith("_config"):
                same(got[key], value, f"{where}{key}.")
            else:
                assert got.get(key) == value, (
                    f"{folder}: {where}{key} {got.get(key)!r} != {value!r}"
                )

    same(loaded, expected, "")


# PretrainedConfig's generic attributes as transformers 4.x wrote them into every (sub-)config.
_LEGACY_CONFIG_KEYS: dict[str, Any] = {
    "_name_or_path": "",
    "add_cross_attention": False,
    "architectures": None,
    "bad_words_ids": None,
    "begin_suppress_tokens": None,
    "bos_token_id": None,
    "chunk_size_feed_forward": 0,
    "cross_attention_hidden_size": None,
    "decoder_start_token_id": None,
    "diversity_penalty": 0.0,
    "do_sample": False,
    "early_stopping": False,
    "encoder_no_repeat_ngram_size": 0,
    "eos_token_id": None,
    "exponential_decay_length_penalty": None,
    "finetuning_task": None,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "id2label": {"0": "LABEL_0", "1": "LABEL_1"},
    "is_decoder": False,
    "is_encoder_decoder": False,
    "label2id": {"LABEL_0": 0, "LABEL_1": 1},
    "length_penalty": 1.0,
    "max_length": 20,
    "min_length": 0,
    "no_repeat_ngram_size": 0,
    "num_beam_groups": 1,
    "num_beams": 1,
    "num_return_sequences": 1,
    "output_attentions": False,
    "output_hidden_states": False,
    "output_scores": False,
    "pad_token_id": None,
    "prefix": None,
    "problem_type": None,
    "pruned_heads": {},
    "remove_invalid_values": False,
    "repetition_penalty": 1.0,
    "return_dict": True,
    "return_dict_in_generate": False,
    "sep_token_id": None,
    "suppress_tokens": None,
    "task_specific_params": None,
    "temperature": 1.0,
    "tf_legacy_loss": False,
    "tie_encoder_decoder": False,
    "tie_word_embeddings": True,
    "tokenizer_class": None,
    "top_k": 50,
    "top_p": 1.0,
    "torch_dtype": None,
    "torchscript": False,
    "typical_p": 1.0,
    "use_bfloat16": False,
}


def write_verbose_config(config: PreTrainedConfig, folder: str | Path) -> dict[str, Any]:
    """config.json as transformers 4.x dumped it (facebook/sam-vit-*): every key of every
    sub-config, plus 4.x's generic generation / head attributes in each."""
    full = config.to_dict()
    subs = getattr(type(config), "sub_configs", None) or {}
    for key in subs:
        if isinstance(full.get(key), dict):
            full[key] = {**_LEGACY_CONFIG_KEYS, **full[key]}
            full[key].pop("dtype", None)
    full.pop("dtype", None)
    full.update(
        architectures=list(config.architectures or []) or None,
        torch_dtype="float32",
        transformers_version="4.29.0.dev0",
    )
    Path(folder).mkdir(parents=True, exist_ok=True)
    Path(folder, "config.json").write_text(json.dumps(full, indent=2, sort_keys=True) + "\n")
    return full


def write_safetensors(
    state: dict[str, torch.Tensor], folder: str | Path, *, max_shard_bytes: int | None = None
) -> list[Path]:
    """Writes ``state`` as ``model.safetensors``, or, with ``max_shard_bytes``, as
    ``model-0000i-of-0000n.safetensors`` shards plus ``model.safetensors.index.json`` (the
    names and index ``save_pretrained`` writes). Removes weight files already there.

    Returns:
        The safetensors files written.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    for old in [*folder.glob("*.safetensors"), folder / "model.safetensors.index.json"]:
        old.unlink(missing_ok=True)
    tensors = {k: v.detach().contiguous().clone() for k, v in state.items()}
    if max_shard_bytes is None:
        path = folder / "model.safetensors"
        save_file(tensors, str(path), metadata={"format": "pt"})
        return [path]
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key in sorted(tensors):
        nbytes = tensors[key].numel() * tensors[key].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensors[key]
        size += nbytes
    paths, weight_map = [], {}
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
        paths.append(folder / name)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return paths


def _hub_weights(
    model: PreTrainedModel, folder: Path, max_shard_bytes: int | None, rename: Any = None
) -> None:
    """The model's weights as ``save_pretrained`` names them (the hub's keys), optionally
    renamed, written whole or sharded."""
    from safetensors.torch import load_file

    model.save_pretrained(str(folder))
    state: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        state.update(load_file(str(path)))
    if rename is not None:
        state = {rename(k): v for k, v in state.items()}
    write_safetensors(state, folder, max_shard_bytes=max_shard_bytes)


def _write_json(path: Path, value: dict[str, Any]) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")


def save_sentencepiece_tokenizer(folder: str | Path, vocab_size: int = 64) -> int:
    """A SigLIP tokenizer as google/siglip-* publish it: ``spiece.model`` (trained here with
    sentencepiece's trainer on the fixture words), ``tokenizer_config.json`` naming
    ``SiglipTokenizer`` and ``special_tokens_map.json``; no tokenizer.json.

    Returns:
        The number of pieces (at most ``vocab_size``): token ids stay below it.
    """
    import sentencepiece as spm

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    corpus = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus),
        model_writer=model,
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        model_type="unigram",
        character_coverage=1.0,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    (folder / "spiece.model").write_bytes(model.getvalue())
    specials = {"eos_token": "</s>", "pad_token": "</s>", "unk_token": "<unk>"}
    _write_json(folder / "special_tokens_map.json", specials)
    _write_json(
        folder / "tokenizer_config.json",
        {
            **specials,
            "additional_special_tokens": [],
            "do_lower_case": True,
            "model_max_length": 64,
            "sp_model_kwargs": {},
            "tokenizer_class": "SiglipTokenizer",
        },
    )
    processor = spm.SentencePieceProcessor(model_proto=model.getvalue())
    return int(processor.get_piece_size())


def _shard_bytes(max_shard_size: int | str | None) -> int | None:
    """``"20KB"`` / ``"1MB"`` / bytes -> bytes (None: one file)."""
    if max_shard_size is None or isinstance(max_shard_size, int):
        return max_shard_size
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    text = max_shard_size.strip().upper()
    for unit, factor in sorted(units.items(), key=lambda u: -len(u[0])):
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


HUB_SIGLIP_VOCAB = 64
"""Text vocabulary of ``save_hub_siglip`` (room for the SentencePiece tokenizer's pieces)."""


def save_hub_siglip2(
    folder: str | Path,
    *,
    patch_size: int = 16,
    max_num_patches: int = 64,
    hidden: int = 32,
    layers: int = 2,
    seed: int = 0,
    max_shard_size: int | str | None = None,
) -> Path:
    """``save_tiny_siglip2``'s model as google/siglip2-*-naflex publish theirs: minimal
    config.json (``vision_config`` holds little more than ``model_type``), the hub's
    ``preprocessor_config.json`` (``Siglip2ImageProcessorFast``), the fast tokenizer (the
    hub's Gemma tokenizer has a tokenizer.json too), weights whole or in shards."""
    folder = Path(folder)
    model = _tiny_siglip2_model(patch_size, max_num_patches, hidden, layers, seed)
    _hub_weights(model, folder, _shard_bytes(max_shard_size))
    write_hub_config(model.config, folder)
    check_config_loads(model.config, folder)
    _write_json(
        folder / "preprocessor_config.json",
        {
            "do_convert_rgb": None,
            "do_normalize": True,
            "do_rescale": True,
            "do_resize": True,
            "image_mean": [0.5, 0.5, 0.5],
            "image_processor_type": "Siglip2ImageProcessorFast",
            "image_std": [0.5, 0.5, 0.5],
            "max_num_patches": max_num_patches,
            "patch_size": patch_size,
            "processor_class": "Siglip2Processor",
            "resample": 2,
            "rescale_factor": 1 / 255,
        },
    )
    save_tiny_tokenizer(folder)
    return folder


def save_hub_siglip(
    folder: str | Path,
    *,
    image_size: int = 64,
    patch_size: int = 16,
    hidden: int = 32,
    layers: int = 2,
    seed: int = 0,
    max_shard_size: int | str | None = None,
) -> Path:
    """``save_tiny_siglip``'s vision tower (text vocabulary ``HUB_SIGLIP_VOCAB``) as
    google/siglip-* publish theirs: minimal config.json, the hub's
    ``preprocessor_config.json``, a SentencePiece-only tokenizer (``spiece.model``, no
    tokenizer.json), weights whole or in shards."""
    folder = Path(folder)
    model = _tiny_siglip_model(image_size, patch_size, hidden, layers, seed, HUB_SIGLIP_VOCAB)
    _hub_weights(model, folder, _shard_bytes(max_shard_size))
    write_hub_config(model.config, folder)
    check_config_loads(model.config, folder)
    _write_json(
        folder / "preprocessor_config.json",
        {
            "do_normalize": True,
            "do_rescale": True,
            "do_resize": True,
            "image_mean": [0.5, 0.5, 0.5],
            "image_processor_type": "SiglipImageProcessor",
            "image_std": [0.5, 0.5, 0.5],
            "processor_class": "SiglipProcessor",
            "resample": 3,
            "rescale_factor": 1 / 255,
            "size": {"height": image_size, "width": image_size},
        },
    )
    pieces = save_sentencepiece_tokenizer(folder, HUB_SIGLIP_VOCAB)
    assert pieces <= HUB_SIGLIP_VOCAB
    return folder


def _model_visual(key: str) -> str:
    """Hub key -> re-saved ``Qwen2VLModel`` layout: ``visual.*`` -> ``model.visual.*``,
    ``model.*`` -> ``model.language_model.*``, ``lm_head.*`` unchanged."""
    if key.startswith("visual."):
        return "model." + key
    if key.startswith("model.") and not key.startswith(("model.visual.", "model.language_model.")):
        return "model.language_model." + key[len("model.") :]
    return key


def save_hub_qwen2_vl(
    folder: str | Path,
    *,
    seed: int = 0,
    min_pixels: int = 28 * 28 * 4,
    max_pixels: int = 56 * 56 * 4,
    hidden: int = 32,
    layers: int = 2,
    max_shard_size: int | str | None = None,
) -> Path:
    """``save_tiny_qwen2_vl``'s model as a re-saved hub checkpoint: the text settings flat at
    the root of config.json and a minimal ``vision_config`` (as Qwen/Qwen2-VL-* publish it,
    keys equal to the defaults left out), weights under ``model.visual.*`` /
    ``model.language_model.*``, whole or in shards, and the hub's
    ``preprocessor_config.json`` (``min_pixels`` / ``max_pixels``, no ``size``)."""
    folder = Path(folder)
    model = _tiny_qwen2_vl_model(hidden, layers, seed)
    _hub_weights(model, folder, _shard_bytes(max_shard_size), rename=_model_visual)
    written = write_hub_config(model.config, folder, flat_text=True)
    # as Qwen/Qwen2-VL-*: no model_type in vision_config, and two keys transformers 5 ignores
    del written["vision_config"]["model_type"]
    written["vision_config"].update(in_chans=3, spatial_patch_size=14)
    _write_json(folder / "config.json", written)
    check_config_loads(model.config, folder)
    _write_json(
        folder / "preprocessor_config.json",
        {
            "image_mean": [0.48145466, 0.4578275, 0.40821073],
            "image_processor_type": "Qwen2VLImageProcessor",
            "image_std": [0.26862954, 0.26130258, 0.27577711],
            "max_pixels": max_pixels,
            "merge_size": 2,
            "min_pixels": min_pixels,
            "patch_size": 14,
            "processor_class": "Qwen2VLProcessor",
            "temporal_patch_size": 2,
        },
    )
    return folder


def save_hub_sam(
    folder: str | Path,
    *,
    hidden: int = 32,
    layers: int = 2,
    initializer_range: float = 0.4,
    seed: int = 0,
    max_shard_size: int | str | None = None,
) -> Path:
    """``save_tiny_sam``'s model as facebook/sam-vit-* publish theirs: the verbose 4.x
    config.json (every key, generic attributes included), the hub's
    ``preprocessor_config.json``, weights whole or in shards."""
    folder = Path(folder)
    model = _tiny_sam_model(hidden, layers, initializer_range, seed)
    _hub_weights(model, folder, _shard_bytes(max_shard_size))
    write_verbose_config(model.config, folder)
    check_config_loads(model.config, folder)
    _write_json(
        folder / "preprocessor_config.json",
        {
            "do_convert_rgb": True,
            "do_normalize": True,
            "do_pad": True,
            "do_rescale": True,
            "do_resize": True,
            "image_mean": [0.485, 0.456, 0.406],
            "image_processor_type": "SamImageProcessor",
            "image_std": [0.229, 0.224, 0.225],
            "pad_size": {"height": 1024, "width": 1024},
            "processor_class": "SamProcessor",
            "resample": 2,
            "rescale_factor": 1 / 255,
            "size": {"longest_edge": 1024},
        },
    )
    return folder


# ---------------------------------------------------------------------------------------------
# CLIP and DINOv2, in the hub's layouts

CLIP_SPECIALS = ("<|startoftext|>", "<|endoftext|>")
"""CLIP's bos and eos (also pad and unk) tokens."""


def save_clip_tokenizer(folder: str | Path) -> int:
    """A ``CLIPTokenizer`` (byte-level BPE, ``</w>`` word ends) over the lowercase letters, each
    alone and word-final, with merges for the fixture words' first two letters; saved as the
    hub has it (tokenizer.json, tokenizer_config.json, special tokens).

    Returns:
        The vocabulary size: token ids stay below it.
    """
    from transformers import CLIPTokenizer

    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {token: i for i, token in enumerate(CLIP_SPECIALS)}
    for token in [*letters, *(c + "</w>" for c in letters)]:
        vocab.setdefault(token, len(vocab))
    merges = []
    for word in sorted({w[:2] for w in WORDS if len(w) > 2}):
        merges.append((word[0], word[1]))
        vocab.setdefault(word, len(vocab))
    tokenizer = CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=CLIP_SPECIALS[1],
        bos_token=CLIP_SPECIALS[0],
        eos_token=CLIP_SPECIALS[1],
        pad_token=CLIP_SPECIALS[1],
        model_max_length=77,
    )
    tokenizer.save_pretrained(str(folder))
    return len(vocab)


def _tiny_clip_model(
    image_size: int, patch_size: int, hidden: int, projection: int, layers: int, seed: int
) -> PreTrainedModel:
    from transformers import CLIPConfig, CLIPModel

    text, vision = _vision_text(hidden, layers, 4, 96)
    text.update(max_position_embeddings=77, pad_token_id=1, bos_token_id=0, eos_token_id=1)
    vision.update(image_size=image_size, patch_size=patch_size)
    torch.manual_seed(seed)
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection)
    return CLIPModel(config)


def save_hub_clip(
    folder: str | Path,
    *,
    image_size: int = 32,
    patch_size: int = 8,
    hidden: int = 32,
    projection: int = 24,
    layers: int = 2,
    seed: int = 0,
    max_shard_size: int | str | None = None,
) -> Path:
    """A tiny ``CLIPModel`` as openai/clip-vit-* publish theirs: minimal config.json (the
    projection narrower than the towers, as ViT-B/32's 512 < 768), the hub's
    ``preprocessor_config.json`` (old-style ints: ``size`` is the shortest edge, ``crop_size``
    the square crop; a ``CLIPFeatureExtractor``), a ``CLIPTokenizer``, weights whole or in
    shards."""
    folder = Path(folder)
    model = _tiny_clip_model(image_size, patch_size, hidden, projection, layers, seed)
    _hub_weights(model, folder, _shard_bytes(max_shard_size))
    write_hub_config(model.config, folder)
    check_config_loads(model.config, folder)
    _write_json(
        folder / "preprocessor_config.json",
        {
            "crop_size": image_size,
            "do_center_crop": True,
            "do_normalize": True,
            "do_resize": True,
            "feature_extractor_type": "CLIPFeatureExtractor",
            "image_mean": [0.48145466, 0.4578275, 0.40821073],
            "image_std": [0.26862954, 0.26130258, 0.27577711],
            "resample": 3,
            "size": image_size,
        },
    )
    assert save_clip_tokenizer(folder) <= model.config.text_config.vocab_size
    return folder


def _tiny_dinov2_model(
    image_size: int, patch_size: int, hidden: int, layers: int, registers: bool, seed: int
) -> PreTrainedModel:
    from transformers import (
        Dinov2Config,
        Dinov2Model,
        Dinov2WithRegistersConfig,
        Dinov2WithRegistersModel,
    )

    settings = {
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "mlp_ratio": 2,
        "image_size": image_size,
        "patch_size": patch_size,
    }
    torch.manual_seed(seed)
    if registers:
        return Dinov2WithRegistersModel(Dinov2WithRegistersConfig(**settings))
    return Dinov2Model(Dinov2Config(**settings))


def save_hub_dinov2(
    folder: str | Path,
    *,
    image_size: int = 56,
    patch_size: int = 8,
    shortest_edge: int = 40,
    crop: int = 32,
    hidden: int = 32,
    layers: int = 2,
    registers: bool = False,
    seed: int = 0,
    max_shard_size: int | str | None = None,
) -> Path:
    """A tiny ``Dinov2Model`` (``Dinov2WithRegistersModel`` with ``registers``) as
    facebook/dinov2-* publish theirs: minimal config.json (``image_size`` larger than the crop,
    as 518 > 224, so position embeddings are interpolated), the hub's
    ``preprocessor_config.json`` (``BitImageProcessor``, shortest edge then a smaller centre
    crop, as 256 / 224, ImageNet's mean and std), weights whole or in shards."""
    folder = Path(folder)
    model = _tiny_dinov2_model(image_size, patch_size, hidden, layers, registers, seed)
    _hub_weights(model, folder, _shard_bytes(max_shard_size))
    write_hub_config(model.config, folder)
    check_config_loads(model.config, folder)
    _write_json(
        folder / "preprocessor_config.json",
        {
            "crop_size": {"height": crop, "width": crop},
            "do_center_crop": True,
            "do_convert_rgb": True,
            "do_normalize": True,
            "do_rescale": True,
            "do_resize": True,
            "image_mean": [0.485, 0.456, 0.406],
            "image_processor_type": "BitImageProcessor",
            "image_std": [0.229, 0.224, 0.225],
            "resample": 3,
            "rescale_factor": 1 / 255,
            "size": {"shortest_edge": shortest_edge},
        },
    )
    return folder
