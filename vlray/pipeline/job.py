"""The embedding job: plan -> Ray Data graph -> committed outputs -> FAISS index -> summary."""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vlray.config import ConfigError, JobConfig, ModelConfig, OutputConfig, SamConfig, to_dict
from vlray.families import Checkpoint, CheckpointError, family_for, resolve_checkpoint
from vlray.families.base import Capability, Family
from vlray.index.update import build_output_index, index_manifest_fields
from vlray.pipeline.files import ReadStage, WriteStage
from vlray.pipeline.progress import Progress
from vlray.pipeline.regions_stage import RegionStage
from vlray.pipeline.resources import (
    StagePlan,
    actor_stage,
    commit_rows,
    plan_resources,
    task_stage,
)
from vlray.pipeline.sources import InputPlan, plan_input
from vlray.pipeline.stages import DecodeEncodeStage, DecodeStage, EncodeStage, MaskStage
from vlray.pipeline.state import LockLost, RunFailed, RunLock
from vlray.pipeline.stop import RunStopped, StopRequested, StopSignals, hold_stops, signal_name
from vlray.region_index import build_region_index
from vlray.schema import STAGES
from vlray.storage import (
    Location,
    list_files,
    locate,
    write_bytes_atomic,
    write_parquet_atomic,
)

logger = logging.getLogger(__name__)


def ensure_ray(config: JobConfig, quiet: bool = False) -> bool:
    """Connects to ``RAY_ADDRESS`` when set, else starts a local Ray for this run. True when
    this call did (False: Ray was already initialized by the caller). ``quiet``: Ray's own
    INFO lines off (warnings and errors still show)."""
    import ray

    if ray.is_initialized():
        return False
    level = logging.WARNING if quiet else logging.INFO
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True, logging_level=level)
        return True
    kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": level}
    if config.compute.num_cpus:
        kwargs["num_cpus"] = config.compute.num_cpus
    ray.init(**kwargs)
    return True


def build_dataset(
    config: JobConfig,
    plan: InputPlan | None,
    checkpoint: Checkpoint | None,
    output: Location | None,
    stages: StagePlan,
    dim: int,
    sam_checkpoint: Checkpoint | None = None,
    rows: Any = None,
) -> Any:
    """The Ray Data graph: read tasks -> decode actors -> encode actors -> [SAM actors] -> write.

    ``checkpoint`` is the embedding model (None for masks only); ``sam_checkpoint`` adds masks in
    the same pass: each image is read and decoded once and resized for each model. ``rows`` (a
    Dataset of read rows, ``vlray.embed``) replaces the plan's read tasks; with ``output`` None
    the encoded rows are returned unwritten.
    """
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = True
    ds = rows if rows is not None else _read(config, plan, stages, sam_checkpoint is not None)
    if stages.fused:  # plan_resources fuses only one embedding model without SAM
        ds = ds.map_batches(
            DecodeEncodeStage,
            fn_constructor_kwargs={**_encode_args(config, checkpoint, stages), **_decoding(config)},
            batch_size=config.compute.encode_batch_size,
            batch_format="pyarrow",
            zero_copy_batch=True,
            **actor_stage(stages.decode_actors, stages.decode_cpus, stages.encode_gpus),
        )
        return _write(ds, config, output, stages, dim, None)
    regions = config.regions.enabled and checkpoint is not None and sam_checkpoint is not None
    ds = ds.map_batches(
        DecodeStage,
        fn_constructor_kwargs={
            "checkpoint": checkpoint,
            "sam_checkpoint": sam_checkpoint,
            **_decoding(config),
            "frames": regions,
        },
        batch_size=config.compute.decode_batch_size,
        batch_format="pyarrow",
        zero_copy_batch=True,
        **actor_stage(stages.decode_actors, stages.decode_cpus),
    )
    if checkpoint is not None:
        ds = _encode(ds, config, checkpoint, stages)
    if sam_checkpoint is not None:
        ds = _model_stage(ds, MaskStage, sam_checkpoint, config.sam, config, stages)
    if regions:
        ds = _model_stage(ds, RegionStage, checkpoint, config.regions, config, stages)
    sam_batch = config.sam.batch_size if sam_checkpoint is not None else None
    return _write(ds, config, output, stages, dim, sam_batch)


