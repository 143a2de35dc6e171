"""GPU: siglip2-base NaFlex (random weights, bf16) on one CUDA device, the reference and vlray
side by side; without a GPU it prints why and exits 0.

1. In process, one batch of ``--batch`` decoded 640x480 photos (one target shape, 252 of 256
   patches):
   - reference: ``Siglip2ImageProcessor`` (torchvision backend) with ``device="cuda"`` (its own
     GPU path), then ``Siglip2Model.get_image_features`` on the 256 padded patches with the
     attention mask;
   - vlray: the decode actors' uint8 resize on the CPU (timed apart: on a cluster it runs in
     other processes), then what the encoder actor does: ``stack_group`` (page-locked host
     memory, non-blocking copy of uint8), ``family.preprocess`` on the GPU, and
     ``Siglip2ImageEncoder.embed`` on the unpadded group without a mask.
   Prints each side's preprocessing and forward times (CUDA-synchronized, best of N), the
   preprocessing share of the forward (SPEC 9: <= 10%), images/s, the cosine of the two
   embeddings, the forward's FLOPs (``torch.utils.flop_counter``), the achieved TFLOP/s and
   its share of the GPU's dense bf16 peak.
2. End to end (unless ``--no-job``): the vlray job (``configs/siglip2-base-naflex.yaml``,
   random weights) from a local Parquet of N and 3N 640x480 JPEGs, for each ``--decodes``
   value (``exact``: CPU decode; ``gpu``: nvJPEG in the encoder); steady images/s =
   2N / (t(3N) - t(N)) (SPEC 9: >= 3,000 on one H100), the GPU's utilization sampled every
   0.2 s over the 3N run, and the embeddings of each non-exact run against the exact run's
   (cosine per image: the quality bound of ``decode: gpu``).

    python bench/gpu.py [--batch 256] [--rows 6000] [--repeat 5] [--decodes exact,gpu] [--no-job]
        [--quick]
"""

from __future__ import annotations

import argparse
import io
import shutil
import subprocess
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import benchutil
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from vlray.families import family_for, resolve_checkpoint
from vlray.families.checkpoint import load_model
from vlray.ops.decode import rgb_pixels
from vlray.pipeline.stages import stack_group, to_device

