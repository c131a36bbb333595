"""``sfpc serve``: run the gateway under uvicorn.

With no ``--model``, the project's embedded default model (``sfpc/default_model/`` inside the
installed package) is served when it exists; otherwise the command says how to point it at an
export directory. Flags override environment variables (``SFPC_*``) and the config file
(``--config`` or ``SFPC_CONFIG_FILE``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from sfpc.inference.contract import DEFAULT_MODEL_DIR, METADATA_FILE

if TYPE_CHECKING:  # the gateway loads lazily, in the functions below; this is for annotations
    from fastapi import FastAPI

FACTORY = "sfpc.server.cli:_factory"
_ENV_SETTINGS = "SFPC__SERVE_SETTINGS"


def default_model_dir() -> Path | None:
    """The embedded default model's export directory, when the package ships one."""
    return DEFAULT_MODEL_DIR if (DEFAULT_MODEL_DIR / METADATA_FILE).is_file() else None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sfpc serve",
        description="Serve exported SFPC models over HTTP (FastAPI + uvicorn). Settings also "
                    "come from SFPC_* environment variables and --config; see docs/server.md.")
    p.add_argument("--model", "-m", action="append", dest="models", metavar="DIR",
                   help="export directory (with sfpc_model.json); repeat to serve several")
    p.add_argument("--default-model", help="model name used when a request names none")
    p.add_argument("--host", help="bind address (default 127.0.0.1; anything else needs "
                                  "--api-key)")
    p.add_argument("--port", type=int, help="TCP port (default 8000)")
    p.add_argument("--workers", type=int, help="uvicorn worker processes (default 1)")
    p.add_argument("--concurrency", type=int, help="segmentations at once per process")
    p.add_argument("--backend", choices=("onnxruntime", "triton"))
    p.add_argument("--triton-url", help="Triton address, e.g. localhost:8001")
    p.add_argument("--triton-protocol", choices=("grpc", "http"))
    p.add_argument("--api-key", action="append", dest="api_keys", metavar="KEY",
                   help="accepted API key (repeat for several); prefer SFPC_API_KEYS, which "
                        "does not show in the process list")
    p.add_argument("--data-dir", help="jobs database, uploads and results")
    p.add_argument("--config", help="settings file (.json, .toml, .yaml)")
    p.add_argument("--log-level", help="DEBUG, INFO, WARNING, ERROR")
    return p


def _overrides(args: argparse.Namespace) -> dict[str, object]:
    given = {
        "model_dirs": args.models, "default_model": args.default_model, "host": args.host,
        "port": args.port, "workers": args.workers, "concurrency": args.concurrency,
        "backend": args.backend, "triton_url": args.triton_url,
        "triton_protocol": args.triton_protocol, "api_keys": args.api_keys,
        "data_dir": args.data_dir, "log_level": args.log_level,
    }
    return {k: v for k, v in given.items() if v is not None}


def serve(argv: Sequence[str] | None = None) -> int:
    """Parse the flags, check the settings and run uvicorn until interrupted."""
    import uvicorn
    from pydantic import ValidationError

    from sfpc.server.settings import load_settings

    args = build_parser().parse_args(list(argv or []))
    try:
        settings = load_settings(args.config, **_overrides(args))
    except (ValidationError, ValueError, FileNotFoundError) as exc:
        print(f"sfpc serve: invalid settings: {exc}", file=sys.stderr)
        return 2
    if not settings.model_dirs:
        embedded = default_model_dir()
        if embedded is None:
            print("sfpc serve: no model to serve. Pass an export directory written by "
                  "`sfpc export`: sfpc serve --model DIR (or set SFPC_MODEL_DIRS). This "
                  "installation ships no embedded default model.", file=sys.stderr)
            return 2
        settings = settings.model_copy(update={"model_dirs": [embedded]})
    try:
        settings.check_startable()
    except ValueError as exc:
        print(f"sfpc serve: {exc}", file=sys.stderr)
        return 2
    missing = [str(d) for d in settings.model_dirs if not (Path(d) / METADATA_FILE).is_file()]
    if missing:
        print(f"sfpc serve: not an SFPC export directory (no {METADATA_FILE}): "
              f"{', '.join(missing)}", file=sys.stderr)
        return 2
    # Worker processes rebuild the app from this JSON: flags must reach them too.
    resolved = settings.model_dump(mode="json")
    resolved["api_keys"] = settings.key_values()  # model_dump masks secrets
    for name, destination in settings.destinations.items():  # the PACS credentials too
        for key in ("password", "token"):
            secret = getattr(destination, key)
            if secret is not None:
                resolved["destinations"][name][key] = secret.get_secret_value()
    os.environ[_ENV_SETTINGS] = json.dumps(resolved)
    from sfpc.server.observability import configure_logging

    configure_logging(settings.log_level, settings.log_json)
    uvicorn.run(FACTORY, factory=True, host=settings.host, port=settings.port,
                workers=settings.workers, log_config=None, access_log=False,
                timeout_graceful_shutdown=30, proxy_headers=False)
    return 0


