"""Job states and the JSON shapes of the ``/v1/jobs`` endpoints.

``JobRecord`` is one row of the job database as Python sees it; the ``*Response`` models are what
goes over HTTP (and into the OpenAPI schema). Times are stored as Unix seconds and shown as
ISO 8601 UTC strings.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from pydantic import BaseModel, Field


class JobStatus(str, enum.Enum):
    """Life of a job: queued -> running -> succeeded | failed | cancelled; any end -> expired."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"

    @property
    def terminal(self) -> bool:
        """True once nothing will run for this job again."""
        return self not in (JobStatus.QUEUED, JobStatus.RUNNING)


@dataclass(frozen=True)
class InputFile:
    """One uploaded file as kept on disk: its client-side name and its path in the job folder."""

    name: str
    path: str
    content_type: str | None = None
    size: int = 0


@dataclass(frozen=True)
class ResultBody:
    """What ``GET /v1/jobs/{id}/results`` returns: a file in the job folder and its media type."""

    path: str
    media_type: str
    filename: str


@dataclass(frozen=True)
class JobRecord:
    """One job as stored (see :mod:`sfpc.server.jobs.store` for the table)."""

    id: str
    seq: int
    status: JobStatus
    options: dict[str, Any]
    inputs: list[InputFile]
    created_at: float
    updated_at: float
    attempts: int = 0
    started_at: float | None = None
    finished_at: float | None = None
    expires_at: float | None = None
    error_code: str | None = None
    error_message: str | None = None
    results: list[str] = field(default_factory=list)
    result_body: ResultBody | None = None
    report: dict[str, Any] | None = None
    owner: str | None = None
    heartbeat_at: float | None = None
    # Distributed mode only (server/jobs/pg_store.py); the SQLite store leaves the defaults.
    priority: int = 0
    idempotency_key: str | None = None
    webhook: dict[str, Any] | None = None
    queue_job_id: int | None = None

    def is_expired(self, now: float) -> bool:
        """Expired in the database, or past its expiry time though not yet swept."""
        if self.status is JobStatus.EXPIRED:
            return True
        return self.expires_at is not None and self.expires_at <= now


def iso_time(ts: float | None) -> str | None:
    """Unix seconds as an ISO 8601 UTC string (None stays None)."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat().replace("+00:00", "Z")


# ----------------------------------------------------------------------------------------------
# HTTP bodies
# ----------------------------------------------------------------------------------------------


class ErrorDetail(BaseModel):
    code: str = Field(description="Stable machine-readable error kind.")
    message: str = Field(description="What went wrong, for a person.")


class JobSubmitted(BaseModel):
    """The 202 answer to ``POST /v1/jobs``."""

    id: str
    status: JobStatus
    status_url: str
    results_url: str


class JobTimings(BaseModel):
    queued_s: float | None = Field(None, description="From submission to the last start (or "
                                   "to now while queued).")
    run_s: float | None = Field(None, description="From the last start to the end (or to now "
                                "while running).")
    stages: dict[str, float] = Field(default_factory=dict, description="Per-stage seconds of "
                                     "the segmentation (from its report), once succeeded.")


class JobView(BaseModel):
    """The answer to ``GET /v1/jobs/{id}`` and one item of the job list."""

    id: str
    status: JobStatus
    created_at: str
    started_at: str | None = None
    finished_at: str | None = None
    expires_at: str | None = Field(None, description="When results and uploads are deleted.")
    attempts: int = Field(0, description="How many times a worker has started this job.")
    options: dict[str, Any] = Field(default_factory=dict)
    inputs: int = Field(0, description="Number of uploaded files (their names are not shown: "
                        "they may identify a patient).")
    input_bytes: int = Field(0, description="Total size of the uploaded files.")
    error: ErrorDetail | None = None
    results: list[str] = Field(default_factory=list, description="Result file names, each "
                               "downloadable from results_url + '/' + name.")
    timings: JobTimings = Field(default_factory=JobTimings)
    deliveries: list[dict[str, Any]] | None = Field(
        None, description="Jobs with a route (STOW-RS): where the DICOM results were sent, "
        "each {destination, kind, target, status: delivered | failed, attempts, instances: "
        "[{file, sop_class_uid, sop_instance_uid}], error?, time}.")
    priority: str | None = Field(None, description="Distributed mode: routine or urgent.")
    webhook: dict[str, Any] | None = Field(
        None, description="Jobs submitted with webhook_url: {url, status: pending | delivered "
        "| retrying | failed, attempts, error}.")
    status_url: str
    results_url: str


class JobList(BaseModel):
    """One page of ``GET /v1/jobs``, newest first."""

    items: list[JobView]
    total: int = Field(description="Jobs matching the filter, on all pages.")
    limit: int
    offset: int
    next_offset: int | None = Field(None, description="Offset of the next page; null on the "
                                    "last one.")
