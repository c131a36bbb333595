"""POST /v1/segment: one upload in, the mask (and uncertainty artefacts) out, synchronously.

The request is ``multipart/form-data``: one or more ``file`` parts (a NIfTI file, a zip of a DICOM
series, several DICOM files, or one multi-frame DICOM file) and the options, as query parameters
or form fields (a form field wins over the query parameter of the same name); both, and the
OpenAPI request body, are generated from SegmentOptions (see ``sfpc.server.routers``). The
response is one file, or a zip when several artefacts were asked for (see SegmentOptions and
docs/server.md).

Uploads larger than ``spool_memory_bytes`` are copied to a private temporary folder that is
removed whatever happens: success, an error, a timeout or the client going away. The CPU-bound
work runs in a bounded thread pool (``concurrency``), so the event loop keeps answering /healthz.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import logging
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, Response
from starlette.datastructures import UploadFile

from sfpc.errors import Cancelled, ServiceError
from sfpc.inference.options import OUTPUT_FILES
from sfpc.inference.pipeline import ArtefactSet, SegmentationService
from sfpc.server.observability import IN_FLIGHT, SEGMENTATIONS, set_queue_depth
from sfpc.server.routers import (
    build_options,
    check_fields,
    error_responses,
    option_query,
    read_multipart,
    upload_request_body,
)
from sfpc.server.security import require_api_key
from sfpc.server.settings import Settings

router = APIRouter(tags=["segmentation"], dependencies=[Depends(require_api_key)])
log = logging.getLogger("sfpc.server.segment")

_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")
T = TypeVar("T")


class SegmentationPool:
    """A bounded thread pool for segmentations that exports how many wait for a thread."""

    def __init__(self, workers: int, *, queue: str = "sync") -> None:
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=max(1, int(workers)), thread_name_prefix="sfpc-segment")
        self._queue = queue
        self._waiting = 0
        self._lock = threading.Lock()

    def _moved(self, delta: int) -> None:
        with self._lock:
            self._waiting += delta
            set_queue_depth(self._waiting, self._queue)

    def submit(self, fn: Callable[[], T]) -> concurrent.futures.Future[T]:
        self._moved(+1)
        state = {"started": False}
        context = contextvars.copy_context()  # the request id follows the work into the thread

        def run() -> T:
            state["started"] = True
            self._moved(-1)
            return context.run(fn)

        future = self._executor.submit(run)
        # A future cancelled before its thread picked it up never ran `run`.
        future.add_done_callback(lambda f: self._moved(-1) if not state["started"] else None)
        return future

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


class RequestTimeout(ServiceError):
    status = 504
    code = "timeout"


class ClientGone(Exception):
    """The client closed the connection before the result was ready."""


def _safe_name(name: str | None, index: int) -> str:
    base = Path(name or "").name  # never a path from the client
    cleaned = _SAFE_NAME.sub("_", base).strip("._")[:100]
    return f"{index:05d}_{cleaned or 'upload'}"


def _spool(uploads: list[tuple[str, UploadFile]], settings: Settings,
           folder: Path) -> list[tuple[str, bytes | Path]]:
    """The uploads as decode_upload takes them: bytes when small, else files in ``folder``."""
    total = sum(int(f.size or 0) for _, f in uploads)
    in_memory = total <= settings.spool_memory_bytes
    out: list[tuple[str, bytes | Path]] = []
    for index, (_, upload) in enumerate(uploads):
        label = Path(upload.filename or f"file{index}").name or f"file{index}"
        upload.file.seek(0)
        if in_memory:
            out.append((label, upload.file.read()))
            continue
        target = folder / _safe_name(upload.filename, index)
        with open(target, "wb") as sink:
            shutil.copyfileobj(upload.file, sink, 1 << 20)
        out.append((label, target))
    return out


async def _wait_disconnect(request: Request) -> None:
    # The body is consumed by now: the next message is the disconnect (or nothing until the
    # response is sent, when this task is cancelled).
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _media_types() -> dict[str, dict[str, Any]]:
    types = {media for _, media in OUTPUT_FILES.values()} | {"application/zip"}
    return {media: {"schema": {"type": "string", "format": "binary"}} for media in sorted(types)}


UPLOAD_DESCRIPTION = ("The image: one .nii/.nii.gz, a .zip of a DICOM series, several DICOM "
                      "files, or one multi-frame DICOM file.")


@router.post(
    "/v1/segment",
    summary="Segment an uploaded volume",
    response_class=Response,
    responses={200: {"content": _media_types(),
                     "description": "The mask (NIfTI with the upload's shape and affine, or DICOM "
                                    "SEG for DICOM uploads), or a zip of several artefacts."},
               **error_responses(400, 401, 404, 413, 415, 422, 502, 503, 504)},
    openapi_extra={"requestBody": upload_request_body(UPLOAD_DESCRIPTION)},
)
async def segment(request: Request,
                  query: dict[str, Any] = Depends(option_query())) -> Response:
    """Decode the upload, segment it with the chosen model and return the requested artefacts.

    Defaults: the mask alone (``mask.nii.gz`` for NIfTI uploads, ``segmentation.dcm`` for DICOM).
    Uncertainty outputs (``entropy_nifti``, ``mi_nifti``, ``overlay_png``) run the FLPM graph.
    Several artefacts come back as ``application/zip``. Response headers name the model, the
    DICOM series used and the files produced.
    """
    app = request.app
    settings: Settings = app.state.settings
    service: SegmentationService = app.state.service
    pool: SegmentationPool = app.state.pool
    form = await read_multipart(request, settings.max_files)
    folder = Path(tempfile.mkdtemp(prefix="sfpc-upload-", dir=settings.temp_dir))
    handed_over = False
    try:
        uploads = check_fields(form)
        options = build_options(query, form)
        service.registry.get(options.model)  # 404 before any decoding work
        files = await run_in_threadpool(_spool, uploads, settings, folder)
        await form.close()
        cancel = threading.Event()

        def work() -> ArtefactSet:
            IN_FLIGHT.inc()
            try:
                return service.segment_upload(files, options, cancel=cancel)
            finally:
                IN_FLIGHT.dec()
                shutil.rmtree(folder, ignore_errors=True)

        future = pool.submit(work)
        handed_over = True
        try:
            result = await _await_result(request, future, cancel, settings.request_timeout_s)
        except BaseException:
            if future.cancel():  # it never started, so its own cleanup will never run
                shutil.rmtree(folder, ignore_errors=True)
            raise
    except ClientGone:
        label = _model_label(service, query.get("model"))
        SEGMENTATIONS.labels(model=label, outcome="client_gone").inc()
        return Response(status_code=499)
    except Exception as exc:
        outcome = getattr(exc, "code", None) or type(exc).__name__
        label = _model_label(service, query.get("model"))
        SEGMENTATIONS.labels(model=label, outcome=str(outcome)).inc()
        raise
    finally:
        await form.close()
        if not handed_over:
            shutil.rmtree(folder, ignore_errors=True)
    report = result.report
    model_name = str(report.get("model", {}).get("name", ""))
    SEGMENTATIONS.labels(model=model_name, outcome="ok").inc()
    artefact = result.response(options.format)
    # Facts about the work only: no file names, header values or patient identifiers.
    log.info("segmentation done", extra={
        "model": model_name, "source": (report.get("input") or {}).get("source"),
        "shape": (report.get("input") or {}).get("shape"), "outputs": result.filenames,
        "uncertainty": report.get("uncertainty"), "timings": report.get("timings"),
        "response_bytes": artefact.size})
    headers = {"Content-Disposition": f'attachment; filename="{artefact.filename}"',
               **result_headers(report, result.filenames)}
    if isinstance(artefact.content, Path):
        return FileResponse(artefact.content, media_type=artefact.media_type, headers=headers)
    return Response(content=artefact.content, media_type=artefact.media_type, headers=headers)


# Every header result_headers may set: CORS must expose each of them to browser clients.
RESULT_HEADERS = ("X-SFPC-Model", "X-SFPC-Model-Version", "X-SFPC-Series-UID", "X-SFPC-Artefacts")


def result_headers(report: dict[str, Any] | None, filenames: list[str]) -> dict[str, str]:
    """What a client needs without opening the body: model, version, artefacts, series used.
    Shared by /v1/segment and job results, so that both answer alike."""
    report = report or {}
    found = report.get("model")
    model: dict[str, Any] = found if isinstance(found, dict) else {}
    headers = {"X-SFPC-Model": str(model.get("name", "")),
               "X-SFPC-Model-Version": str(model.get("version", "")),
               "X-SFPC-Artefacts": ",".join(filenames)}
    source = report.get("input")
    series = (source.get("series") if isinstance(source, dict) else None) or {}
    if series.get("series_instance_uid"):
        headers["X-SFPC-Series-UID"] = str(series["series_instance_uid"])
    return headers


def _model_label(service: SegmentationService, name: str | None) -> str:
    """A metrics label that cannot grow without bound: a served model's name or 'unknown'."""
    if name is None:
        return str(service.registry.default_name or "none")
    return name if name in service.registry.names else "unknown"


async def _await_result(request: Request, future: concurrent.futures.Future[ArtefactSet],
                        cancel: threading.Event, timeout_s: float) -> ArtefactSet:
    """The work's result; on timeout or disconnect, ask it to stop and raise."""
    started = time.perf_counter()
    waiting = asyncio.wrap_future(future)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        tasks: set[asyncio.Future[Any]] = {waiting, watcher}
        done, _ = await asyncio.wait(tasks, timeout=timeout_s,
                                     return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if waiting in done:
        try:
            return waiting.result()
        except Cancelled:
            raise RequestTimeout("segmentation was cancelled") from None
    cancel.set()
    if watcher in done:
        raise ClientGone()
    waiting.cancel()
    raise RequestTimeout(
        f"segmentation did not finish within the request timeout of {timeout_s:g} s (waited "
        f"{time.perf_counter() - started:.1f} s, including time queued behind other requests); "
        "submit large volumes as an asynchronous job (POST /v1/jobs) or ask the operator to "
        "raise request_timeout_s", detail={"timeout_s": timeout_s})
