"""Checkpoints laid out as the Hugging Face hub publishes them (issue 14).

Published config.json files leave out every key equal to transformers' default (google's
siglip2 naflex ``vision_config`` is ``{"model_type": ...}`` and little more), Qwen2-VL's put the
text settings at the root, SAM's are 4.x's verbose dumps; weights may be sharded or re-saved
under ``model.visual.*``; SigLIP's tokenizer is a bare ``spiece.model``. Every family must take
its dimensions from the config object (defaults applied) and agree with transformers'
reference model + processor loaded from the same folder. Tiny models, a few images, no Ray.
"""

from __future__ import annotations

import json
import pickle
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vlray.families import Checkpoint, Family, family_for, resolve_checkpoint
from vlray.families.batch import preprocess_images
from vlray.families.checkpoint import load_config
from vlray.ops.decode import decode_image
from vlray.testing.checkpoints import (
    HUB_SIGLIP_VOCAB,
    save_hub_qwen2_vl,
    save_hub_sam,
    save_hub_siglip,
    save_hub_siglip2,
    save_tiny_qwen2_vl,
    save_tiny_sam,
    save_tiny_siglip,
    save_tiny_siglip2,
    write_hub_config,
)
from vlray.testing.images import sample_photos

CPU = torch.device("cpu")
EMBEDDING_FAMILIES = ("siglip2", "siglip", "qwen2_vl")
ALL_FAMILIES = (*EMBEDDING_FAMILIES, "sam")
WRITERS = {
    "siglip2": (save_tiny_siglip2, save_hub_siglip2),
    "siglip": (partial(save_tiny_siglip, vocab=HUB_SIGLIP_VOCAB), save_hub_siglip),
    "qwen2_vl": (save_tiny_qwen2_vl, save_hub_qwen2_vl),
    "sam": (save_tiny_sam, save_hub_sam),
}
SHARD = "20KB"
PHOTOS = [decode_image(blob, max_pixels=10**8) for _, blob in sample_photos(3)]


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Path]]:
    """Per family: the save_pretrained layout, the hub layout, the hub layout sharded."""
    root = tmp_path_factory.mktemp("hub-layouts")
    out: dict[str, dict[str, Path]] = {}
    for name, (tiny, hub) in WRITERS.items():
        out[name] = {
            "save_pretrained": tiny(root / name / "save_pretrained"),
            "hub": hub(root / name / "hub"),
            "sharded": hub(root / name / "sharded", max_shard_size=SHARD),
        }
    return out


def _family(folder: Path) -> Family:
    return family_for(resolve_checkpoint(str(folder)))


def _ours(family: Family, images: list[np.ndarray]) -> torch.Tensor:
    """vlray's embeddings, in the images' order (same-shape groups, as the pipeline)."""
    encoder = family.load_encoder(CPU, torch.float32)
    out = torch.empty(len(images), encoder.dim)
    for indices, inputs in preprocess_images(family, images):
        out[indices] = encoder.encode(inputs)
    return out


def _reference_model(kind: str, folder: Path) -> torch.nn.Module:
    from transformers import AutoModel, Qwen2VLForConditionalGeneration

    if kind == "qwen2_vl":
        return Qwen2VLForConditionalGeneration.from_pretrained(str(folder)).eval()
    return AutoModel.from_pretrained(str(folder)).eval()


def _reference(kind: str, folder: Path, images: list[np.ndarray]) -> torch.Tensor:
    """transformers' processor + model from the same folder, L2-normalized."""
    from transformers import AutoImageProcessor

    model = _reference_model(kind, folder)
    processor = AutoImageProcessor.from_pretrained(str(folder))
    rows = []
    with torch.no_grad():
        for image in images:
            inputs = processor(images=[Image.fromarray(image)], return_tensors="pt")
            if kind == "qwen2_vl":
                tokens = model.get_image_features(
                    inputs["pixel_values"], inputs["image_grid_thw"]
                ).pooler_output
                rows.append(torch.cat(list(tokens)).mean(0))
            else:
                rows.append(model.get_image_features(**inputs).pooler_output[0])
    return F.normalize(torch.stack(rows).float(), dim=-1)


