"""Resolve a model name (hub id or local folder) to its configs, and load its weights.

A checkpoint folder is what ``save_pretrained`` writes: ``config.json`` (the family comes from its
``model_type``), safetensors weights, ``preprocessor_config.json`` and tokenizer files. With
``weights: random`` only the configs are needed; the architecture is built with seeded random
weights, identically in every process, so every actor and the query tool agree.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from vlray.config import configs_dir

if TYPE_CHECKING:
    from transformers import PreTrainedConfig

logger = logging.getLogger(__name__)

ARCH_DIR = configs_dir() / "arch"
"""The full-size architecture presets (the repo's configs/arch/, installed as vlray.configs)."""
RANDOM_MARKER = "vlray_random_weights.json"
"""A file in a checkpoint folder saying its weights are random (the offline demo writes it)."""


class CheckpointError(RuntimeError):
    """The model cannot be found or loaded; the message names the fix."""


@dataclass(frozen=True)
class Checkpoint:
    """A resolved model: local folder, parsed configs, and how weights are obtained.

    ``config`` is config.json as written, which on the hub leaves out every key equal to its
    transformers default: read dimensions, sizes and capabilities from ``config_object()``
    (defaults applied) instead, never from ``config``.
    """

    name: str
    path: str
    model_type: str
    config: dict[str, Any] = field(repr=False)
    processor: dict[str, Any] = field(repr=False)
    weights: str = "pretrained"
    seed: int = 0

    def config_object(self) -> PreTrainedConfig:
        """The transformers config of this checkpoint (``AutoConfig``, defaults applied).

        Loaded once per process and folder (cached, never pickled with the checkpoint); shared
        between callers, so treat it as read-only.
        """
        return load_config(self.path)

    def vision_bytes(self) -> int:
        """float32 bytes of the weights the family's encoder keeps resident (the vision tower;
        SAM's whole model), counted from the config object on the meta device, for memory
        planning. Exact for any checkpoint, whichever keys its config.json leaves out."""
        from vlray.families import family_for  # the families import this module

        return family_for(self).model_bytes

    @property
    def random_weights(self) -> bool:
        """True when outputs come from random weights (and must say so)."""
        return self.weights == "random" or (Path(self.path) / RANDOM_MARKER).exists()


def load_config(folder: str | Path) -> PreTrainedConfig:
    """``AutoConfig.from_pretrained(folder)`` (never remote code), cached per folder and
    config.json version (modification time and size); the result is shared: read-only.

    Raises:
        CheckpointError: config.json missing or not a config transformers can read.
    """
    path = Path(folder) / "config.json"
    try:
        stat = path.stat()
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from None
    return _load_config(str(Path(folder)), stat.st_mtime_ns, stat.st_size)


@lru_cache(maxsize=64)
def _load_config(folder: str, mtime_ns: int, size: int) -> PreTrainedConfig:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(folder, trust_remote_code=False)
    except Exception as exc:  # unreadable JSON, unknown model_type, strict validation
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(
            f"{folder}/config.json: transformers cannot read it ({first})"
        ) from None


def vision_config(config: PreTrainedConfig) -> PreTrainedConfig:
    """The vision tower's config: ``vision_config`` of a full model, else the config itself
    (a vision-only checkpoint)."""
    sub = getattr(config, "vision_config", None)
    return sub if sub is not None else config


def meta_module_bytes(module_cls: Any, config: PreTrainedConfig, bytes_per_value: int = 4) -> int:
    """Bytes of ``module_cls._from_config(config)``'s parameters and buffers at
    ``bytes_per_value`` each, built on the meta device (no memory, no initialization:
    milliseconds even for a 7B model's tower); cached per class and config."""
    key = (module_cls, config.to_json_string(use_diff=False))
    values = _MODULE_VALUES.get(key)
    if values is None:
        from transformers.initialization import no_init_weights

        with torch.device("meta"), no_init_weights():  # a copy: _from_config writes to it
            module = module_cls._from_config(copy.deepcopy(config), dtype=torch.float32)
            module.tie_weights()  # shared tensors counted once, as after from_pretrained
        values = sum(t.numel() for t in module.parameters())
        values += sum(t.numel() for t in module.buffers())
        if len(_MODULE_VALUES) >= 64:
            _MODULE_VALUES.clear()
        _MODULE_VALUES[key] = values
    return values * bytes_per_value


_MODULE_VALUES: dict[tuple[Any, str], int] = {}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from None


def _local_folder(name: str, revision: str | None = None) -> Path:
    """A local folder for ``name``: itself, a preset in configs/arch/, or a hub download (of
    ``revision`` when given; offline, the Hugging Face cache's copy)."""
    candidate = Path(name).expanduser()
    if candidate.is_dir():
        return candidate.resolve()
    preset = ARCH_DIR / name
    if preset.is_dir():
        return preset
    if candidate.is_file() and candidate.name == "config.json":
        return candidate.parent.resolve()
    if name.startswith((".", "/", "~")) or os.sep in name and not _looks_like_hub_id(name):
        raise CheckpointError(f"model folder {name} does not exist")
    try:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(
                name,
                revision=revision,
                allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken"],
            )
        )
    except Exception as exc:  # offline, unknown repo, auth: one clear message
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(
            f"cannot get model {name!r} from the Hugging Face hub ({first}); pass a local folder "
            "saved with save_pretrained, or a preset in configs/arch/ with weights: random"
        ) from None


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts)


