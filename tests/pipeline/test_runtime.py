"""The encoder runtime as pure code (no Ray): shape groups, encode_batch's row accounting and
token matrices through the capability contract."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vlray.families import MissingCapability, family_for, resolve_checkpoint
from vlray.ops.decode import decode_image
from vlray.pipeline.runtime import encode_batch, shape_groups
from vlray.testing.checkpoints import save_tiny_qwen2_vl
from vlray.testing.images import sample_photos

CPU = torch.device("cpu")


def test_shape_groups_cover_each_row_once_capped_and_sorted():
    heights = np.array([8, 4, 8, 4, 8, 2, 8])
    widths = np.array([8, 4, 8, 4, 8, 2, 6])
    rows = np.array([0, 1, 2, 3, 4, 6])  # row 5 left out (an error row)
    groups = list(shape_groups(heights, widths, rows, cap=2))
    assert [(size, list(g)) for size, g in groups] == [
        ((4, 4), [1, 3]),
        ((8, 6), [6]),
        ((8, 8), [0, 2]),
        ((8, 8), [4]),
    ]


def _batch(family, n: int):
    pixels, th, tw = [], [], []
    for _, blob in sample_photos(n, seed=7):
        fitted = family.fit(decode_image(blob, max_pixels=10**8))
        pixels.append(fitted.tobytes())
        th.append(fitted.shape[0])
        tw.append(fitted.shape[1])
    return np.array(pixels, dtype=object), (np.array(th), np.array(tw))


def test_encode_batch_token_matrices_pool_to_the_embedding(tmp_path):
    """store_tokens: each row's token matrix, its grid, and an embedding equal to the plain
    forward's and to the normalized mean of its tokens; incoming error rows stay as they were."""
    family = family_for(resolve_checkpoint(str(save_tiny_qwen2_vl(tmp_path / "q"))))
    encoder = family.load_encoder(CPU, torch.float32)
    pixels, sizes = _batch(family, 5)
    errors = np.array(["", "", "bad bytes", "", ""], dtype=object)
    stages = np.array(["", "", "decode", "", ""], dtype=object)
    common = {"max_group_size": 2}
    plain = encode_batch(family, encoder, pixels, sizes, errors, stages, **common)
    tokens = encode_batch(
        family, encoder, pixels, sizes, errors, stages, store_tokens=True, **common
    )
    for out in (plain, tokens):
        assert list(out.errors) == list(errors) and list(out.stages) == list(stages)
        assert out.group_size[2] == 0 and (out.group_size[[0, 1, 3, 4]] >= 1).all()
        assert not out.embeddings[2].any()
    np.testing.assert_allclose(tokens.embeddings, plain.embeddings, atol=1e-5)
    cell = family.patch_size * family.merge_size
    for i in (0, 1, 3, 4):
        grid = (sizes[0][i] // cell, sizes[1][i] // cell)
        assert tuple(tokens.grids[i]) == grid
        matrix = np.frombuffer(tokens.tokens[i], np.float32).reshape(grid[0] * grid[1], -1)
        mean = matrix.mean(0) / np.linalg.norm(matrix.mean(0))
        np.testing.assert_allclose(mean, tokens.embeddings[i], atol=1e-5)
    assert tokens.tokens[2] == b""


def test_token_matrices_need_the_capability(siglip2_checkpoint):
    family = family_for(resolve_checkpoint(str(siglip2_checkpoint)))
    pixels, sizes = _batch(family, 1)
    none = np.array([""], dtype=object)
    with pytest.raises(MissingCapability, match="no token matrix"):
        encode_batch(family, None, pixels, sizes, none, none, max_group_size=4, store_tokens=True)
