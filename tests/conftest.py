"""Shared fixtures: tiny checkpoints saved with save_pretrained, sample images, one local Ray."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from vlray.testing.checkpoints import save_tiny_siglip, save_tiny_siglip2  # noqa: E402


@pytest.fixture(scope="session")
def siglip2_checkpoint(tmp_path_factory):
    return save_tiny_siglip2(tmp_path_factory.mktemp("ckpt") / "tiny-siglip2", max_num_patches=64)


@pytest.fixture(scope="session")
def siglip_checkpoint(tmp_path_factory):
    return save_tiny_siglip(tmp_path_factory.mktemp("ckpt") / "tiny-siglip", image_size=64)


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the session, sized like CI (2 CPUs)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
