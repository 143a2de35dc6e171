"""Tests for the SAM family: preprocessing, prompt scaling, prompted and automatic masks.

The oracle is transformers: ``SamImageProcessor`` (torchvision backend) and its PIL twin,
``SamProcessor`` + ``SamModel`` + ``post_process_masks``, and the ``mask-generation`` pipeline,
all on a tiny random SAM saved with ``save_pretrained``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as tvF

from vlray.families import Capability, MissingCapability
from vlray.families.checkpoint import resolve_checkpoint
from vlray.families.sam import SamFamily, SamMaskGenerator, build_point_grid, preprocess_shape
from vlray.ops.rle import rle_to_mask
from vlray.testing.checkpoints import save_tiny_sam

skimage_data = pytest.importorskip("skimage.data")
ROOT = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")


def _photos() -> dict[str, np.ndarray]:
    astronaut, coffee, chelsea = (
        skimage_data.astronaut(),
        skimage_data.coffee(),
        skimage_data.chelsea(),
    )
    return {
        "astronaut": astronaut,  # 512x512, upscaled
        "coffee": coffee,  # 400x600
        "chelsea": chelsea,  # 300x451
        "astronaut_tall": np.ascontiguousarray(astronaut[:480, 100:290]),
        "coffee_wide": np.ascontiguousarray(coffee[120:220, :]),
        "chelsea_odd": np.ascontiguousarray(chelsea[3:250, 7:200]),
    }


PHOTOS = _photos()


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_sam(tmp_path_factory.mktemp("tiny-sam"))


@pytest.fixture(scope="module")
def family(folder: Path) -> SamFamily:
    return SamFamily(resolve_checkpoint(str(folder)))


@pytest.fixture(scope="module")
def generator(family: SamFamily) -> SamMaskGenerator:
    return family.load_mask_generator(CPU, torch.float32)


@pytest.fixture(scope="module")
def reference(folder: Path):
    from transformers import SamImageProcessor, SamModel, SamProcessor

    model = SamModel.from_pretrained(str(folder)).eval()
    processor = SamProcessor(image_processor=SamImageProcessor.from_pretrained(str(folder)))
    return model, processor


def _resized(family: SamFamily, image: np.ndarray) -> torch.Tensor:
    """What a decode actor does: uint8 (3, h, w) at the family's target size."""
    h, w = image.shape[:2]
    chw = torch.from_numpy(image).permute(2, 0, 1)
    return tvF.resize(chw, list(family.target_size(h, w)), family.interpolation, antialias=True)


def _embed(family: SamFamily, generator: SamMaskGenerator, image: np.ndarray):
    resized = _resized(family, image)
    inputs = family.preprocess(resized[None])
    return generator.image_embeddings(inputs["pixel_values"])[0], tuple(resized.shape[-2:])


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def test_family_basics(family: SamFamily) -> None:
    assert family.name == "sam" and family.model_types == ("sam",)
    assert family.capabilities == {Capability.MASKS} and family.produces_embeddings is False
    assert family.interpolation == InterpolationMode.BILINEAR
    assert family.pad_size == (1024, 1024) and family.longest_edge == 1024
    assert family.target_size(480, 640) == (768, 1024)
    assert family.target_size(1, 1) == (1024, 1024)
    with pytest.raises(MissingCapability, match="produces no embeddings"):
        family.load_encoder(CPU, torch.float32)
    with pytest.raises(MissingCapability, match="no text tower"):
        family.load_text_encoder(CPU, torch.float32)


def test_preprocess_matches_reference(family: SamFamily) -> None:
    from transformers import SamImageProcessor, SamImageProcessorPil

    torchvision_ref, pil_ref = SamImageProcessor(), SamImageProcessorPil()
    for name, image in PHOTOS.items():
        resized = _resized(family, image)
        group = torch.stack([resized, resized.flip(-1)])  # a same-shape group of two
        ours = family.preprocess(group)
        images = [
            torch.from_numpy(image).permute(2, 0, 1),
            torch.from_numpy(image[:, ::-1].copy()).permute(2, 0, 1),
        ]
        ref = torchvision_ref(images=images, return_tensors="pt")
        pil = pil_ref(
            images=[Image.fromarray(image), Image.fromarray(image[:, ::-1].copy())],
            return_tensors="pt",
        )
        assert ours["pixel_values"].shape == (2, 3, 1024, 1024)
        assert ours["pixel_values"].dtype == torch.float32
        assert ours["reshaped_input_sizes"].tolist() == ref["reshaped_input_sizes"].tolist(), name
        assert tuple(resized.shape[-2:]) == preprocess_shape(*image.shape[:2], 1024)
        ours_diff = (ours["pixel_values"] - ref["pixel_values"]).abs().max().item()
        pil_diff = (pil["pixel_values"] - ref["pixel_values"]).abs().max().item()
        assert ours_diff <= pil_diff + 1e-6, (name, ours_diff, pil_diff)


