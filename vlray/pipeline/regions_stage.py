"""The region stage: SAM's masks of each row -> crops of its decoded frame -> the embedding model.

``encode_regions`` is the pure part (crops of many images grouped by target shape with one
``family.preprocess`` and one forward per group, exactly as whole images); ``RegionStage`` is the
Ray adapter over a batch that carries ``frame`` (the decoded, EXIF-oriented image as uint8 bytes,
``height`` x ``width`` x 3) and ``masks`` (the mask stage's JSON records). It drops ``frame`` and
adds ``regions`` (the rows of ``regions/`` for that image as Arrow IPC bytes) and
``region_count``. A crop the model rejects (an aspect ratio it refuses) is skipped and counted;
an image's other regions and its own embedding are unaffected.
"""

from __future__ import annotations

import io
import json
import time
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from vlray.families import Checkpoint, UnsupportedImage, family_for
from vlray.families.base import Family, ImageEncoder
from vlray.families.batch import preprocess_images
from vlray.pipeline.stages import resolve_dtype
from vlray.regions import Region, RegionSettings, image_regions, regions_table
from vlray.schema import Col

FRAME_COLUMN = Col.FRAME
REGIONS_COLUMN = "regions"


def encode_regions(
    family: Family, encoder: ImageEncoder, crops: list[np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """(unit-norm embeddings (N, D) float32, accepted mask (N,)) of region crops: each crop
    fitted and preprocessed as a whole image of its size would be, grouped by target shape."""
    vectors = np.zeros((len(crops), family.embedding_dim), dtype=np.float32)
    accepted = np.ones(len(crops), dtype=bool)
    usable = []
    for i, crop in enumerate(crops):
        try:
            family.target_size(*crop.shape[:2])
        except (UnsupportedImage, ValueError):
            accepted[i] = False
            continue
        usable.append(i)
    if not usable:
        return vectors, accepted
    with torch.inference_mode():
        for indices, inputs in preprocess_images(family, [crops[i] for i in usable]):
            rows = [usable[j] for j in indices]
            vectors[rows] = encoder.encode(inputs).float().cpu().numpy()
    return vectors, accepted


def _ipc(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue()


def read_regions_cell(cell: bytes) -> pa.Table | None:
    """The ``regions`` cell of a row back to its table (None when the row has no regions)."""
    if not cell:
        return None
    return pa.ipc.open_stream(pa.py_buffer(cell)).read_all()


class RegionStage:
    """Embeds the regions of each row with masks (see the module docstring)."""

    def __init__(
        self,
        checkpoint: Checkpoint,
        device: str,
        dtype: str,
        settings: RegionSettings,
        threads: int = 0,
    ) -> None:
        if threads > 0:
            torch.set_num_threads(threads)
        self.family = family_for(checkpoint)
        self.encoder = self.family.load_encoder(
            torch.device(device), resolve_dtype(dtype, torch.device(device))
        )
        self.settings = settings
        # the gray background: the processor's mean colour (0.5 where a config leaves it out)
        self.mean = tuple(checkpoint.processor.get("image_mean", (0.5, 0.5, 0.5)))

    def _row_regions(self, batch: dict[str, np.ndarray], i: int) -> list[tuple[Region, np.ndarray]]:
        h, w = int(batch["height"][i]), int(batch["width"][i])
        frame = np.frombuffer(batch[FRAME_COLUMN][i], dtype=np.uint8).reshape(h, w, 3)
        records = json.loads(str(batch["masks"][i]) or "[]")
        return image_regions(frame, records, self.settings, self.mean)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        start = time.perf_counter()
        n = len(batch["id"])
        ok = np.flatnonzero((batch["error"] == "") & (batch["masks"] != ""))
        owners: list[int] = []
        regions: list[Region] = []
        crops: list[np.ndarray] = []
        for i in ok:
            for region, pixels in self._row_regions(batch, int(i)):
                owners.append(int(i))
                regions.append(region)
                crops.append(pixels)
        vectors, accepted = encode_regions(self.family, self.encoder, crops)
        cells = np.full(n, b"", dtype=object)
        counts = np.zeros(n, dtype=np.int32)
        skipped = np.zeros(n, dtype=np.int32)
        by_row: dict[int, list[int]] = {}
        for k, owner in enumerate(owners):
            if accepted[k]:
                by_row.setdefault(owner, []).append(k)
            else:
                skipped[owner] += 1
        for owner, ks in by_row.items():
            ids = [str(batch["id"][owner])] * len(ks)
            table = regions_table(ids, [regions[k] for k in ks], vectors[ks])
            cells[owner], counts[owner] = _ipc(table), len(ks)
        out: dict[str, Any] = {k: v for k, v in batch.items() if k != FRAME_COLUMN}
        out.update(
            {
                REGIONS_COLUMN: cells,
                "region_count": counts,
                "regions_skipped": skipped,
                "region_s": np.full(n, (time.perf_counter() - start) / max(n, 1)),
            }
        )
        return out
