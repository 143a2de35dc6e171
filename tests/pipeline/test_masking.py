"""mask_batch as pure code (no Ray): per-row prompts, per-row errors, rows accounted for."""

from __future__ import annotations

import json

import numpy as np
import torch

from vlray.config import SamConfig
from vlray.families import family_for, resolve_checkpoint
from vlray.pipeline.masking import image_masks, mask_batch
from vlray.testing.checkpoints import save_tiny_sam

CPU = torch.device("cpu")


def test_prompted_rows_get_their_masks_and_bad_rows_their_own_errors(tmp_path):
    family = family_for(resolve_checkpoint(str(save_tiny_sam(tmp_path / "sam"))))
    generator = family.load_mask_generator(CPU, torch.float32)
    settings = SamConfig(mode="prompted", batch_size=2)
    rng = np.random.default_rng(0)
    originals = [(48, 64), (48, 64), (64, 48), (48, 64)]
    pixels, th, tw = [], [], []
    for h, w in originals:
        fitted = family.fit(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        pixels.append(fitted.tobytes())
        th.append(fitted.shape[0])
        tw.append(fitted.shape[1])
    prompts = [
        json.dumps({"points": [[[10.0, 12.0]]], "labels": [[1]]}),
        "",  # prompted mode without prompts: this row's error
        json.dumps({"boxes": [[2.0, 3.0, 30.0, 40.0], [0.0, 0.0, 10.0, 10.0]]}),
        json.dumps({"points": [[10.0, 12.0]]}),  # objects x points x [x, y] expected
    ]
    errors = np.array(["", "", "", ""], dtype=object)
    out = mask_batch(
        family,
        generator,
        settings,
        np.array(pixels, dtype=object),
        (np.array(th), np.array(tw)),
        (np.array([h for h, _ in originals]), np.array([w for _, w in originals])),
        np.array(prompts, dtype=object),
        errors,
        errors.copy(),
        CPU,
    )
    assert list(out.stages) == ["", "preprocess", "", "preprocess"]
    assert "no points or boxes" in out.errors[1] and "points must be" in out.errors[3]
    assert out.counts[1] == out.counts[3] == 0 and out.masks[1] == out.masks[3] == ""
    assert out.counts[0] == 3 and out.counts[2] == 6  # 3 masks per prompt (multimask)
    records = json.loads(out.masks[2])
    assert len(records) == 6 and {r["prompt_index"] for r in records} == {0, 1}
    # the same records as the image alone
    embedding = generator.image_embeddings(
        family.preprocess(
            torch.from_numpy(np.frombuffer(pixels[0], np.uint8).reshape(th[0], tw[0], 3)).permute(
                2, 0, 1
            )[None]
        )["pixel_values"]
    )[0]
    alone = image_masks(generator, settings, embedding, prompts[0], originals[0], (th[0], tw[0]))
    assert json.loads(out.masks[0]) == json.loads(json.dumps(alone))
