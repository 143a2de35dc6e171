"""Command line of ``jobs/serve.py``."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from vlray.serve.config import DEFAULT_HOST, LOOPBACK_HOSTS, ServeConfig, is_loopback


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="jobs/serve.py",
        description="HTTP search service (API, web page, metrics) over a vlray index.",
    )
    p.add_argument("--index", required=True, help="OUT/index folder (local or s3://)")
    p.add_argument("--host", default=DEFAULT_HOST, help=f"address to bind (default {DEFAULT_HOST})")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument(
        "--api-key",
        default=os.environ.get("VLRAY_API_KEY") or None,
        help="require this key in the x-api-key header on /api/* (default: $VLRAY_API_KEY)",
    )
    p.add_argument(
        "--reload-interval",
        type=float,
        default=10.0,
        help="seconds between checks of manifest.json for a new index (0: never; default 10)",
    )
    p.add_argument("--max-upload-mb", type=float, default=20.0, help="upload limit (default 20)")
    p.add_argument(
        "--max-pixels", type=int, default=50_000_000, help="image pixel limit (default 5e7)"
    )
    p.add_argument("--max-k", type=int, default=1000, help="largest k (default 1000)")
    p.add_argument("--preload", action="store_true", help="load the encoders at start")
    p.add_argument(
        "--model",
        metavar="PATH_OR_ID",
        help="load the model from here instead of the folder or hub id the index recorded",
    )
    p.add_argument(
        "--allowed-hosts",
        metavar="NAMES",
        help="comma-separated Host header names to answer (port ignored; *.example.com matches "
        "subdomains; * any). Default: 127.0.0.1,localhost,::1 when --host is a loopback "
        "address, else any",
    )
    p.add_argument(
        "--max-decodes", type=int, default=2, help="image uploads decoded at once (default 2)"
    )
    p.add_argument(
        "--decode-wait",
        type=float,
        default=5.0,
        help="seconds an upload waits for a decode slot before 503 + Retry-After (default 5)",
    )
    p.add_argument("--ray-serve", action="store_true", help="run as a Ray Serve deployment")
    p.add_argument("--replicas", type=int, default=1, help="Ray Serve replicas (default 1)")
    p.add_argument("--cpus-per-replica", type=float, default=1.0, help="Ray Serve CPUs per replica")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    """The ServeConfig of parsed flags (a local index path is made absolute)."""
    index = args.index
    if "://" not in index:
        index = os.path.abspath(os.path.expanduser(index))
    return ServeConfig(
        index=index,
        api_key=args.api_key,
        reload_interval_s=args.reload_interval,
        max_upload_bytes=int(args.max_upload_mb * (1 << 20)),
        max_pixels=args.max_pixels,
        max_k=args.max_k,
        preload_models=args.preload,
        model=args.model,
        allowed_hosts=allowed_hosts(args.allowed_hosts, args.host),
        max_decodes=args.max_decodes,
        decode_wait_s=args.decode_wait,
    )


def allowed_hosts(flag: str | None, bind: str) -> tuple[str, ...] | None:
    """The Host names to answer: the flag's, else the loopback names on a loopback bind."""
    if flag is not None:
        names = tuple(n.strip() for n in flag.split(",") if n.strip())
        return None if not names or "*" in names else names
    if not is_loopback(bind):
        return None
    bound = bind.strip("[]").lower()
    return LOOPBACK_HOSTS if bound in LOOPBACK_HOSTS else (*LOOPBACK_HOSTS, bound)


def serve_main(argv: list[str] | None = None) -> int:
    """Entry point of ``jobs/serve.py``; returns the exit code."""
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.log_level != "debug":  # faiss' optional-library probe, Ray's token notice, ...
        from vlray.quiet import quiet_loggers

        quiet_loggers()
        # no "Loading weights" bars in a service log (read when huggingface_hub is imported)
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    config = config_from_args(args)
    if not is_loopback(args.host) and not config.api_key:
        logging.warning(
            "binding %s without --api-key: anyone who can reach it can query", args.host
        )
    hosts = config.allowed_hosts
    logging.info("answering Host: %s", ", ".join(hosts) if hosts else "any (--allowed-hosts)")
    if args.ray_serve:
        return _run_ray_serve(config, args)
    import uvicorn

    from vlray.serve.app import create_app

    app = create_app(config)
    if app.state.holder.snapshot is None:
        logging.warning(
            "%s; serving anyway, /readyz is 503 until it appears", app.state.holder.error
        )
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def _run_ray_serve(config: ServeConfig, args: argparse.Namespace) -> int:
    import ray
    from ray import serve

    from vlray.serve.ray_deploy import build_deployment

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=True)
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(
        build_deployment(config, args.replicas, args.cpus_per_replica),
        name="vlray",
        route_prefix="/",
    )
    print(f"vlray search on http://{args.host}:{args.port}/ (Ray Serve, {args.replicas} replicas)")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
    return 0
