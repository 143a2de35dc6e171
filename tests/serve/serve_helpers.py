"""Helpers of the search-service tests (a module with a unique name, imported by tests)."""

from __future__ import annotations

import contextlib
import hashlib
import io
import shutil
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from vlray.index import build_index
from vlray.schema import MASKS_SCHEMA, embeddings_schema


def fake_masks(height: int, width: int) -> list[dict]:
    """Two masks of an image, as ``masks/`` rows without the id: a box and a disc."""
    import torch

    from vlray.ops.rle import mask_area, mask_to_bbox_xywh, masks_to_rle

    y, x = np.mgrid[:height, :width]
    box = (y >= height // 4) & (y < height // 2) & (x >= width // 3) & (x < width - 2)
    disc = (y - height * 0.6) ** 2 + (x - width * 0.4) ** 2 < (min(height, width) / 5) ** 2
    masks = torch.from_numpy(np.stack([box, disc]))
    rows = []
    for i, (rle, bbox, area) in enumerate(
        zip(masks_to_rle(masks), mask_to_bbox_xywh(masks), mask_area(masks), strict=True)
    ):
        rows.append(
            {
                "mask_id": i,
                "segmentation": rle,
                "bbox": [float(v) for v in bbox],
                "area": int(area),
                "predicted_iou": 0.9 - 0.1 * i,
                "stability_score": 0.95,
                "point": [width / 2.0, height / 2.0],
                "prompt_index": None,
            }
        )
    return rows


def write_out(
    out: Path,
    checkpoint: Path,
    embedded,
    n: int | None = None,
    thumbs: int = 0,
    photos=None,
    masks: int = 0,
):
    """Writes OUT/embeddings/part-0.parquet and OUT/index for the first ``n`` photos, thumbnails
    for the first ``thumbs`` and OUT/masks/part-0.parquet (``fake_masks``) for the first
    ``masks``."""
    ids, vectors, widths, heights = embedded
    n = len(ids) if n is None else n
    ids, vectors, widths, heights = ids[:n], vectors[:n], widths[:n], heights[:n]
    dim = vectors.shape[1]
    (out / "embeddings").mkdir(parents=True, exist_ok=True)
    table = pa.table(
        {
            "id": ids,
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), dim),
            "width": pa.array(widths, pa.int32()),
            "height": pa.array(heights, pa.int32()),
        },
        schema=embeddings_schema(dim),
    )
    pq.write_table(table, out / "embeddings" / "part-0.parquet")
    if masks:
        (out / "masks").mkdir(exist_ok=True)
        rows = [
            {"id": item_id, **row}
            for item_id, w, h in zip(ids[:masks], widths, heights, strict=False)
            for row in fake_masks(h, w)
        ]
        pq.write_table(
            pa.Table.from_pylist(rows, schema=MASKS_SCHEMA), out / "masks" / "part-0.parquet"
        )
    if thumbs:
        (out / "thumbnails").mkdir(exist_ok=True)
        sources = dict(photos or [])
        for item_id in ids[:thumbs]:
            buf = io.BytesIO()
            if item_id in sources:
                img = Image.open(io.BytesIO(sources[item_id])).convert("RGB")
                img.thumbnail((160, 160))
            else:
                img = Image.new("RGB", (32, 32), (200, 50, 50))
            img.save(buf, format="JPEG")
            name = hashlib.sha1(item_id.encode()).hexdigest() + ".jpg"
            (out / "thumbnails" / name).write_bytes(buf.getvalue())
    return build_index(
        lambda: iter([(list(ids), vectors)]),
        out / "index",
        dim=dim,
        count=n,
        manifest={
            "model": str(checkpoint),
            "model_path": str(checkpoint),
            "family": "siglip2",
            "weights": "random",
            "seed": 0,
            "processor": {},
        },
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running(app):
    """Runs ``app`` with uvicorn in a background thread on a free loopback port."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


# the system Chromium the page tests drive (skipped where there is none)
CHROMIUM = shutil.which("chromium") or (
    "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None
)
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
