"""HTTP routers of the gateway: operations (/healthz, /readyz, /metrics), models (/v1/models),
synchronous segmentation (/v1/segment); the asynchronous jobs router lives in ``jobs.py``.

Every error body has one shape, :class:`ErrorBody`: ``{"error": {"code", "message", "detail"?,
"request_id"?}}``.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class ErrorInfo(BaseModel):
    code: str = Field(description="Stable machine-readable slug, e.g. 'invalid_image'.")
    message: str = Field(description="What is wrong, in words, and what to do instead.")
    detail: Any = Field(None, description="Structured detail (e.g. the invalid fields).")
    request_id: str | None = Field(None, description="Quote it when reporting a problem.")


class ErrorBody(BaseModel):
    error: ErrorInfo


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries documenting the JSON error body for ``statuses``."""
    words = {400: "Malformed request or upload", 401: "Missing or invalid API key",
             404: "Not found", 413: "Upload over a size limit", 415: "Unsupported media type "
             "or file format", 422: "Readable but unusable input or options",
             500: "Server bug (quote the request id)", 502: "Inference backend failed",
             503: "Not ready or overloaded", 504: "Timed out"}
    return {status: {"model": ErrorBody, "description": words.get(status, "Error")}
            for status in statuses}
