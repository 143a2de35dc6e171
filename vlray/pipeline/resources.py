"""The whole mapping of vlray stages onto Ray resources, in one place.

A Ray API change (``concurrency=`` -> ``compute=``, ...) is a change here only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from vlray.config import ComputeConfig


@dataclass(frozen=True)
class StagePlan:
    """Resources of the read, decode, encode and write stages."""

    decode_actors: int
    decode_cpus: float
    encode_actors: int
    encode_cpus: float
    encode_gpus: float
    encode_threads: int
    device: str
    io_cpus: float = 0.1
    """Each read task's and each write actor's CPU reservation."""
    write_actors: int = 1
    """Long-lived writer processes (see :func:`write_actor_count`)."""
    fused: bool = False
    """Decode and encode run in the same actors (``decode_actors`` of them)."""


def _floor(value: float) -> float:
    """Rounds a CPU reservation down to 1/1000 (rounding up could ask for more than exists)."""
    return math.floor(value * 1000) / 1000


ROWS_PER_ACTOR = 512
"""Small jobs get at most one decode (or fused) actor per this many rows. Starting an actor costs
4-6 CPU-seconds (a Ray worker, torch, transformers, the model); on a 2-core machine two actors
starting together take ~8 s where one takes ~5, and 512 rows is about what one actor of a small
model does in its start-up time. Big jobs are not affected."""


def _cap_for_rows(actors: int, rows: int | None) -> int:
    return actors if rows is None else max(1, min(actors, math.ceil(rows / ROWS_PER_ACTOR)))


def write_actor_count(cpus: float) -> int:
    """Writers: one per 64 CPUs. Writing a 2048-row file takes milliseconds, but the writer must be
    a long-lived actor: as a task, each write between long gaps runs in a fresh worker process
    (Ray kills idle workers beyond one per CPU after a second), and starting one costs about a
    second of CPU, 17% of a 2-core machine in the job benchmark."""
    return max(1, math.ceil(cpus / 64))


CPU_COMMIT_BATCHES = 8
"""On the CPU, SAM runs commit every this many SAM batches."""


def commit_rows(rows_per_file: int, device: str, encode_batch: int, sam_batch: int | None) -> int:
    """Rows per committed part (the write stage's batch), at most ``output.rows_per_file``.

    On an accelerator, ``rows_per_file``: 2048 rows take about a second there. On the CPU, one
    encoder batch (or ``CPU_COMMIT_BATCHES`` SAM batches when the job runs SAM, seconds per
    image): there 2048 rows of a real model take minutes, and a Ray Data stage cannot commit on
    a timer (it gets whole batches and no end-of-stream call), so a run stopped or killed would
    lose them; a commit per batch keeps the work done within seconds of each batch.
    """
    if device != "cpu":
        return rows_per_file
    model_batch = encode_batch if sam_batch is None else CPU_COMMIT_BATCHES * sam_batch
    return max(1, min(rows_per_file, model_batch))


def plan_resources(
    compute: ComputeConfig,
    cluster: dict[str, float],
    models: int = 1,
    model_bytes: int = 0,
    fusable: bool = True,
    rows: int | None = None,
) -> StagePlan:
    """Splits the cluster between decode and encode actors.

    CPU-only: each encoder reserves one CPU and runs torch with that many threads; decode actors
    (single-threaded PIL + libjpeg-turbo) share the rest with fractional reservations, leaving a
    slice for the read and write tasks so they are never starved (Ray 2.60 hangs otherwise:
    FIELD-NOTES). With GPUs: one GPU and one CPU per encoder, every other CPU decodes. ``rows``
    (the rows to do, when known) caps the decode actors of small jobs (``ROWS_PER_ACTOR``) unless
    ``compute.decode_actors`` sets them.
    """
    cpus = float(cluster.get("CPU", 1.0))
    gpus = float(cluster.get("GPU", 0.0))
    use_gpu = compute.num_gpus > 0 or (compute.num_gpus < 0 and gpus >= 1)
    # fusable: one embedding model and no SAM (the fused actor decodes for one model)
    fusable = fusable and models == 1
    if fusable and (compute.fuse == "on" or (compute.fuse == "auto" and not use_gpu)):
        memory = float(cluster.get("memory", 0.0))
        return _fused_plan(compute, cpus, gpus if use_gpu else 0.0, memory, model_bytes, rows)
    encode_gpus = (compute.num_gpus if compute.num_gpus > 0 else 1.0) if use_gpu else 0.0
    if use_gpu and models > 1 and compute.num_gpus <= 0:
        encode_gpus /= models  # both models' actors share each GPU
    encode_actors = compute.encode_actors
    if use_gpu and gpus:
        encode_actors = max(1, min(encode_actors, int(gpus // (encode_gpus * models))))
    io_cpus = 0.1
    model_actors = models * encode_actors
    encode_cpus = 1.0 if use_gpu else min(1.0, max(0.25, cpus / 4))
    # encoders never reserve more than half the CPUs: the rest decodes (and reads and writes)
    encode_cpus = _floor(min(encode_cpus, max(cpus / 2 - io_cpus, 0.1) / model_actors))
    writers = write_actor_count(cpus)
    left = max(cpus - model_actors * encode_cpus - (1 + writers) * io_cpus, 0.25)
    decode_actors = compute.decode_actors or _cap_for_rows(max(1, math.ceil(left - 0.05)), rows)
    decode_cpus = _floor(max(min(left / decode_actors, 1.0), 0.05))
    threads = compute.torch_threads or (2 if use_gpu else max(1, int(round(encode_cpus))))
    return StagePlan(
        decode_actors=decode_actors,
        decode_cpus=decode_cpus,
        encode_actors=encode_actors,
        encode_cpus=encode_cpus,
        encode_gpus=encode_gpus,
        encode_threads=threads,
        device="cuda" if use_gpu else "cpu",
        io_cpus=io_cpus,
        write_actors=writers,
    )


def _fused_plan(
    compute: ComputeConfig,
    cpus: float,
    gpus: float,
    memory: float,
    model_bytes: int,
    rows: int | None = None,
) -> StagePlan:
    """One decode+encode actor per CPU (``decode_actors`` overrides), single-threaded torch,
    a slice left for the read and write tasks. Each actor holds a copy of the model: when copies
    for every CPU (x2 for activations) would pass half the cluster's memory, fewer actors run
    with more torch threads each. With GPUs (``fuse: on``), at most as many actors as GPUs."""
    io_cpus = 0.1
    writers = write_actor_count(cpus)
    left = max(cpus - (1 + writers) * io_cpus, 0.25)
    actors = compute.decode_actors or max(1, math.ceil(left - 0.05))
    if not compute.decode_actors and memory > 0 and model_bytes > 0:
        actors = max(1, min(actors, int(0.5 * memory // (2 * model_bytes))))
    if not compute.decode_actors:
        actors = _cap_for_rows(actors, rows)
    encode_gpus = (compute.num_gpus if compute.num_gpus > 0 else 1.0) if gpus else 0.0
    if encode_gpus:
        actors = max(1, min(actors, int(gpus // encode_gpus)))
    per_actor = _floor(max(left / actors, 0.05))
    return StagePlan(
        decode_actors=actors,
        decode_cpus=per_actor,
        encode_actors=0,  # the decode actors encode
        encode_cpus=0.0,
        encode_gpus=encode_gpus,
        encode_threads=compute.torch_threads or (2 if gpus else max(1, round(per_actor))),
        device="cuda" if gpus else "cpu",
        io_cpus=io_cpus,
        write_actors=writers,
        fused=True,
    )


def actor_stage(actors: int, cpus: float, gpus: float = 0.0) -> dict[str, Any]:
    """Keyword arguments of ``map_batches`` for a fixed-size actor pool."""
    import ray.data

    kwargs: dict[str, Any] = {
        "compute": ray.data.ActorPoolStrategy(min_size=actors, max_size=actors),
        "num_cpus": cpus,
    }
    if gpus:
        kwargs["num_gpus"] = gpus
    return kwargs


def task_stage(cpus: float) -> dict[str, Any]:
    """Keyword arguments of ``map_batches`` for stateless tasks."""
    return {"num_cpus": cpus}
