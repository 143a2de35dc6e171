"""Bucketing statistics of a mixed-aspect corpus with SigLIP2 NaFlex, and the encoder time of a
same-shape group without an attention mask (vlray) vs the reference's padded, masked forward.

1. Corpus (``vlray.testing.images.sample_photos``): distinct target shapes at 256 patches of 16;
   decode batches of 32 rows sorted by shape (as ``DecodeStage``), concatenated into encoder
   batches of 64/128/256 rows and split by shape (as ``EncodeStage``, groups capped at
   ``max_group_size``): groups per encoder batch, mean group size, rows in groups under 8.
2. Encoder: one same-shape group, vlray's ``Siglip2ImageEncoder.encode`` on unpadded patches
   vs ``model.get_image_features(pixel_values, pixel_attention_mask, spatial_shapes)`` on the
   processor's padded output, same weights; best of N; cosine of the two embeddings. Tiny random
   SigLIP2 (256 patches) and, unless ``--no-base``, the full-size random siglip2-base.

    python bench/encoder_groups.py [--photos 512] [--batch 32] [--base-batch 4] [--quick]
"""

from __future__ import annotations

import argparse
import tempfile
from collections import Counter
from pathlib import Path

import benchutil
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from vlray.families import family_for, resolve_checkpoint
from vlray.families.batch import preprocess_images
from vlray.families.checkpoint import load_model
from vlray.ops.decode import decode_image, probe_image
from vlray.testing.images import sample_photos

DECODE_BATCH, MAX_GROUP = 32, 256


