"""Asynchronous jobs: ``/v1/jobs`` submit, status, results, cancel, list.

``POST /v1/jobs`` takes exactly what ``POST /v1/segment`` takes (multipart ``file`` parts plus the
same options as query parameters or form fields) and answers 202 once the upload is fsynced to
the data dir and the job is committed to the job database: a server killed after the 202 loses
nothing. Results are the files the synchronous endpoint would have returned.

The app factory builds the manager with ``JobManager.from_settings(settings, service)``, stores
it as ``app.state.job_manager``, calls ``start()``/``stop()`` in its lifespan and includes
``router`` behind the API key dependency.
"""

from __future__ import annotations

import functools
from typing import Any, Literal

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse, Response

from sfpc.errors import JobError
from sfpc.server.jobs.manager import PRIORITY_NAMES, JobManager
from sfpc.server.jobs.models import (
    ErrorDetail,
    JobList,
    JobRecord,
    JobStatus,
    JobSubmitted,
    JobTimings,
    JobView,
    iso_time,
)
from sfpc.server.routers import (
    build_options,
    check_fields,
    error_responses,
    option_query,
    read_multipart,
    upload_request_body,
)
from sfpc.server.routers.segment import UPLOAD_DESCRIPTION, result_headers

router = APIRouter(tags=["jobs"])

MAX_PAGE = 500

__all__ = ["JobManager", "router"]


def _manager(request: Request) -> JobManager:
    manager = getattr(request.app.state, "job_manager", None)
    if manager is None:
        raise JobError(503, "jobs_unavailable", "asynchronous jobs are not enabled on this server")
    return manager


def _urls(request: Request, job_id: str) -> tuple[str, str]:
    return (str(request.url_for("get_job", job_id=job_id)),
            str(request.url_for("get_job_results", job_id=job_id)))


def _view(request: Request, record: JobRecord, now: float) -> JobView:
    status_url, results_url = _urls(request, record.id)
    queued_until = record.started_at or record.finished_at or now
    run_s = None
    if record.started_at is not None:
        run_s = (record.finished_at or now) - record.started_at
    stages = {}
    if record.report and isinstance(record.report.get("timings"), dict):
        stages = {str(k): float(v) for k, v in record.report["timings"].items()
                  if isinstance(v, (int, float))}
    error = None
    if record.error_code:
        error = ErrorDetail(code=record.error_code, message=record.error_message or "")
    # Past its expiry but not yet swept: shown as what it is.
    status = JobStatus.EXPIRED if record.is_expired(now) else record.status
    return JobView(
        id=record.id, status=status, created_at=iso_time(record.created_at) or "",
        started_at=iso_time(record.started_at), finished_at=iso_time(record.finished_at),
        expires_at=iso_time(record.expires_at), attempts=record.attempts,
        options=record.options, inputs=len(record.inputs),
        input_bytes=sum(f.size for f in record.inputs), error=error,
        results=[] if status is JobStatus.EXPIRED else list(record.results),
        timings=JobTimings(queued_s=max(0.0, queued_until - record.created_at), run_s=run_s,
                           stages=stages),
        deliveries=(record.report or {}).get("deliveries"),
        priority=(PRIORITY_NAMES.get(record.priority, str(record.priority))
                  if getattr(request.app.state.job_manager, "distributed", False) else None),
        webhook=record.webhook,
        status_url=status_url, results_url=results_url)


