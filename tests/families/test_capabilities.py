"""The capability contract: what each family's checkpoint can do, read from the checkpoint.

A two-tower checkpoint (SigLIP, CLIP) embeds text only when its folder holds the text tower's
weights and a tokenizer; asking a family for something it cannot do raises MissingCapability
with a message that says what to use instead.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from vlray.families import Capability, MissingCapability, family_for, resolve_checkpoint
from vlray.families.batch import preprocess_images
from vlray.testing.images import sample_photos

CPU = torch.device("cpu")
IMAGE, TEXT, MASKS, TOKENS = (
    Capability.IMAGE_EMBEDDINGS,
    Capability.TEXT_EMBEDDINGS,
    Capability.MASKS,
    Capability.TOKEN_MATRICES,
)


@pytest.mark.parametrize(
    ("preset", "expected"),
    [
        ("sam-vit-base", {MASKS}),
        ("qwen2-vl-2b-instruct", {IMAGE, TOKENS}),
        ("dinov2-base", {IMAGE}),
        # the shipped architecture presets have no tokenizer files: no text search
        ("siglip2-base-patch16-naflex", {IMAGE}),
        ("clip-vit-base-patch32", {IMAGE}),
    ],
)
def test_presets_list_what_they_can_do(preset, expected):
    family = family_for(resolve_checkpoint(preset, weights="random"))
    assert family.capabilities == expected
    assert family.produces_embeddings is (IMAGE in expected)
    missing = [c for c in Capability if c not in expected]
    for capability in missing:
        with pytest.raises(MissingCapability):
            family.require(capability)


def test_missing_capabilities_say_what_to_do(siglip2_checkpoint):
    dinov2 = family_for(resolve_checkpoint("dinov2-base", weights="random"))
    with pytest.raises(MissingCapability, match="no text tower: query by --image or --id"):
        dinov2.load_text_encoder(CPU, torch.float32)
    with pytest.raises(MissingCapability, match="produces no masks"):
        dinov2.load_mask_generator(CPU, torch.float32)
    siglip2 = family_for(resolve_checkpoint(str(siglip2_checkpoint)))
    assert siglip2.capabilities == {IMAGE, TEXT}
    encoder = siglip2.load_encoder(CPU, torch.float32)
    (_, inputs), *_ = preprocess_images(siglip2, [_photo()])
    with pytest.raises(MissingCapability, match="no token matrix"):
        encoder.embed_tokens(inputs)
    preset = family_for(resolve_checkpoint("siglip2-base-patch16-naflex", weights="random"))
    with pytest.raises(MissingCapability, match="no tokenizer files"):
        preset.load_text_encoder(CPU, torch.float32)


def _photo():
    from vlray.ops.decode import decode_image

    return decode_image(sample_photos(1, seed=5)[0][1], max_pixels=10**8)


def _vision_weights_only(source: Path, folder: Path, tokenizer: bool) -> Path:
    """A full SigLIP config.json with only the vision tower's tensors (as some exports ship),
    with or without the tokenizer files."""
    folder.mkdir()
    for name in ("config.json", "preprocessor_config.json"):
        shutil.copy(source / name, folder)
    if tokenizer:
        for path in source.glob("*token*"):
            shutil.copy(path, folder)
    state = load_file(str(source / "model.safetensors"))
    vision = {k: v for k, v in state.items() if not k.startswith("text_model.")}
    assert len(vision) < len(state)
    save_file(vision, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


@pytest.mark.parametrize("tokenizer", [False, True])
def test_a_siglip_folder_without_its_text_tower_is_vision_only(
    siglip_checkpoint, tmp_path, tokenizer
):
    folder = _vision_weights_only(Path(siglip_checkpoint), tmp_path / "vision", tokenizer)
    family = family_for(resolve_checkpoint(str(folder)))
    assert family.capabilities == {IMAGE}
    why = "no text tower weights" if tokenizer else "no tokenizer files"
    with pytest.raises(MissingCapability, match=why):
        family.load_text_encoder(CPU, torch.float32)
    # the image side is unaffected: the same embedding as the full checkpoint's
    full = family_for(resolve_checkpoint(str(siglip_checkpoint)))
    vectors = []
    for f in (full, family):
        (_, inputs), *_ = preprocess_images(f, [_photo()])
        vectors.append(f.load_encoder(CPU, torch.float32).encode(inputs))
    assert torch.allclose(vectors[0], vectors[1], atol=1e-6)
