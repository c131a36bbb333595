"""``sfpc client``: batch segmentation of a folder tree or of PACS series through the gateway.

    sfpc client batch INPUT_DIR OUTPUT_DIR [--model NAME] [--uncertainty] [--concurrency N]
    sfpc client pacs OUTPUT_DIR --modality MR [--study UID] [--uncertainty-map]
    sfpc client models

Exit codes: 0 every input done (now or in an earlier run), 1 some input failed (see the
manifest), 2 bad arguments or configuration, or the gateway or PACS unreachable, 130
interrupted (a rerun resumes). See docs/hospital-pipeline.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sfpc.clients.config import ClientConfig, gateway_client, load_config
from sfpc.inference.options import add_option_arguments

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class UsageError(Exception):
    """Bad arguments or configuration: exit code 2 with the message."""


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="client config file (.json/.yaml/.toml; default "
                                    "$SFPC_CLIENT_CONFIG); see docs/hospital-pipeline.md")
    p.add_argument("--server", help="gateway URL (default: config, $SFPC_SERVER_URL, "
                                    "http://127.0.0.1:8000); the API key comes from the config "
                                    "or $SFPC_API_KEY / $SFPC_API_KEY_FILE")


def _segmentation(p: argparse.ArgumentParser) -> None:
    # The segmentation options come from the gateway's schema; the batch finds the series
    # itself (no --series-uid) and always downloads files (no --format).
    add_option_arguments(p, exclude=("series_uid", "format"), several=False, more_help={
        "outputs": "A batch adds report_json to the default; seg_dicom is asked for DICOM "
                   "inputs only (a NIfTI input gets mask_nifti).",
        "flip": "See GET /v1/models (or sfpc client models) for which models take it."})
    p.add_argument("--mode", choices=("jobs", "sync"), default="jobs",
                   help="jobs (default: queued on the server, survives a gateway restart) or "
                        "sync (one request per input)")
    p.add_argument("--concurrency", type=int, default=2,
                   help="inputs in flight at once (default 2)")
    p.add_argument("--manifest", help="manifest path (default OUTPUT_DIR/manifest.jsonl)")
    p.add_argument("--no-retry-failed", action="store_true",
                   help="skip inputs that failed in an earlier run instead of trying again")
    p.add_argument("--job-timeout", type=float, default=None, metavar="S",
                   help="give up waiting for one job after S seconds (it is retried on rerun)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--dry-run", action="store_true",
                   help="list what would be segmented or skipped, and stop")
    p.add_argument("-v", "--verbose", action="store_true", help="log retries and re-attaches")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sfpc client",
        description="Send folders of NIfTI files and DICOM series, or PACS series, to an SFPC "
                    "gateway; resumable (a manifest records every input).")
    sub = parser.add_subparsers(dest="command", required=True)

    batch = sub.add_parser("batch", help="segment every NIfTI file and DICOM series in a "
                                         "folder tree",
                           description="Find NIfTI files and DICOM series (grouped by series "
                                       "UID whatever the file names) under INPUT_DIR, segment "
                                       "them, and write the artefacts under OUTPUT_DIR in the "
                                       "same layout. Rerun to resume.")
    batch.add_argument("input", type=Path, help="folder tree to search")
    batch.add_argument("output", type=Path, help="folder for artefacts and the manifest")
    batch.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                       help="skip files whose path relative to INPUT_DIR matches (repeat), "
                            "e.g. '*_label.nii.gz'")
    _common(batch)
    _segmentation(batch)

    pacs = sub.add_parser("pacs", help="segment PACS series (QIDO-RS/WADO-RS) and store the "
                                       "results back (STOW-RS)",
                          description="Query the PACS for image series, segment each, and "
                                      "store the DICOM SEG (and with --uncertainty-map the "
                                      "uncertainty as a parametric map) into the source study. "
                                      "Local copies and the manifest go to OUTPUT_DIR.")
    pacs.add_argument("output", type=Path, help="folder for local copies and the manifest")
    pacs.add_argument("--pacs-url", help="DICOMweb base URL (default: config or "
                                         "$SFPC_PACS_URL); credentials come from the config or "
                                         "$SFPC_PACS_USERNAME / $SFPC_PACS_PASSWORD[_FILE] / "
                                         "$SFPC_PACS_TOKEN[_FILE]")
    pacs.add_argument("--study", action="append", default=[], metavar="UID",
                      help="only this study (repeat)")
    pacs.add_argument("--series", action="append", default=[], metavar="UID",
                      help="only this series (repeat)")
    pacs.add_argument("--modality", action="append", default=[], metavar="CODE",
                      help="only series of this modality, e.g. MR (repeat)")
    pacs.add_argument("--filter", action="append", default=[], metavar="KEY=VALUE",
                      help="further QIDO-RS match, e.g. StudyDate=20240101- (repeat)")
    pacs.add_argument("--limit", type=int, help="at most this many series")
    pacs.add_argument("--uncertainty-map", action="store_true",
                      help="also store the normalised entropy as a DICOM Parametric Map "
                           "(implies --uncertainty)")
    pacs.add_argument("--no-store", action="store_true",
                      help="segment and keep local copies only; store nothing in the PACS")
    _common(pacs)
    _segmentation(pacs)

    models = sub.add_parser("models", help="list the gateway's models (JSON)")
    _common(models)
    return parser


def _config(args: argparse.Namespace) -> ClientConfig:
    try:
        return load_config(args.config, gateway={"url": args.server},
                           pacs={"url": getattr(args, "pacs_url", None)})
    except (OSError, ValueError) as exc:
        raise UsageError(f"configuration: {exc}") from exc


def _options(args: argparse.Namespace, *, dicom_only: bool = False) -> Any:
    from sfpc.clients.batch import BatchOptions

    # add_option_arguments checked each name against the schema's choices.
    outputs = tuple(args.outputs) if args.outputs else None
    uncertainty = bool(args.uncertainty or getattr(args, "uncertainty_map", False))
    if dicom_only and outputs is not None:
        needed = []
        if not args.no_store:
            needed.append("seg_dicom")
        if getattr(args, "uncertainty_map", False):
            needed.append("entropy_nifti")
        outputs = tuple(dict.fromkeys([*needed, *outputs]))
    try:
        return BatchOptions(model=args.model, outputs=outputs, uncertainty=uncertainty,
                            flip=args.flip, mode=args.mode, concurrency=args.concurrency,
                            retry_failed=not args.no_retry_failed,
                            job_timeout_s=args.job_timeout)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc


def _preflight(config: ClientConfig, model: str | None) -> None:
    """Fail fast (exit 2) when the gateway is unreachable or lacks the model."""
    from sfpc.clients.models import SFPCError

    try:
        with gateway_client(config.gateway) as client:
            served = client.models()
    except SFPCError as exc:
        raise UsageError(f"gateway {config.gateway.url}: {exc}") from exc
    if model is not None and model not in {m.name for m in served.models}:
        raise UsageError(f"the gateway serves no model {model!r}; it serves "
                         f"{', '.join(m.name for m in served.models) or 'none'}")
    if model is None and served.default is None:
        raise UsageError(f"the gateway at {config.gateway.url} serves no model")


def _run(config: ClientConfig, items: list[Any], out: Path, options: Any, args: argparse.Namespace,
         hooks: Any = None) -> int:
    import asyncio

    from sfpc.clients.batch import BatchRunner
    from sfpc.clients.manifest import Manifest, ManifestLocked

    try:
        manifest = Manifest(args.manifest or out / "manifest.jsonl")
    except ManifestLocked as exc:
        raise UsageError(str(exc)) from exc
    try:
        if args.dry_run:
            runner = BatchRunner(None, out, manifest, options)  # type: ignore[arg-type]
            todo, skipped = runner.plan(items)
            for item in todo:
                print(f"segment  {item.label} -> {item.output}/")
            for item in skipped:
                print(f"skip     {item.label} (done)")
            print(f"{len(todo)} to segment, {len(skipped)} skipped")
            return EXIT_OK
        _preflight(config, options.model)

        async def go() -> Any:
            async with gateway_client(config.gateway, asynchronous=True) as client:
                runner = BatchRunner(client, out, manifest, options, hooks=hooks,
                                     progress=False if args.no_progress else None)
                return await runner.run(items)

        summary = asyncio.run(go())
    finally:
        manifest.close()
    print(f"{summary.line()}; manifest: {manifest.path}")
    return summary.exit_code


def _cmd_batch(args: argparse.Namespace) -> int:
    from sfpc.clients.discover import discover

    config = _config(args)
    options = _options(args)
    out = args.output.resolve()
    try:
        found = discover(args.input, exclude=args.exclude, skip_dirs=[out])
    except NotADirectoryError as exc:
        raise UsageError(str(exc)) from exc
    if args.verbose:
        for path, why in found.skipped:
            print(f"not an input: {path} ({why})", file=sys.stderr)
    if not found.items:
        print(f"no NIfTI file or DICOM series under {args.input}", file=sys.stderr)
        return EXIT_OK
    return _run(config, found.items, out, options, args)


def _cmd_pacs(args: argparse.Namespace) -> int:
    from sfpc.clients.dicomweb import PacsHooks, connect, find_series

    config = _config(args)
    options = _options(args, dicom_only=True)
    filters = {}
    for entry in args.filter:
        key, sep, value = entry.partition("=")
        if not sep or not key:
            raise UsageError(f"--filter {entry!r}: use KEY=VALUE, e.g. StudyDate=20240101-")
        filters[key] = value
    try:
        dw = connect(config.pacs)
        refs = find_series(dw, studies=args.study, series=args.series, modalities=args.modality,
                           filters=filters, limit=args.limit)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    except Exception as exc:  # requests' and dicomweb-client's errors alike
        raise UsageError(f"PACS {config.pacs.url}: query failed: {exc}") from exc
    if not refs:
        print("no matching image series in the PACS", file=sys.stderr)
        return EXIT_OK
    hooks = PacsHooks(dw, store_seg=not args.no_store,
                      store_uncertainty=args.uncertainty_map and not args.no_store)
    items = [ref.work_item() for ref in refs]
    return _run(config, items, args.output.resolve(), options, args, hooks)


def _cmd_models(args: argparse.Namespace) -> int:
    from sfpc.clients.models import SFPCError

    config = _config(args)
    try:
        with gateway_client(config.gateway) as client:
            listing = client.models()
    except SFPCError as exc:
        raise UsageError(f"gateway {config.gateway.url}: {exc}") from exc
    print(json.dumps(listing.model_dump(mode="json"), indent=2))
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    if getattr(args, "verbose", False):
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        logging.getLogger("sfpc.clients").setLevel(logging.INFO)
    handler = {"batch": _cmd_batch, "pacs": _cmd_pacs, "models": _cmd_models}[args.command]
    try:
        return handler(args)
    except UsageError as exc:
        print(f"sfpc client {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"sfpc client {args.command}: interrupted; run the same command again to resume",
              file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
