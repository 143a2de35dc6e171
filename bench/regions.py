"""Region embeddings per second: SAM automatic masks -> crops -> the embedding model.

Reference: transformers' ``mask-generation`` pipeline, then the reference processor + model on
the crops of its masks (PIL crops of the original image, one batched processor call per image).
vlray: its SAM mask generator, ``vlray.regions.image_regions`` crops of the decoded frame, then
``encode_regions`` (the job's region stage: crops grouped by target shape, the family's
encoder). Same photos, same SAM settings, same crop rules (best predicted IoU first, max per
image, min area, context), same process; tiny random checkpoints (the real SAM frame of 1024;
thresholds 0 so random weights still give many masks). Checks the same number of regions and
the cosine of region embeddings; prints regions/s of both and the ratio.

    python bench/regions.py [--images 2] [--points-per-side 16]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import benchutil
import numpy as np
import torch
from PIL import Image

from vlray.families import family_for, resolve_checkpoint
from vlray.ops.decode import decode_image
from vlray.ops.resize import resize_uint8
from vlray.pipeline.regions_stage import encode_regions
from vlray.regions import RegionSettings, crop_box, image_regions
from vlray.testing.checkpoints import save_tiny_sam, save_tiny_siglip2
from vlray.testing.images import sample_photos

CPU = torch.device("cpu")


def _reference_regions(sam_pipe, processor, model, image, args, settings) -> torch.Tensor:
    """Masks from the pipeline, then crops (vlray's rules on its masks) through the processor
    and model; unit-norm embeddings, best mask first."""
    h, w = image.shape[:2]
    out = sam_pipe(
        Image.fromarray(image),
        points_per_crop=args.points_per_side,
        points_per_batch=args.points_per_batch,
        crops_nms_thresh=0.7,
        pred_iou_thresh=args.pred_iou_thresh,
        stability_score_thresh=args.stability_thresh,
    )
    masks = [np.asarray(m, dtype=bool) for m in out["masks"]]
    scores = [float(s) for s in out["scores"]]
    order = sorted(range(len(masks)), key=lambda i: -scores[i])
    order = [i for i in order if masks[i].sum() >= settings.min_area * h * w]
    order = order[: settings.max_per_image]
    original = Image.fromarray(image)
    crops = []
    for i in order:
        ys, xs = np.nonzero(masks[i])
        bbox = (xs.min(), ys.min(), xs.max() - xs.min(), ys.max() - ys.min())
        x, y, cw, ch = crop_box(bbox, h, w, settings.context)
        crops.append(original.crop((x, y, x + cw, y + ch)))
    if not crops:
        return torch.empty(0)
    with torch.no_grad():
        features = model.get_image_features(**processor(images=crops, return_tensors="pt"))
    return torch.nn.functional.normalize(features.pooler_output, dim=-1)


def _vlray_regions(sam, generator, family, encoder, image, args, settings) -> torch.Tensor:
    h, w = image.shape[:2]
    size = sam.target_size(h, w)
    resized = torch.from_numpy(resize_uint8(image, size, sam.interpolation)).permute(2, 0, 1)
    with torch.inference_mode():
        embeddings = generator.image_embeddings(sam.preprocess(resized[None])["pixel_values"])
    records = generator.automatic(
        embeddings[0],
        (h, w),
        size,
        points_per_side=args.points_per_side,
        points_per_batch=args.points_per_batch,
        pred_iou_thresh=args.pred_iou_thresh,
        stability_score_thresh=args.stability_thresh,
        box_nms_thresh=0.7,
    )
    regions = image_regions(image, records, settings)
    vectors, accepted = encode_regions(family, encoder, [pixels for _, pixels in regions])
    return torch.from_numpy(vectors[accepted])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--points-per-side", type=int, default=16)
    parser.add_argument("--points-per-batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--pred-iou-thresh", type=float, default=0.0)
    parser.add_argument("--stability-thresh", type=float, default=0.0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoImageProcessor, AutoModel, SamImageProcessor, SamModel, pipeline

    tmp = Path(tempfile.mkdtemp())
    sam_folder = save_tiny_sam(tmp / "sam")
    model_folder = save_tiny_siglip2(tmp / "siglip2", max_num_patches=256)
    sam = family_for(resolve_checkpoint(str(sam_folder)))
    generator = sam.load_mask_generator(CPU, torch.float32)
    family = family_for(resolve_checkpoint(str(model_folder)))
    encoder = family.load_encoder(CPU, torch.float32)
    sam_pipe = pipeline(
        "mask-generation",
        model=SamModel.from_pretrained(sam_folder).eval(),
        image_processor=SamImageProcessor.from_pretrained(sam_folder),
        device=CPU,
    )
    processor = AutoImageProcessor.from_pretrained(model_folder)
    model = AutoModel.from_pretrained(model_folder).eval()
    settings = RegionSettings(enabled=True, min_area=0.0)
    images = [decode_image(b, max_pixels=10**9) for _, b in sample_photos(12, seed=3)]
    images = [i for i in images if 300 <= max(i.shape[:2]) <= 800][: args.images]
    print(benchutil.machine())
    t_ref = t_ours = 0.0
    n_ref = n_ours = 0
    worst = 1.0
    for image in images:
        start = time.perf_counter()
        ref = _reference_regions(sam_pipe, processor, model, image, args, settings)
        t_ref += time.perf_counter() - start
        start = time.perf_counter()
        ours = _vlray_regions(sam, generator, family, encoder, image, args, settings)
        t_ours += time.perf_counter() - start
        n_ref, n_ours = n_ref + len(ref), n_ours + len(ours)
        print(
            f"  {image.shape[1]}x{image.shape[0]}: reference {len(ref)}, vlray {len(ours)} regions"
        )
        if len(ref) == len(ours) and len(ours):
            worst = min(worst, float((ref * ours).sum(dim=-1).min()))
    print(f"regions: reference {n_ref}, vlray {n_ours}; worst cosine (same count) {worst:.5f}")
    print(
        f"regions/s ({args.points_per_side}^2 points, max {settings.max_per_image}/image): "
        f"reference {n_ref / t_ref:.2f}, vlray {n_ours / t_ours:.2f}, "
        f"{(n_ours / t_ours) / (n_ref / t_ref):.1f}x"
    )


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
