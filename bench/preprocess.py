"""Preprocessing: vlray (uint8 resize + batched tensor preprocessing) vs the transformers processors.

Same decoded images in, model inputs out; outputs checked equal (max |diff| per image on a
sample); prints img/s of the reference's torchvision backend, its PIL backend and vlray, the
ratios, and where vlray's time goes (target_size + grouping, uint8 resize, stacking,
``family.preprocess``, the top torch ops of ``preprocess``), for each torch thread count.

    python bench/preprocess.py [--images 128] [--threads 1,2] [--families siglip2,siglip,qwen2_vl,sam]
"""

from __future__ import annotations

import argparse
import math
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

import benchutil
import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as tvF

from vlray.families import family_for, resolve_checkpoint
from vlray.families.batch import preprocess_images
from vlray.ops.decode import decode_image, rgb_pixels
from vlray.ops.memory import empty_huge
from vlray.ops.resize import _resize_hwc, pack_rgb, resize_uint8
from vlray.testing.images import sample_photos

PRESETS = {
    "siglip2": ("siglip2-base-patch16-naflex", {}),
    "siglip": ("siglip-so400m-patch14-384", {}),
    "qwen2_vl": ("qwen2-vl-2b-instruct", {"max_pixels": 1280 * 28 * 28}),
    "sam": ("sam-vit-base", {}),
}
TARGET = 5.0  # SPEC 9: >= 5x the reference processor on CPU, for each family


def group_resize(family, images):
    """target_size per image, ``family.fit`` (the decode actors' uint8 resize, and the centre
    crop where the family crops), grouped by shape."""
    groups = defaultdict(list)
    for image in images:
        groups[family.target_size(*image.shape[:2])].append(family.fit(image))
    return groups


def stack(groups):
    """Same-shape groups -> uint8 (B, 3, H, W) channels-last views (as the encode actors)."""
    return [torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) for arrays in groups.values()]


def vlray_preprocess(family, pils, pool=None):
    """The whole vlray path from the same PIL images as the reference: uint8 resize per image
    (over ``pool``'s threads), then one tensor op per same-shape group."""
    return [inputs for _, inputs in preprocess_images(family, pils, pool)]


def parity(name, family, ref, pils, sample=16):
    """Max |diff| of vlray's model inputs vs the reference's, image by image."""
    worst = 0.0
    for p in pils[:sample]:
        expected = ref(images=[p], return_tensors="pt")["pixel_values"]
        got = vlray_preprocess(family, [p])[0]["pixel_values"]
        if name == "siglip2":  # the reference pads to max_num_patches; vlray does not pad
            expected = expected[:, : got.shape[1]]
        if expected.shape != got.shape:
            return float("inf")
        worst = max(worst, (got - expected).abs().max().item())
    return worst


