"""STOW-RS: ``POST /dicomweb/studies`` and ``POST /dicomweb/studies/{study}``.

A DICOMweb router (a PACS such as Orthanc, a modality gateway) pushes instances as
``multipart/related; type="application/dicom"``, one Part 10 file per part. Each part is read to
a temporary file, its header parsed, and the instance is:

- refused with FailureReason 0x0122 (SOP Class not supported) when it is not an image this node
  segments (SEG, SR, RT objects, secondary captures...: see
  :data:`sfpc.io.dicom_net.SEGMENTABLE_SOP_CLASSES`), 0xC000 when it is not readable DICOM,
  0xC409 when the URL names another study;
- otherwise accepted; the accepted instances are grouped by series, and each series becomes a
  job (``JobManager.submit``, as ``POST /v1/jobs`` would make it), with the options of the query
  string over the gateway's ``dicomweb_options``. A series the queue has no room for is refused
  with 0xA700 (out of resources).

The answer is PS3.18's Store Instances response, ``application/dicom+json``: 200 when every
instance was accepted, 202 when some were refused, 409 when none was; ReferencedSOPSequence and
FailedSOPSequence list them. The jobs made are in the ``X-SFPC-Jobs`` header (comma-separated
ids) and ``GET /v1/jobs``. When a route of the gateway's ``routes`` matches the job's model, the
job sends its DICOM results to that route's destinations once it has succeeded (recorded in the
job's ``deliveries``).
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from python_multipart.multipart import MultipartParser, parse_options_header

from sfpc.errors import JobError, ServiceError
from sfpc.inference.options import SegmentOptions, parse_options
from sfpc.io import dicom_net
from sfpc.server.jobs.manager import JobManager
from sfpc.server.routers import error_responses, option_query

log = logging.getLogger("sfpc.server.dicomweb")
router = APIRouter(tags=["dicomweb"])
DICOM_JSON = "application/dicom+json"
JOBS_HEADER = "X-SFPC-Jobs"


@dataclass
class _Part:
    """One received instance on disk, in the shape JobManager.submit takes."""

    path: Path
    filename: str
    content_type: str = "application/dicom"
    sop_class: str = ""
    sop_instance: str = ""
    study: str = ""
    series: str = ""
    _handle: BinaryIO | None = None

    @property
    def file(self) -> BinaryIO:
        if self._handle is None:
            self._handle = open(self.path, "rb")
        return self._handle

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()


def _manager(request: Request) -> JobManager:
    manager = getattr(request.app.state, "job_manager", None)
    if manager is None:
        raise JobError(503, "jobs_unavailable", "asynchronous jobs are not enabled on this server")
    return manager


async def _read_parts(request: Request, folder: Path, max_parts: int) -> list[Path]:
    """The body's parts, each written to a file in ``folder``; 415 for another media type,
    400 for a body that is not multipart."""
    content_type = request.headers.get("content-type", "")
    media, params = parse_options_header(content_type)
    part_type = params.get(b"type", b"application/dicom").decode("latin-1").lower()
    if media.lower() != b"multipart/related" or part_type != "application/dicom":
        raise ServiceError(
            'STOW-RS takes multipart/related; type="application/dicom" (one DICOM file per '
            f"part), got Content-Type {content_type or 'none'}", status=415,
            code="unsupported_media_type")
    boundary = params.get(b"boundary")
    if not boundary:
        raise ServiceError("the multipart/related Content-Type has no boundary", status=400,
                           code="malformed_multipart")
    paths: list[Path] = []
    handle: list[BinaryIO] = []

    def begin() -> None:
        if len(paths) >= max_parts:
            raise ServiceError(f"more than {max_parts} parts in one request", status=413,
                               code="too_many_files")
        path = folder / f"{len(paths):05d}.dcm"
        paths.append(path)
        handle.append(open(path, "wb"))

    def data(chunk: bytes, start: int, end: int) -> None:
        handle[-1].write(chunk[start:end])

    def end() -> None:
        handle[-1].close()

    parser = MultipartParser(boundary, {"on_part_begin": begin, "on_part_data": data,
                                        "on_part_end": end})
    try:
        async for chunk in request.stream():
            parser.write(chunk)
        parser.finalize()
    except ServiceError:
        raise
    except Exception as exc:  # python-multipart raises its own errors on a broken body
        raise ServiceError(f"malformed multipart/related body: {exc}", status=400,
                           code="malformed_multipart") from None
    finally:
        for fh in handle:
            fh.close()
    if not paths:
        raise ServiceError("the STOW-RS request holds no part", status=400, code="missing_file")
    return paths


def _classify(paths: Sequence[Path], study: str | None
              ) -> tuple[list[_Part], list[tuple[str, str, int]]]:
    """The parts to segment and the refused ones as (class, instance, failure reason)."""
    import pydicom

    accepted: list[_Part] = []
    failed: list[tuple[str, str, int]] = []
    for path in paths:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            meta = getattr(ds, "file_meta", None)
            sop_class = str(ds.get("SOPClassUID") or (meta or {}).get(
                "MediaStorageSOPClassUID", "") or "")
            sop_instance = str(ds.get("SOPInstanceUID") or (meta or {}).get(
                "MediaStorageSOPInstanceUID", "") or "")
            part = _Part(path, path.name, sop_class=sop_class, sop_instance=sop_instance,
                         study=str(ds.get("StudyInstanceUID", "") or ""),
                         series=str(ds.get("SeriesInstanceUID", "") or ""))
        except Exception:  # not DICOM: pydicom raises many types on foreign bytes
            failed.append(("", "", dicom_net.CANNOT_UNDERSTAND))
            continue
        if not dicom_net.segmentable(part.sop_class):
            failed.append((part.sop_class, part.sop_instance, dicom_net.SOP_CLASS_NOT_SUPPORTED))
        elif study is not None and part.study != study:
            failed.append((part.sop_class, part.sop_instance, dicom_net.STUDY_MISMATCH))
        else:
            accepted.append(part)
    return accepted, failed


def _submit(manager: JobManager, accepted: Sequence[_Part], options: SegmentOptions,
            delivery: dict[str, Any] | None
            ) -> tuple[list[str], list[tuple[str, str]], list[tuple[str, str, int]]]:
    """One job per series; returns the job ids, the stored and the refused instances."""
    series: dict[tuple[str, str], list[_Part]] = {}
    for part in accepted:
        series.setdefault((part.study, part.series), []).append(part)
    jobs: list[str] = []
    stored: list[tuple[str, str]] = []
    failed: list[tuple[str, str, int]] = []
    for (_, series_uid), parts in series.items():
        chosen = options
        if series_uid and not options.series_uid:
            chosen = options.model_copy(update={"series_uid": series_uid})
        try:
            record = manager.submit(parts, chosen, delivery=delivery)
        except JobError as exc:
            reason = (dicom_net.OUT_OF_RESOURCES if exc.status in (413, 503, 507)
                      else dicom_net.PROCESSING_FAILURE)
            log.warning("STOW-RS series refused", extra={"code": exc.code,
                                                         "instances": len(parts)})
            failed += [(p.sop_class, p.sop_instance, reason) for p in parts]
            continue
        finally:
            for part in parts:
                part.close()
        jobs.append(record.id)
        stored += [(p.sop_class, p.sop_instance) for p in parts]
    return jobs, stored, failed


async def _store(request: Request, study: str | None, query: dict[str, Any]) -> JSONResponse:
    manager = _manager(request)
    settings = request.app.state.settings
    options = parse_options({**dict(getattr(settings, "dicomweb_options", {}) or {}), **query})
    model = request.app.state.service.registry.get(options.model)  # 404 before reading
    names = dicom_net.choose_route(getattr(settings, "routes", []), None, model.name)
    delivery = None
    if names:
        delivery = {"destinations": names, "model": model.name}
    folder = Path(tempfile.mkdtemp(prefix="sfpc-stow-", dir=settings.temp_dir))
    try:
        paths = await _read_parts(request, folder, settings.max_files)
        accepted, failed = await run_in_threadpool(_classify, paths, study)
        jobs, stored, refused = await run_in_threadpool(_submit, manager, accepted, options,
                                                        delivery)
    finally:
        for entry in folder.iterdir() if folder.exists() else ():
            os.unlink(entry)
        folder.rmdir()
    failed += refused
    retrieve = str(request.url) if study is None else None
    status, body = dicom_net.store_response(stored, failed, retrieve)
    log.info("STOW-RS", extra={"stored": len(stored), "failed": len(failed), "jobs": jobs})
    return JSONResponse(status_code=status, content=body, media_type=DICOM_JSON,
                        headers={JOBS_HEADER: ",".join(jobs)})


_RESPONSES = {200: {"description": "Every instance accepted; one job per series."},
              202: {"description": "Some instances accepted, some refused (FailedSOPSequence)."},
              409: {"description": "No instance accepted (FailedSOPSequence says why)."},
              **error_responses(400, 401, 404, 413, 415, 503)}


@router.post("/dicomweb/studies", summary="Store instances (STOW-RS)", responses=_RESPONSES)
async def store_studies(request: Request,
                        query: dict[str, Any] = Depends(option_query())) -> Any:
    """Store instances of any studies; each series becomes a segmentation job."""
    return await _store(request, None, query)


@router.post("/dicomweb/studies/{study}", summary="Store instances of one study (STOW-RS)",
             responses=_RESPONSES)
async def store_study(request: Request, study: str,
                      query: dict[str, Any] = Depends(option_query())) -> Any:
    """Store instances of ``study``; instances of another study are refused (0xC409)."""
    return await _store(request, study, query)
