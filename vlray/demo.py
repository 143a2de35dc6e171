"""The offline demo: sample photos in a Parquet file and a tiny random-weight SigLIP2 checkpoint.

Everything is generated locally (no download), under a cache folder, and reused across runs. The
checkpoint carries a marker, so every output built from it says its weights are random.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

logger = logging.getLogger(__name__)

DEMO_IMAGES = 96


def demo_config() -> Path:
    """The demo's YAML preset, ``demo.yaml`` of the presets shipped with vlray."""
    from vlray.config import configs_dir

    return configs_dir() / "demo.yaml"


def demo_home() -> Path:
    """``$VLRAY_HOME`` or ``~/.cache/vlray``."""
    return Path(os.environ.get("VLRAY_HOME", Path.home() / ".cache" / "vlray"))


def prepare_demo(home: Path | None = None, n_images: int = DEMO_IMAGES) -> tuple[Path, Path]:
    """Writes (once) the demo Parquet of sample photos and the tiny checkpoint.

    Returns:
        (parquet path, checkpoint folder).
    """
    from vlray.testing.images import sample_photos, unusual_images

    home = home or demo_home()
    data = home / "demo" / "images.parquet"
    model = home / "demo" / "tiny-siglip2-random"
    if not data.exists():
        data.parent.mkdir(parents=True, exist_ok=True)
        photos = sample_photos(n_images)
        extra = sorted(unusual_images().items())[:4]
        rows = photos + extra
        table = pa.table(
            {
                "id": [name for name, _ in rows],
                "image": pa.array([blob for _, blob in rows], pa.binary()),
            }
        )
        tmp = data.with_suffix(".tmp")
        pq.write_table(table, tmp)
        tmp.replace(data)
    if not (model / "config.json").exists():
        tmp_model = model.with_name(model.name + ".tmp")
        _save_quietly(tmp_model)
        tmp_model.replace(model)
    return data, model


def _save_quietly(folder: Path) -> None:
    """The tiny checkpoint, without transformers' "Writing model shards" bar (a one-shard
    save of a few kilobytes)."""
    from transformers.utils import logging as hf_logging

    from vlray.testing.checkpoints import save_tiny_siglip2

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        save_tiny_siglip2(folder, max_num_patches=64, random_marker=True)
    finally:
        if shown:
            hf_logging.enable_progress_bar()
