"""The whole job vs a plain single-process loop and a hand-written Ray Data script.

Same Parquet of 640x480 JPEGs, same tiny random SigLIP2 (64 patches). Start-up is cancelled out by
timing N and 3N rows: steady rate = 2N / (t(3N) - t(N)). Also measures the decode-bound limit
(cores x single-core PIL decode + uint8 resize) on the same machine in the same run.

    python bench/job.py [--rows 600] [--cpus 2]
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from vlray.config import build_config  # noqa: E402
from vlray.families import family_for, resolve_checkpoint  # noqa: E402
from vlray.ops.decode import decode_image  # noqa: E402
from vlray.ops.resize import resize_uint8  # noqa: E402
from vlray.testing.checkpoints import save_tiny_siglip2  # noqa: E402
from vlray.testing.images import sample_photos  # noqa: E402


def make_parquet(path: Path, rows: int) -> None:
    base = []
    for _, blob in sample_photos(32, seed=7):
        img = Image.open(io.BytesIO(blob)).convert("RGB").resize((640, 480))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        base.append(buf.getvalue())
    blobs = [base[i % len(base)] for i in range(rows)]
    pq.write_table(
        pa.table(
            {"id": [f"img{i:07d}" for i in range(rows)], "image": pa.array(blobs, pa.binary())}
        ),
        path,
        row_group_size=256,
    )


def decode_limit(path: Path, family, seconds: float = 3.0) -> float:
    blobs = pq.read_table(path).column("image").to_pylist()[:200]
    torch.set_num_threads(1)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for blob in blobs:
            img = decode_image(blob, max_pixels=10**9)
            resize_uint8(img, family.target_size(*img.shape[:2]), family.interpolation)
            n += 1
    return n / (time.perf_counter() - start)


def plain_loop(path: Path, ckpt: Path, threads: int) -> float:
    from transformers import AutoImageProcessor, AutoModel

    torch.set_num_threads(threads)
    processor = AutoImageProcessor.from_pretrained(ckpt)
    model = AutoModel.from_pretrained(ckpt).eval()
    table = pq.read_table(path)
    blobs = table.column("image").to_pylist()
    start = time.perf_counter()
    for i in range(0, len(blobs), 64):
        images = [Image.open(io.BytesIO(b)).convert("RGB") for b in blobs[i : i + 64]]
        with torch.no_grad():
            out = model.get_image_features(
                **processor(images=images, return_tensors="pt")
            ).pooler_output
        torch.nn.functional.normalize(out, dim=-1).numpy()
    return len(blobs) / (time.perf_counter() - start)


class HandWritten:
    """What users write by hand: map_batches calling the transformers processor and model."""

    def __init__(self, ckpt: str) -> None:
        from transformers import AutoImageProcessor, AutoModel

        self.processor = AutoImageProcessor.from_pretrained(ckpt)
        self.model = AutoModel.from_pretrained(ckpt).eval()

    def __call__(self, batch):
        images = [Image.open(io.BytesIO(b)).convert("RGB") for b in batch["image"]]
        with torch.no_grad():
            out = self.model.get_image_features(
                **self.processor(images=images, return_tensors="pt")
            ).pooler_output
        return {"id": batch["id"], "embedding": torch.nn.functional.normalize(out, dim=-1).numpy()}


def hand_written(path: Path, ckpt: Path, out: Path) -> float:
    import ray.data

    start = time.perf_counter()
    ds = ray.data.read_parquet(str(path)).repartition(target_num_rows_per_block=64)
    ds = ds.map_batches(
        HandWritten,
        fn_constructor_kwargs={"ckpt": str(ckpt)},
        batch_size=64,
        compute=ray.data.ActorPoolStrategy(size=1),
        num_cpus=1,
    )
    ds.write_parquet(str(out))
    return time.perf_counter() - start


def vlray_job(path: Path, ckpt: Path, out: Path) -> float:
    from vlray.pipeline.job import run_job

    config = build_config(
        None,
        {
            "input": {"uri": str(path)},
            "output": {"uri": str(out)},
            "model": {"name": str(ckpt)},
            "index": {"enabled": False},
        },
    )
    summary = run_job(config)
    assert summary["accounted"] and summary["errors"] == 0
    return summary["job_seconds"]


def steady(n: int, t1: float, t3: float) -> float:
    return 2 * n / (t3 - t1) if t3 > t1 else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=600)
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 2)
    args = parser.parse_args()
    import ray

    tmp = Path(tempfile.mkdtemp(prefix="vlray-bench-"))
    ckpt = save_tiny_siglip2(tmp / "ckpt", max_num_patches=64)
    family = family_for(resolve_checkpoint(str(ckpt)))
    n = args.rows
    small, large = tmp / "n.parquet", tmp / "3n.parquet"
    make_parquet(small, n)
    make_parquet(large, 3 * n)

    limit1 = decode_limit(small, family)
    loop = plain_loop(large, ckpt, args.cpus)
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    ours = steady(n, vlray_job(small, ckpt, tmp / "o1"), vlray_job(large, ckpt, tmp / "o3"))
    hand = steady(n, hand_written(small, ckpt, tmp / "h1"), hand_written(large, ckpt, tmp / "h3"))
    limit = limit1 * args.cpus
    print(
        f"machine: {os.cpu_count()} CPUs, Ray with {args.cpus}; {n} and {3 * n} 640x480 JPEGs; tiny SigLIP2, 64 patches"
    )
    print(
        f"decode-bound limit      {limit:8.0f} img/s  ({limit1:.0f} img/s single-core decode + resize x {args.cpus})"
    )
    print(f"plain transformers loop {loop:8.0f} img/s")
    print(f"hand-written Ray Data   {hand:8.0f} img/s (steady)")
    print(f"vlray job               {ours:8.0f} img/s (steady)")
    print(
        f"vlray / limit {ours / limit:.2f}   vlray / loop {ours / loop:.2f}x   vlray / hand-written {ours / hand:.2f}x"
    )


if __name__ == "__main__":
    main()
