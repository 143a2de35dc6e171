"""Resolve a model name (hub id or local folder) to its configs, and load its weights.

A checkpoint folder is what ``save_pretrained`` writes: ``config.json`` (the family comes from its
``model_type``), safetensors weights, ``preprocessor_config.json`` and tokenizer files. With
``weights: random`` only the configs are needed; the architecture is built with seeded random
weights, identically in every process, so every actor and the query tool agree.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

ARCH_DIR = Path(__file__).resolve().parents[2] / "configs" / "arch"
RANDOM_MARKER = "vlray_random_weights.json"
"""A file in a checkpoint folder saying its weights are random (the offline demo writes it)."""


class CheckpointError(RuntimeError):
    """The model cannot be found or loaded; the message names the fix."""


@dataclass(frozen=True)
class Checkpoint:
    """A resolved model: local folder, parsed configs, and how weights are obtained."""

    name: str
    path: str
    model_type: str
    config: dict[str, Any] = field(repr=False)
    processor: dict[str, Any] = field(repr=False)
    weights: str = "pretrained"
    seed: int = 0

    def vision_bytes(self) -> int:
        """Rough float32 size of the vision tower (12 * layers * width^2 parameters, the
        attention and MLP weights of a transformer), for memory planning; 0 when unknown."""
        vision = self.config.get("vision_config", self.config)
        layers = vision.get("num_hidden_layers", vision.get("depth", 0)) or 0
        width = vision.get("hidden_size", vision.get("embed_dim", 0)) or 0
        return int(12 * layers * width * width * 4)

    @property
    def random_weights(self) -> bool:
        """True when outputs come from random weights (and must say so)."""
        return self.weights == "random" or (Path(self.path) / RANDOM_MARKER).exists()


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from None


def _local_folder(name: str) -> Path:
    """A local folder for ``name``: itself, a preset in configs/arch/, or a hub download."""
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


def resolve_checkpoint(
    name: str,
    *,
    weights: str = "pretrained",
    processor_overrides: dict[str, Any] | None = None,
    seed: int = 0,
) -> Checkpoint:
    """Reads config.json and preprocessor_config.json of ``name``.

    Args:
        name: a local folder, a hub id, or the name of a folder in configs/arch/.
        weights: ``pretrained`` (safetensors required) or ``random``.
        processor_overrides: keys replacing the checkpoint's preprocessor config.
        seed: seed of random weights.

    Raises:
        CheckpointError: missing folder or files, with what to do about it.
    """
    folder = _local_folder(name)
    config_path = folder / "config.json"
    if not config_path.exists():
        raise CheckpointError(f"{folder} has no config.json: is it a save_pretrained folder?")
    config = _read_json(config_path)
    model_type = config.get("model_type", "")
    if not model_type:
        raise CheckpointError(f"{config_path} has no model_type")
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