def _decoding(config: JobConfig) -> dict[str, Any]:
    """The decode actors' input settings (fused or not)."""
    return {
        "max_pixels": config.input.max_pixels,
        "s3": config.s3,
        "decode": config.input.decode,
        "thumbnails": config.output.thumbnails,
        "max_bytes": config.input.max_bytes,
    }


def _model_stage(
    ds: Any,
    stage: type,
    checkpoint: Checkpoint,
    settings: Any,
    config: JobConfig,
    stages: StagePlan,
) -> Any:
    """A model stage after the encoder (SAM masks, regions): on the encoders' actor pool and
    device, in SAM-sized batches (``sam.batch_size``), its section's ``settings``."""
    return ds.map_batches(
        stage,
        fn_constructor_kwargs={
            "checkpoint": checkpoint,
            "device": stages.device,
            "dtype": config.model.dtype,
            "settings": settings,
            "threads": stages.encode_threads,
        },
        batch_size=config.sam.batch_size,
        batch_format="numpy",
        **actor_stage(stages.encode_actors, stages.encode_cpus, stages.encode_gpus),
    )


def _read(config: JobConfig, plan: Any, stages: StagePlan, prompts: bool) -> Any:
    import ray.data

    items = [{"task": asdict(t)} for t in plan.tasks]
    ds = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
    return ds.map_batches(
        ReadStage(plan.root, config.input, _prompt_columns(config) if prompts else ()),
        batch_size=1,
        batch_format="numpy",
        **task_stage(stages.io_cpus),
    )


def _write(
    ds: Any,
    config: JobConfig,
    output: Location | None,
    stages: StagePlan,
    dim: int,
    sam_batch: int | None,
) -> Any:
    if output is None:  # vlray.embed: the caller's dataset, not files
        return ds
    rows = commit_rows(
        config.output.rows_per_file, stages.device, config.compute.encode_batch_size, sam_batch
    )
    return ds.map_batches(
        WriteStage,
        fn_constructor_kwargs={"output": output, "dim": dim, "dtype": config.output.dtype},
        batch_size=rows,
        batch_format="numpy",
        **actor_stage(stages.write_actors, stages.io_cpus),
    )


def _prompt_columns(config: JobConfig) -> tuple[str, ...]:
    return (config.sam.points_column, config.sam.labels_column, config.sam.boxes_column)


def _encode_args(config: JobConfig, checkpoint: Checkpoint | None, stages: StagePlan) -> dict:
    """Constructor arguments of the embedding encoder (``EncodeStage``, and the fused stage)."""
    return {
        "checkpoint": checkpoint,
        "device": stages.device,
        "dtype": config.model.dtype,
        "max_group_size": config.compute.max_group_size,
        "threads": stages.encode_threads,
        "store_tokens": config.model.store_tokens,
    }


def _encode(ds: Any, config: JobConfig, checkpoint: Checkpoint, stages: StagePlan) -> Any:
    return ds.map_batches(
        EncodeStage,
        fn_constructor_kwargs=_encode_args(config, checkpoint, stages),
        batch_size=config.compute.encode_batch_size,
        batch_format="numpy",
        **actor_stage(stages.encode_actors, stages.encode_cpus, stages.encode_gpus),
    )


def _resolve(section: ModelConfig | SamConfig) -> Checkpoint:
    """The checkpoint of a model section: with random weights and an ``arch``, the preset."""
    random_arch = section.weights == "random" and section.arch
    return resolve_checkpoint(
        section.arch if random_arch else section.name,
        weights=section.weights,
        processor_overrides=section.processor,
        seed=section.seed,
    )


def resolve_sam(config: JobConfig) -> Checkpoint:
    """The SAM checkpoint of ``sam`` (a second model in the same pass)."""
    return _resolve(config.sam)


def resolve_model(config: JobConfig) -> Checkpoint:
    """The checkpoint of ``model``."""
    return _resolve(config.model)