def _factory() -> FastAPI:
    """uvicorn's app factory in each worker: the settings `serve` resolved, or the environment."""
    from sfpc.server.app import create_app
    from sfpc.server.observability import configure_logging
    from sfpc.server.settings import Settings

    raw = os.environ.get(_ENV_SETTINGS)
    settings = Settings(**json.loads(raw)) if raw else Settings()
    configure_logging(settings.log_level, settings.log_json)
    return create_app(settings)


def worker_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sfpc worker",
        description="Run asynchronous jobs of the distributed mode (procrastinate on "
                    "PostgreSQL): any number of these, on any host that mounts SFPC_DATA_DIR. "
                    "Settings as for `sfpc serve` (SFPC_* variables, --config); see "
                    "docs/deploy.md.")
    p.add_argument("--model", "-m", action="append", dest="models", metavar="DIR",
                   help="export directory (with sfpc_model.json); repeat for several")
    p.add_argument("--default-model", help="model used when a job names none")
    p.add_argument("--concurrency", type=int, help="jobs at once in this worker "
                                                   "(default SFPC_JOB_WORKERS)")
    p.add_argument("--backend", choices=("onnxruntime", "triton"))
    p.add_argument("--triton-url", help="Triton address, e.g. localhost:8001")
    p.add_argument("--triton-protocol", choices=("grpc", "http"))
    p.add_argument("--data-dir", help="the shared folder of uploads and results")
    p.add_argument("--database-url", help="PostgreSQL URL (prefer SFPC_DATABASE_URL: a "
                                          "password here shows in the process list)")
    p.add_argument("--config", help="settings file (.json, .toml, .yaml)")
    p.add_argument("--log-level", help="DEBUG, INFO, WARNING, ERROR")
    return p


def worker(argv: Sequence[str] | None = None) -> int:
    """``sfpc worker``: load the models and run queued jobs until SIGTERM."""
    from pydantic import ValidationError

    from sfpc.inference.pipeline import ModelRegistry, SegmentationService
    from sfpc.server.jobs.distributed import DistributedJobManager
    from sfpc.server.observability import configure_logging
    from sfpc.server.settings import load_settings

    args = worker_parser().parse_args(list(argv or []))
    given = {"model_dirs": args.models, "default_model": args.default_model,
             "backend": args.backend, "triton_url": args.triton_url,
             "triton_protocol": args.triton_protocol, "data_dir": args.data_dir,
             "database_url": args.database_url, "log_level": args.log_level,
             "job_workers": args.concurrency, "jobs_backend": "postgres"}
    try:
        settings = load_settings(args.config, **{k: v for k, v in given.items()
                                                 if v is not None})
    except (ValidationError, ValueError, FileNotFoundError) as exc:
        print(f"sfpc worker: invalid settings: {exc}", file=sys.stderr)
        return 2
    if not settings.model_dirs:
        embedded = default_model_dir()
        if embedded is None:
            print("sfpc worker: no model: pass --model DIR (or set SFPC_MODEL_DIRS)",
                  file=sys.stderr)
            return 2
        settings = settings.model_copy(update={"model_dirs": [embedded]})
    if not settings.database_url:
        print("sfpc worker: no database: set SFPC_DATABASE_URL (postgresql://user@host/db)",
              file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_json)
    registry = ModelRegistry(settings)
    try:
        service = SegmentationService(registry, settings)
        try:
            manager = DistributedJobManager.from_settings(settings, service, role="worker")
        except ConnectionError as exc:
            print(f"sfpc worker: {exc}", file=sys.stderr)
            return 1
        if settings.worker_metrics_port is not None:
            from prometheus_client import start_http_server

            # Each worker counts its own segmentations; Prometheus sums the instances.
            httpd, _ = start_http_server(settings.worker_metrics_port, addr=settings.host)
            logging.getLogger("sfpc.server.jobs").info(
                "worker metrics", extra={"host": settings.host, "port": httpd.server_port})
        manager.run_worker()
    finally:
        registry.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return serve(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
