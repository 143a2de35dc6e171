"""Qwen2-VL vision tower: packed sequences (the reference's cu_seqlens forward) vs vlray's dense
same-shape groups, on the same mixed-size images and the same weights.

Packed = ``Qwen2VisionTransformerPretrainedModel.forward`` on every image's patches concatenated
with their ``grid_thw`` (attention split by ``cu_seqlens``), as transformers runs it for a mixed
batch; same-shape = ``Qwen2VLImageEncoder.encode`` once per same-shape group ((B, L, D), one SDPA
call per block, no mask). Embedding = mean of the merged tokens, L2-normalized; both must agree.

    python bench/qwen2_vl_packing.py [--arch qwen2-vl-2b-instruct] [--images 6]
        [--max-pixels 50176] [--repeat 2] [--threads 2] [--same-size]
"""

from __future__ import annotations

import argparse

import benchutil
import torch
import torch.nn.functional as F

from vlray.families import family_for, resolve_checkpoint
from vlray.families.batch import preprocess_images
from vlray.ops.decode import decode_rgb
from vlray.testing.images import sample_photos


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", default="qwen2-vl-2b-instruct")
    parser.add_argument("--images", type=int, default=6)
    parser.add_argument("--max-pixels", type=int, default=64 * 28 * 28)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--same-size", action="store_true", help="all photos resized to 640x480: one group"
    )
    parser.add_argument("--quick", action="store_true", help="3 images")
    args = parser.parse_args()
    if args.quick:
        args.images = 3
    torch.set_num_threads(args.threads)
    benchutil.header("qwen2_vl vision tower: packed (cu_seqlens, reference) vs same-shape groups")
    checkpoint = resolve_checkpoint(
        args.arch, weights="random", processor_overrides={"max_pixels": args.max_pixels}
    )
    family = family_for(checkpoint)
    encoder = family.load_encoder(torch.device("cpu"), torch.float32)
    images = [decode_rgb(b, max_pixels=10**9) for _, b in sample_photos(args.images, seed=4)]
    if args.same_size:
        images = [image.resize((640, 480)) for image in images]
    groups = preprocess_images(family, images)
    tokens = sum(int(g["image_grid_thw"][:, 1:].prod(-1).sum()) for _, g in groups)
    print(
        f"{args.arch} (random weights), {len(images)} photos -> {len(groups)} shapes, "
        f"{tokens} patches in all (max_pixels {args.max_pixels}); torch threads {args.threads}"
    )

    def same_shape() -> dict[int, torch.Tensor]:
        out = {}
        for indices, inputs in groups:
            for i, vector in zip(indices, encoder.encode(inputs), strict=True):
                out[i] = vector
        return out

    order = [i for indices, _ in groups for i in indices]
    pixels = torch.cat([g["pixel_values"] for _, g in groups])
    grid = torch.cat([g["image_grid_thw"] for _, g in groups])

    @torch.inference_mode()
    def packed() -> dict[int, torch.Tensor]:
        result = encoder.tower(pixels, grid_thw=grid)
        merged = getattr(result, "pooler_output", result)
        sizes = (grid.prod(-1) // encoder.merge_size**2).tolist()
        vectors = [F.normalize(t.float().mean(0), dim=-1) for t in torch.split(merged, sizes)]
        return dict(zip(order, vectors, strict=True))

    t_same, ours = benchutil.best_of(same_shape, args.repeat, warmup=1)
    t_packed, ref = benchutil.best_of(packed, args.repeat, warmup=1)
    cosine = min(float(ours[i] @ ref[i]) for i in ours)
    print(
        f"packed (reference forward)  {1e3 * t_packed:9.1f} ms  {len(images) / t_packed:7.2f} img/s"
    )
    print(f"same-shape groups (vlray)   {1e3 * t_same:9.1f} ms  {len(images) / t_same:7.2f} img/s")
    print(f"ratio packed / same-shape   {t_packed / t_same:.2f}x   cosine min {cosine:.6f}")
    benchutil.emit(
        {
            "bench": "qwen2_vl_packing",
            "arch": args.arch,
            "images": len(images),
            "shapes": len(groups),
            "patches": tokens,
            "threads": args.threads,
            "same_size": args.same_size,
            "packed_s": t_packed,
            "same_shape_s": t_same,
            "speedup": t_packed / t_same,
            "cosine_min": cosine,
        }
    )


if __name__ == "__main__":
    main()