@router.post(
    "/v1/jobs",
    status_code=202,
    response_model=JobSubmitted,
    summary="Submit a segmentation job",
    responses={**error_responses(400, 401, 404, 413, 415, 422, 503, 507)},
    openapi_extra={"requestBody": upload_request_body(
        f"As for POST /v1/segment: {UPLOAD_DESCRIPTION[0].lower()}{UPLOAD_DESCRIPTION[1:]}")},
)
async def submit_job(
        request: Request, query: dict[str, Any] = Depends(option_query()),
        # Headers, not query parameters: the query and form carry exactly the segmentation
        # options, the same on /v1/segment and /v1/jobs.
        priority: Literal["routine", "urgent"] | None = Header(
            None, alias="X-SFPC-Priority",
            description="Distributed mode: urgent jobs start before routine ones."),
        webhook_url: str | None = Header(
            None, alias="X-SFPC-Webhook-URL", description="Distributed mode: POSTed the job's "
            "status once it ends (body signed with HMAC-SHA256 of SFPC_WEBHOOK_SECRET in "
            "X-SFPC-Signature: sha256=<hex>; X-SFPC-Job-Id names the job)."),
        idempotency_key: str | None = Header(
            None, alias="Idempotency-Key", description="Distributed mode: a repeated key "
            "returns the job first submitted with it.")) -> Any:
    """Queue an upload for segmentation; 202 with the job's id, status URL and results URL (also
    in ``Location``). 503 with ``Retry-After`` when the queue is full. The options are those of
    POST /v1/segment; ``format`` packs GET .../results."""
    manager = _manager(request)
    settings = request.app.state.settings
    form = await read_multipart(request, settings.max_files)
    try:
        uploads = [upload for _, upload in check_fields(form)]
        options = build_options(query, form)
        request.app.state.service.registry.get(options.model)  # 404 before queuing
        for upload in uploads:
            upload.file.seek(0)
        given = (("priority", priority), ("webhook_url", webhook_url),
                 ("idempotency_key", idempotency_key))
        extras: dict[str, Any] = {k: v for k, v in given if v is not None}
        record = await run_in_threadpool(functools.partial(manager.submit, uploads, options,
                                                           **extras))
    finally:
        await form.close()
    status_url, results_url = _urls(request, record.id)
    body = JobSubmitted(id=record.id, status=record.status, status_url=status_url,
                        results_url=results_url)
    return JSONResponse(status_code=202, content=body.model_dump(mode="json"),
                        headers={"Location": status_url})


@router.get("/v1/jobs", response_model=JobList, summary="List jobs",
            responses={**error_responses(401, 422)})
async def list_jobs(
    request: Request,
    status: JobStatus | None = Query(None, description="Only jobs in this state."),
    limit: int = Query(50, ge=1, le=MAX_PAGE, description="Jobs per page."),
    offset: int = Query(0, ge=0, le=2**62, description="Jobs to skip (newest first)."),
) -> Any:
    """Jobs newest first, optionally of one status, one page at a time."""
    manager = _manager(request)
    records, total = await run_in_threadpool(manager.list, status, limit, offset)
    now = manager.clock()
    next_offset = offset + len(records) if offset + len(records) < total else None
    return JobList(items=[_view(request, r, now) for r in records], total=total, limit=limit,
                   offset=offset, next_offset=next_offset)


@router.get("/v1/jobs/stats", summary="Queue depth, running jobs and workers",
            responses={**error_responses(401)})
async def job_stats(request: Request) -> Any:
    """Jobs by state and the workers taking them: from the shared database in the distributed
    mode, so every gateway answers the same."""
    manager = _manager(request)
    return await run_in_threadpool(manager.stats)


@router.get("/v1/jobs/{job_id}", response_model=JobView, summary="Job status",
            name="get_job", responses={**error_responses(401, 404, 410)})
async def get_job(request: Request, job_id: str) -> Any:
    """State, attempts, timings, error and result file names of one job; 410 once expired."""
    manager = _manager(request)
    record = await run_in_threadpool(manager.get, job_id)
    return _view(request, record, manager.clock())


@router.delete("/v1/jobs/{job_id}", response_model=JobView, summary="Cancel a job",
               responses={**error_responses(401, 404, 409, 410)})
async def cancel_job(request: Request, job_id: str) -> Any:
    """Cancel a queued job, or a running one (it stops at its next stage boundary and whatever
    it computed is discarded); 409 when it already ended."""
    manager = _manager(request)
    record = await run_in_threadpool(manager.cancel, job_id)
    return _view(request, record, manager.clock())


@router.get("/v1/jobs/{job_id}/results", summary="Job results", name="get_job_results",
            response_class=Response,
            responses={200: {"description": "As POST /v1/segment would have answered: one file "
                             "or a zip of several."}, **error_responses(401, 404, 409, 410)})
async def get_job_results(request: Request, job_id: str) -> Any:
    """The results of a succeeded job; 409 while queued or running (or when it failed or was
    cancelled), 410 once expired."""
    manager = _manager(request)
    path, body = await run_in_threadpool(manager.result_body, job_id)
    record = await run_in_threadpool(manager.get, job_id)
    headers = result_headers(record.report, list(record.results))
    return FileResponse(path, media_type=body.media_type, filename=body.filename,
                        headers=headers)


@router.get("/v1/jobs/{job_id}/results/{filename}", summary="One result file",
            response_class=Response,
            responses={200: {"description": "The named artefact."},
                       **error_responses(401, 404, 409, 410)})
async def get_job_result_file(request: Request, job_id: str, filename: str) -> Any:
    """One artefact of a succeeded job, by the name listed in its status ``results``."""
    manager = _manager(request)
    path, media_type = await run_in_threadpool(manager.result_file, job_id, filename)
    return FileResponse(path, media_type=media_type, filename=filename)
