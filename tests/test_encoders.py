"""The one encoder holder (query CLI, service, benchmarks): the job's preprocessing, each
encoder loaded once, capabilities from the checkpoint."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from vlray.encoders import Encoders
from vlray.families import Capability, MissingCapability, family_for, resolve_checkpoint
from vlray.ops.decode import decode_image
from vlray.testing.images import sample_photos


def _holder(folder, loads):
    return Encoders(
        lambda: family_for(resolve_checkpoint(str(folder))),
        on_load=lambda kind, seconds: loads.append(kind),
    )


def test_images_embed_as_the_family_does_in_any_batch(siglip2_checkpoint):
    """Photos of several shapes in one call: the same vectors, in input order, as each image
    alone through fit + preprocess + the encoder; the encoder is loaded once across threads."""
    loads: list[str] = []
    encoders = _holder(siglip2_checkpoint, loads)
    photos = sample_photos(6, seed=11)
    pixels = [decode_image(blob, max_pixels=10**8) for _, blob in photos]
    assert len({encoders.family.target_size(*p.shape[:2]) for p in pixels}) > 1
    family = family_for(resolve_checkpoint(str(siglip2_checkpoint)))
    encoder = family.load_encoder(torch.device("cpu"), torch.float32)
    alone = np.stack(
        [
            encoder.encode(
                family.preprocess(torch.from_numpy(family.fit(p)).permute(2, 0, 1)[None])
            )[0]
            for p in pixels
        ]
    )
    threads = [threading.Thread(target=encoders.encode_pixels, args=([p],)) for p in pixels[:3]]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    batch = encoders.encode_pixels(pixels)
    assert batch.shape == (6, family.embedding_dim)
    np.testing.assert_allclose(batch, alone, atol=1e-5)
    np.testing.assert_allclose(encoders.encode_image(photos[2][1], 10**8), alone[2], atol=1e-5)
    assert loads == ["image"]


def test_text_follows_the_checkpoint(siglip2_checkpoint):
    loads: list[str] = []
    encoders = _holder(siglip2_checkpoint, loads)
    assert encoders.supports(Capability.TEXT_EMBEDDINGS)
    vector, probability = encoders.encode_text("a photo of a cat")
    assert vector.shape == (encoders.family.embedding_dim,)
    assert abs(float(np.linalg.norm(vector)) - 1) < 1e-5
    assert 0 <= float(probability(torch.tensor(0.5))) <= 1
    preset = Encoders(lambda: family_for(resolve_checkpoint("dinov2-base", weights="random")))
    assert not preset.supports(Capability.TEXT_EMBEDDINGS)
    with pytest.raises(MissingCapability, match="no text tower"):
        preset.encode_text("a cat")
