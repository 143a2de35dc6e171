"""Preprocessing: vlray (uint8 resize + batched tensor preprocessing) vs the transformers processors.

Same decoded images in, model inputs out; outputs checked equal; prints img/s and the ratio.

    python bench/preprocess.py [--images 256] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import time
from collections import defaultdict

import numpy as np
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from vlray.families import family_for, resolve_checkpoint  # noqa: E402
from vlray.ops.decode import decode_image  # noqa: E402
from vlray.ops.resize import resize_uint8  # noqa: E402
from vlray.testing.images import sample_photos  # noqa: E402

PRESETS = {
    "siglip2": ("siglip2-base-patch16-naflex", {}),
    "siglip": ("siglip-so400m-patch14-384", {}),
    "qwen2_vl": ("qwen2-vl-2b-instruct", {"max_pixels": 1280 * 28 * 28}),
}


def vlray_preprocess(family, images):
    """Per image: uint8 resize (decode actors); then per same-shape group: one tensor op."""
    groups = defaultdict(list)
    for image in images:
        size = family.target_size(*image.shape[:2])
        groups[size].append(resize_uint8(image, size, family.interpolation))
    out = []
    for arrays in groups.values():
        batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
        out.append(family.preprocess(batch))
    return out


def bench(fn, repeat=3):
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--families", default=",".join(PRESETS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import transformers

    images = [decode_image(b, max_pixels=10**9) for _, b in sample_photos(args.images)]
    pils = [Image.fromarray(i) for i in images]
    print(f"{args.images} decoded photos, {args.threads} threads, torch {torch.__version__}")
    print(
        f"{'family':10s} {'reference (tv)':>15s} {'reference (PIL)':>16s} {'vlray':>10s} {'vs tv':>7s} {'vs PIL':>7s}  max|diff|"
    )
    for name in args.families.split(","):
        arch, overrides = PRESETS[name]
        checkpoint = resolve_checkpoint(arch, weights="random", processor_overrides=overrides)
        family = family_for(checkpoint)
        ref_cls = getattr(transformers, checkpoint.processor["image_processor_type"])
        ref = ref_cls.from_pretrained(checkpoint.path, **overrides)
        pil = getattr(transformers, ref_cls.__name__ + "Pil").from_pretrained(
            checkpoint.path, **overrides
        )
        t_ref, _ = bench(lambda ref=ref: ref(images=pils, return_tensors="pt"), repeat=2)
        t_pil, _ = bench(lambda pil=pil: pil(images=pils, return_tensors="pt"), repeat=2)
        t_ours, _ = bench(lambda family=family: vlray_preprocess(family, images))
        # parity on a sample: per image, ours vs reference
        worst = 0.0
        for image, p in list(zip(images, pils, strict=True))[:16]:
            expected = ref(images=[p], return_tensors="pt")["pixel_values"]
            got = vlray_preprocess(family, [image])[0]["pixel_values"]
            if name == "siglip2":
                expected = expected[:, : got.shape[1]]
            worst = max(worst, (got - expected).abs().max().item())
        n = len(images)
        print(
            f"{name:10s} {n / t_ref:11.0f} img/s {n / t_pil:12.0f} img/s {n / t_ours:6.0f} img/s "
            f"{t_ref / t_ours:6.1f}x {t_pil / t_ours:6.1f}x  {worst:.2g}"
        )


if __name__ == "__main__":
    main()