STAT_KEYS = (
    "rows",
    "embedded",
    "segmented",
    "masks",
    "regions",
    "regions_skipped",
    "thumbnails",
    "errors",
    "undone",
    "systemic",
    "groups",
    "batches",
    "decode_s",
    "encode_s",
    "mask_s",
    "region_s",
    "write_s",
    *(f"errors_{stage}" for stage in STAGES),
)


OUTPUT_FOLDERS = {
    "embeddings": "embedded",
    "segmented": "segmented",
    "masks": "masks",
    "regions": "regions",
    "thumbnails": "thumbnails",
    "errors": "errors",
}
"""Output folder -> the writers' count that says this run wrote into it."""


def written_folders(totals: dict[str, float], index: bool, tokens: bool = False) -> list[str]:
    """The output folders this run wrote files into (``index`` when it built or updated it,
    ``tokens`` with ``model.store_tokens``)."""
    folders = [name for name, key in OUTPUT_FOLDERS.items() if totals.get(key)]
    if tokens and totals.get("embedded"):
        folders.append("tokens")
    return folders + (["index"] if index else [])


def _build_indexes(
    config: JobConfig,
    checkpoint: Checkpoint,
    family_name: str,
    output: Location,
    dim: int,
    embedded: int,
    new_files: list[str],
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(image index manifest, region index manifest or None): index/ brought up to date with
    this run's committed files, then index/regions/ when the job embeds regions."""
    index_manifest = build_output_index(
        config, checkpoint, family_name, output, dim, embedded, new_files
    )
    if not config.regions.enabled:
        return index_manifest, None
    region_manifest = build_region_index(
        output,
        dim,
        int(config.index.memory_budget_gb * (1 << 30)),
        index_manifest_fields(config, checkpoint, family_name),
        new_files,
    )
    return index_manifest, region_manifest


def _throughput(
    rows: int, embedded: int, totals: dict[str, float], job_seconds: float
) -> dict[str, Any]:
    """The summary's speed fields: job time, images/s, per-stage busy time, encoder buckets."""
    stages = ("decode", "encode", "mask", "write")
    groups, batches = totals.get("groups", 0.0), totals.get("batches", 0.0)
    return {
        "job_seconds": round(job_seconds, 3),
        "images_per_second": round(rows / job_seconds, 2) if job_seconds else 0.0,
        "stage_busy_seconds": {k: round(totals.get(f"{k}_s", 0.0), 3) for k in stages},
        "per_stage_images_per_busy_second": {
            k: round(rows / totals[f"{k}_s"], 1) if totals.get(f"{k}_s") else None for k in stages
        },
        "buckets": {
            "groups": round(groups),
            "encoder_batches": round(batches),
            "groups_per_batch": round(groups / batches, 3) if batches else 0.0,
            "mean_group_size": round(embedded / groups, 2) if groups else 0.0,
        },
    }


def can_embed_text(family: Family) -> bool:
    """Whether the checkpoint answers text queries (the families' capability contract)."""
    return bool(family.supports(Capability.TEXT_EMBEDDINGS))


def _budget_failure(totals: dict[str, float], output: OutputConfig) -> str:
    """Why the run must stop now (empty: go on): a systemic failure, or the error budget spent."""
    rows, errors = totals.get("rows", 0.0), totals.get("errors", 0.0)
    if rows >= output.error_budget_min_rows and errors > output.max_error_fraction * rows:
        return (
            f"error budget exceeded: {int(errors)} of the first {int(rows)} rows failed "
            f"(output.max_error_fraction {output.max_error_fraction})"
        )
    return ""


def drive(
    ds: Any, output: OutputConfig, lock: RunLock | None = None, progress: Progress | None = None
) -> tuple[dict[str, float], list[str], str]:
    """Consumes the write stage's per-file counts; stops at the first systemic failure or once
    the error budget is spent. Returns (totals, committed file names, failure reason or "").
    ``progress`` is told every committed batch.

    Raises:
        LockLost: ``lock`` was taken over by another run (checked after each file).
    """
    totals: dict[str, float] = {}
    new_files: list[str] = []
    stream = iter(ds.iter_batches(batch_size=None, batch_format="numpy"))
    try:
        for batch in stream:
            for key in STAT_KEYS:
                totals[key] = totals.get(key, 0.0) + float(batch[key].sum())
            new_files += [str(name) for name in batch["file"] if name]
            if progress is not None:
                progress.add(int(batch["rows"].sum()), int(batch["errors"].sum()))
            if lock is not None and lock.lost:
                raise lock.lost
            systemic = [str(t) for t in batch["systemic_error"] if t]
            if systemic:
                return totals, new_files, f"systemic failure: {systemic[0]}"
            reason = _budget_failure(totals, output)
            if reason:
                return totals, new_files, reason
    finally:
        _close(stream)  # stop consuming now: the executor shuts its operators down
    return totals, new_files, ""


def _close(stream: Any) -> None:
    close = getattr(stream, "close", None)
    if close is not None:
        try:
            close()
        except Exception as exc:  # a stream that fails to close must not hide why we stopped
            logger.debug("closing the Ray Data stream: %s", exc)


def _read_ids(location: Location) -> list[str] | None:
    try:
        with location.fs.open_input_file(location.path) as f:
            return pq.read_table(f, columns=["id"]).column("id").to_pylist()
    except (FileNotFoundError, OSError):
        return None


def _drop_retried_errors(output: Location, old_error_files: list[str], new_files: list[str]) -> int:
    """Removes from earlier errors/ files the ids this run processed again (``--retry-errors``).

    Decided by content, not by name: an id done this run leaves every earlier errors file; an id
    that failed again leaves every errors file but the one this run wrote (which may share its
    name with an earlier one, when the batch holds the same ids).
    """
    from vlray.pipeline.state import hash_ids, is_done

    if not old_error_files or not new_files:
        return 0
    done: list[np.ndarray] = []
    failed: list[np.ndarray] = []
    for name in set(new_files):
        for folder, into in (("embeddings", done), ("segmented", done), ("errors", failed)):
            ids = _read_ids(output.join(folder, name))
            if ids:
                into.append(hash_ids(ids))
    done_hashes = np.unique(np.concatenate(done)) if done else np.empty(0, dtype="S16")
    failed_hashes = np.unique(np.concatenate(failed + done)) if failed or done else done_hashes
    removed = 0
    for path in old_error_files:
        with output.fs.open_input_file(path) as f:
            table = pq.read_table(f)
        drop = failed_hashes if os.path.basename(path) not in new_files else done_hashes
        keep = ~is_done(hash_ids(table.column("id").to_pylist()), drop)
        if keep.all():
            continue
        removed += int((~keep).sum())
        if keep.any():
            write_parquet_atomic(Location(output.fs, path, path), table.filter(pa.array(keep)))
        else:
            output.fs.delete_file(path)
    return removed


def committed_rows(output: Location, folder: str, names: list[str]) -> int:
    """Rows in ``output/folder/NAME`` over the distinct ``names`` (missing files count 0)."""
    total = 0
    for name in set(names):
        location = output.join(folder, name)
        try:
            with location.fs.open_input_file(location.path) as f:
                total += pq.ParquetFile(f).metadata.num_rows
        except (FileNotFoundError, OSError):
            continue
    return total


def _check_storage(config: JobConfig) -> None:
    """Fails in seconds, before Ray starts, when an ``s3://`` input or output cannot be reached."""
    from vlray.pipeline.sources import InputError
    from vlray.storage import StorageError, check_reachable

    for uri in (config.input.uri, config.output.uri):
        if uri.startswith("s3://"):
            try:
                check_reachable(locate(uri, config.s3), config.s3)
            except StorageError as exc:
                raise InputError(str(exc)) from None


class _Stopping:
    """Inside the run lock: turns a stop signal into RunStopped after shutting down the Ray this
    run started, counting what its writers committed and writing a short ``_summary.json``;
    on a lost lock shuts Ray down and writes nothing."""

    def __init__(self, output: Location, folders: tuple[str, ...]) -> None:
        self.output, self.folders = output, folders
        self.ray_started = False
        self.before: set[str] = set()

    def _files(self) -> set[str]:
        return {p for f in self.folders for p in list_files(self.output.join(f), (".parquet",))}

    def __enter__(self) -> _Stopping:
        self.before = self._files()
        return self

    def __exit__(self, kind: type | None, exc: BaseException | None, tb: object) -> None:
        if not isinstance(exc, (StopRequested, LockLost)):
            return
        if self.ray_started:
            import ray

            ray.shutdown()
        if isinstance(exc, StopRequested):
            with hold_stops():
                rows = self._committed()
                stopped = RunStopped(exc.signum, rows)
                self._write_summary(stopped)
            raise stopped from None

    def _committed(self) -> int:
        total = 0
        for path in sorted(self._files() - self.before):
            with self.output.fs.open_input_file(path) as f:
                total += pq.ParquetFile(f).metadata.num_rows
        return total

    def _write_summary(self, stopped: RunStopped) -> None:
        summary = {
            "failed": str(stopped),
            "stopped": signal_name(stopped.signum),
            "rows_committed": stopped.rows,
            "accounted": False,
            "output": self.output.uri,
        }
        write_bytes_atomic(
            self.output.join("_summary.json"), json.dumps(summary, indent=2).encode()
        )


def run_job(
    config: JobConfig, progress: Progress | None = None, quiet: bool = False
) -> dict[str, Any]:
    """Runs the whole job and returns the summary (also written to ``_summary.json``).

    Incremental: rows whose id is already in ``embeddings/`` (or ``errors/``, unless
    ``retry_errors``) are left out; the index is then brought up to date with all rows.
    SIGINT / SIGTERM stop it cleanly (in the main thread): committed work stays, the lock is
    released. ``progress`` shows the rows as they are committed; ``quiet`` turns Ray's own
    progress and INFO lines off.

    Raises:
        OutputLocked: another run is using the same output.
        LockLost: another run took the output over while this one ran.
        RunFailed: the run ended without doing all its work (see its summary).
        RunStopped: stopped by a signal.
    """
    with StopSignals() as stops:
        try:
            return _run_job(config, stops, progress, quiet)
        except StopRequested as stop:  # before the output was touched
            raise RunStopped(stop.signum, 0) from None


def _resolve_models(config: JobConfig) -> tuple[Checkpoint | None, Checkpoint | None, Any]:
    """(embedding checkpoint or None, SAM checkpoint or None, the main model's family), with
    the settings that need a kind of model checked before anything runs."""
    checkpoint: Checkpoint | None = resolve_model(config)
    family = family_for(checkpoint)
    sam_checkpoint = None
    if not family.produces_embeddings:  # the main model is SAM: masks only
        sam_checkpoint, checkpoint = checkpoint, None
    elif config.sam.name:
        sam_checkpoint = resolve_sam(config)
        if family_for(sam_checkpoint).produces_embeddings:
            raise CheckpointError(f"sam.name {config.sam.name!r} is not a SAM checkpoint")
    if config.model.store_tokens and (
        checkpoint is None or not family.supports(Capability.TOKEN_MATRICES)
    ):
        raise CheckpointError(f"model.store_tokens: {family.name} models have no token matrix")
    if config.regions.enabled and (checkpoint is None or sam_checkpoint is None):
        raise CheckpointError("regions.enabled: needs an embedding model and sam.name (SAM)")
    return checkpoint, sam_checkpoint, family


def _plan_stages(
    config: JobConfig, plan: Any, checkpoint: Checkpoint | None, sam: Checkpoint | None
) -> StagePlan:
    """The Ray resources of each stage on this cluster (``input.decode: gpu`` checked here)."""
    import ray

    models = (checkpoint is not None) + (sam is not None)
    models += bool(config.regions.enabled and checkpoint and sam)
    stages = plan_resources(
        config.compute,
        ray.cluster_resources(),
        models,
        checkpoint.vision_bytes() if checkpoint else 0,
        fusable=checkpoint is not None and sam is None,
        rows=plan.rows,
    )
    if config.input.decode == "gpu" and (stages.device != "cuda" or sam):
        why = (
            "not with SAM masks"
            if sam
            else "this Ray cluster has no GPU for the encoder (compute.num_gpus)"
        )
        raise ConfigError(
            [
                "input.decode: gpu decodes JPEGs on the embedding model's GPU: "
                f"{why}; use input.decode exact or draft"
            ]
        )
    return stages


def _execute(
    config: JobConfig,
    plan: Any,
    models: tuple[Checkpoint | None, Checkpoint | None, int],
    run: tuple[Location, RunLock, Any, StopSignals],
    progress: Progress | None,
    quiet: bool,
) -> tuple[dict[str, float], list[str], str, StagePlan | None]:
    """Runs the Ray pipeline over the plan: (writer totals, committed files, failure, stages)."""
    import ray

    checkpoint, sam_checkpoint, dim = models
    output, lock, stopping, stops = run
    if not plan.tasks:
        return {}, [], "", None
    stopping.ray_started = not ray.is_initialized()  # set first: a stop may cut ray.init
    ensure_ray(config, quiet)
    stops.install()  # again: ray.init sets its own SIGTERM handler
    stages = _plan_stages(config, plan, checkpoint, sam_checkpoint)
    ds = build_dataset(config, plan, checkpoint, output, stages, dim, sam_checkpoint)
    ds.context.enable_progress_bars = not quiet
    if progress is not None:
        progress.begin(plan.rows)
    try:
        totals, new_files, failure = drive(ds, config.output, lock, progress)
    finally:
        if progress is not None:
            progress.end()
    return totals, new_files, failure, stages


def _accounting_failure(
    plan: Any, totals: dict[str, float], committed: tuple[int, int], done_rows: int
) -> tuple[str, bool]:
    """(why the run failed or "", whether the index may still be updated) from the writers'
    totals and the committed files' row counts."""
    errors, undone = int(totals.get("errors", 0)), int(totals.get("undone", 0))
    if committed != (done_rows, errors):
        return (
            f"accounting mismatch: the writers reported {done_rows} done + {errors} errors, "
            f"the committed files hold {committed[0]} + {committed[1]}"
        ), False
    if undone:  # rows left undone still leave a useful index of the rest
        return (
            f"{undone} rows left undone by transient failures (network or service errors "
            "that outlasted the retries); the next run retries them"
        ), True
    if plan.rows != done_rows + errors:
        return f"accounting mismatch: {plan.rows} rows in, {done_rows + errors} out", True
    return "", True


def _account(
    plan: Any, totals: dict[str, float], output: Location, done_folder: str, new_files: list[str]
) -> tuple[str, bool, bool]:
    """(why the run failed or "", whether the index may be updated, whether the committed
    files hold what the writers reported): the writers' totals against the files this run
    committed, read back."""
    done_rows = int(totals.get("embedded" if done_folder == "embeddings" else "segmented", 0))
    committed = (
        committed_rows(output, done_folder, new_files),
        committed_rows(output, "errors", new_files),
    )
    failure, index_ok = _accounting_failure(plan, totals, committed, done_rows)
    return failure, index_ok, committed == (done_rows, int(totals.get("errors", 0)))


def _previous_runs(config: JobConfig, output: Location, done_folder: str) -> tuple[Any, list[str]]:
    """What earlier runs left (under the lock): their partial files removed, the ids they
    finished, and (``--retry-errors``) the error parts to rewrite once their rows are redone."""
    from vlray.pipeline.state import done_ids, remove_orphan_parts, remove_stale_temp_files

    removed = remove_stale_temp_files(output) + remove_orphan_parts(output, done_folder)
    if removed:
        logger.warning("removed %d partial files left by an interrupted run", removed)
    done = done_ids(output, include_errors=not config.retry_errors, folder=done_folder)
    old_error_files = (
        list_files(output.join("errors"), (".parquet",)) if config.retry_errors else []
    )
    return done, old_error_files


def _run_job(
    config: JobConfig, stops: StopSignals, progress: Progress | None, quiet: bool
) -> dict[str, Any]:
    started = time.time()
    _check_storage(config)
    checkpoint, sam_checkpoint, family = _resolve_models(config)
    dim = family.embedding_dim if checkpoint else 0
    done_folder = "embeddings" if checkpoint else "segmented"
    output = locate(config.output.uri, config.s3)
    lock = RunLock(output, config.s3, on_lost=stops.interrupt)
    with lock, _Stopping(output, (done_folder, "errors")) as stopping:
        done, old_error_files = _previous_runs(config, output, done_folder)
        plan = plan_input(config.input, config.s3, done)
        logger.info(
            "input: %d rows to do (%d already done) in %d read tasks",
            plan.rows,
            plan.skipped,
            len(plan.tasks),
        )
        totals, new_files, failure, stages = _execute(
            config,
            plan,
            (checkpoint, sam_checkpoint, dim),
            (output, lock, stopping, stops),
            progress,
            quiet,
        )
        job_seconds = time.time() - started
        with hold_stops():  # rewrites several errors/ files: not cut halfway
            retried = _drop_retried_errors(output, old_error_files, new_files)
        found, index_ok, files_match = _account(plan, totals, output, done_folder, new_files)
        index_ok = index_ok and not failure  # a failed pipeline run leaves the index alone
        failure = failure or found
        manifests = (None, None)
        if config.index.enabled and checkpoint is not None and index_ok:
            embedded = int(totals.get("embedded", 0))
            manifests = _build_indexes(
                config, checkpoint, family.name, output, dim, embedded, new_files
            )
        summary = _summary(
            config,
            plan,
            totals,
            (checkpoint, sam_checkpoint, family),
            (output, stages, failure, retried, files_match),
            manifests,
            (time.time() - started, job_seconds),
        )
        write_bytes_atomic(
            output.join("_summary.json"), json.dumps(summary, indent=2, default=str).encode()
        )
    if failure:
        raise RunFailed(failure, summary)
    return summary


def _summary(
    config: JobConfig,
    plan: Any,
    totals: dict[str, float],
    models: tuple[Checkpoint | None, Checkpoint | None, Any],
    run: tuple[Location, StagePlan | None, str, int, bool],
    manifests: tuple[dict[str, Any] | None, dict[str, Any] | None],
    seconds: tuple[float, float],
) -> dict[str, Any]:
    """The run's ``_summary.json``."""
    checkpoint, sam_checkpoint, family = models
    output, stages, failure, retried, files_match = run
    index_manifest, region_manifest = manifests
    wall, job_seconds = seconds
    embedded, errors = int(totals.get("embedded", 0)), int(totals.get("errors", 0))
    segmented, undone = int(totals.get("segmented", 0)), int(totals.get("undone", 0))
    done_rows = embedded if checkpoint else segmented
    main = checkpoint or sam_checkpoint
    return {
        "rows_in": plan.rows,
        "embedded": embedded,
        "segmented": segmented,
        "masks": int(totals.get("masks", 0)),
        "regions": int(totals.get("regions", 0)),
        "regions_skipped": int(totals.get("regions_skipped", 0)),
        "thumbnails": int(totals.get("thumbnails", 0)),
        "errors": errors,
        "skipped_done": plan.skipped,
        "skipped": plan.skipped_files,
        "input_errors": plan.unreadable,
        "errors_retried_and_removed": retried,
        "errors_by_stage": {
            stage: int(totals[f"errors_{stage}"])
            for stage in STAGES
            if totals.get(f"errors_{stage}")
        },
        "undone": undone,
        "failed": failure or None,
        "accounted": plan.rows == done_rows + errors + undone and files_match,
        "wall_seconds": round(wall, 3),
        **_throughput(plan.rows, embedded, totals, job_seconds),
        "device": stages.device if stages else "none (nothing to do)",
        "resources": asdict(stages) if stages else None,
        "model": main.name,
        "family": family.name,
        "weights": "random" if main.random_weights else "pretrained",
        "sam_model": sam_checkpoint.name if sam_checkpoint and checkpoint else None,
        "input": plan.root.uri,
        "output": output.uri,
        "index": index_manifest
        and {k: index_manifest.get(k) for k in ("factory", "count", "dim", "mode")},
        "written": written_folders(totals, index_manifest is not None, config.model.store_tokens),
        "text_queries": checkpoint is not None and can_embed_text(family),
        "region_index": region_manifest
        and {k: region_manifest.get(k) for k in ("factory", "count", "dim", "mode")},
        "config": to_dict(config),
    }
