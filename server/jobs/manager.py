"""The job manager: the store, the job folders and the worker pool, bound to the segmentation
service. The HTTP router (``sfpc.server.routers.jobs``) only translates between this and HTTP.

A job runs exactly what the synchronous endpoint runs (``SegmentationService.segment_upload`` on
the uploaded files with the same :class:`SegmentOptions`), so its results are the same files.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import json
import logging
import math
import posixpath
import statistics
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from sfpc.errors import (
    BackendError,
    BackendUnavailable,
    Cancelled,
    JobError,
    SFPCError,
)
from sfpc.inference.options import SegmentOptions
from sfpc.server.jobs.files import (
    MANIFEST_FILE,
    JobFiles,
    UploadTooLarge,
    is_job_id,
    is_safe_name,
    new_job_id,
    write_durable,
)
from sfpc.server.jobs.models import InputFile, JobRecord, JobStatus, ResultBody
from sfpc.server.jobs.runner import (
    JobCancelled,
    JobFailure,
    JobOutcome,
    PoolConfig,
    WorkerPool,
)
from sfpc.server.jobs.store import JobStore, QueueFull
from sfpc.server.observability import IN_FLIGHT, SEGMENTATIONS, set_queue_depth

log = logging.getLogger("sfpc.server.jobs")

DB_FILE = "jobs.sqlite3"
DELIVERY_FILE = "delivery.json"  # in a job's folder: where its DICOM results are sent
JOBS_DIR = "jobs"
# Retry-After when no job has finished yet to time: a small CPU model's run.
DEFAULT_JOB_SECONDS = 10.0
MAX_RETRY_AFTER_S = 600
# Submit's ``priority`` names and the queue's priorities (procrastinate: higher runs first).
PRIORITIES = {"routine": 0, "urgent": 10}
PRIORITY_NAMES = {v: k for k, v in PRIORITIES.items()}


class Upload(Protocol):
    """What the router hands over for each uploaded file (FastAPI's UploadFile fits)."""

    # Read-only, so that FastAPI's UploadFile (whose attributes are typed more narrowly) fits.
    @property
    def filename(self) -> str | None: ...

    @property
    def content_type(self) -> str | None: ...

    @property
    def file(self) -> BinaryIO: ...


@dataclass(frozen=True)
class JobsConfig:
    """What the manager needs from the settings (see :meth:`JobManager.from_settings`)."""

    data_dir: Path
    workers: int = 1
    max_queued: int = 100
    retention_s: float = 24 * 3600.0
    max_attempts: int = 3
    max_upload_bytes: int = 1 << 30
    poll_s: float = 1.0
    sweep_s: float | None = None


def client_name(filename: str | None, index: int) -> str:
    """The client's file name without any folder part (decoders use its extension)."""
    base = posixpath.basename((filename or "").replace("\\", "/")).strip()
    return base[:255] or f"upload-{index:04d}"


class JobManager:
    """Asynchronous segmentation jobs persisted under ``config.data_dir``.

    Create with :meth:`from_settings`, call :meth:`start` at application start-up (it recovers
    what a previous process left) and :meth:`stop` at shutdown.
    """

    def __init__(self, config: JobsConfig, service: Any, *,
                 on_queue_depth: Callable[[int], None] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.service = service
        self.clock = clock
        data_dir = Path(config.data_dir)
        data_dir.mkdir(parents=True, exist_ok=True)
        self.store = JobStore(data_dir / DB_FILE)
        self.files = JobFiles(data_dir / JOBS_DIR)
        if on_queue_depth is None:
            on_queue_depth = _prometheus_queue_depth()
        self.pool = WorkerPool(
            self.store, self.files, self._execute,
            PoolConfig(workers=config.workers, max_attempts=config.max_attempts,
                       retention_s=config.retention_s, poll_s=config.poll_s,
                       sweep_s=config.sweep_s),
            on_change=on_queue_depth, clock=clock)
        self._started = False
        # Where jobs with a delivery file send their DICOM results (Settings.destinations).
        self.destinations: dict[str, Any] = {}

    @classmethod
    def from_settings(cls, settings: Any, service: Any, **kwargs: Any) -> JobManager:
        """A manager configured from the gateway's :class:`~sfpc.server.settings.Settings`."""
        if getattr(settings, "jobs_backend", "sqlite") == "postgres" and cls is JobManager:
            from sfpc.server.jobs.distributed import DistributedJobManager

            return DistributedJobManager.from_settings(settings, service, **kwargs)
        config = JobsConfig(
            data_dir=Path(settings.data_dir),
            workers=int(settings.job_workers),
            max_queued=int(settings.job_max_queued),
            retention_s=float(settings.job_retention_s),
            max_attempts=int(settings.job_max_attempts),
            max_upload_bytes=int(getattr(settings, "max_upload_bytes", 1 << 30)),
        )
        manager = cls(config, service, **kwargs)
        manager.destinations = dict(getattr(settings, "destinations", {}) or {})
        return manager

    # -- life cycle -------------------------------------------------------------------------
    def start(self) -> None:
        """Recover jobs a dead process left running and start the workers."""
        if self._started:
            return
        self.pool.start()
        self._started = True
        log.info("job workers started", extra={"workers": self.config.workers,
                                               "queued": self.store.count(JobStatus.QUEUED)})

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the workers (running jobs go back to the queue) and close the database."""
        if self._started:
            self.pool.stop(timeout)
            self._started = False
        self.store.close()

    # -- requests ---------------------------------------------------------------------------
    def submit(self, uploads: Sequence[Upload], options: Any, *,
               delivery: dict[str, Any] | None = None, priority: str | None = None,
               idempotency_key: str | None = None,
               webhook_url: str | None = None) -> JobRecord:
        """Write the uploads to disk (fsynced), then queue the job; blocking (call it in a
        thread). :class:`JobError` 503 with Retry-After when the queue is full. ``delivery``
        (``{"destinations": [names]}``, names of ``self.destinations``): where the job sends
        its DICOM results once it has succeeded (STOW-RS jobs routed by model)."""
        # "routine" is what this FIFO queue does anyway; "urgent" it cannot honour.
        given = [name for name, value in (("priority", None if priority == "routine" else priority),
                                          ("Idempotency-Key", idempotency_key),
                                          ("webhook_url", webhook_url)) if value is not None]
        if given:
            raise JobError(400, "needs_distributed_jobs", f"{', '.join(given)}: only the "
                           "distributed job backend offers this (SFPC_JOBS_BACKEND=postgres; "
                           "see docs/deploy.md)")
        if self.pool.stopping:
            raise JobError(503, "shutting_down", "the server is shutting down; retry shortly",
                           {"Retry-After": "5"})
        if not uploads:
            raise JobError(422, "no_files", "the request has no file; send the volume as a "
                           "multipart field named 'file' (or several 'files')")
        # Refuse a full queue before reading the body to disk; the insert checks again.
        if self.store.count(JobStatus.QUEUED) >= self.config.max_queued:
            raise self._queue_full()
        job_id = new_job_id()
        inputs = self._store_inputs(job_id, uploads)
        try:
            if delivery:
                # Beside the inputs, durable before the row: a worker that runs the job finds it.
                write_durable(self.files.job_dir(job_id) / DELIVERY_FILE,
                              json.dumps(delivery).encode())
            record = self.store.insert(job_id, options=_options_json(options), inputs=inputs,
                                       now=self.clock(), max_queued=self.config.max_queued)
        except QueueFull:
            self.files.remove(job_id)
            raise self._queue_full() from None
        except BaseException:
            self.files.remove(job_id)
            raise
        log.info("job queued", extra={"job_id": job_id, "files": len(inputs),
                                      "bytes": sum(f.size for f in inputs)})
        self.pool.wake()
        self.pool.publish()
        return record

    def _store_inputs(self, job_id: str, uploads: Sequence[Upload]) -> list[InputFile]:
        """The uploads on disk in the job's folder (fsynced), described as the job's inputs;
        413 over the size limit, 507 when the data dir is full."""
        try:
            stored = self.files.write_inputs(job_id, [u.file for u in uploads],
                                             max_bytes=self.config.max_upload_bytes)
        except UploadTooLarge as exc:
            raise JobError(413, "upload_too_large", str(exc)) from exc
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise JobError(507, "insufficient_storage", "the server's data dir is full; "
                               "retry later", {"Retry-After": "60"}) from exc
            raise
        return [InputFile(name=client_name(u.filename, i), path=name,
                          content_type=u.content_type, size=size)
                for i, (u, (name, size)) in enumerate(zip(uploads, stored, strict=True))]

    def get(self, job_id: str) -> JobRecord:
        """The job; 404 unknown, 410 expired."""
        record = self.store.get(job_id) if is_job_id(job_id) else None
        if record is None:
            raise JobError(404, "job_not_found", f"no job {job_id!r} (never submitted, or "
                           "deleted long after it expired)")
        if record.is_expired(self.clock()):
            raise JobError(410, "job_expired", f"job {job_id} has expired: its results and "
                           "upload were deleted after the retention period")
        return record

    def list(self, status: JobStatus | None, limit: int, offset: int
             ) -> tuple[list[JobRecord], int]:
        """A page of jobs, newest first, and the number of matching jobs."""
        return self.store.list(status, limit=limit, offset=offset)

    def cancel(self, job_id: str) -> JobRecord:
        """Cancel a queued or running job; 409 when it already ended."""
        record = self.get(job_id)
        now = self.clock()
        before = self.store.cancel(record.id, now=now, expires_at=now + self.config.retention_s)
        if before is JobStatus.QUEUED:
            self.files.remove_inputs(record.id)
        elif before is JobStatus.RUNNING:
            # Here, the worker stops at its next check; in another process, that process's
            # sweeper sees the row change and stops it.
            self.pool.cancel_local(record.id)
        else:
            raise JobError(409, "job_finished", f"job {job_id} already ended "
                           f"({record.status.value}); nothing to cancel")
        log.info("job cancelled", extra={"job_id": job_id, "was": before.value})
        return self.get(job_id)

    def result_body(self, job_id: str) -> tuple[Path, ResultBody]:
        """The file ``GET /results`` sends: 409 unless the job succeeded."""
        record = self._finished(job_id)
        assert record.result_body is not None
        path = self.files.results_dir(record.id) / record.result_body.path
        return self._existing(path, job_id), record.result_body

    def result_file(self, job_id: str, filename: str) -> tuple[Path, str]:
        """One artefact of a succeeded job and its media type; 404 for another name."""
        record = self._finished(job_id)
        media = _manifest_media_types(self.files.results_dir(record.id))
        body = record.result_body
        if body is not None and filename == body.path:
            media.setdefault(filename, body.media_type)
        if not is_safe_name(filename) or filename not in media or filename == MANIFEST_FILE:
            names = ", ".join(record.results) or "none"
            raise JobError(404, "result_not_found", f"job {job_id} has no result file "
                           f"{filename!r}; it has: {names}")
        path = self.files.results_dir(record.id) / filename
        return self._existing(path, job_id), media[filename]

    def stats(self) -> dict[str, Any]:
        """Jobs by state and this process's worker threads (GET /v1/jobs/stats)."""
        counts = {s.value: self.store.count(s) for s in JobStatus}
        return {"backend": "sqlite", "jobs": counts,
                "workers": {"alive": self.config.workers if self._started else 0, "stale": 0}}

    def retry_after(self) -> int:
        """Seconds until a queue slot is likely free: one typical job over the workers."""
        runs = self.store.recent_run_seconds(20)
        per_job = statistics.median(runs) if runs else DEFAULT_JOB_SECONDS
        return int(min(MAX_RETRY_AFTER_S, max(1, math.ceil(per_job / self.config.workers))))

    # -- internals --------------------------------------------------------------------------
    def _queue_full(self) -> JobError:
        seconds = self.retry_after()
        return JobError(503, "queue_full", f"{self.config.max_queued} jobs are already queued; "
                        f"retry in about {seconds} s", {"Retry-After": str(seconds)})

    def _finished(self, job_id: str) -> JobRecord:
        record = self.get(job_id)
        if record.status is JobStatus.SUCCEEDED:
            return record
        if record.status in (JobStatus.QUEUED, JobStatus.RUNNING):
            raise JobError(409, "results_not_ready", f"job {job_id} is {record.status.value}; "
                           "poll its status URL until it has succeeded")
        # A cancelled job's code repeats its status; say the message alone then.
        detail = [v for v in (record.error_code, record.error_message)
                  if v and v != record.status.value]
        reason = f" ({': '.join(detail)})" if detail else ""
        raise JobError(409, f"job_{record.status.value}",
                       f"job {job_id} {record.status.value}{reason}; it has no results")

    def _existing(self, path: Path, job_id: str) -> Path:
        if not path.is_file():
            # The sweep removed the files between the status check and here.
            raise JobError(410, "job_expired", f"job {job_id} has expired: its results were "
                           "deleted after the retention period")
        return path

    def _execute(self, job: JobRecord, cancel: threading.Event) -> JobOutcome:
        try:
            options = SegmentOptions.model_validate(job.options)
        except ValueError as exc:
            raise JobFailure("invalid_option", f"the stored options no longer validate: {exc}"
                             ) from exc
        uploads = [(f.name, self.files.input_path(job.id, f.path)) for f in job.inputs]
        model_label = str(options.model or "default")
        try:
            with _in_flight():
                artefacts = self.service.segment_upload(uploads, options, cancel=cancel)
            if cancel.is_set():
                raise Cancelled("cancelled after the segmentation")
            body = artefacts.response(options.format)
        except Cancelled as exc:
            _count(model_label, "cancelled")
            raise JobCancelled(str(exc)) from exc
        except Exception as exc:
            # The same codes the synchronous endpoint answers with.
            failure = _failure(exc)
            if failure is None:
                raise
            _count(model_label, failure.code)
            raise failure from exc
        _count(str((artefacts.report.get("model") or {}).get("name", model_label)), "ok")

        produced = [(a.filename, a.media_type, a.content) for a in artefacts.artefacts]
        names = [a.filename for a in artefacts.artefacts]
        extra: list[tuple[str, bytes]] = []
        if body.filename not in names:
            # A zip of several artefacts: built once here rather than on every download.
            extra.append((body.filename, body.read()))
        self.files.write_results(job.id, produced, artefacts.report, extra)
        report = artefacts.report or {}
        summary: dict[str, Any] = {"timings": report.get("timings", {}),
                                   "model": report.get("model")}
        deliveries = self._deliver(job, [(a.filename, a.media_type, a.content)
                                         for a in artefacts.artefacts])
        if deliveries is not None:
            summary["deliveries"] = deliveries
        return JobOutcome(
            results=names,
            result_body=ResultBody(path=body.filename, media_type=body.media_type,
                                   filename=body.filename),
            report=summary,
        )

    def _deliver(self, job: JobRecord, produced: Sequence[tuple[str, str, bytes | Path]]
                 ) -> builtins.list[dict[str, Any]] | None:
        """Send the job's DICOM results where its delivery file says (each destination with
        its retries); the records of what went where, or None for a job without delivery.
        A destination that fails is recorded, not raised: the results stay downloadable."""
        try:
            delivery = json.loads((self.files.job_dir(job.id) / DELIVERY_FILE).read_text())
        except FileNotFoundError:
            return None
        from sfpc.io import dicom_net

        files = [(name, content if isinstance(content, bytes) else Path(content).read_bytes())
                 for name, media, content in produced if media == "application/dicom"]
        records = []
        for name in delivery.get("destinations", []):
            destination = self.destinations.get(name)
            if destination is None:
                records.append({"destination": name, "status": "failed",
                                "error": f"destination {name!r} is no longer configured"})
                continue
            if not files:
                records.append({"destination": name, "status": "failed",
                                "error": "the job produced no DICOM object to send"})
                continue
            record = dicom_net.send(name, destination, files)
            log.info("job results delivered" if record["status"] == "delivered"
                     else "job results not delivered",
                     extra={"job_id": job.id, "destination": name, "status": record["status"],
                            "attempts": record.get("attempts"), "error": record.get("error")})
            records.append(record)
        return records


def _options_json(options: Any) -> dict[str, Any]:
    if hasattr(options, "model_dump"):
        return options.model_dump(mode="json")
    return dict(options or {})


def _manifest_media_types(results_dir: Path) -> dict[str, str]:
    try:
        manifest = json.loads((results_dir / MANIFEST_FILE).read_text())
    except (FileNotFoundError, ValueError):
        return {}
    return {e["filename"]: e["media_type"] for e in manifest.get("artefacts", [])}


def _failure(exc: Exception) -> JobFailure | None:
    """The job failure for an error a bad upload, option or backend raises; None for a bug."""
    if isinstance(exc, BackendError):
        what = "is unavailable" if isinstance(exc, BackendUnavailable) else "failed"
        return JobFailure(exc.code, f"the inference backend {what}: {exc.message}")
    if isinstance(exc, SFPCError):
        return JobFailure(exc.code, exc.message)
    return None


def _count(model: str, outcome: str) -> None:
    SEGMENTATIONS.labels(model=model, outcome=outcome).inc()


@contextlib.contextmanager
def _in_flight() -> Iterator[None]:
    IN_FLIGHT.inc()
    try:
        yield
    finally:
        IN_FLIGHT.dec()


def _prometheus_queue_depth() -> Callable[[int], None]:
    def publish(depth: int) -> None:
        set_queue_depth(depth, "jobs")

    return publish
