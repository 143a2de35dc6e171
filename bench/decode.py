"""JPEG decode rates, single core: PIL full decode, PIL with ``Image.draft`` (DCT-domain
shrinking), ``torchvision.io.decode_jpeg`` on CPU, and batched ``decode_jpeg(device="cuda")``.

Same 640x480 and ~2000x1500 JPEGs for every decoder. Each rate is given for decode alone and
for decode + the uint8 antialiased resize to the SigLIP2 NaFlex target (256 patches of 16), the
per-image work of a decode actor. The draft path's quality bound: max and mean |pixel diff| of
draft + resize vs full decode + the same resize, and the cosine of the embeddings of both
with a tiny random SigLIP2 (256 patches) run through vlray's family.

    python bench/decode.py [--images 64] [--repeat 3] [--device cpu|cuda] [--quick]
"""

from __future__ import annotations

import argparse
import io
import tempfile
from pathlib import Path

import benchutil
import numpy as np
import torch
from PIL import Image

from vlray.families import family_for, resolve_checkpoint
from vlray.ops.decode import (
    decode_image,
    decode_pixels,
    decode_rgb,
    large_pil_blocks,
    rgb_pixels,
)
from vlray.testing.images import sample_photos

SIZES = {"640x480": (640, 480), "2000x1500": (2000, 1500)}


