"""The embedding job: plan -> Ray Data graph -> committed outputs -> FAISS index -> summary."""

from __future__ import annotations

import ast
import json
import logging
import os
import time
from dataclasses import asdict
from typing import Any

import pyarrow.parquet as pq

from vlray.config import JobConfig, to_dict
from vlray.families import Checkpoint, family_for, resolve_checkpoint
from vlray.pipeline.resources import StagePlan, actor_stage, plan_resources, task_stage
from vlray.pipeline.sources import InputPlan, plan_input
from vlray.pipeline.stages import DecodeStage, EncodeStage, ReadStage, WriteStage
from vlray.storage import Location, list_files, locate, write_bytes_atomic

logger = logging.getLogger(__name__)


def ensure_ray(config: JobConfig) -> None:
    """Connects to ``RAY_ADDRESS`` when set, else starts a local Ray for this run."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
        return
    kwargs: dict[str, Any] = {"include_dashboard": False}
    if config.compute.num_cpus:
        kwargs["num_cpus"] = config.compute.num_cpus
    ray.init(**kwargs)


def _embedding_dim(checkpoint: Checkpoint) -> int:
    vision = checkpoint.config.get("vision_config", {})
    return int(vision.get("hidden_size", checkpoint.config.get("hidden_size", 0)))


def build_dataset(
    config: JobConfig,
    plan: InputPlan,
    checkpoint: Checkpoint,
    output: Location,
    stages: StagePlan,
    dim: int,
) -> Any:
    """The Ray Data graph: read tasks -> decode actors -> encode actors -> write tasks."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = True
    items = [{"task": asdict(t)} for t in plan.tasks]
    ds = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
    ds = ds.map_batches(
        ReadStage(plan.root, config.input),
        batch_size=1,
        batch_format="numpy",
        **task_stage(stages.io_cpus),
    )
    ds = ds.map_batches(
        DecodeStage,
        fn_constructor_kwargs={
            "checkpoint": checkpoint,
            "max_pixels": config.input.max_pixels,
            "s3": config.s3,
        },
        batch_size=config.compute.decode_batch_size,
        batch_format="pyarrow",
        zero_copy_batch=True,
        **actor_stage(stages.decode_actors, stages.decode_cpus),
    )
    ds = ds.map_batches(
        EncodeStage,
        fn_constructor_kwargs={
            "checkpoint": checkpoint,
            "device": stages.device,
            "dtype": config.model.dtype,
            "max_group_size": config.compute.max_group_size,
            "threads": stages.encode_threads,
        },
        batch_size=config.compute.encode_batch_size,
        batch_format="numpy",
        **actor_stage(stages.encode_actors, stages.encode_cpus, stages.encode_gpus),
    )
    ds = ds.map_batches(
        WriteStage(output, dim, config.output.dtype),
        batch_size=config.output.rows_per_file,
        batch_format="numpy",
        **task_stage(stages.io_cpus),
    )
    return ds


def iter_embeddings(output: Location, batch_rows: int = 65536) -> Any:
    """A callable yielding (ids, vectors float32 (n, d)) from every committed embeddings file."""
    import numpy as np

    def batches() -> Any:
        for path in list_files(output.join("embeddings"), (".parquet",)):
            with output.fs.open_input_file(path) as f:
                for batch in pq.ParquetFile(f).iter_batches(batch_size=batch_rows):
                    emb = batch.column("embedding")
                    dim = emb.type.list_size
                    values = emb.values.to_numpy(zero_copy_only=False).astype(
                        np.float32, copy=False
                    )
                    yield batch.column("id").to_pylist(), values.reshape(-1, dim)

    return batches


def count_rows(output: Location, folder: str) -> int:
    """Rows in the committed Parquet files of ``output/folder``."""
    total = 0
    for path in list_files(output.join(folder), (".parquet",)):
        with output.fs.open_input_file(path) as f:
            total += pq.ParquetFile(f).metadata.num_rows
    return total


