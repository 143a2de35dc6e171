"""SAM automatic masks per image: vlray vs transformers' ``mask-generation`` pipeline, same settings.

Tiny random SAM saved with ``save_pretrained`` (the real 1024 frame), real photos. Both sides
include preprocessing, the image encoder and mask generation; vlray also RLE-encodes its masks.
Checks the same number of masks; prints per-image seconds and the ratio (SPEC target >= 5x).

    python bench/sam.py [--points-per-side 16] [--images 2]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from vlray.families import family_for, resolve_checkpoint  # noqa: E402
from vlray.families.batch import preprocess_images  # noqa: E402
from vlray.ops.decode import decode_image  # noqa: E402
from vlray.testing.checkpoints import save_tiny_sam  # noqa: E402
from vlray.testing.images import sample_photos  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--points-per-side", type=int, default=16)
    parser.add_argument("--points-per-batch", type=int, default=64)
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import SamImageProcessor, SamModel, pipeline

    folder = save_tiny_sam(Path(tempfile.mkdtemp()) / "sam")
    family = family_for(resolve_checkpoint(str(folder)))
    generator = family.load_mask_generator(torch.device("cpu"), torch.float32)
    reference = pipeline(
        "mask-generation",
        model=SamModel.from_pretrained(folder).eval(),
        image_processor=SamImageProcessor.from_pretrained(folder),
        device=torch.device("cpu"),
    )
    settings = {"pred_iou_thresh": 0.5, "stability_score_thresh": 0.3}
    images = [decode_image(b, max_pixels=10**9) for _, b in sample_photos(12, seed=3)]
    images = [i for i in images if 300 <= max(i.shape[:2]) <= 800][: args.images]
    print(
        f"machine: {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}; torch threads {args.threads}"
    )
    t_ref = t_ours = 0.0
    for image in images:
        h, w = image.shape[:2]
        start = time.perf_counter()
        ref = reference(
            Image.fromarray(image),
            points_per_crop=args.points_per_side,
            points_per_batch=args.points_per_batch,
            crops_nms_thresh=0.7,
            **settings,
        )
        t_ref += time.perf_counter() - start
        start = time.perf_counter()
        size = family.target_size(h, w)
        [(_, inputs)] = preprocess_images(family, [image])  # the one image-to-inputs path
        embeddings = generator.image_embeddings(inputs["pixel_values"])
        records = generator.automatic(
            embeddings[0],
            (h, w),
            size,
            points_per_side=args.points_per_side,
            points_per_batch=args.points_per_batch,
            box_nms_thresh=0.7,
            **settings,
        )
        t_ours += time.perf_counter() - start
        print(f"  {w}x{h}: reference {len(ref['masks'])} masks, vlray {len(records)} masks")
        assert len(records) == len(ref["masks"])
    n = len(images)
    print(
        f"sam automatic ({args.points_per_side}^2 points): reference {t_ref / n:.2f} s/image, "
        f"vlray {t_ours / n:.2f} s/image, {t_ref / t_ours:.1f}x"
    )


if __name__ == "__main__":
    main()