def corpus_stats(family, sizes: list[tuple[int, int]]) -> None:
    """sizes: (width, height) of each row, in input order."""
    keys = [family.target_size(h, w) for w, h in sizes]
    count = Counter(keys)
    n = len(keys)
    print(
        f"corpus: {n} photos, {len(set(sizes))} source sizes -> {len(count)} distinct target "
        f"shapes (h x w, rows): " + ", ".join(f"{h}x{w} {c}" for (h, w), c in count.most_common())
    )
    pad = {k: 1 - (k[0] // 16) * (k[1] // 16) / family.max_num_patches for k in count}
    wasted = sum(pad[k] * c for k, c in count.items()) / n
    print(
        f"padding the reference would add (share of {family.max_num_patches} patches): mean "
        f"{100 * wasted:.1f}%, worst {100 * max(pad.values()):.1f}% ({max(pad, key=pad.get)})"
    )
    # decode batches sorted by shape, concatenated into encoder batches
    ids = np.array([k[0] * 100000 + k[1] for k in keys])
    decoded = np.concatenate(
        [np.sort(ids[i : i + DECODE_BATCH]) for i in range(0, n, DECODE_BATCH)]
    )
    print(
        f"{'encoder batch':>14s} {'batches':>8s} {'groups/batch':>13s} {'mean group':>11s} "
        f"{'runs/batch':>11s} {'rows in groups <8':>18s}"
    )
    for size in (64, 128, 256):
        groups, runs, small, batches = [], [], 0, 0
        for i in range(0, n, size):
            batch = decoded[i : i + size]
            batches += 1
            _, counts = np.unique(batch, return_counts=True)
            split = [min(MAX_GROUP, c) for c in counts for _ in range(-(-c // MAX_GROUP))]
            groups.append(len(split))
            runs.append(1 + int((batch[1:] != batch[:-1]).sum()))
            small += sum(c for c in split if c < 8)
        g = float(np.mean(groups))
        print(
            f"{size:14d} {batches:8d} {g:13.2f} {size / g:11.1f} {np.mean(runs):11.2f} "
            f"{100 * small / n:17.1f}%"
        )
        benchutil.emit(
            {
                "bench": "encoder_groups",
                "encoder_batch": size,
                "distinct_shapes": len(count),
                "groups_per_batch": g,
                "mean_group_size": size / g,
                "rows_in_small_groups": small / n,
            }
        )


def group_inputs(family, blobs):
    images = [decode_image(b, max_pixels=10**9) for b in blobs]
    size = family.target_size(*images[0].shape[:2])
    # the one image-to-inputs path (fit, then one preprocess per same-shape group)
    [(_, inputs)] = preprocess_images(family, images)
    return images, inputs, size


def time_encoders(label, checkpoint, blobs_by_shape, batch: int, repeat: int) -> None:
    import transformers

    family = family_for(checkpoint)
    encoder = family.load_encoder(torch.device("cpu"), torch.float32)
    model = load_model(checkpoint, transformers.Siglip2Model, torch.float32)
    processor = transformers.Siglip2ImageProcessor.from_pretrained(checkpoint.path)
    for source, blobs in blobs_by_shape.items():
        blobs = (blobs * batch)[:batch]
        images, inputs, size = group_inputs(family, blobs)
        ref_inputs = processor(images=[Image.fromarray(i) for i in images], return_tensors="pt")
        n = inputs["pixel_values"].shape[1]

        def ours(inputs=inputs):
            return encoder.encode(inputs)

        def reference(ref_inputs=ref_inputs):
            with torch.inference_mode():
                out = model.get_image_features(**ref_inputs).pooler_output
            return F.normalize(out, dim=-1)

        t_ours, e_ours = benchutil.best_of(ours, repeat, warmup=1)
        t_ref, e_ref = benchutil.best_of(reference, repeat, warmup=1)
        cos = (e_ours * e_ref).sum(-1)
        print(
            f"{label:12s} {source:>9s} -> {size[0]}x{size[1]} ({n}/{family.max_num_patches} "
            f"patches) B={batch}: vlray {1e3 * t_ours:8.1f} ms, reference {1e3 * t_ref:8.1f} ms, "
            f"{t_ref / t_ours:5.2f}x; cosine min {cos.min():.7f}  ({benchutil.load()})"
        )
        benchutil.emit(
            {
                "bench": "encoder_group_forward",
                "model": label,
                "source": source,
                "target": size,
                "patches": n,
                "batch": batch,
                "vlray_ms": 1e3 * t_ours,
                "reference_ms": 1e3 * t_ref,
                "speedup": t_ref / t_ours,
                "cosine_min": float(cos.min()),
            }
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--photos", type=int, default=512)
    parser.add_argument("--batch", type=int, default=32, help="group size, tiny model")
    parser.add_argument("--base-batch", type=int, default=4, help="group size, siglip2-base")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="1: stable on a loaded box")
    parser.add_argument("--no-base", action="store_true", help="skip the full-size model")
    parser.add_argument("--quick", action="store_true", help="128 photos, tiny model only")
    args = parser.parse_args()
    if args.quick:
        args.photos, args.no_base, args.repeat = 128, True, 2
    torch.set_num_threads(args.threads)
    benchutil.header("encoder groups: SigLIP2 NaFlex buckets and the unpadded, unmasked forward")

    base = resolve_checkpoint("siglip2-base-patch16-naflex", weights="random")
    photos = sample_photos(args.photos)
    sizes = [probe_image(b, max_pixels=10**9) for _, b in photos]
    corpus_stats(family_for(base), sizes)

    # one group per source shape: the most common (4:3) and the one the reference pads most
    by_size: dict[str, list[bytes]] = {}
    for (w, h), (_, blob) in zip(sizes, photos, strict=True):
        by_size.setdefault(f"{w}x{h}", []).append(blob)
    picks = {k: by_size[k] for k in ("640x480", "1024x256", "97x131") if k in by_size}

    print(
        f"\nencoder forward of one same-shape group, torch threads {args.threads}, best of "
        f"{args.repeat}"
    )
    tmp = Path(tempfile.mkdtemp(prefix="vlray-bench-enc-"))
    from vlray.testing.checkpoints import save_tiny_siglip2

    tiny = resolve_checkpoint(str(save_tiny_siglip2(tmp / "tiny", max_num_patches=256)))
    time_encoders("tiny", tiny, picks, args.batch, args.repeat)
    if not args.no_base:
        time_encoders("siglip2-base", base, picks, args.base_batch, args.repeat)


if __name__ == "__main__":
    main()