def test_scale_prompts_matches_processor(family: SamFamily, reference) -> None:
    _, processor = reference
    images = [PHOTOS["coffee"], PHOTOS["chelsea_odd"]]
    points = [
        [[[10.5, 20.0], [300.0, 200.0]], [[1.0, 2.0], [599.0, 399.0]]],
        [[[0.0, 0.0], [192.0, 246.0]], [[50.0, 60.0], [70.0, 80.0]]],
    ]
    labels = [[[1, 0], [1, 1]], [[1, 1], [0, 1]]]
    boxes = [
        [[10.0, 20.0, 300.5, 200.0], [0.0, 0.0, 599.0, 399.0]],
        [[5.0, 6.0, 100.0, 200.0], [0.0, 0.0, 192.0, 246.0]],
    ]
    ref = processor(
        images=images,
        input_points=points,
        input_labels=labels,
        input_boxes=boxes,
        return_tensors="pt",
    )
    sizes = torch.tensor([im.shape[:2] for im in images])
    ours = family.scale_prompts(
        torch.tensor(points), torch.tensor(labels), torch.tensor(boxes), sizes
    )
    assert torch.equal(ours[0], ref["input_points"])
    assert torch.equal(ours[1], ref["input_labels"])
    assert torch.equal(ours[2], ref["input_boxes"])


@pytest.mark.parametrize("name", ["coffee", "astronaut_tall", "chelsea"])
def test_prompted_matches_reference(
    name: str, family: SamFamily, generator: SamMaskGenerator, reference
) -> None:
    model, processor = reference
    image = PHOTOS[name]
    h, w = image.shape[:2]
    points = [
        [
            [[w * 0.3, h * 0.4], [w * 0.7, h * 0.6]],
            [[w * 0.5, h * 0.5], [w * 0.1, h * 0.9]],
            [[w * 0.9, h * 0.1], [w * 0.2, h * 0.2]],
        ]
    ]
    labels = [[[1, 0], [1, 1], [1, 1]]]
    boxes = [
        [
            [w * 0.1, h * 0.1, w * 0.6, h * 0.7],
            [0.0, 0.0, w - 1.0, h - 1.0],
            [w * 0.4, h * 0.3, w * 0.9, h * 0.95],
        ]
    ]
    embeddings, reshaped = _embed(family, generator, image)
    for prompt in ({"input_points": points, "input_labels": labels}, {"input_boxes": boxes}):
        inputs = processor(images=Image.fromarray(image), return_tensors="pt", **prompt)
        with torch.inference_mode():
            out = model(**inputs)
        ref_masks = processor.post_process_masks(
            out.pred_masks, inputs["original_sizes"], inputs["reshaped_input_sizes"]
        )[0]
        ref_masks = ref_masks.flatten(0, 1).numpy()
        ref_iou = out.iou_scores.flatten()
        p, lab, b = family.scale_prompts(
            torch.tensor(points) if "input_points" in prompt else None,
            torch.tensor(labels) if "input_labels" in prompt else None,
            torch.tensor(boxes) if "input_boxes" in prompt else None,
            (h, w),
        )
        records = generator.prompted(
            embeddings, p, lab, b, original_size=(h, w), reshaped_input_size=reshaped
        )
        assert len(records) == 9 == len(ref_masks)
        assert [r["prompt_index"] for r in records] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
        assert [r["mask_id"] for r in records] == list(range(9))
        for record, ref_mask, score in zip(records, ref_masks, ref_iou.tolist(), strict=True):
            mask = rle_to_mask(record["segmentation"])
            assert mask.shape == (h, w)
            assert _iou(mask, ref_mask) >= 0.99
            assert record["predicted_iou"] == pytest.approx(score, abs=1e-4)
            assert record["area"] == int(mask.sum())
            assert 0.0 <= record["stability_score"] <= 1.0
    single = generator.prompted(
        embeddings,
        p,
        lab,
        b,
        original_size=(h, w),
        reshaped_input_size=reshaped,
        multimask_output=False,
    )
    assert [r["prompt_index"] for r in single] == [0, 1, 2]


