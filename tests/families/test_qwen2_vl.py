"""Qwen2-VL family: parity with transformers' processor and vision tower, vision-only loading."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import (
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessor,
    Qwen2VLImageProcessorPil,
)
from transformers.models.qwen2_vl import modeling_qwen2_vl
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize as ref_smart_resize

from vlray.families.base import UnsupportedImage
from vlray.families.checkpoint import ARCH_DIR, CheckpointError, resolve_checkpoint
from vlray.families.qwen2_vl import Qwen2VLFamily
from vlray.ops.resize import resize_uint8
from vlray.testing.checkpoints import save_tiny_qwen2_vl

skimage_data = pytest.importorskip("skimage.data")

# (photo, top, left, height, width): several crops share a shape, so groups have >1 image.
CROPS = (
    ("astronaut", 0, 0, 300, 200),
    ("coffee", 10, 20, 300, 200),
    ("chelsea", 5, 5, 300, 200),
    ("astronaut", 50, 60, 131, 97),
    ("coffee", 0, 0, 400, 600),
    ("chelsea", 0, 0, 300, 451),
    ("astronaut", 100, 0, 40, 500),
    ("coffee", 3, 7, 29, 31),
    ("chelsea", 0, 0, 250, 250),
    ("astronaut", 0, 0, 512, 512),
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_qwen2_vl(tmp_path_factory.mktemp("qwen2_vl") / "tiny")


@pytest.fixture(scope="module")
def family(tiny: Path) -> Qwen2VLFamily:
    return Qwen2VLFamily(resolve_checkpoint(str(tiny)))


@pytest.fixture(scope="module")
def photos() -> list[np.ndarray]:
    """Decoded (H, W, 3) uint8 crops of real photos."""
    out = []
    for name, top, left, h, w in CROPS:
        src = getattr(skimage_data, name)()
        out.append(np.ascontiguousarray(src[top : top + h, left : left + w, :3]))
    return out


def _groups(
    family: Qwen2VLFamily, photos: list[np.ndarray]
) -> list[tuple[list[int], torch.Tensor]]:
    """What the pipeline does: resize each photo to its target, stack same-target runs."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, img in enumerate(photos):
        groups.setdefault(family.target_size(*img.shape[:2]), []).append(i)
    out = []
    for size, idx in groups.items():
        resized = [resize_uint8(photos[i], size, family.interpolation) for i in idx]
        stacked = torch.from_numpy(np.stack(resized)).permute(0, 3, 1, 2).contiguous()
        out.append((idx, stacked))
    return out


