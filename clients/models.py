"""Typed results of the gateway's endpoints, and the errors the client raises.

The shapes mirror the server's JSON (docs/server.md) but are declared here, so that a client
install needs neither FastAPI nor the server package. Unknown fields are kept (``extra="allow"``):
a newer server that adds a field does not break an older client.
"""

from __future__ import annotations

import enum
import io
import json
import zipfile
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path, PurePath
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from sfpc.io.files import write_atomic

ZIP_MEDIA_TYPE = "application/zip"


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow", protected_namespaces=())


# --- operations ---------------------------------------------------------------------------------
class Health(_Body):
    status: str


class Readiness(_Body):
    """``GET /readyz``: 200 or 503 alike become this (``ready`` says which)."""

    status: str
    models: dict[str, bool] = Field(default_factory=dict)

    @property
    def ready(self) -> bool:
        return self.status == "ready"


# --- models -------------------------------------------------------------------------------------
class ModelInfo(_Body):
    name: str
    version: str
    task: str = ""
    spatial_dims: int
    in_channels: int
    # Channels an upload carries (older gateways do not say: then in_channels).
    image_channels: int | None = None
    context_slices: int = 0
    num_classes: int
    class_names: list[str]
    orientation: str = "RAS"
    plane: str | None = None
    spacing: list[float | None] | None = None
    input_mode: str = ""
    patch_size: list[int] = Field(default_factory=list)
    normalisation: dict[str, Any] | None = None
    uncertainty: bool = False
    # What produces the uncertainty maps (method, samples per pass, tau, graph, maps); None
    # without an uncertainty graph.
    uncertainty_method: dict[str, Any] | None = None
    # As the gateway declares it: flip=true is allowed unless the model's metadata says it was
    # trained without flips (GET /v1/models always states it; the default is for bodies that
    # omit it).
    flip: bool = True
    perturbation: dict[str, Any] = Field(default_factory=dict)
    temperature: float = 1.0
    # The review flag's rule (measure, threshold, how it was chosen); empty: no flag.
    quality: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)
    sfpc_version: str = ""
    created: str = ""
    backend: str = ""
    ready: bool = False


class ModelList(_Body):
    default: str | None
    models: list[ModelInfo]

    def get(self, name: str | None = None) -> ModelInfo:
        """The model called ``name`` (the default model when None); KeyError otherwise."""
        wanted = self.default if name is None else name
        for model in self.models:
            if model.name == wanted:
                return model
        raise KeyError(f"model {wanted!r} is not served; served: "
                       f"{', '.join(m.name for m in self.models) or 'none'}")


# --- jobs ---------------------------------------------------------------------------------------
class JobStatus(str, enum.Enum):
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


class JobErrorInfo(_Body):
    code: str
    message: str


class JobTimings(_Body):
    queued_s: float | None = None
    run_s: float | None = None
    stages: dict[str, float] = Field(default_factory=dict)


class JobSubmitted(_Body):
    id: str
    status: JobStatus
    status_url: str
    results_url: str


class Job(_Body):
    """One job as ``GET /v1/jobs/{id}`` shows it."""

    id: str
    status: JobStatus
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    expires_at: datetime | None = None
    attempts: int = 0
    options: dict[str, Any] = Field(default_factory=dict)
    inputs: int = 0
    input_bytes: int = 0
    error: JobErrorInfo | None = None
    results: list[str] = Field(default_factory=list)
    timings: JobTimings = Field(default_factory=JobTimings)
    # Jobs the gateway routes (STOW-RS): where their DICOM results were sent.
    deliveries: list[dict[str, Any]] | None = None
    status_url: str
    results_url: str


class JobPage(_Body):
    items: list[Job]
    total: int
    limit: int
    offset: int
    next_offset: int | None = None


# --- segmentation results -----------------------------------------------------------------------
@dataclass
class SegmentResult:
    """The artefacts of one segmentation, by file name (a zip response is unpacked)."""

    files: dict[str, bytes]
    model: str | None = None
    model_version: str | None = None
    series_uid: str | None = None
    artefacts: list[str] = field(default_factory=list)
    request_id: str | None = None

    @property
    def report(self) -> dict[str, Any] | None:
        """``report.json`` parsed, when it was asked for (``outputs=...,report_json``)."""
        raw = self.files.get("report.json")
        return None if raw is None else json.loads(raw)

    def save(self, directory: str | Path) -> list[Path]:
        """Write every file into ``directory`` (created); returns the paths written."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        return [write_atomic(out / name, data) for name, data in self.files.items()]

    @classmethod
    def from_body(cls, content: bytes, media_type: str, filename: str | None,
                  headers: Any) -> SegmentResult:
        """A result from a response body: a zip of artefacts, or one file named by
        ``Content-Disposition`` (``filename``)."""
        if media_type.split(";")[0].strip() == ZIP_MEDIA_TYPE:
            files = unpack_zip(content)
        else:
            files = {safe_name(filename or "result"): content}
        artefacts = [a for a in (headers.get("x-sfpc-artefacts") or "").split(",") if a]
        return cls(files=files, model=headers.get("x-sfpc-model") or None,
                   model_version=headers.get("x-sfpc-model-version") or None,
                   series_uid=headers.get("x-sfpc-series-uid") or None,
                   artefacts=artefacts or list(files),
                   request_id=headers.get("x-request-id") or None)


def safe_name(name: str) -> str:
    """A server-given file name reduced to its last component (never a path to follow)."""
    base = PurePath(name.replace("\\", "/")).name
    if base in ("", ".", ".."):
        raise ValueError(f"unusable artefact file name {name!r}")
    return base


def unpack_zip(content: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(content)) as archive:
        return {safe_name(info.filename): archive.read(info) for info in archive.infolist()
                if not info.is_dir()}


# --- errors -------------------------------------------------------------------------------------
class SFPCError(Exception):
    """Base class of every error this client raises."""


class APIError(SFPCError):
    """The gateway answered with an error status; ``code`` is its stable slug
    (docs/server.md, "Errors"), ``request_id`` the id to quote when reporting a problem."""

    def __init__(self, status: int, code: str, message: str, *, detail: Any = None,
                 request_id: str | None = None, retry_after: float | None = None,
                 method: str = "", url: str = "") -> None:
        where = f" ({method} {url})" if method else ""
        super().__init__(f"{status} {code}: {message}{where}")
        self.status = status
        self.code = code
        self.message = message
        self.detail = detail
        self.request_id = request_id
        self.retry_after = retry_after


class TransportError(SFPCError):
    """The gateway could not be reached, or the connection broke, after every retry."""


class RequestTimeout(TransportError):
    """No answer within the client's timeout (the request may still run on the server)."""


class WaitTimeout(SFPCError):
    """A job did not reach a final state within the time the caller was prepared to wait (it
    goes on running on the server)."""


class JobFailed(SFPCError):
    """A job ended without results (failed, cancelled or expired); ``job`` holds why."""

    def __init__(self, job: Job) -> None:
        error = f": {job.error.code}: {job.error.message}" if job.error else ""
        super().__init__(f"job {job.id} {job.status.value}{error}")
        self.job = job


__all__ = [
    "APIError", "Health", "Job", "JobErrorInfo", "JobFailed", "JobPage", "JobStatus",
    "JobSubmitted", "JobTimings", "ModelInfo", "ModelList", "Readiness", "RequestTimeout",
    "SFPCError", "SegmentResult", "TransportError", "WaitTimeout", "safe_name", "unpack_zip",
]
