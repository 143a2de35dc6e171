"""Model families: one module per family, registered by the ``model_type`` of config.json."""

from __future__ import annotations

from vlray.families.base import (
    Capability,
    Family,
    ImageEncoder,
    MaskGenerator,
    MissingCapability,
    TextEncoder,
    TokenMatrices,
    UnsupportedImage,
)
from vlray.families.checkpoint import Checkpoint, CheckpointError, resolve_checkpoint
from vlray.families.clip import ClipFamily
from vlray.families.dinov2 import Dinov2Family
from vlray.families.qwen2_vl import Qwen2VLFamily
from vlray.families.sam import SamFamily
from vlray.families.siglip import SiglipFamily
from vlray.families.siglip2 import Siglip2Family

FAMILIES: dict[str, type[Family]] = {
    cls.name: cls
    for cls in (Siglip2Family, SiglipFamily, Qwen2VLFamily, SamFamily, ClipFamily, Dinov2Family)
}


def family_for(checkpoint: Checkpoint) -> Family:
    """The family plug-in for a checkpoint, chosen by its config.json ``model_type``."""
    for cls in FAMILIES.values():
        if checkpoint.model_type in cls.model_types:
            return cls(checkpoint)
    known = ", ".join(sorted(t for cls in FAMILIES.values() for t in cls.model_types))
    raise CheckpointError(
        f"{checkpoint.path}: model_type {checkpoint.model_type!r} is not supported (supported: {known})"
    )


__all__ = [
    "FAMILIES",
    "Capability",
    "MaskGenerator",
    "MissingCapability",
    "TokenMatrices",
    "Checkpoint",
    "CheckpointError",
    "Family",
    "ImageEncoder",
    "TextEncoder",
    "UnsupportedImage",
    "family_for",
    "resolve_checkpoint",
]
