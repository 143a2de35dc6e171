"""Runs the whole benchmark suite in sequence (one subprocess each) and prints a summary table.

    python bench/run.py --device cpu|cuda [--quick] [--only preprocess,decode,...]

Each benchmark prints its own report and ``RESULT {json}`` lines; the summary table is built
from those. With ``--device cuda`` and no GPU, the CUDA parts print a skip message and the CPU
parts still run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import benchutil

HERE = Path(__file__).resolve().parent
SUITE = ("preprocess", "decode", "encoder_groups", "job", "memory", "float16")


def run(name: str, args: list[str]) -> tuple[int, list[dict], float]:
    cmd = [sys.executable, str(HERE / f"{name}.py"), *args]
    print(f"\n$ {' '.join(cmd[1:])}", flush=True)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    results = []
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("RESULT "):
            results.append(json.loads(line[len("RESULT ") :]))
        elif not line.startswith(("USDT:", "Writing model shards", "Loading weights")):
            print(line, end="", flush=True)
    return proc.wait(), results, time.perf_counter() - start


def summarize(results: dict[str, list[dict]]) -> list[tuple[str, str, str]]:
    rows: list[tuple[str, str, str]] = []
    for r in results.get("preprocess", []):
        ok = min(r["ratio_tv"], r["ratio_pil"]) >= 5
        rows.append(
            (
                f"preprocess {r['family']} ({r['threads']} thr)",
                f"{r['vlray_img_s']:.0f} img/s; {r['ratio_tv']:.1f}x tv, {r['ratio_pil']:.1f}x "
                f"PIL; max|diff| {r['max_diff']:.2g}",
                "meets >= 5x" if ok else "misses >= 5x",
            )
        )
    for r in results.get("decode", []):
        rows.append(
            (
                f"decode {r['size']} {r['decoder']}",
                f"{r['decode_img_s']:.0f} img/s"
                + (
                    f", +resize {r['decode_resize_img_s']:.0f} ({r['vs_pil_full']:.2f}x PIL)"
                    if "decode_resize_img_s" in r
                    else ""
                ),
                "info",
            )
        )
    for r in results.get("decode_quality", []):
        rows.append(
            (
                f"draft quality {r['size']}",
                f"|diff| max {r['max_abs_diff']} mean {r['mean_abs_diff']:.2f}; cos min "
                f"{r['cosine_min']:.5f}",
                "info",
            )
        )
    for r in results.get("encoder_groups", []):
        rows.append(
            (
                f"groups, encoder batch {r['encoder_batch']}",
                f"{r['groups_per_batch']:.1f} groups/batch of {r['distinct_shapes']} shapes, "
                f"mean {r['mean_group_size']:.1f} rows",
                "info",
            )
        )
    for r in results.get("encoder_group_forward", []):
        rows.append(
            (
                f"forward {r['model']} {r['source']} B={r['batch']}",
                f"vlray {r['vlray_ms']:.1f} ms vs ref {r['reference_ms']:.1f} ms "
                f"({r['speedup']:.2f}x), cos {r['cosine_min']:.6f}",
                "info",
            )
        )
    for r in results.get("job", []):
        ok = (
            r["vlray_over_limit"] >= 0.5
            and r["vlray_over_loop"] >= 1.5
            and r["vlray_over_hand"] >= 1.5
        )
        rows.append(
            (
                f"job N={r['rows']}",
                f"vlray {r['vlray_img_s']:.0f} img/s = {r['vlray_over_limit']:.2f} of limit "
                f"{r['limit_img_s']:.0f}; {r['vlray_over_loop']:.2f}x loop, "
                f"{r['vlray_over_hand']:.2f}x hand-written"
                + (
                    f"; fuse off {r['vlray_fuse_off_img_s']:.0f} img/s"
                    if r.get("vlray_fuse_off_img_s")
                    else ""
                ),
                "meets" if ok else "misses (>= 0.5 limit, >= 1.5x both)",
            )
        )
    for r in results.get("float16", []):
        rows.append(
            (
                f"float16 {r['corpus']}",
                f"top-{r['k']} overlap {r['topk_overlap']:.4f}, top-1 same {r['top1_same']:.4f}",
                "info",
            )
        )
    for r in results.get("gpu_inprocess", []):
        rows.append(
            (
                f"gpu preprocess/forward ({r['gpu']})",
                f"{100 * r['preprocess_share']:.1f}% of the forward; {r['vlray_img_s']:.0f} img/s "
                f"in process, {r['vlray_img_s'] / r['ref_img_s']:.1f}x the reference; "
                f"{r['tflop_s']:.0f} TFLOP/s",
                "meets <= 10%" if r["preprocess_share"] <= 0.10 else "misses <= 10%",
            )
        )
    for r in results.get("gpu_job", []):
        rows.append(
            (
                f"gpu job siglip2-base ({r['decode']} decode)",
                f"{r['vlray_img_s']:.0f} img/s steady; GPU utilization {r['gpu_utilization_mean']}",
                "meets >= 3000" if r["vlray_img_s"] >= 3000 else "misses >= 3000",
            )
        )
    for r in results.get("memory", []):
        a, b = r["runs"]
        rows.append(
            (
                f"memory {a['rows']} vs {b['rows']} rows",
                f"peak {a['peak_total_mib']:.0f} vs {b['peak_total_mib']:.0f} MiB "
                f"({r['ratio']:.2f}x)",
                "meets <= 1.2x" if r["ratio"] <= 1.2 else "misses <= 1.2x",
            )
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--quick", action="store_true", help="small sizes everywhere")
    parser.add_argument("--only", default=",".join(SUITE), help="comma list of benchmarks")
    args = parser.parse_args()
    benchutil.header(f"vlray benchmark suite, device {args.device}, quick {args.quick}")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("device cuda: torch.cuda is unavailable, CUDA parts are skipped")
    extra = {name: (["--quick"] if args.quick else []) for name in SUITE}
    extra["decode"] += ["--device", args.device]
    extra["job"] += ["--separate", "--draft"]
    extra["gpu"] = ["--quick"] if args.quick else []
    names = args.only.split(",")
    if args.device == "cuda" and "gpu" not in names and args.only == ",".join(SUITE):
        names.append("gpu")  # the GPU benchmark joins the default suite on --device cuda
    by_kind: dict[str, list[dict]] = {}
    status = []
    for name in names:
        rc, results, seconds = run(name, extra[name])
        status.append((name, rc, seconds))
        for r in results:
            by_kind.setdefault(r["bench"], []).append(r)

    print(f"\n== summary ({benchutil.load()})")
    for name, rc, seconds in status:
        print(f"  {name:15s} exit {rc}  {seconds:6.0f} s")
    rows = summarize(by_kind)
    w0 = max((len(r[0]) for r in rows), default=10)
    w1 = max((len(r[1]) for r in rows), default=10)
    for a, b, c in rows:
        print(f"  {a:{w0}s}  {b:{w1}s}  {c}")
    sys.exit(max((rc for _, rc, _ in status), default=0))


if __name__ == "__main__":
    main()