def _ours(family: Qwen2VLFamily, photos: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """pixel_values / image_grid_thw in the photos' order, computed group by group."""
    per_image: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for idx, images in _groups(family, photos):
        out = family.preprocess(images)
        values = out["pixel_values"].reshape(len(idx), -1, out["pixel_values"].shape[-1])
        for j, i in enumerate(idx):
            per_image[i] = (values[j], out["image_grid_thw"][j])
    order = range(len(photos))
    return torch.cat([per_image[i][0] for i in order]), torch.stack(
        [per_image[i][1] for i in order]
    )


def test_target_size_is_smart_resize(family: Qwen2VLFamily) -> None:
    rng = random.Random(0)
    sizes = [(1, 1), (1, 200), (200, 1), (13, 13), (27, 29), (28, 28), (56, 56), (4000, 3000)]
    sizes += [(rng.randint(1, 3000), rng.randint(1, 3000)) for _ in range(2000)]
    checked = 0
    for h, w in sizes:
        if max(h, w) / min(h, w) > 200:
            continue
        expected = ref_smart_resize(h, w, 28, family.min_pixels, family.max_pixels)
        assert family.target_size(h, w) == expected, (h, w)
        checked += 1
    assert checked > 1000
    for h, w in [(1, 201), (201, 1), (3, 1000)]:
        with pytest.raises(ValueError):
            ref_smart_resize(h, w, 28, family.min_pixels, family.max_pixels)
        with pytest.raises(UnsupportedImage):
            family.target_size(h, w)


def test_processor_values_follow_reference_precedence(tiny: Path) -> None:
    """size dict alone, min/max_pixels overriding it, and the class defaults, as the reference."""
    cases = [
        {"size": {"shortest_edge": 1000, "longest_edge": 20000}},
        {
            "size": {"shortest_edge": 1000, "longest_edge": 20000},
            "min_pixels": 5000,
            "max_pixels": 9000,
        },
        {"min_pixels": 3136, "max_pixels": 12845056},
        {},
    ]
    base = resolve_checkpoint(str(tiny))
    for overrides in cases:
        proc = {
            k: v for k, v in base.processor.items() if k not in ("size", "image_processor_type")
        }
        proc.update(overrides)
        fam = Qwen2VLFamily(dataclasses.replace(base, processor=proc))
        ref = Qwen2VLImageProcessor(**proc)
        assert (fam.min_pixels, fam.max_pixels) == (ref.size.shortest_edge, ref.size.longest_edge)


def test_preprocess_matches_reference(
    family: Qwen2VLFamily, tiny: Path, photos: list[np.ndarray]
) -> None:
    ours, grid = _ours(family, photos)
    tv = Qwen2VLImageProcessor.from_pretrained(str(tiny))
    pil = Qwen2VLImageProcessorPil.from_pretrained(str(tiny))
    ref = tv([torch.from_numpy(p).permute(2, 0, 1) for p in photos], return_tensors="pt")
    twin = pil(list(photos), return_tensors="pt")
    assert torch.equal(grid, ref["image_grid_thw"])
    assert torch.equal(twin["image_grid_thw"], ref["image_grid_thw"])
    assert ours.dtype == torch.float32
    assert ours.shape == ref["pixel_values"].shape == twin["pixel_values"].shape
    assert ours.shape[1] == 3 * 2 * 14 * 14
    ours_diff = (ours - ref["pixel_values"]).abs().max().item()
    pil_diff = (twin["pixel_values"] - ref["pixel_values"]).abs().max().item()
    assert ours_diff <= pil_diff + 1e-6
    assert ours_diff == 0.0  # same uint8 resize, same float32 arithmetic, pure reordering


def _reference_embeddings(tiny: Path, photos: list[np.ndarray]) -> torch.Tensor:
    model = Qwen2VLForConditionalGeneration.from_pretrained(str(tiny), dtype=torch.float32).eval()
    proc = Qwen2VLImageProcessor.from_pretrained(str(tiny))
    ref = proc([torch.from_numpy(p).permute(2, 0, 1) for p in photos], return_tensors="pt")
    with torch.no_grad():
        tokens = model.get_image_features(ref["pixel_values"], ref["image_grid_thw"]).pooler_output
    return F.normalize(torch.stack([t.mean(0) for t in tokens]), dim=-1)


def _embeddings(family: Qwen2VLFamily, photos: list[np.ndarray]) -> torch.Tensor:
    encoder = family.load_encoder(torch.device("cpu"), torch.float32)
    out = torch.empty(len(photos), encoder.dim)
    for idx, images in _groups(family, photos):
        out[idx] = encoder.encode(family.preprocess(images))
    return out


def test_embeddings_match_reference(
    family: Qwen2VLFamily, tiny: Path, photos: list[np.ndarray]
) -> None:
    ours = _embeddings(family, photos)
    ref = _reference_embeddings(tiny, photos)
    assert ours.shape == (len(photos), 32)
    assert ours.dtype == torch.float32
    assert torch.allclose(ours.norm(dim=-1), torch.ones(len(photos)), atol=1e-5)
    cos = (ours * ref).sum(-1)
    assert cos.min().item() >= 0.999, cos


def test_merged_tokens_shape(family: Qwen2VLFamily, photos: list[np.ndarray]) -> None:
    encoder = family.load_encoder(torch.device("cpu"), torch.float32)
    idx, images = _groups(family, photos)[0]
    tokens = encoder.merged_tokens(family.preprocess(images))
    h, w = images.shape[-2:]
    assert tokens.shape == (len(idx), (h // 28) * (w // 28), 32)


def test_loader_never_builds_the_language_model(
    family: Qwen2VLFamily, tiny: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the language model was built")

    monkeypatch.setattr(modeling_qwen2_vl.Qwen2VLTextModel, "__init__", refuse)
    monkeypatch.setattr(modeling_qwen2_vl.Qwen2VLForConditionalGeneration, "__init__", refuse)
    encoder = family.load_encoder(torch.device("cpu"), torch.float32)
    tower = encoder.tower
    assert isinstance(tower, modeling_qwen2_vl.Qwen2VisionTransformerPretrainedModel)
    assert not any(
        "lm_head" in n or "language" in n or "embed_tokens" in n
        for n, _ in tower.named_parameters()
    )
    stored = load_file(str(tiny / "model.safetensors"))
    vision = {k[len("visual.") :]: v for k, v in stored.items() if k.startswith("visual.")}
    assert sum(p.numel() for p in tower.parameters()) == sum(v.numel() for v in vision.values())
    for name, tensor in tower.state_dict().items():
        assert torch.equal(tensor, vision[name]), name


def _copy_configs(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True)
    for name in ("config.json", "preprocessor_config.json"):
        shutil.copy(src / name, dst / name)


def test_loader_accepts_model_visual_prefix_and_shards(
    family: Qwen2VLFamily, tiny: Path, tmp_path: Path, photos: list[np.ndarray]
) -> None:
    expected = _embeddings(family, photos[:3])
    stored = load_file(str(tiny / "model.safetensors"))

    renamed = tmp_path / "renamed"
    _copy_configs(tiny, renamed)
    save_file(
        {("model." + k if k.startswith("visual.") else k): v for k, v in stored.items()},
        str(renamed / "model.safetensors"),
    )
    got = _embeddings(Qwen2VLFamily(resolve_checkpoint(str(renamed))), photos[:3])
    assert torch.equal(got, expected)

    # Sharded: the vision tower in one shard, the language model in a shard that is not even a
    # valid safetensors file, so opening it would fail.
    sharded = tmp_path / "sharded"
    _copy_configs(tiny, sharded)
    vision = {k: v for k, v in stored.items() if k.startswith("visual.")}
    save_file(vision, str(sharded / "model-00001-of-00002.safetensors"))
    (sharded / "model-00002-of-00002.safetensors").write_bytes(b"not a safetensors file")
    weight_map = {
        k: "model-00001-of-00002.safetensors" if k in vision else "model-00002-of-00002.safetensors"
        for k in stored
    }
    (sharded / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    got = _embeddings(Qwen2VLFamily(resolve_checkpoint(str(sharded))), photos[:3])
    assert torch.equal(got, expected)


def test_loader_is_strict(tiny: Path, tmp_path: Path) -> None:
    stored = load_file(str(tiny / "model.safetensors"))
    broken = tmp_path / "broken"
    _copy_configs(tiny, broken)
    save_file(
        {k: v for k, v in stored.items() if k != "visual.merger.ln_q.weight"},
        str(broken / "model.safetensors"),
    )
    with pytest.raises(CheckpointError, match="merger.ln_q.weight"):
        Qwen2VLFamily(resolve_checkpoint(str(broken))).load_encoder(
            torch.device("cpu"), torch.float32
        )

    text_only = tmp_path / "text_only"
    _copy_configs(tiny, text_only)
    save_file(
        {k: v for k, v in stored.items() if not k.startswith("visual.")},
        str(text_only / "model.safetensors"),
    )
    with pytest.raises(CheckpointError, match="no vision tower"):
        Qwen2VLFamily(resolve_checkpoint(str(text_only))).load_encoder(
            torch.device("cpu"), torch.float32
        )


def test_random_weights_are_seeded(tiny: Path, photos: list[np.ndarray]) -> None:
    def embed(seed: int) -> torch.Tensor:
        return _embeddings(
            Qwen2VLFamily(resolve_checkpoint(str(tiny), weights="random", seed=seed)), photos[:2]
        )

    first, again, other = embed(1), embed(1), embed(2)
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)


def test_no_text_tower(family: Qwen2VLFamily) -> None:
    with pytest.raises(NotImplementedError, match="no text tower"):
        family.load_text_encoder(torch.device("cpu"), torch.float32)


@pytest.mark.parametrize(
    ("name", "dim", "text_hidden"),
    [("qwen2-vl-2b-instruct", 1536, 1536), ("qwen2-vl-7b-instruct", 3584, 3584)],
)
def test_arch_configs(name: str, dim: int, text_hidden: int) -> None:
    folder = ARCH_DIR / name
    config = Qwen2VLConfig.from_pretrained(str(folder))
    vision = config.vision_config
    assert (vision.depth, vision.embed_dim, vision.num_heads, vision.mlp_ratio) == (32, 1280, 16, 4)
    assert (
        vision.hidden_size,
        vision.patch_size,
        vision.spatial_merge_size,
        vision.temporal_patch_size,
    ) == (
        dim,
        14,
        2,
        2,
    )
    assert config.text_config.hidden_size == text_hidden
    assert config.text_config.num_hidden_layers == 28
    ref = Qwen2VLImageProcessor.from_pretrained(str(folder))
    for checkpoint in (
        resolve_checkpoint(str(folder), weights="random"),
        resolve_checkpoint(name, weights="random"),
    ):
        fam = Qwen2VLFamily(checkpoint)
        assert (fam.min_pixels, fam.max_pixels) == (ref.size.shortest_edge, ref.size.longest_edge)
        assert fam.normalization.mean == tuple(ref.image_mean)
        for h, w in [(1080, 1920), (480, 640), (10000, 9000), (20, 20)]:
            assert fam.target_size(h, w) == ref_smart_resize(
                h, w, 28, fam.min_pixels, fam.max_pixels
            )


_PEAK_SCRIPT = """
import sys, torch
from vlray.families import family_for, resolve_checkpoint
import transformers.models.qwen2_vl.modeling_qwen2_vl  # imports done before the baseline


def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])


family = family_for(resolve_checkpoint(sys.argv[1]))
# reset the peak (VmHWM) to the current RSS: imports (byte-compiling a fresh venv) can peak
# far above what follows, which would hide the loader's own peak
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before = status("VmRSS")
if sys.argv[2] == "vlray":
    size = sum(p.numel() * p.element_size() for p in family.load_encoder(
        torch.device("cpu"), torch.float32).tower.parameters())
else:  # calibration: what materializing every tensor of the checkpoint costs
    from safetensors.torch import load_file
    state = {k: v.clone() for k, v in load_file(sys.argv[1] + "/model.safetensors").items()}
    size = sum(v.numel() * v.element_size() for v in state.values())
print(before, status("VmHWM"), size)
"""


def _peak_growth(folder: Path, mode: str) -> tuple[int, int]:
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", _PEAK_SCRIPT, str(folder), mode],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    before_kib, after_kib, size = (int(v) for v in out.stdout.split()[-3:])
    return (after_kib - before_kib) * 1024, size


def test_loader_peak_memory_stays_near_the_vision_tower(tiny: Path, tmp_path: Path) -> None:
    """A checkpoint whose language model is 384 MiB next to a ~0.3 MiB vision tower, in the
    same safetensors file: loading the encoder raises the peak RSS by about the tower; loading
    every tensor (the calibration run, proving the measurement sees materialized weights)
    raises it by the whole checkpoint."""
    stored = load_file(str(tiny / "model.safetensors"))
    stored["model.language_model.embed_tokens.weight"] = torch.ones(32768, 2048)  # 256 MiB
    stored["lm_head.weight"] = torch.ones(16384, 2048)  # 128 MiB
    big = tmp_path / "big-lm"
    _copy_configs(tiny, big)
    save_file(stored, str(big / "model.safetensors"))
    del stored
    grown, tower_bytes = _peak_growth(big, "vlray")
    assert tower_bytes < 4 << 20
    assert grown < 48 << 20, f"peak RSS grew {grown / 2**20:.0f} MiB loading a small tower"
    everything, total = _peak_growth(big, "all")
    assert total > 384 << 20
    assert everything > 300 << 20, "the calibration run must show materialized weights"