# Random masks are scattered over the whole image, so nearly all boxes are the image box: an NMS
# threshold just below 1 suppresses some of them (45 -> 8 candidates on coffee), 0.7 all but one.
@pytest.mark.parametrize(
    ("name", "nms", "min_masks"),
    [("coffee", 0.999, 5), ("astronaut_tall", 0.999, 2), ("coffee", 0.7, 1)],
)
def test_automatic_matches_pipeline(
    name: str,
    nms: float,
    min_masks: int,
    folder: Path,
    family: SamFamily,
    generator: SamMaskGenerator,
    reference,
) -> None:
    from transformers import SamImageProcessor, pipeline

    model, _ = reference
    image = PHOTOS[name]
    h, w = image.shape[:2]
    settings = {"pred_iou_thresh": 0.5, "stability_score_thresh": 0.3}
    generate = pipeline(
        "mask-generation",
        model=model,
        image_processor=SamImageProcessor.from_pretrained(str(folder)),
        device=CPU,
    )
    ref = generate(
        Image.fromarray(image),
        points_per_crop=6,
        points_per_batch=16,
        crops_nms_thresh=nms,
        **settings,
    )
    embeddings, reshaped = _embed(family, generator, image)
    records = generator.automatic(
        embeddings,
        (h, w),
        reshaped,
        points_per_side=6,
        points_per_batch=16,
        box_nms_thresh=nms,
        **settings,
    )
    assert len(ref["masks"]) >= min_masks, "the tiny model should give masks at these thresholds"
    assert len(records) == len(ref["masks"])
    grid = (build_point_grid(6) * torch.tensor([w, h])).tolist()
    for i, (record, ref_mask, score) in enumerate(
        zip(records, ref["masks"], ref["scores"].tolist(), strict=True)
    ):
        mask = rle_to_mask(record["segmentation"])
        assert _iou(mask, np.asarray(ref_mask)) >= 0.95
        assert record["predicted_iou"] == pytest.approx(score, abs=1e-4)
        assert record["predicted_iou"] > 0.5 and record["stability_score"] > 0.3
        assert record["mask_id"] == i
        assert record["point"] in grid
        x, y, bw, bh = record["bbox"]
        ys, xs = np.nonzero(mask)
        assert [x, y, bw, bh] == [
            xs.min(),
            ys.min(),
            xs.max() - xs.min() + 1,
            ys.max() - ys.min() + 1,
        ]
    scores = [r["predicted_iou"] for r in records]
    assert scores == sorted(scores, reverse=True)


def test_automatic_filters_everything(family: SamFamily, generator: SamMaskGenerator) -> None:
    image = PHOTOS["coffee_wide"]
    embeddings, reshaped = _embed(family, generator, image)
    assert (
        generator.automatic(
            embeddings, image.shape[:2], reshaped, points_per_side=4, pred_iou_thresh=1e9
        )
        == []
    )


def test_random_weights_are_seeded(folder: Path) -> None:
    family = SamFamily(resolve_checkpoint(str(folder), weights="random", seed=3))
    pixels = family.preprocess(_resized(family, PHOTOS["chelsea_odd"])[None])["pixel_values"]
    first = family.load_mask_generator(CPU, torch.float32).image_embeddings(pixels)
    second = family.load_mask_generator(CPU, torch.float32).image_embeddings(pixels)
    assert first.shape == (1, 32, 64, 64)
    assert torch.equal(first, second)


@pytest.mark.parametrize(
    ("name", "hidden", "layers", "global_attn"),
    [
        ("sam-vit-base", 768, 12, [2, 5, 8, 11]),
        ("sam-vit-large", 1024, 24, [5, 11, 17, 23]),
        ("sam-vit-huge", 1280, 32, [7, 15, 23, 31]),
    ],
)
def test_arch_configs_load(name: str, hidden: int, layers: int, global_attn: list[int]) -> None:
    from transformers import SamConfig, SamImageProcessor

    folder = ROOT / "configs" / "arch" / name
    config = SamConfig.from_pretrained(str(folder))
    vision = config.vision_config
    assert (vision.hidden_size, vision.num_hidden_layers, list(vision.global_attn_indexes)) == (
        hidden,
        layers,
        global_attn,
    )
    assert (
        vision.mlp_dim == 4 * hidden
        and vision.output_channels == 256
        and vision.num_pos_feats == 128
    )
    assert (vision.image_size, vision.patch_size, vision.window_size) == (1024, 16, 14)
    assert config.prompt_encoder_config.hidden_size == config.mask_decoder_config.hidden_size == 256
    processor = SamImageProcessor.from_pretrained(str(folder))
    assert processor.size["longest_edge"] == 1024
    family = SamFamily(resolve_checkpoint(name, weights="random"))
    assert family.target_size(480, 640) == (768, 1024)
    assert json.loads((folder / "config.json").read_text())["model_type"] == "sam"


def test_preset_yaml_loads() -> None:
    from vlray.config import build_config

    config = build_config(ROOT / "configs" / "sam-vit-base.yaml", {"input": {"uri": "images/"}})
    assert config.model.name == "facebook/sam-vit-base"
    assert config.model.weights == "pretrained"