def build_output_index(
    config: JobConfig, checkpoint: Checkpoint, family_name: str, output: Location, dim: int
) -> dict[str, Any]:
    """Builds index/ from every committed embedding (streamed), staging locally for S3."""
    import shutil
    import tempfile

    from vlray.index import build_index

    count = count_rows(output, "embeddings")
    manifest = {
        "model": checkpoint.name,
        "model_path": checkpoint.path,
        "family": family_name,
        "weights": "random" if checkpoint.random_weights else "pretrained",
        "seed": checkpoint.seed,
        "processor": checkpoint.processor,
        "output_dtype": config.output.dtype,
    }
    index_loc = output.join("index")
    staging = index_loc.path if index_loc.is_local else tempfile.mkdtemp(prefix="vlray-index-")
    result = build_index(
        iter_embeddings(output),
        staging,
        dim=dim,
        count=count,
        factory=config.index.factory or None,
        memory_budget_bytes=int(config.index.memory_budget_gb * (1 << 30)),
        manifest=manifest,
    )
    if not index_loc.is_local:
        for name in ("index.faiss", "ids.parquet", "manifest.json"):
            with open(os.path.join(staging, name), "rb") as f:
                write_bytes_atomic(index_loc.join(name), f.read())
        shutil.rmtree(staging, ignore_errors=True)
    return result


def resolve_model(config: JobConfig) -> Checkpoint:
    """The checkpoint of ``model``: with random weights and an ``arch``, the architecture preset."""
    random_arch = config.model.weights == "random" and config.model.arch
    return resolve_checkpoint(
        config.model.arch if random_arch else config.model.name,
        weights=config.model.weights,
        processor_overrides=config.model.processor,
        seed=config.model.seed,
    )


def run_job(config: JobConfig) -> dict[str, Any]:
    """Runs the whole job and returns the summary (also written to ``_summary.json``)."""
    import ray

    started = time.time()
    checkpoint = resolve_model(config)
    family = family_for(checkpoint)
    dim = _embedding_dim(checkpoint)
    output = locate(config.output.uri, config.s3)
    plan = plan_input(config.input, config.s3)
    ensure_ray(config)
    stages = plan_resources(config.compute, ray.cluster_resources())
    logger.info("input: %d rows in %d read tasks; stages: %s", plan.rows, len(plan.tasks), stages)
    ds = build_dataset(config, plan, checkpoint, output, stages, dim)

    totals: dict[str, float] = {}
    stage_counts: dict[str, int] = {}
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for key in (
            "rows",
            "embedded",
            "errors",
            "groups",
            "batches",
            "decode_s",
            "encode_s",
            "write_s",
        ):
            totals[key] = totals.get(key, 0.0) + float(batch[key].sum())
        for text in batch["stage_counts"]:
            for stage, n in ast.literal_eval(str(text)).items():
                stage_counts[stage] = stage_counts.get(stage, 0) + n
    job_seconds = time.time() - started

    index_manifest: dict[str, Any] | None = None
    if config.index.enabled:
        index_manifest = build_output_index(config, checkpoint, family.name, output, dim)
    wall = time.time() - started
    embedded, errors = int(totals.get("embedded", 0)), int(totals.get("errors", 0))
    groups, batches = totals.get("groups", 0.0), totals.get("batches", 0.0)
    summary = {
        "rows_in": plan.rows,
        "embedded": embedded,
        "masks": 0,
        "errors": errors,
        "errors_by_stage": stage_counts,
        "accounted": plan.rows == embedded + errors,
        "wall_seconds": round(wall, 3),
        "job_seconds": round(job_seconds, 3),
        "images_per_second": round(plan.rows / job_seconds, 2) if job_seconds else 0.0,
        "stage_busy_seconds": {
            k: round(totals.get(f"{k}_s", 0.0), 3) for k in ("decode", "encode", "write")
        },
        "per_stage_images_per_busy_second": {
            k: round(plan.rows / totals[f"{k}_s"], 1) if totals.get(f"{k}_s") else None
            for k in ("decode", "encode", "write")
        },
        "buckets": {
            "groups": round(groups),
            "encoder_batches": round(batches),
            "groups_per_batch": round(groups / batches, 3) if batches else 0.0,
            "mean_group_size": round(embedded / groups, 2) if groups else 0.0,
        },
        "device": stages.device,
        "resources": asdict(stages),
        "model": checkpoint.name,
        "family": family.name,
        "weights": "random" if checkpoint.random_weights else "pretrained",
        "input": plan.root.uri,
        "output": output.uri,
        "index": index_manifest and {k: index_manifest.get(k) for k in ("factory", "count", "dim")},
        "config": to_dict(config),
    }
    write_bytes_atomic(
        output.join("_summary.json"), json.dumps(summary, indent=2, default=str).encode()
    )
    if not summary["accounted"]:
        logger.error(
            "row accounting failed: %d in, %d embedded, %d errors", plan.rows, embedded, errors
        )
    return summary
