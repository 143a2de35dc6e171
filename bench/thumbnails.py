"""The cost of ``output.thumbnails`` (on by default, 256): the decode actor's per-image work
(decode + uint8 resize to the SigLIP2 NaFlex target) with and without a 256-pixel JPEG preview,
on the same 640x480 JPEGs, one core. The preview is made from the decoded pixels (one more
antialiased resize and a JPEG encode), so its cost is a fraction of the decode's.

    python bench/thumbnails.py [--images 128] [--repeat 3] [--side 256]
"""

from __future__ import annotations

import argparse

import benchutil
import torch
from job import jpeg_blobs

from vlray.families import family_for, resolve_checkpoint
from vlray.ops.decode import decode_pixels
from vlray.ops.resize import resize_uint8
from vlray.ops.thumbnail import make_thumbnail


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--side", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(1)
    benchutil.header("thumbnails: decode actor work with and without a preview")
    family = family_for(resolve_checkpoint("siglip2-base-patch16-naflex", weights="random"))
    blobs = jpeg_blobs(args.images)

    def work(side: int) -> int:
        made = 0
        for blob in blobs:
            pixels = decode_pixels(blob, max_pixels=100_000_000)
            size = family.target_size(pixels.shape[0], pixels.shape[1])
            resize_uint8(pixels, size, family.interpolation)
            if side:
                made += len(make_thumbnail(pixels, side))
        return made

    # alternated, best of each: a busy machine's drift hits both variants alike
    work(0), work(args.side)  # warm-up
    plain = thumbs = float("inf")
    total = 0
    for _ in range(args.repeat):
        plain = min(plain, benchutil.best_of(lambda: work(0), 1)[0])
        seconds, total = benchutil.best_of(lambda: work(args.side), 1)
        thumbs = min(thumbs, seconds)
    n = len(blobs)
    print(f"{n} 640x480 JPEGs, 1 thread, best of {args.repeat}")
    print(f"  decode + resize:             {n / plain:8.1f} img/s")
    print(f"  decode + resize + thumbnail: {n / thumbs:8.1f} img/s  (thumbnail {args.side})")
    print(
        f"  cost: {100 * (thumbs / plain - 1):.1f}% more decode time; "
        f"{total / n / 1024:.1f} KiB per thumbnail"
    )
    benchutil.emit(
        {
            "bench": "thumbnails",
            "images": n,
            "side": args.side,
            "plain_img_s": round(n / plain, 1),
            "thumb_img_s": round(n / thumbs, 1),
            "overhead": round(thumbs / plain - 1, 3),
            "kib_per_thumbnail": round(total / n / 1024, 1),
        }
    )


if __name__ == "__main__":
    main()