def make_jpegs(size: tuple[int, int], n: int) -> list[bytes]:
    """n photo-like JPEGs of ``size`` (width, height), quality 90, from the sample photos."""
    out = []
    for _, blob in sample_photos(min(n, 24), seed=11):
        img = Image.open(io.BytesIO(blob)).convert("RGB").resize(size, Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return [out[i % len(out)] for i in range(n)]


def pil_draft(blob: bytes, target_hw: tuple[int, int]) -> np.ndarray:
    """PIL decode with DCT-domain shrinking to the smallest scale still >= the target size."""
    with Image.open(io.BytesIO(blob)) as img:
        img.draft("RGB", (target_hw[1], target_hw[0]))
        return np.asarray(img.convert("RGB"))


def tv_decode(blob: bytes) -> torch.Tensor:
    from torchvision.io import ImageReadMode, decode_jpeg

    data = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
    return decode_jpeg(data, mode=ImageReadMode.RGB)  # (3, H, W)


def rate(fn, blobs, repeat: int) -> float:
    t, _ = benchutil.best_of(lambda: [fn(b) for b in blobs], repeat, warmup=0)
    return len(blobs) / t


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.images, args.repeat = 24, 2
    torch.set_num_threads(1)
    large_pil_blocks()  # as the decode actors: one Pillow block per image, so the view applies
    benchutil.header("decode: single-core JPEG decode (+ uint8 resize to the SigLIP2 target)")

    tmp = Path(tempfile.mkdtemp(prefix="vlray-bench-decode-"))
    from vlray.testing.checkpoints import save_tiny_siglip2

    ckpt = save_tiny_siglip2(tmp / "ckpt", max_num_patches=256)
    family = family_for(resolve_checkpoint(str(ckpt)))
    encoder = family.load_encoder(torch.device("cpu"), torch.float32)

    print(
        f"torch threads 1; {args.images} JPEGs (q90) per size; best of {args.repeat}; "
        f"target = SigLIP2 NaFlex {family.max_num_patches} patches of {family.patch_size}"
    )
    print(f"{'size':10s} {'decoder':22s} {'decode':>9s} {'+resize':>9s} {'vs PIL':>7s}   (img/s)")
    for label, size in SIZES.items():
        blobs = make_jpegs(size, args.images)
        target = family.target_size(size[1], size[0])

        # every "+resize" is family.fit: the decode actors' resize (and crop, where the
        # family crops), from the source size even when the decode was a draft reduction
        source = (size[1], size[0])

        def full(b):
            return family.fit(decode_image(b, max_pixels=10**9))

        def draft(b, target=target, source=source):
            return family.fit(pil_draft(b, target), source)

        def tv(b):
            return family.fit(tv_decode(b).permute(1, 2, 0).contiguous().numpy())

        def viewed(b):
            return rgb_pixels(decode_rgb(b, max_pixels=10**9))

        def viewed_resize(b):
            return family.fit(viewed(b))

        rows = [
            ("PIL full (decode_image)", lambda b: decode_image(b, max_pixels=10**9), full),
            ("PIL full, RGBX view", viewed, viewed_resize),
            (
                "vlray decode_pixels",
                lambda b: decode_pixels(b, max_pixels=10**9),
                lambda b: family.fit(decode_pixels(b, max_pixels=10**9)),
            ),
            ("PIL draft", lambda b, target=target: pil_draft(b, target), draft),
            ("torchvision decode_jpeg", tv_decode, tv),
        ]
        base = None
        for name, dec, dec_resize in rows:
            try:
                r_dec, r_all = rate(dec, blobs, args.repeat), rate(dec_resize, blobs, args.repeat)
            except Exception as exc:  # e.g. a torchvision build without libjpeg
                print(f"{label:10s} {name:22s} skipped: {type(exc).__name__}: {exc}")
                continue
            base = base or r_all
            print(f"{label:10s} {name:22s} {r_dec:9.0f} {r_all:9.0f} {r_all / base:6.2f}x")
            benchutil.emit(
                {
                    "bench": "decode",
                    "size": label,
                    "decoder": name,
                    "decode_img_s": r_dec,
                    "decode_resize_img_s": r_all,
                    "vs_pil_full": r_all / base,
                    "loadavg": benchutil.load(),
                }
            )
        draft_shape = pil_draft(blobs[0], target).shape
        # quality bound of draft: vs full decode + the same resize
        a = np.stack([full(b) for b in blobs]).astype(np.int16)
        d = np.stack([draft(b) for b in blobs]).astype(np.int16)
        diff = np.abs(a - d)
        with torch.inference_mode():
            emb = []
            for arr in (a, d):
                batch = torch.from_numpy(arr.astype(np.uint8)).permute(0, 3, 1, 2)
                emb.append(encoder.encode(family.preprocess(batch)))
        cos = (emb[0] * emb[1]).sum(-1)
        tv_equal = all(
            np.array_equal(tv_decode(b).permute(1, 2, 0).numpy(), decode_image(b, max_pixels=10**9))
            for b in blobs[:8]
        )
        print(
            f"{label:10s} draft quality: decoded at {draft_shape[1]}x{draft_shape[0]} for target "
            f"{target[1]}x{target[0]}; after resize |diff| max {diff.max()} mean {diff.mean():.2f} "
            f"(0-255); tiny-SigLIP2 embedding cosine min {cos.min():.5f} mean {cos.mean():.5f}; "
            f"torchvision decode == PIL decode: {tv_equal}"
        )
        benchutil.emit(
            {
                "bench": "decode_quality",
                "size": label,
                "draft_shape": draft_shape,
                "max_abs_diff": int(diff.max()),
                "mean_abs_diff": float(diff.mean()),
                "cosine_min": float(cos.min()),
                "cosine_mean": float(cos.mean()),
                "tv_equals_pil": tv_equal,
            }
        )

        if args.device == "cuda":
            if not torch.cuda.is_available():
                print(f"{label:10s} decode_jpeg(device='cuda'): skipped, torch.cuda unavailable")
                continue
            from torchvision.io import ImageReadMode, decode_jpeg

            datas = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]

            def gpu(datas=datas):
                out = decode_jpeg(datas, mode=ImageReadMode.RGB, device="cuda")
                torch.cuda.synchronize()
                return out

            t, _ = benchutil.best_of(gpu, args.repeat, warmup=1)
            print(f"{label:10s} {'decode_jpeg cuda batch':22s} {len(blobs) / t:9.0f}")
            benchutil.emit(
                {
                    "bench": "decode",
                    "size": label,
                    "decoder": "cuda",
                    "decode_img_s": len(blobs) / t,
                }
            )


if __name__ == "__main__":
    main()