def breakdown(family, pils, repeat):
    """Seconds per part of vlray's path, best of ``repeat`` each."""
    images = [rgb_pixels(p) for p in pils]  # PIL's RGBX buffers, viewed (what vlray resizes)
    rgb = [np.asarray(p) for p in pils]  # packed RGB copies, for the 3-channel what-if
    t_size, _ = benchutil.best_of(
        lambda: [family.target_size(*i.shape[:2]) for i in images], repeat
    )
    sizes = [family.target_size(*i.shape[:2]) for i in images]
    t_resize, resized = benchutil.best_of(lambda: [family.fit(i) for i in images], repeat)
    t_resize_rgb, _ = benchutil.best_of(
        lambda: [resize_uint8(i, s, family.interpolation) for i, s in zip(rgb, sizes, strict=True)],
        repeat,
    )
    # the same resize on a contiguous CHW copy (what a naive caller passes torchvision)
    chws = [torch.from_numpy(i).permute(2, 0, 1).contiguous() for i in rgb]
    t_resize_chw, _ = benchutil.best_of(
        lambda: [
            tvF.resize(c, list(s), interpolation=family.interpolation, antialias=True)
            for c, s in zip(chws, sizes, strict=True)
        ],
        repeat,
    )
    groups = defaultdict(list)
    for s, r in zip(sizes, resized, strict=True):
        groups[s].append(r)
    t_stack, batches = benchutil.best_of(lambda: stack(groups), repeat)
    t_pre, _ = benchutil.best_of(lambda: [family.preprocess(b) for b in batches], repeat)
    # what-ifs for the optimizer (same values, bit for bit, checked):
    # resize spread over a 2-thread pool (torch releases the GIL in the kernel)
    with ThreadPoolExecutor(2) as pool:
        t_resize_pool, _ = benchutil.best_of(
            lambda: list(
                pool.map(
                    lambda a: resize_uint8(a[0], a[1], family.interpolation),
                    zip(images, sizes, strict=True),
                )
            ),
            repeat,
        )
    # the normalization alone on the stacked (B, 3, H, W) channels-last groups, as vlray does
    # it, vs copying into a contiguous NCHW float32 buffer first and normalizing in place
    norm = family.normalization
    t_norm_cl, ref = benchutil.best_of(lambda: [norm.apply(b, 1) for b in batches], repeat)

    def contiguous_first():
        out = []
        for b in batches:
            buf = torch.empty(b.shape, dtype=torch.float32)
            buf.copy_(b)
            out.append(norm.apply(buf, 1))
        return out

    t_norm_contig, alt = benchutil.best_of(contiguous_first, repeat)
    same_values = all(torch.equal(a, b) for a, b in zip(ref, alt, strict=True))
    # the 4 -> 3 channel pack of the resized RGBX images: Pillow's packer (what vlray does)
    # vs torch's and numpy's strided copies (same bytes, checked)
    needed = [
        (torch.from_numpy(i), s)
        for i, s in zip(images, sizes, strict=True)
        if tuple(i.shape[:2]) != tuple(s)
    ]
    padded = [_resize_hwc(t, s, family.interpolation).numpy() for t, s in needed if t.shape[2] == 4]
    t_pack_pil, packed = benchutil.best_of(lambda: [pack_rgb(a) for a in padded], repeat)
    t_pack_torch, packed_t = benchutil.best_of(
        lambda: [torch.from_numpy(a)[..., :3].contiguous().numpy() for a in padded], repeat
    )
    t_pack_np, _ = benchutil.best_of(
        lambda: [np.ascontiguousarray(a[..., :3]) for a in padded], repeat
    )
    packs_equal = all(np.array_equal(a, b) for a, b in zip(packed, packed_t, strict=True))
    # the resize through tvF.resize (Python dispatch) vs torch's kernel called directly
    t_tvf, _ = benchutil.best_of(
        lambda: [
            tvF.resize(t.permute(2, 0, 1), list(s), family.interpolation, antialias=True)
            for t, s in needed
        ],
        repeat,
    )
    t_direct, _ = benchutil.best_of(
        lambda: [_resize_hwc(t, s, family.interpolation) for t, s in needed], repeat
    )
    # the float32 outputs of all groups written into fresh torch.empty buffers vs buffers
    # advised as huge pages (what vlray's normalization allocates)
    shapes = [tuple(r.shape) for r in ref]

    def fill(alloc):
        return [alloc(shape).fill_(0.5) for shape in shapes]

    t_fresh, _ = benchutil.best_of(lambda: fill(torch.empty), repeat)
    t_huge, _ = benchutil.best_of(lambda: fill(empty_huge), repeat)
    # what fraction of the images needed no resize (already at the target shape)
    same = sum(tuple(i.shape[:2]) == tuple(s) for i, s in zip(images, sizes, strict=True))
    return {
        "target_size": t_size,
        "resize": t_resize,
        "resize_contiguous_chw": t_resize_chw,
        "resize_rgb_hwc": t_resize_rgb,
        "stack": t_stack,
        "preprocess": t_pre,
        "resize_pool2": t_resize_pool,
        "normalize_channels_last": t_norm_cl,
        "normalize_contiguous_first": t_norm_contig,
        "normalize_variants_equal": same_values,
        "pack_pillow": t_pack_pil,
        "pack_torch": t_pack_torch,
        "pack_numpy": t_pack_np,
        "packs_equal": packs_equal,
        "resize_tvf": t_tvf,
        "resize_direct_kernel": t_direct,
        "outputs_fresh": t_fresh,
        "outputs_huge_pages": t_huge,
        "output_mib": sum(4 * math.prod(shape) for shape in shapes) / 2**20,
        "groups": len(groups),
        "no_resize_needed": same,
    }


