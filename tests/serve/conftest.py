"""Fixtures of the search-service tests: a small index built without Ray, a live server."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
import torch
from serve_helpers import running, write_out

from vlray.families import family_for, resolve_checkpoint
from vlray.ops.decode import decode_image
from vlray.ops.resize import resize_uint8
from vlray.testing.checkpoints import save_tiny_siglip2
from vlray.testing.images import sample_photos

N_PHOTOS = 20


@pytest.fixture(scope="session")
def serve_checkpoint(tmp_path_factory):
    return save_tiny_siglip2(tmp_path_factory.mktemp("serve-ckpt") / "tiny", max_num_patches=64)


@pytest.fixture(scope="session")
def photos():
    return sample_photos(N_PHOTOS)


@pytest.fixture(scope="session")
def embedded(serve_checkpoint, photos):
    """(ids, vectors float32 (n, d), widths, heights) of the sample photos, as the job embeds."""
    family = family_for(resolve_checkpoint(str(serve_checkpoint), weights="pretrained"))
    encoder = family.load_encoder(torch.device("cpu"), torch.float32)
    ids, vectors, widths, heights = [], [], [], []
    for name, data in photos:
        pixels = decode_image(data, max_pixels=100_000_000)
        size = family.target_size(pixels.shape[0], pixels.shape[1])
        resized = resize_uint8(pixels, size, family.interpolation)
        inputs = family.preprocess(torch.from_numpy(resized).permute(2, 0, 1)[None])
        vectors.append(encoder.encode(inputs)[0].numpy())
        ids.append(name)
        heights.append(pixels.shape[0])
        widths.append(pixels.shape[1])
    return ids, np.stack(vectors).astype(np.float32), widths, heights


@pytest.fixture(scope="session")
def out_dir(tmp_path_factory, serve_checkpoint, embedded, photos):
    out = tmp_path_factory.mktemp("serve-out")
    write_out(out, serve_checkpoint, embedded, thumbs=5, photos=photos, masks=3)
    return out


@pytest.fixture(scope="session")
def server(out_dir):
    """A server over the shared index (no API key)."""
    from vlray.serve import ServeConfig, create_app

    app = create_app(
        ServeConfig(index=str(out_dir / "index"), max_upload_bytes=2 << 20, max_pixels=4_000_000)
    )
    with running(app) as url:
        yield url


@pytest.fixture()
def client(server):
    with httpx.Client(base_url=server, timeout=30) as c:
        yield c
