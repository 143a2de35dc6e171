"""Command-line front ends of ``jobs/embed.py`` and ``jobs/query.py``."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from vlray.config import ConfigError, JobConfig, build_config, parse_assignments

REPO = Path(__file__).resolve().parents[1]


def _embed_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="jobs/embed.py",
        description="Embed images with Ray Data and build a FAISS index. With no flags: the offline demo.",
    )
    p.add_argument("--config", help="YAML preset (configs/*.yaml)")
    p.add_argument(
        "--input", help="Parquet file/folder/glob or image folder (local, file://, s3://)"
    )
    p.add_argument("--output", help="output folder or s3:// prefix")
    p.add_argument("--model", help="hub id, or a local save_pretrained folder")
    p.add_argument("--weights", choices=["pretrained", "random"], help="model weights")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any config key (repeatable)",
    )
    p.add_argument(
        "--demo", action="store_true", help="run the offline demo (default with no flags)"
    )
    p.add_argument(
        "--retry-errors",
        action="store_true",
        help="process again the rows in OUTPUT/errors/ (removed there when they succeed)",
    )
    p.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="also show Ray's own progress and INFO lines and library notices",
    )
    return p


def embed_config(argv: list[str]) -> JobConfig:
    """Parses embed flags into a JobConfig (defaults < YAML < flags); the demo when no flags."""
    args = _embed_parser().parse_args(argv)
    overrides: dict[str, Any] = parse_assignments(args.set)
    demo = args.demo or not argv
    if args.retry_errors:
        overrides["retry_errors"] = True
    if demo and not args.config:
        from vlray.demo import demo_config

        args.config = str(demo_config())
    flat = {
        "input": {"uri": args.input},
        "output": {"uri": args.output},
        "model": {"name": args.model, "weights": args.weights},
    }
    for section, values in flat.items():
        for key, value in values.items():
            if value is not None:
                overrides.setdefault(section, {})[key] = value
    if demo:
        from vlray.demo import prepare_demo

        data, model = prepare_demo()
        overrides["demo"] = True
        overrides.setdefault("input", {}).setdefault("uri", str(data))
        overrides.setdefault("model", {}).setdefault("name", str(model))
    return build_config(args.config, overrides)


def _headline(summary: dict[str, Any], config: JobConfig) -> str:
    status = "vlray embed: FAILED" if summary.get("failed") else "vlray embed: done"
    if config.demo:
        return status + "  [demo: a tiny random-weight model, results are not meaningful]"
    if summary["weights"] == "random":
        return status + "  [random weights: results are not meaningful]"
    return status


def masks_note(summary: dict[str, Any], config: JobConfig) -> str:
    """Why a run that segmented images found no masks (empty when it found some)."""
    if summary.get("masks") or not summary.get("segmented"):
        return ""
    sam = config.sam
    why = (
        f"every candidate mask scored below sam.pred_iou_thresh {sam.pred_iou_thresh} or "
        f"sam.stability_score_thresh {sam.stability_score_thresh}"
    )
    if summary["weights"] == "random":
        why += " (random weights rarely pass them)"
    return (
        why
        + "; lower them, e.g. --set sam.pred_iou_thresh=0.5 --set sam.stability_score_thresh=0.5"
    )


def next_steps(summary: dict[str, Any]) -> list[str]:
    """The commands to try next, suited to what the model can do."""
    if not summary.get("index"):
        return []
    index = f"{summary['output']}/index"
    query = (
        '--text "a photo of a cat"'
        if summary.get("text_queries")
        else "--image PHOTO.jpg   (this model has no text tower: query by image or --id)"
    )
    return [
        f"python jobs/query.py --index {index} {query}",
        f"python jobs/serve.py --index {index}   (search page on http://127.0.0.1:8000/)",
    ]


def print_summary(summary: dict[str, Any], config: JobConfig) -> None:
    """The one-screen summary at the end of a run."""
    out = summary["output"]
    done = summary["embedded"] or summary.get("segmented", 0)
    verb = "embedded" if summary["embedded"] or not summary.get("segmented") else "segmented"
    lines = [
        "",
        _headline(summary, config),
        f"  model      {summary['model']} ({summary['family']}, {summary['weights']} weights) on {summary['device']}",
        f"  input      {summary['input']}",
        f"  rows       {summary['rows_in']} in = {done} {verb} + {summary['errors']} errors"
        + ("" if summary["accounted"] else "   <-- MISMATCH"),
    ]
    if summary.get("undone"):
        lines.append(
            f"  undone     {summary['undone']} rows (transient failures; the next run retries them)"
        )
    if summary.get("skipped_done"):
        lines.append(f"  skipped    {summary['skipped_done']} rows already done by earlier runs")
    if summary.get("segmented") or summary.get("masks"):
        lines.append(f"  masks      {summary['masks']} masks over {summary['segmented']} images")
        note = masks_note(summary, config)
        if note:
            lines.append(f"             {note}")
    if summary["errors"]:
        stages = ", ".join(f"{n} {stage}" for stage, n in summary["errors_by_stage"].items())
        lines.append(f"  errors     {stages}  (one line each in {out}/errors/)")
    b = summary["buckets"]
    lines += [
        f"  speed      {summary['images_per_second']} images/s over {summary['job_seconds']} s (wall {summary['wall_seconds']} s incl. index)",
        f"  buckets    {b['groups_per_batch']} shape groups per encoder batch, mean group size {b['mean_group_size']}",
    ]
    written = [f"{out}/{name}/" for name in summary.get("written", [])]
    lines.append("  written    " + "  ".join([*written, f"{out}/_summary.json"]))
    if summary.get("index"):
        lines.append(
            f"  index      {summary['index']['factory']} over {summary['index']['count']} vectors"
        )
    for i, step in enumerate(next_steps(summary)):
        lines.append(("  try        " if i == 0 else "             ") + step)
    print("\n".join(lines))


def embed_main(argv: list[str] | None = None) -> int:
    """Entry point of ``jobs/embed.py``; returns the process exit code."""
    argv = sys.argv[1:] if argv is None else argv
    verbose = _embed_parser().parse_args(argv).verbose  # --help exits here, before torch loads
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    from vlray.quiet import quiet_stderr

    with quiet_stderr(enabled=not verbose) as terminal:
        return _embed(argv, verbose, terminal)


def _embed(argv: list[str], verbose: bool, terminal: Any) -> int:
    from vlray.families import CheckpointError
    from vlray.pipeline.progress import Progress
    from vlray.pipeline.sources import InputError
    from vlray.pipeline.state import OutputLocked, RunFailed
    from vlray.pipeline.stop import RunStopped, StopRequested, StopSignals
    from vlray.storage import StorageError

    try:
        with StopSignals():  # before Ray starts; run_job puts them back after ray.init
            config = embed_config(argv)
            if config.demo:
                print(
                    f"vlray demo: {config.input.uri} with a tiny RANDOM-weight SigLIP2 model "
                    "(offline)"
                )
            from vlray.pipeline.job import run_job

            progress = Progress(terminal) if terminal is not None else None  # no stderr
            summary = run_job(config, progress, quiet=not verbose)
    except StopRequested as stop:  # before the run began
        exc = RunStopped(stop.signum, 0)
        print(exc, file=sys.stderr)
        return exc.exit_code
    except RunStopped as exc:
        print(exc, file=sys.stderr)
        return exc.exit_code
    except RunFailed as exc:
        if exc.summary:
            print_summary(exc.summary, config)
        print(f"error: the run failed: {exc}", file=sys.stderr)
        return 1
    except OutputLocked as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    except (ConfigError, CheckpointError, InputError, StorageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print_summary(summary, config)
    return 0


def _query_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="jobs/query.py", description="Nearest neighbours in a vlray index."
    )
    p.add_argument("--index", required=True, help="OUT/index folder (local or s3://)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--text", help="text query (SigLIP families)")
    what.add_argument("--image", help="image file path or URI")
    what.add_argument("--id", help="id of an indexed image")
    p.add_argument(
        "--model",
        metavar="PATH_OR_ID",
        help="load the model from here instead of the folder or hub id the index recorded "
        "(it must hold the same weights)",
    )
    p.add_argument("-k", type=int, default=10, help="number of results (default 10)")
    p.add_argument(
        "--regions",
        action="store_true",
        help="search the regions (SAM masks) index: hits carry mask_id and bbox",
    )
    p.add_argument(
        "--per-image",
        type=int,
        default=0,
        metavar="N",
        help="with --regions: at most N regions of one image (default: no limit)",
    )
    p.add_argument(
        "--json", action="store_true", help='print a JSON list of {"id", "score"}, best first'
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="s3.KEY=VALUE",
        help="S3 settings of an s3:// index or image (endpoint_url, region, key, secret, ...)",
    )
    p.add_argument(
        "-v", "--verbose", action="store_true", help="also show library notices and progress bars"
    )
    return p


def query_main(argv: list[str] | None = None) -> int:
    """Entry point of ``jobs/query.py``; returns the process exit code."""
    args = _query_parser().parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from vlray.quiet import quiet_stderr

    with quiet_stderr(enabled=not args.verbose):
        return _query(args)


def _query(args: argparse.Namespace) -> int:
    from vlray.query import QueryError, Searcher

    if args.k < 1 or args.per_image < 0:
        print("error: -k must be >= 1 and --per-image >= 0", file=sys.stderr)
        return 2
    try:
        s3 = build_config(None, {**parse_assignments(args.set), "demo": True}).s3
        if args.regions:
            from vlray.region_query import RegionSearcher

            searcher = RegionSearcher.open(args.index, s3, args.model, args.per_image)
        else:
            searcher = Searcher.open(args.index, s3, args.model)
        if args.text is not None:
            hits = searcher.by_text(args.text, args.k)
        elif args.image is not None:
            hits = searcher.by_image(args.image, args.k)
        else:
            hits = searcher.by_id(args.id, args.k)
    except (QueryError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(hits))
        return 0
    m = searcher.manifest
    print(
        f"index {args.index}: {m.get('count')} vectors, {m.get('factory')}, model {m.get('model')} ({m.get('weights')} weights)"
    )
    print(
        f"loaded in {searcher.load_seconds:.3f} s; query took {searcher.last_query_seconds * 1000:.1f} ms"
    )
    for rank, hit in enumerate(hits, 1):
        extra = f"  p={hit['probability']:.4f}" if "probability" in hit else ""
        where = f"  mask {hit['mask_id']} at {hit['bbox']}" if "mask_id" in hit else ""
        print(f"{rank:3d}. {hit['score']:.4f}{extra}  {hit['id']}{where}")
    return 0