def profile_top_ops(fn, k):
    """The k torch ops with the most self CPU time inside ``fn()``, as "name share%" text."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1
    return ", ".join(
        f"{e.key} {100 * e.self_cpu_time_total / total:.0f}%"
        for e in events[:k]
        if e.self_cpu_time_total > 0
    )


def top_ops(family, images, k=4):
    """Top ops inside ``family.preprocess`` of the stacked groups."""
    batches = stack(group_resize(family, images))
    return profile_top_ops(lambda: [family.preprocess(b) for b in batches], k)


def top_ops_ref(ref, pils, k=5):
    """Top ops inside the reference processor call."""
    return profile_top_ops(lambda: ref(images=pils, return_tensors="pt"), k)


def load_family(name):
    import transformers

    arch, overrides = PRESETS[name]
    checkpoint = resolve_checkpoint(arch, weights="random", processor_overrides=overrides)
    family = family_for(checkpoint)
    ref_cls = getattr(transformers, checkpoint.processor["image_processor_type"])
    ref = ref_cls.from_pretrained(checkpoint.path, **overrides)
    pil = getattr(transformers, ref_cls.__name__ + "Pil").from_pretrained(
        checkpoint.path, **overrides
    )
    return family, ref, pil


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--threads", default="1,2", help="comma list of torch thread counts")
    parser.add_argument("--families", default=",".join(PRESETS))
    parser.add_argument("--repeat", type=int, default=3, help="best of N (vlray parts)")
    parser.add_argument("--ref-repeat", type=int, default=2, help="best of N (reference)")
    parser.add_argument("--quick", action="store_true", help="32 images, 1 and 2 threads")
    args = parser.parse_args()
    if args.quick:
        args.images = 32

    benchutil.header("preprocess: vlray vs transformers processors (decoded images -> inputs)")
    images = [decode_image(b, max_pixels=10**9) for _, b in sample_photos(args.images)]
    pils = [Image.fromarray(i) for i in images]
    shapes = sorted({i.shape[:2] for i in images})
    print(
        f"{len(images)} decoded photos (sample_photos, {len(shapes)} sizes from "
        f"{min(shapes)} to {max(shapes)}); SPEC target >= {TARGET:.0f}x the reference"
    )
    families = {}
    for name in args.families.split(","):
        try:
            families[name] = load_family(name)
        except Exception as exc:  # e.g. a family or a reference class missing here
            print(f"{name}: skipped ({type(exc).__name__}: {exc})")
    n = len(images)
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        # vlray spreads the per-image resizes over the same number of threads
        pool = ThreadPoolExecutor(threads) if threads > 1 else None
        print(f"\n-- torch threads {threads} ({benchutil.load()})")
        print(
            f"{'family':9s} {'ref tv':>9s} {'ref PIL':>9s} {'vlray':>9s} {'vs tv':>7s} "
            f"{'vs PIL':>7s} {'target':>7s}  max|diff|   (img/s)"
        )
        parts_lines, ref_ops = [], []
        for name, (family, ref, pil) in families.items():
            t_ref, _ = benchutil.best_of(
                lambda ref=ref: ref(images=pils, return_tensors="pt"), args.ref_repeat, warmup=1
            )
            t_pil, _ = benchutil.best_of(
                lambda pil=pil: pil(images=pils, return_tensors="pt"), args.ref_repeat
            )
            t_ours, _ = benchutil.best_of(
                lambda family=family, pool=pool: vlray_preprocess(family, pils, pool),
                args.repeat,
                warmup=1,
            )
            worst = parity(name, family, ref, pils)
            worst_pil = parity(name, family, pil, pils)
            ratio_tv, ratio_pil = t_ref / t_ours, t_pil / t_ours
            verdict = "meets" if min(ratio_tv, ratio_pil) >= TARGET else "MISSES"
            print(
                f"{name:9s} {n / t_ref:9.0f} {n / t_pil:9.0f} {n / t_ours:9.0f} "
                f"{ratio_tv:6.1f}x {ratio_pil:6.1f}x {verdict:>7s}  {worst:.2g} "
                f"(vs PIL backend {worst_pil:.2g})"
            )
            parts = breakdown(family, pils, args.repeat)
            ops = top_ops(family, [rgb_pixels(p) for p in pils])
            parts_lines.append((name, parts, t_ours, ops))
            if threads == 1:
                ref_ops.append((name, family, top_ops_ref(ref, pils), None))
            benchutil.emit(
                {
                    "bench": "preprocess",
                    "family": name,
                    "threads": threads,
                    "images": n,
                    "ref_tv_img_s": n / t_ref,
                    "ref_pil_img_s": n / t_pil,
                    "vlray_img_s": n / t_ours,
                    "ratio_tv": ratio_tv,
                    "ratio_pil": ratio_pil,
                    "max_diff": worst,
                    "max_diff_vs_pil_backend": worst_pil,
                    "parts_s": parts,
                    "loadavg": benchutil.load(),
                }
            )
        print("where vlray's time goes (ms for all images; share of the parts' sum):")
        for name, p, t_ours, ops in parts_lines:
            keys = ("target_size", "resize", "stack", "preprocess")
            total = sum(p[k] for k in keys)
            shares = "  ".join(f"{k} {1e3 * p[k]:6.1f} ({100 * p[k] / total:3.0f}%)" for k in keys)
            print(
                f"  {name:9s} {shares}  | whole {1e3 * t_ours:6.1f}; resize on contiguous "
                f"CHW {1e3 * p['resize_contiguous_chw']:6.1f}; from packed RGB "
                f"{1e3 * p['resize_rgb_hwc']:6.1f}; {p['groups']} groups; "
                f"{p['no_resize_needed']} images need no resize"
            )
            print(f"  {'':9s} preprocess top ops: {ops}")
            print(
                f"  {'':9s} what-ifs: resize on a 2-thread pool {1e3 * p['resize_pool2']:6.1f}; "
                f"normalize of the stacked groups: channels-last (as now) "
                f"{1e3 * p['normalize_channels_last']:6.1f} vs contiguous NCHW copy first "
                f"{1e3 * p['normalize_contiguous_first']:6.1f} "
                f"(equal: {p['normalize_variants_equal']})"
            )
            print(
                f"  {'':9s} pack 4 -> 3 channels: Pillow (as now) {1e3 * p['pack_pillow']:6.1f} vs "
                f"torch {1e3 * p['pack_torch']:6.1f} vs numpy {1e3 * p['pack_numpy']:6.1f} "
                f"(equal: {p['packs_equal']}); resize kernel called directly (as now) "
                f"{1e3 * p['resize_direct_kernel']:6.1f} vs through tvF.resize "
                f"{1e3 * p['resize_tvf']:6.1f}; writing the {p['output_mib']:.0f} MiB of outputs: "
                f"huge-page buffers (as now) {1e3 * p['outputs_huge_pages']:6.1f} vs torch.empty "
                f"{1e3 * p['outputs_fresh']:6.1f}"
            )
        for name, _family, ref, _pil in ref_ops:
            print(f"  reference {name} top ops (tv backend): {ref}")


if __name__ == "__main__":
    main()