ARCH = "siglip2-base-patch16-naflex"
PRESET = Path(__file__).resolve().parent.parent / "configs" / "siglip2-base-naflex.yaml"
TARGET_SHARE, TARGET_JOB = 0.10, 3000.0  # SPEC 9
# dense bf16 tensor-core peaks (FLOP/s) by device-name fragment, most specific first
PEAKS = (
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("GH200", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("A10", 125e12),
)


def peak_flops(name: str) -> float | None:
    """The dense bf16 peak of a GPU named ``name``, where known."""
    return next((peak for key, peak in PEAKS if key in name), None)


def timed(fn, repeat: int) -> tuple[float, object]:
    """Best of ``repeat`` CUDA-synchronized calls, after one warm-up call."""

    def synced():
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return out

    return benchutil.best_of(synced, repeat, warmup=1)


def photos(n: int) -> list[Image.Image]:
    """n decoded 640x480 photos: the job benchmark's JPEGs, decoded (what a job decodes)."""
    from job import jpeg_blobs

    return [Image.open(io.BytesIO(blob)).convert("RGB") for blob in jpeg_blobs(n)]


def in_process(batch: int, repeat: int, device: torch.device) -> dict:
    import transformers

    checkpoint = resolve_checkpoint(ARCH, weights="random")
    family = family_for(checkpoint)
    encoder = family.load_encoder(device, torch.bfloat16)
    model = load_model(checkpoint, transformers.Siglip2Model, torch.bfloat16).to(device)
    processor = transformers.Siglip2ImageProcessor.from_pretrained(checkpoint.path)
    images = photos(batch)
    size = family.target_size(images[0].height, images[0].width)

    # vlray: uint8 resize on the CPU (decode actors), over the machine's cores
    with ThreadPoolExecutor(8) as pool:
        t_resize, resized = benchutil.best_of(
            lambda: list(pool.map(lambda i: family.fit(rgb_pixels(i)), images)),
            repeat,
        )
    cells = np.array([r.tobytes() for r in resized], dtype=object)
    rows = np.arange(batch)

    def ours_pre():
        return family.preprocess(stack_group(cells, rows, size, device))

    t_pre, inputs = timed(ours_pre, repeat)
    t_fwd, ours_emb = timed(lambda: encoder.embed(inputs), repeat)
    t_all, _ = timed(lambda: encoder.embed(ours_pre()), repeat)
    # the parts of t_pre: stacking into host memory (CPU), the copy, the kernels on the device
    host = stack_group(cells, rows, size, torch.device("cpu")).permute(0, 2, 3, 1)
    if device.type == "cuda":
        host = host.pin_memory()
        t_h2d, on_device = timed(lambda: to_device(host, device), repeat)
    else:
        t_h2d, on_device = 0.0, host
    t_kernels, _ = timed(lambda: family.preprocess(on_device.permute(0, 3, 1, 2)), repeat)
    share_device = (t_h2d + t_kernels) / t_fwd
    # pipelined as in EncodeStage: k groups enqueued back to back, one wait at the end
    k = 8
    t_loop, _ = timed(lambda: torch.cat([encoder.embed(ours_pre()) for _ in range(k)]).cpu(), 2)
    overhead = (t_loop / k - t_fwd) / t_fwd

    def ref_pre():
        return processor(images=images, return_tensors="pt", device=device)

    t_ref_pre, ref_inputs = timed(ref_pre, repeat)
    ref_inputs = {k: v.to(device) for k, v in ref_inputs.items()}

    def ref_fwd():
        with torch.inference_mode():
            out = model.get_image_features(
                pixel_values=ref_inputs["pixel_values"].to(torch.bfloat16),
                pixel_attention_mask=ref_inputs["pixel_attention_mask"],
                spatial_shapes=ref_inputs["spatial_shapes"],
            ).pooler_output
        return F.normalize(out.float(), dim=-1)

    t_ref_fwd, ref_emb = timed(ref_fwd, repeat)
    cosine = float((ours_emb * ref_emb).sum(-1).min())
    # parity of the model inputs: vlray's patches vs the reference's (unpadded part)
    n = inputs["pixel_values"].shape[1]
    diff = float((inputs["pixel_values"] - ref_inputs["pixel_values"][:, :n]).abs().max())

    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        encoder.embed(inputs)
    flops = counter.get_total_flops()
    with FlopCounterMode(display=False) as counter:
        ref_fwd()
    ref_flops = counter.get_total_flops()
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "CPU (dry run)"
    peak = peak_flops(name)
    achieved = flops / t_fwd
    share = t_pre / t_fwd
    print(
        f"{ARCH}, random weights, bf16, {name}; batch {batch} of 640x480 photos -> "
        f"{size[0]}x{size[1]} ({n}/{family.max_num_patches} patches); best of {repeat}"
    )
    print(f"{'':10s} {'preprocess ms':>14s} {'forward ms':>11s} {'pre/fwd':>8s} {'img/s':>9s}")
    ref_rate = batch / (t_ref_pre + t_ref_fwd)
    print(
        f"{'reference':10s} {1e3 * t_ref_pre:14.2f} {1e3 * t_ref_fwd:11.2f} "
        f"{t_ref_pre / t_ref_fwd:8.2f} {ref_rate:9.0f}"
    )
    print(
        f"{'vlray':10s} {1e3 * t_pre:14.2f} {1e3 * t_fwd:11.2f} {share:8.2f} "
        f"{batch / t_all:9.0f}  (preprocess + forward in one call: {1e3 * t_all:.2f} ms)"
    )
    print(
        f"vlray / reference {(batch / t_all) / ref_rate:.2f}x (the reference's preprocessing "
        f"includes its resize, on the GPU; vlray's uint8 resize runs in the decode actors: "
        f"{1e3 * t_resize:.1f} ms on 8 CPU threads)"
    )
    print(
        f"vlray preprocessing {1e3 * t_pre:.2f} ms = stacking on the CPU + copy "
        f"{1e3 * t_h2d:.2f} ms + kernels {1e3 * t_kernels:.2f} ms; on the device "
        f"{100 * share_device:.1f}% of the forward (target <= {100 * TARGET_SHARE:.0f}%): "
        f"{'meets' if share_device <= TARGET_SHARE else 'MISSES'}; all of it "
        f"{100 * share:.1f}%; pipelined ({k} groups, one wait) {1e3 * t_loop / k:.2f} ms per "
        f"group = forward + {100 * overhead:.1f}%"
    )
    print(
        f"inputs max|diff| vs the reference {diff:.3g}; embedding cosine min {cosine:.5f}; "
        f"forward {flops / batch / 1e9:.1f} GFLOP/img (reference, padded: "
        f"{ref_flops / batch / 1e9:.1f}), {achieved / 1e12:.1f} TFLOP/s"
        + (
            f" = {100 * achieved / peak:.1f}% of the {peak / 1e12:.0f} TFLOP/s bf16 peak"
            if peak
            else ""
        )
    )
    return {
        "bench": "gpu_inprocess",
        "gpu": name,
        "batch": batch,
        "target": size,
        "ref_preprocess_ms": 1e3 * t_ref_pre,
        "ref_forward_ms": 1e3 * t_ref_fwd,
        "vlray_preprocess_ms": 1e3 * t_pre,
        "vlray_forward_ms": 1e3 * t_fwd,
        "vlray_total_ms": 1e3 * t_all,
        "cpu_resize_ms": 1e3 * t_resize,
        "preprocess_share": share_device,
        "preprocess_share_with_cpu_stacking": share,
        "h2d_ms": 1e3 * t_h2d,
        "preprocess_kernels_ms": 1e3 * t_kernels,
        "pipelined_group_ms": 1e3 * t_loop / k,
        "pipelined_overhead": overhead,
        "ref_img_s": ref_rate,
        "vlray_img_s": batch / t_all,
        "cosine_min": cosine,
        "max_diff": diff,
        "gflop_per_img": flops / batch / 1e9,
        "tflop_s": achieved / 1e12,
        "peak_share": achieved / peak if peak else None,
    }


class Utilization:
    """GPU 0's utilization (%), sampled every ``period`` s in a thread (pynvml through
    ``torch.cuda.utilization``, else ``nvidia-smi``)."""

    def __init__(self, period: float = 0.2) -> None:
        self.period, self.samples = period, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def read() -> float | None:
        try:
            return float(torch.cuda.utilization(0))
        except Exception:  # no pynvml: ask nvidia-smi
            pass
        if shutil.which("nvidia-smi") is None:
            return None
        out = subprocess.run(
            [
                "nvidia-smi",
                "--query-gpu=utilization.gpu",
                "--format=csv,noheader,nounits",
                "-i",
                "0",
            ],
            capture_output=True,
            text=True,
            timeout=5,
        )
        try:
            return float(out.stdout.strip().splitlines()[0])
        except (ValueError, IndexError):
            return None

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            value = self.read()
            if value is not None:
                self.samples.append(value)

    def __enter__(self) -> Utilization:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _embeddings(folder: Path) -> dict[str, np.ndarray]:
    import pyarrow.parquet as pq

    table = pq.read_table(folder / "embeddings", columns=["id", "embedding"])
    return dict(
        zip(table.column("id").to_pylist(), table.column("embedding").to_numpy(), strict=True)
    )


def end_to_end(rows: int, decodes: list[str], model: dict | None = None) -> list[dict]:
    """The job runs; ``model`` replaces the preset's model section (the CPU dry run's tiny one)."""
    import ray
    from job import make_parquet  # bench/job.py: the same Parquet of 640x480 JPEGs

    from vlray.config import build_config
    from vlray.pipeline.job import run_job

    tmp = Path(tempfile.mkdtemp(prefix="vlray-bench-gpu-"))
    small, large = tmp / "n.parquet", tmp / "3n.parquet"
    make_parquet(small, rows)
    make_parquet(large, 3 * rows)

    def job(path: Path, out: str, decode: str) -> dict:
        config = build_config(
            PRESET,
            {
                "model": model or {"weights": "random"},
                "input": {"uri": str(path), "decode": decode},
                "output": {"uri": str(tmp / out), "thumbnails": 0},  # as the decode-bound limit
                "index": {"enabled": False},
            },
        )
        summary = run_job(config)
        assert summary["accounted"] and summary["errors"] == 0, summary
        return summary

    ray.init(include_dashboard=False, log_to_driver=False)
    resources = ray.cluster_resources()
    print(
        f"\nend to end: vlray job, {ARCH} random bf16, {rows} and {3 * rows} 640x480 JPEGs, "
        f"Ray resources {resources}"
    )
    job(small, "warm", decodes[0])  # the first job of a session pays one-off costs
    results = []
    for decode in decodes:
        t1 = job(small, f"n-{decode}", decode)["job_seconds"]
        with Utilization() as util:
            s3 = job(large, f"3n-{decode}", decode)
        t3 = s3["job_seconds"]
        rate = 2 * rows / (t3 - t1) if t3 > t1 else float("nan")
        busy = float(np.mean(util.samples)) if util.samples else None
        quality = None
        if decode != "exact" and "exact" in decodes:  # embeddings against the exact run's
            exact, other = _embeddings(tmp / "n-exact"), _embeddings(tmp / f"n-{decode}")
            cosines = np.array([float(np.dot(exact[k], other[k])) for k in exact])
            quality = (float(cosines.min()), float(cosines.mean()))
        print(
            f"decode {decode:5s}: t(N) {t1:.1f} s, t(3N) {t3:.1f} s: steady {rate:.0f} img/s "
            f"(target >= {TARGET_JOB:.0f} on one H100): "
            f"{'meets' if rate >= TARGET_JOB else 'MISSES'}; GPU "
            + (
                f"utilization mean {busy:.0f}% over {len(util.samples)} samples"
                if busy is not None
                else "utilization: no reader (pynvml / nvidia-smi)"
            )
            + (
                f"; embeddings vs exact: cosine min {quality[0]:.5f}, mean {quality[1]:.6f}"
                if quality
                else ""
            )
        )
        print(f"  3N run stage_busy_seconds {s3.get('stage_busy_seconds')}")
        results.append(
            {
                "bench": "gpu_job",
                "rows": rows,
                "decode": decode,
                "t_n": t1,
                "t_3n": t3,
                "vlray_img_s": rate,
                "gpu_utilization_mean": busy,
                "cosine_vs_exact": quality,
                "stage_busy_seconds": s3.get("stage_busy_seconds"),
            }
        )
    ray.shutdown()
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--rows", type=int, default=6000, help="N (the job runs N and 3N)")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument(
        "--decodes",
        default="exact,gpu",
        help="input.decode values of the job runs (exact,draft,gpu)",
    )
    parser.add_argument("--no-job", action="store_true", help="in-process part only")
    parser.add_argument("--quick", action="store_true", help="batch 64, N 1000, 3 repeats")
    parser.add_argument(
        "--dry-run-cpu",
        action="store_true",
        help="the in-process part on the CPU (checks the code)",
    )
    args = parser.parse_args()
    if args.quick:
        args.batch, args.rows, args.repeat = 64, 1000, 3
    benchutil.header("gpu: siglip2-base NaFlex, reference vs vlray on one CUDA device")
    if args.dry_run_cpu:  # the code paths on the CPU: siglip2-base in process, a tiny job
        benchutil.emit(in_process(args.batch, args.repeat, torch.device("cpu")))
        if not args.no_job:
            from vlray.testing.checkpoints import save_tiny_siglip2

            tiny = save_tiny_siglip2(Path(tempfile.mkdtemp()) / "tiny", max_num_patches=64)
            model = {"name": str(tiny), "weights": "pretrained", "arch": ""}
            for record in end_to_end(args.rows, ["exact", "draft"], model):
                benchutil.emit(record)
        return
    if not torch.cuda.is_available():
        print("no CUDA device (torch.cuda.is_available() is False): nothing to measure")
        return
    started = time.perf_counter()
    benchutil.emit(in_process(args.batch, args.repeat, torch.device("cuda")))
    if not args.no_job:
        for record in end_to_end(args.rows, args.decodes.split(",")):
            benchutil.emit(record)
    print(f"({time.perf_counter() - started:.0f} s, {benchutil.load()})")


if __name__ == "__main__":
    main()