def read_processor_config(folder: Path) -> dict[str, Any]:
    """The image processor settings of a checkpoint folder.

    ``ImageProcessor.save_pretrained`` writes ``preprocessor_config.json``; transformers 5's
    ``Processor.save_pretrained`` writes them nested under ``image_processor`` in
    ``processor_config.json`` instead. Empty when neither exists (the family's defaults apply).
    """
    path = folder / "preprocessor_config.json"
    if path.exists():
        return _read_json(path)
    path = folder / "processor_config.json"
    if path.exists():
        nested = _read_json(path).get("image_processor")
        if isinstance(nested, dict):
            return dict(nested)
    logger.warning("%s has no image processor config: using the family's defaults", folder)
    return {}


def _check_supported(folder: Path, model_type: str) -> None:
    """An unsupported ``model_type`` is named first, before any question of weight files."""
    from vlray.families import FAMILIES  # the registry imports this module

    known = sorted(t for cls in FAMILIES.values() for t in cls.model_types)
    if model_type not in known:
        raise CheckpointError(
            f"{folder}: model_type {model_type!r} is not supported (supported: "
            + ", ".join(known)
            + ")"
        )


def resolve_checkpoint(
    name: str,
    *,
    weights: str = "pretrained",
    processor_overrides: dict[str, Any] | None = None,
    seed: int = 0,
    revision: str | None = None,
) -> Checkpoint:
    """Reads config.json and preprocessor_config.json of ``name``.

    Args:
        name: a local folder, a hub id, or the name of a folder in configs/arch/.
        weights: ``pretrained`` (safetensors required) or ``random``.
        processor_overrides: keys replacing the checkpoint's preprocessor config.
        seed: seed of random weights.
        revision: the hub commit (or branch, tag) of a hub id; None: the latest.

    Raises:
        CheckpointError: missing folder or files, with what to do about it.
    """
    folder = _local_folder(name, revision)
    config_path = folder / "config.json"
    if not config_path.exists():
        raise CheckpointError(f"{folder} has no config.json: is it a save_pretrained folder?")
    config = _read_json(config_path)
    model_type = config.get("model_type", "")
    if not model_type:
        raise CheckpointError(f"{config_path} has no model_type")
    _check_supported(folder, model_type)
    processor = read_processor_config(folder)
    processor.update(processor_overrides or {})
    if weights == "pretrained" and not any(folder.glob("*.safetensors")):
        raise CheckpointError(
            f"{folder} has no .safetensors weights (only safetensors are loaded; use "
            "weights: random for an architecture-only folder)"
        )
    return Checkpoint(
        name=name,
        path=str(folder),
        model_type=model_type,
        config=config,
        processor=processor,
        weights=weights,
        seed=seed,
    )


def load_model(checkpoint: Checkpoint, model_cls: Any, dtype: torch.dtype) -> torch.nn.Module:
    """Loads ``model_cls`` from the checkpoint (safetensors) or builds it with seeded random weights.

    Returns:
        The model in eval mode, on CPU, in ``dtype``.
    """
    if checkpoint.weights == "random":
        config = model_cls.config_class.from_pretrained(checkpoint.path)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(checkpoint.seed)
            model = model_cls._from_config(config, dtype=torch.float32)
        model = model.to(dtype)
    else:
        model = model_cls.from_pretrained(
            checkpoint.path, dtype=dtype, use_safetensors=True, trust_remote_code=False
        )
    return model.eval()


def is_vision_only(checkpoint: Checkpoint) -> bool:
    """True for checkpoints of a vision tower alone (model_type ``*_vision_model``)."""
    return checkpoint.model_type.endswith("_vision_model")


def load_vision_tower(
    checkpoint: Checkpoint, full_cls: Any, vision_cls: Any, dtype: torch.dtype
) -> torch.nn.Module:
    """The vision tower of a full checkpoint (``.vision_model``) or of a vision-only one."""
    if is_vision_only(checkpoint):
        return load_model(checkpoint, vision_cls, dtype)
    model = load_model(checkpoint, full_cls, dtype)
    return model.vision_model


TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "spiece.model",
    "tokenizer.model",
    "vocab.json",
)
"""Any of these in a checkpoint folder means it ships a tokenizer (fast, SentencePiece or BPE)."""


def has_tokenizer(checkpoint: Checkpoint) -> bool:
    """Whether the checkpoint folder holds tokenizer files."""
    folder = Path(checkpoint.path)
    return any((folder / name).is_file() for name in TOKENIZER_FILES)


def tensor_names(checkpoint: Checkpoint) -> frozenset[str]:
    """The names of the tensors in the checkpoint's safetensors files (headers only, or the
    shard index), cached per folder; empty for random weights."""
    if checkpoint.weights == "random":
        return frozenset()
    return _tensor_names(checkpoint.path)


@lru_cache(maxsize=64)
def _tensor_names(folder: str) -> frozenset[str]:
    from safetensors import safe_open

    index = Path(folder) / "model.safetensors.index.json"
    if index.is_file():
        return frozenset(_read_json(index).get("weight_map", {}))
    names: set[str] = set()
    for path in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            names.update(f.keys())
    return frozenset(names)


def text_tower_problem(checkpoint: Checkpoint, prefix: str = "text_model.") -> str:
    """Why a two-tower checkpoint cannot embed text, empty when it can: a vision-only
    ``model_type``, no tokenizer files, or (pretrained) no tensors under ``prefix``."""
    if is_vision_only(checkpoint):
        return f"model_type {checkpoint.model_type} is a vision tower alone"
    if not has_tokenizer(checkpoint):
        return f"no tokenizer files ({', '.join(TOKENIZER_FILES)}) in the folder"
    names = tensor_names(checkpoint)
    if checkpoint.weights != "random" and not any(
        n.startswith((prefix, f"model.{prefix}")) for n in names
    ):
        return f"no text tower weights ({prefix}*) in its safetensors"
    return ""
