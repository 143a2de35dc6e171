"""Peak memory of the job on N and 10N rows: does it stay flat as the data grows (streaming)?

Each run is a fresh child process (the driver: local ``ray.init`` + ``run_job``); the parent
samples with psutil every 0.2 s the RSS of the driver and all its descendants (raylet, GCS,
Ray workers ``ray::...``) and keeps the peak of the sum, and of the Ray workers alone. RSS counts
shared pages (the plasma object store, torch libraries) once per process, so the sum
over-states the physical memory; it is the same bias for both runs. SPEC target: the 10N peak
within 1.2x of the N peak.

    python bench/memory.py [--rows 200] [--factor 10] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import benchutil

try:
    import psutil
except ImportError:  # ray vendors psutil under ray/thirdparty_files; import ray adds that path
    __import__("ray")
    psutil = __import__("psutil")

TARGET = 1.2
HERE = Path(__file__).resolve().parent


def child(rows: int, parquet: Path, ckpt: Path, out: Path, cpus: int) -> None:
    """The measured driver: local Ray with ``cpus`` CPUs, the whole job, no index."""
    import ray

    from vlray.config import build_config
    from vlray.pipeline.job import run_job

    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    config = build_config(
        None,
        {
            "input": {"uri": str(parquet)},
            "output": {"uri": str(out)},
            "model": {"name": str(ckpt)},
            "index": {"enabled": False},
        },
    )
    summary = run_job(config)
    assert summary["accounted"] and summary["embedded"] == rows, summary
    print(json.dumps({"job_seconds": summary["job_seconds"], "rows": rows}), flush=True)
    ray.shutdown()


class Sampler(threading.Thread):
    """Samples the RSS of a process tree every ``interval`` seconds; keeps the peaks."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.root, self.interval = psutil.Process(pid), interval
        self.peak_total = self.peak_driver = self.peak_workers = 0
        self.peak_processes = 0
        self.samples = 0
        self.stop = threading.Event()

    def sample(self) -> None:
        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        total = driver = workers = 0
        for p in procs:
            try:
                rss = p.memory_info().rss
                cmd = " ".join(p.cmdline())
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            total += rss
            if p.pid == self.root.pid:
                driver = rss
            elif "ray::" in cmd or "default_worker.py" in cmd:
                workers += rss
        self.peak_total = max(self.peak_total, total)
        self.peak_driver = max(self.peak_driver, driver)
        self.peak_workers = max(self.peak_workers, workers)
        self.peak_processes = max(self.peak_processes, len(procs))
        self.samples += 1

    def run(self) -> None:
        while not self.stop.is_set():
            self.sample()
            self.stop.wait(self.interval)


def measure(rows: int, parquet: Path, ckpt: Path, out: Path, cpus: int) -> dict:
    cmd = [
        sys.executable,
        str(HERE / "memory.py"),
        "--child",
        str(rows),
        "--parquet",
        str(parquet),
        "--ckpt",
        str(ckpt),
        "--out",
        str(out),
        "--cpus",
        str(cpus),
    ]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    sampler = Sampler(proc.pid)
    sampler.start()
    stdout, _ = proc.communicate()
    sampler.stop.set()
    sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(f"job on {rows} rows failed (exit {proc.returncode})")
    result = json.loads(next(x for x in stdout.splitlines() if x.startswith('{"job_seconds"')))
    return {
        "rows": rows,
        "wall_s": time.perf_counter() - start,
        "job_s": result["job_seconds"],
        "peak_total_mib": sampler.peak_total / 2**20,
        "peak_driver_mib": sampler.peak_driver / 2**20,
        "peak_workers_mib": sampler.peak_workers / 2**20,
        "processes": sampler.peak_processes,
        "samples": sampler.samples,
        "loadavg": benchutil.load(),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=200, help="N (the runs are N and 10N rows)")
    parser.add_argument("--factor", type=int, default=10)
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--quick", action="store_true", help="N = 100, factor 5")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--parquet", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--ckpt", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(args.child, args.parquet, args.ckpt, args.out, args.cpus)
        return
    if args.quick:
        args.rows, args.factor = 100, 5

    from job import make_parquet

    from vlray.testing.checkpoints import save_tiny_siglip2

    benchutil.header("memory: peak RSS of driver + Ray processes, N vs 10N rows")
    tmp = Path(tempfile.mkdtemp(prefix="vlray-bench-mem-"))
    ckpt = save_tiny_siglip2(tmp / "ckpt", max_num_patches=64)
    results = []
    for rows in (args.rows, args.rows * args.factor):
        parquet = tmp / f"{rows}.parquet"
        make_parquet(parquet, rows)
        results.append(measure(rows, parquet, ckpt, tmp / f"out{rows}", args.cpus))
    print(f"{args.cpus} CPUs for Ray; 640x480 JPEGs; tiny SigLIP2 64 patches; psutil every 0.2 s")
    print(
        f"{'rows':>6s} {'job s':>7s} {'peak total':>11s} {'driver':>8s} {'workers':>8s} "
        f"{'procs':>6s} {'samples':>8s}  (MiB, RSS)"
    )
    for r in results:
        print(
            f"{r['rows']:6d} {r['job_s']:7.1f} {r['peak_total_mib']:11.0f} "
            f"{r['peak_driver_mib']:8.0f} {r['peak_workers_mib']:8.0f} {r['processes']:6d} "
            f"{r['samples']:8d}  {r['loadavg']}"
        )
    ratio = results[1]["peak_total_mib"] / results[0]["peak_total_mib"]
    ratio_w = results[1]["peak_workers_mib"] / max(results[0]["peak_workers_mib"], 1e-9)
    verdict = "meets" if ratio <= TARGET else "MISSES"
    print(
        f"peak ratio {args.factor}N / N: total {ratio:.2f}x, Ray workers {ratio_w:.2f}x "
        f"(target <= {TARGET}x): {verdict}"
    )
    benchutil.emit({"bench": "memory", "runs": results, "ratio": ratio, "ratio_workers": ratio_w})


if __name__ == "__main__":
    main()