def _raw(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def test_hub_configs_leave_out_defaults(folders: dict[str, dict[str, Path]]) -> None:
    """The fixtures really are in the hub's shape (else the rest proves nothing)."""
    siglip2 = _raw(folders["siglip2"]["hub"])["vision_config"]
    assert siglip2["model_type"] == "siglip2_vision_model"
    assert "patch_size" not in siglip2 and "num_channels" not in siglip2
    siglip = _raw(folders["siglip"]["hub"])["vision_config"]
    assert "patch_size" not in siglip and "hidden_act" not in siglip
    qwen = _raw(folders["qwen2_vl"]["hub"])
    assert "text_config" not in qwen and qwen["hidden_size"] == 32  # text settings at the root
    assert "model_type" not in qwen["vision_config"]
    assert not {"patch_size", "spatial_merge_size", "temporal_patch_size"} & set(
        qwen["vision_config"]
    )
    sam = _raw(folders["sam"]["hub"])["vision_config"]
    assert sam["num_pos_feats"] == 16 and sam["chunk_size_feed_forward"] == 0  # 4.x verbose
    for kind in ALL_FAMILIES:
        assert (folders[kind]["hub"] / "preprocessor_config.json").exists()
        assert not (folders[kind]["hub"] / "processor_config.json").exists()
    assert not (folders["siglip"]["hub"] / "tokenizer.json").exists()
    assert (folders["siglip"]["hub"] / "spiece.model").exists()
    with_keys = json.loads(
        (folders["qwen2_vl"]["sharded"] / "model.safetensors.index.json").read_text()
    )["weight_map"]
    assert any(k.startswith("model.visual.") for k in with_keys)
    assert not any(k.startswith("visual.") for k in with_keys)


@pytest.mark.parametrize("kind", ALL_FAMILIES)
def test_dimensions_come_from_the_config_object(
    kind: str, folders: dict[str, dict[str, Path]]
) -> None:
    hub = resolve_checkpoint(str(folders[kind]["hub"]))
    family = family_for(hub)
    assert family.name == kind
    reference = _family(folders[kind]["save_pretrained"])
    assert family.embedding_dim == reference.embedding_dim
    assert hub.vision_bytes() > 0
    assert (
        hub.vision_bytes()
        == resolve_checkpoint(str(folders[kind]["save_pretrained"])).vision_bytes()
    )
    # exact: the parameters the encoder (SAM: the mask generator) really holds, in float32
    if kind == "sam":
        assert family.embedding_dim == 0
        resident = family.load_mask_generator(CPU, torch.float32).model
    else:
        encoder = family.load_encoder(CPU, torch.float32)
        assert encoder.dim == family.embedding_dim
        resident = encoder.vision if kind != "qwen2_vl" else encoder.tower
    values = sum(p.numel() for p in resident.parameters()) + sum(
        b.numel() for b in resident.buffers()
    )
    assert hub.vision_bytes() == 4 * values


@pytest.mark.parametrize("kind", EMBEDDING_FAMILIES)
def test_embeddings_match_reference_on_hub_layout(
    kind: str, folders: dict[str, dict[str, Path]]
) -> None:
    folder = folders[kind]["hub"]
    family = _family(folder)
    ours = _ours(family, PHOTOS)
    reference = _reference(kind, folder, PHOTOS)
    assert ours.shape == reference.shape == (len(PHOTOS), family.embedding_dim)
    assert reference.shape[1] == family.embedding_dim  # get_image_features' width
    cos = (ours * reference).sum(-1)
    assert cos.min().item() >= 0.999, cos
    # the same weights as the save_pretrained layout: the same embeddings
    same = _ours(_family(folders[kind]["save_pretrained"]), PHOTOS)
    assert torch.allclose(ours, same, atol=1e-6)


def test_reference_loads_every_qwen2_vl_tensor(folders: dict[str, dict[str, Path]]) -> None:
    """The reference on the re-saved ``model.visual.*`` folder has the original weights (a
    silently re-initialized tensor would make the parity test above meaningless)."""
    hub = _reference_model("qwen2_vl", folders["qwen2_vl"]["hub"]).state_dict()
    original = _reference_model("qwen2_vl", folders["qwen2_vl"]["save_pretrained"]).state_dict()
    assert hub.keys() == original.keys()
    for key, tensor in original.items():
        assert torch.equal(hub[key], tensor), key


@pytest.mark.parametrize("kind", ALL_FAMILIES)
def test_sharded_weights_load_the_same(kind: str, folders: dict[str, dict[str, Path]]) -> None:
    sharded = folders[kind]["sharded"]
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert not (sharded / "model.safetensors").exists()
    whole, parts = _family(folders[kind]["hub"]), _family(sharded)
    assert resolve_checkpoint(str(sharded)).vision_bytes() == whole.checkpoint.vision_bytes()
    if kind == "sam":
        inputs = preprocess_images(whole, PHOTOS[:1])[0][1]["pixel_values"]
        a = whole.load_mask_generator(CPU, torch.float32).image_embeddings(inputs)
        b = parts.load_mask_generator(CPU, torch.float32).image_embeddings(inputs)
        assert torch.equal(a, b)
    else:
        # the shards hold the whole file's tensors bit for bit; the forward pass may take other
        # SIMD paths for other buffer alignments (1 ulp on an AMD EPYC), so within 1e-6, as in
        # the layout test above
        from safetensors.torch import load_file

        whole_tensors = load_file(folders[kind]["hub"] / "model.safetensors")
        shard_tensors: dict[str, torch.Tensor] = {}
        for name in set(index["weight_map"].values()):
            shard_tensors.update(load_file(sharded / name))
        assert shard_tensors.keys() == whole_tensors.keys()
        assert all(torch.equal(shard_tensors[k], t) for k, t in whole_tensors.items())
        diff = (_ours(whole, PHOTOS[:2]) - _ours(parts, PHOTOS[:2])).abs().max().item()
        assert diff <= 1e-6, diff


def test_sam_hub_layout_matches_reference(folders: dict[str, dict[str, Path]]) -> None:
    from transformers import SamImageProcessor, SamModel

    folder = folders["sam"]["hub"]
    family = _family(folder)
    generator = family.load_mask_generator(CPU, torch.float32)
    image = PHOTOS[0]
    ours = generator.image_embeddings(preprocess_images(family, [image])[0][1]["pixel_values"])
    processor = SamImageProcessor.from_pretrained(str(folder))
    model = SamModel.from_pretrained(str(folder)).eval()
    with torch.no_grad():
        pixels = processor(images=[Image.fromarray(image)], return_tensors="pt")["pixel_values"]
        expected = model.get_image_embeddings(pixels)
    # float64: the tiny SAM's embeddings are ~1e-21 (its neck's layer norms), whose float32
    # squares underflow in F.cosine_similarity
    a, b = ours.flatten().double(), expected.flatten().double()
    assert float(a @ b / (a.norm() * b.norm())) >= 0.999


@pytest.mark.parametrize("kind", ["siglip", "siglip2"])
def test_text_queries_on_hub_layout(kind: str, folders: dict[str, dict[str, Path]]) -> None:
    """SigLIP's bare ``spiece.model`` tokenizer (and SigLIP2's tokenizer.json) serve queries."""
    from transformers import AutoModel, AutoTokenizer

    folder = folders[kind]["hub"]
    texts = ["a photo of a cat", "A Red Car on the sky"]
    text = _family(folder).load_text_encoder(CPU, torch.float32)
    if kind == "siglip":
        assert type(text.tokenizer).__name__ == "SiglipTokenizer"
    got = text.encode(texts)
    tokens = AutoTokenizer.from_pretrained(str(folder))(
        texts, padding="max_length", max_length=64, truncation=True, return_tensors="pt"
    )
    model = AutoModel.from_pretrained(str(folder)).eval()
    assert int(tokens["input_ids"].max()) < model.config.text_config.vocab_size
    with torch.no_grad():
        expected = F.normalize(model.get_text_features(**tokens).pooler_output, dim=-1)
    assert got.shape == (2, _family(folder).embedding_dim)
    assert torch.allclose(got, expected, atol=1e-5)


PRESET_DIMS = {
    "siglip-so400m-patch14-384": 1152,
    "siglip2-base-patch16-naflex": 768,
    "siglip2-so400m-patch16-naflex": 1152,
    "qwen2-vl-2b-instruct": 1536,
    "qwen2-vl-7b-instruct": 3584,
    "sam-vit-base": 0,
}


@pytest.mark.parametrize("name", sorted(PRESET_DIMS))
def test_full_size_configs_in_the_hub_shape(name: str, tmp_path: Path) -> None:
    """The presets' full-size architectures rewritten as the hub publishes them (siglip2-base
    naflex: ``vision_config`` is exactly ``{"model_type": ...}``) give the same dimension and
    model size as the verbose preset."""
    preset = resolve_checkpoint(name, weights="random")
    config = load_config(preset.path)
    write_hub_config(config, tmp_path, flat_text=name.startswith("qwen2"))
    (tmp_path / "preprocessor_config.json").write_text(
        (Path(preset.path) / "preprocessor_config.json").read_text()
    )
    if name == "siglip2-base-patch16-naflex":
        assert _raw(tmp_path)["vision_config"] == {"model_type": "siglip2_vision_model"}
    hub = resolve_checkpoint(str(tmp_path), weights="random")
    assert family_for(preset).embedding_dim == family_for(hub).embedding_dim == PRESET_DIMS[name]
    assert hub.vision_bytes() == preset.vision_bytes() > 100 << 20


def test_checkpoint_pickles_without_its_config_object(
    folders: dict[str, dict[str, Path]],
) -> None:
    """Checkpoints go to Ray actors: the cached config object stays out of the pickle."""
    checkpoint = resolve_checkpoint(str(folders["siglip2"]["hub"]))
    size = len(pickle.dumps(checkpoint))
    assert checkpoint.config_object() is checkpoint.config_object()  # cached
    bytes_before = checkpoint.vision_bytes()
    data = pickle.dumps(checkpoint)
    assert len(data) == size
    again: Checkpoint = pickle.loads(data)
    assert again == checkpoint and again.vision_bytes() == bytes_before
    assert pickle.loads(pickle.dumps(family_for(again))).embedding_dim == 32


def test_without_processor_config_the_model_config_decides(
    folders: dict[str, dict[str, Path]], tmp_path: Path
) -> None:
    """A folder with config.json alone: the processor settings the model fixes (SigLIP's
    image size, SigLIP2's patch size and patch budget, SAM's frame) come from the config
    object, defaults applied, not from constants."""
    got = {}
    for kind in ALL_FAMILIES:
        folder = tmp_path / kind
        folder.mkdir()
        (folder / "config.json").write_text((folders[kind]["hub"] / "config.json").read_text())
        got[kind] = family_for(resolve_checkpoint(str(folder), weights="random"))
    assert got["siglip"].size == (64, 64)  # the tiny tower's image_size (the class default: 224)
    assert (got["siglip2"].patch_size, got["siglip2"].max_num_patches) == (16, 64)
    assert (got["qwen2_vl"].patch_size, got["qwen2_vl"].merge_size) == (14, 2)
    assert got["sam"].longest_edge == 1024 and got["sam"].pad_size == (1024, 1024)
