"""Where the CPU goes in a job: per-process CPU seconds of an N-row and a 3N-row vlray run.

Both runs share one local Ray (after one untimed warm-up run), and every process on the machine
is read from /proc before and after each run, so the 2N-row difference is the steady cost:
CPU milliseconds per image in the fused actors and in everything else (driver, raylet, Ray's
agents, the writer), and how busy the cores were. Linux only (/proc).

    python bench/job_cpu.py [--rows 3000] [--cpus 2]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import benchutil
from job import make_parquet, vlray_job

from vlray.testing.checkpoints import save_tiny_siglip2

TICKS = os.sysconf("SC_CLK_TCK")


def snapshot() -> dict[int, tuple[float, str]]:
    """pid -> (user + system CPU seconds, short command line) for every readable process."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{entry}/cmdline") as f:
                cmd = f.read().replace("\0", " ").strip()
        except OSError:
            continue
        name = cmd.split(" --")[0][:60] if cmd else f"[{entry}]"
        out[int(entry)] = ((int(fields[11]) + int(fields[12])) / TICKS, name)
    return out


def measure(path: Path, ckpt: Path, out: Path) -> tuple[float, dict[str, float]]:
    """(wall seconds, CPU seconds per process name) of one vlray run."""
    before, start = snapshot(), time.perf_counter()
    vlray_job(path, ckpt, out)
    wall, after = time.perf_counter() - start, snapshot()
    cpu: dict[str, float] = {}
    for pid, (seconds, name) in after.items():
        used = seconds - before.get(pid, (0.0, name))[0]
        if used > 0:
            cpu[name] = cpu.get(name, 0.0) + used
    return wall, cpu


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=3000, help="N (the runs are N and 3N rows)")
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 2)
    args = parser.parse_args()
    import ray

    benchutil.header("job CPU accounting: per-process CPU of an N and a 3N-row run")
    tmp = Path(tempfile.mkdtemp(prefix="vlray-bench-"))
    ckpt = save_tiny_siglip2(tmp / "ckpt", max_num_patches=64)
    n = args.rows
    small, large = tmp / "n.parquet", tmp / "3n.parquet"
    make_parquet(small, n)
    make_parquet(large, 3 * n)
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    vlray_job(small, ckpt, tmp / "warm")
    wall1, cpu1 = measure(small, ckpt, tmp / "o1")
    wall3, cpu3 = measure(large, ckpt, tmp / "o3")
    ray.shutdown()
    rows = 2 * n
    actors = "ray::MapWorker(MapBatches(DecodeEncodeStage))"

    def share(cpu: dict[str, float], fused: bool) -> float:
        return sum(v for k, v in cpu.items() if k.startswith(actors) == fused)

    steady_wall = wall3 - wall1
    actor_ms = 1e3 * (share(cpu3, True) - share(cpu1, True)) / rows
    other_ms = 1e3 * (share(cpu3, False) - share(cpu1, False)) / rows
    busy = (share(cpu3, True) + share(cpu3, False) - share(cpu1, True) - share(cpu1, False)) / (
        args.cpus * steady_wall
    )
    print(f"runs: {n} rows {wall1:.1f} s, {3 * n} rows {wall3:.1f} s ({args.cpus} CPUs)")
    print(
        f"steady (the {rows} extra rows): {rows / steady_wall:.0f} img/s; CPU per image: fused "
        f"actors {actor_ms:.2f} ms, everything else {other_ms:.2f} ms; cores busy {busy:.0%}"
    )
    print(
        f"fixed cost of the {n}-row run: fused actors "
        f"{share(cpu1, True) - actor_ms * n / 1e3:.1f} CPU-s (start-up: imports, model)"
    )
    print("CPU seconds of the 3N run by process:")
    for name, seconds in sorted(cpu3.items(), key=lambda kv: -kv[1])[:10]:
        print(f"  {seconds:7.2f}  {name}")
    benchutil.emit(
        {
            "bench": "job_cpu",
            "rows": n,
            "steady_img_s": rows / steady_wall,
            "actor_cpu_ms_per_image": actor_ms,
            "other_cpu_ms_per_image": other_ms,
            "cores_busy": busy,
        }
    )


if __name__ == "__main__":
    main()
