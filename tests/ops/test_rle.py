"""Tests for vlray.ops.rle: COCO RLE round trips, pycocotools parity, boxes and areas."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vlray.ops.rle import mask_area, mask_to_bbox_xywh, masks_to_rle, rle_counts, rle_to_mask

SHAPES = [(1, 1), (1, 7), (7, 1), (2, 3), (17, 31), (64, 48), (123, 77)]


def _random_masks(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Noise, blobs, empty and full masks of one shape: bool (N, H, W)."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w]
    out = [np.zeros(shape, bool), np.ones(shape, bool)]
    for p in (0.02, 0.5, 0.98):
        out.append(rng.random(shape) < p)
    for _ in range(3):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(0.5, max(h, w) / 2)
        out.append((yy - cy) ** 2 + (xx - cx) ** 2 < r**2)
    first = np.zeros(shape, bool)
    first[0, 0] = True
    last = np.zeros(shape, bool)
    last[-1, -1] = True
    return np.stack(out + [first, last, ~first, ~last])


def _numpy_runs(mask: np.ndarray) -> list[int]:
    flat = mask.T.reshape(-1)
    runs, value, count = [], False, 0
    for v in flat:
        if v == value:
            count += 1
        else:
            runs.append(count)
            value, count = v, 1
    runs.append(count)
    return runs


@pytest.mark.parametrize("shape", SHAPES)
def test_round_trip_and_runs(shape: tuple[int, int]) -> None:
    masks = _random_masks(np.random.default_rng(sum(shape)), shape)
    rles = masks_to_rle(torch.from_numpy(masks))
    counts, lengths = rle_counts(torch.from_numpy(masks))
    assert lengths.sum() == counts.size
    splits = np.split(counts, np.cumsum(lengths)[:-1])
    for mask, rle, runs in zip(masks, rles, splits, strict=True):
        assert rle["size"] == list(shape)
        assert isinstance(rle["counts"], str)
        decoded = rle_to_mask(rle)
        assert decoded.dtype == bool and decoded.shape == shape
        np.testing.assert_array_equal(decoded, mask)
        assert runs.tolist() == _numpy_runs(mask)
        np.testing.assert_array_equal(
            rle_to_mask({"size": list(shape), "counts": list(runs)}), mask
        )


def test_empty_batch() -> None:
    assert masks_to_rle(torch.zeros(0, 5, 4, dtype=torch.bool)) == []
    assert mask_to_bbox_xywh(torch.zeros(0, 5, 4, dtype=torch.bool)).shape == (0, 4)
    assert mask_area(torch.zeros(0, 5, 4, dtype=torch.bool)).shape == (0,)


def test_large_counts_round_trip() -> None:
    """Counts needing several 5-bit groups, and negative deltas between them."""
    masks = torch.zeros(3, 1000, 1500, dtype=torch.bool)
    masks[0, 100:900, 200:1400] = True
    masks[1, :, :3] = True
    masks[2, 999, 1499] = True
    for mask, rle in zip(masks, masks_to_rle(masks), strict=True):
        np.testing.assert_array_equal(rle_to_mask(rle), mask.numpy())


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("shape", SHAPES + [(300, 500)])
def test_counts_string_matches_pycocotools(shape: tuple[int, int]) -> None:
    mask_utils = pytest.importorskip("pycocotools.mask")
    masks = _random_masks(np.random.default_rng(7), shape)
    ref = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    ours = masks_to_rle(torch.from_numpy(masks))
    assert [r["counts"] for r in ours] == [r["counts"].decode("ascii") for r in ref]
    np.testing.assert_allclose(
        mask_to_bbox_xywh(torch.from_numpy(masks)).numpy(), mask_utils.toBbox(ref)
    )
    np.testing.assert_array_equal(mask_area(torch.from_numpy(masks)).numpy(), mask_utils.area(ref))
    for r in ours:  # pycocotools decodes our strings
        r_bytes = {"size": r["size"], "counts": r["counts"].encode("ascii")}
        np.testing.assert_array_equal(mask_utils.decode(r_bytes), rle_to_mask(r))


@pytest.mark.parametrize("shape", SHAPES)
def test_bbox_and_area_match_numpy(shape: tuple[int, int]) -> None:
    masks = _random_masks(np.random.default_rng(3), shape)
    boxes = mask_to_bbox_xywh(torch.from_numpy(masks))
    areas = mask_area(torch.from_numpy(masks))
    assert boxes.dtype == torch.float32 and areas.dtype == torch.int64
    for mask, box, area in zip(masks, boxes.tolist(), areas.tolist(), strict=True):
        assert area == int(mask.sum())
        ys, xs = np.nonzero(mask)
        if len(xs) == 0:
            assert box == [0.0, 0.0, 0.0, 0.0]
        else:
            expected = [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
            assert box == [float(v) for v in expected]


def test_bad_counts_raise() -> None:
    with pytest.raises(ValueError, match="sum to"):
        rle_to_mask({"size": [2, 2], "counts": [1, 2]})
