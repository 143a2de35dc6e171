"""output.dtype float16: retrieval agreement with float32 (top-10 overlap), and the size saved.

The job stores float16 embeddings by rounding the float32 unit vectors (``numpy.astype``, round
to nearest even, as ``WriteStage`` does); the index is built from those values read back as
float32. This benchmark builds the same exact (Flat, inner product) index from float32 and from
float16-rounded vectors and compares the top-k of the same float32 queries.

Corpora: unit vectors from a mixture of Gaussian clusters (``--clusters`` centres, within-cluster
spread ``--spread``; a smaller spread means many near-ties, the hard case), plus the embeddings
of real photos from a tiny random SigLIP2 through vlray's own encoder.

    python bench/float16.py [--rows 100000] [--dim 768] [--queries 1000] [--k 10]
"""

from __future__ import annotations

import argparse

import benchutil
import faiss
import numpy as np


def mixture(rows: int, dim: int, clusters: int, spread: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    labels = rng.integers(0, clusters, rows)
    noise = rng.standard_normal((rows, dim)).astype(np.float32) * (spread / np.sqrt(dim))
    vectors = centres[labels] + noise
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def agreement(corpus: np.ndarray, queries: np.ndarray, k: int) -> dict[str, float]:
    """Top-k overlap and top-1 agreement of float16-stored vs float32-stored corpora."""
    ref = faiss.IndexFlatIP(corpus.shape[1])
    ref.add(corpus)
    half = faiss.IndexFlatIP(corpus.shape[1])
    half.add(corpus.astype(np.float16).astype(np.float32))
    d32, i32 = ref.search(queries, k)
    d16, i16 = half.search(queries, k)
    overlap = np.mean([len(set(a) & set(b)) / k for a, b in zip(i32, i16, strict=True)])
    gap = np.median(d32[:, 0] - d32[:, min(k, d32.shape[1]) - 1])
    return {
        "topk_overlap": float(overlap),
        "top1_same": float(np.mean(i32[:, 0] == i16[:, 0])),
        "max_score_diff": float(np.abs(d32 - d16).max()),
        "median_top1_topk_gap": float(gap),
    }


def photo_embeddings(count: int) -> np.ndarray:
    """vlray's embeddings of ``count`` real photos (tiny random SigLIP2), float32 unit vectors."""
    import tempfile
    from pathlib import Path

    import torch
    from PIL import Image

    from vlray.families import family_for, resolve_checkpoint
    from vlray.families.batch import preprocess_images
    from vlray.ops.decode import decode_rgb
    from vlray.testing.checkpoints import save_tiny_siglip2
    from vlray.testing.images import sample_photos

    folder = Path(tempfile.mkdtemp(prefix="vlray-f16-"))
    family = family_for(resolve_checkpoint(str(save_tiny_siglip2(folder / "ckpt"))))
    encoder = family.load_encoder(torch.device("cpu"), torch.float32)
    images: list[Image.Image] = []
    for i, (_, blob) in enumerate(sample_photos(count, seed=11)):
        image = decode_rgb(blob, max_pixels=10**9)
        # distinct crops so that repeated base photos give distinct, near-duplicate vectors
        w, h = image.size
        dx, dy = (i * 7) % max(1, w // 4), (i * 5) % max(1, h // 4)
        images.append(image.crop((dx, dy, w - (i % 3) * 4, h)))
    out = np.zeros((len(images), encoder.dim), dtype=np.float32)
    for indices, inputs in preprocess_images(family, images):
        out[indices] = encoder.encode(inputs).numpy()
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--clusters", type=int, default=1000)
    parser.add_argument("--photos", type=int, default=1000)
    parser.add_argument("--quick", action="store_true", help="20,000 rows, 200 queries")
    args = parser.parse_args()
    if args.quick:
        args.rows, args.queries, args.photos = 20_000, 200, 300
    benchutil.header("output.dtype float16 vs float32: top-k agreement of exact search")
    print(
        f"storage: {args.dim * 4} vs {args.dim * 2} bytes per vector (float32 vs float16); "
        f"k = {args.k}; exact inner-product search (FAISS Flat) on both"
    )
    cases = []
    for spread in (1.0, 0.5, 0.2):
        vectors = mixture(args.rows + args.queries, args.dim, args.clusters, spread, seed=1)
        cases.append((f"mixture spread {spread}", vectors[args.queries :], vectors[: args.queries]))
    photos = photo_embeddings(args.photos)
    queries = max(1, len(photos) // 10)
    cases.append((f"photos, tiny SigLIP2 ({len(photos)})", photos[queries:], photos[:queries]))
    print(
        f"{'corpus':34s} {'rows':>8s} {'top-k overlap':>14s} {'top-1 same':>11s}  max |score diff|  median top1-topk gap"
    )
    for name, corpus, query in cases:
        r = agreement(corpus, query, args.k)
        print(
            f"{name:34s} {len(corpus):8d} {r['topk_overlap']:14.4f} {r['top1_same']:11.4f}  "
            f"{r['max_score_diff']:16.2e}  {r['median_top1_topk_gap']:.4f}"
        )
        benchutil.emit({"bench": "float16", "corpus": name, "rows": len(corpus), "k": args.k, **r})


if __name__ == "__main__":
    main()
