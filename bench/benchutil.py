"""Shared helpers of the benchmarks: machine description, best-of-N timing, load average.

Imported as ``benchutil`` by the scripts in this folder (``python bench/<name>.py`` puts the
folder first on ``sys.path``).
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (platform.processor() elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load() -> str:
    """The 1/5/15-minute load averages, formatted."""
    return "load {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def machine() -> dict[str, Any]:
    """CPU model, cores, load average and library versions, for the header of every result."""
    import torch

    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "loadavg": [round(v, 2) for v in os.getloadavg()],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    for name in ("torchvision", "transformers", "ray", "PIL"):
        try:
            info[name] = __import__(name).__version__
        except Exception:  # not installed / no version
            info[name] = None
    return info


def header(title: str) -> None:
    """Prints the benchmark title and the machine line."""
    m = machine()
    print(f"== {title}")
    print(
        f"machine: {m['cpu']}, {m['cores']} cores, {load()}; torch {m['torch']}, "
        f"torchvision {m['torchvision']}, transformers {m['transformers']}, ray {m['ray']}, "
        f"PIL {m['PIL']}" + (f", GPU {m['cuda']}" if m["cuda"] else "")
    )


def best_of(fn: Callable[[], Any], repeat: int = 3, warmup: int = 0) -> tuple[float, Any]:
    """The smallest wall time of ``repeat`` calls (after ``warmup`` untimed calls), and a result."""
    result = None
    for _ in range(warmup):
        result = fn()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def emit(record: dict[str, Any]) -> None:
    """Prints one machine-readable result line (``RESULT {json}``) for bench/run.py."""
    print("RESULT " + json.dumps(record, default=str), flush=True)
