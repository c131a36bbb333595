"""Every error a user can act on, for every layer: a stable ``code``, the HTTP ``status`` the
gateway answers with, a message in the user's terms, and the one JSON body they travel in.

The I/O layer raises :class:`UploadError`, the engine :class:`InputError`, backends
:class:`BackendError`, the pipeline :class:`ServiceError` and its kinds, the jobs API
:class:`JobError`. The gateway answers all of them with :func:`error_body` through one exception
handler, jobs record their ``code`` and message, and the command lines map them to exit codes
(:attr:`SFPCError.exit_code`), so an upload refused over HTTP is refused with the same code by
``sfpc predict``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# Status families of bad uploads.
MALFORMED = 400  # the bytes are not what they claim to be (truncated, corrupt, unsafe archive)
TOO_LARGE = 413  # over a size limit (upload, decompressed size, voxels, archive members)
UNSUPPORTED = 415  # a format or encoding this server does not read (transfer syntax, colour...)
UNPROCESSABLE = 422  # readable, but not a volume that can be segmented (geometry, dims, NaN...)

# Codes of the errors HTTP itself raises (unknown path, wrong method, ...), by status.
HTTP_CODES: Mapping[int, str] = {
    400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
    405: "method_not_allowed", 406: "not_acceptable", 409: "conflict", 410: "gone",
    413: "upload_too_large", 415: "unsupported_media_type", 422: "invalid_request",
    429: "too_many_requests", 503: "unavailable",
}

# Command-line exit codes: the input or the options are wrong (fix and rerun) versus the
# machinery failed (retry, or check the backend).
EXIT_USER_ERROR = 2
EXIT_FAILURE = 1


def http_code(status: int) -> str:
    """The code of an error HTTP raised with ``status`` and no code of ours."""
    return HTTP_CODES.get(status, f"http_{status}")


def error_body(code: str, message: str, detail: Any = None,
               request_id: str | None = None) -> dict[str, Any]:
    """The one JSON error shape: ``{"error": {"code", "message", ["detail"], ["request_id"]}}``."""
    error: dict[str, Any] = {"code": code, "message": message}
    if detail is not None:
        error["detail"] = detail
    if request_id and request_id != "-":
        error["request_id"] = request_id
    return {"error": error}


class SFPCError(Exception):
    """An error a user can act on; subclasses set the default ``status`` and ``code``."""

    status: int = 422
    code: str = "invalid_request"

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None,
                 detail: Any = None, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        if code is not None:
            self.code = code
        self.detail = detail
        self.headers: dict[str, str] = dict(headers or {})

    @property
    def exit_code(self) -> int:
        """What a command line exits with: 2 for a request to fix, 1 for a failure."""
        return EXIT_USER_ERROR if 400 <= self.status < 500 else EXIT_FAILURE

    def body(self, request_id: str | None = None) -> dict[str, Any]:
        return error_body(self.code, self.message, self.detail, request_id)

    def __str__(self) -> str:
        return self.message


class UploadError(SFPCError, ValueError):
    """An upload that cannot be turned into a volume.

    Decoders never let a library's own exception (pydicom, nibabel, zipfile, zlib...) escape for
    bad input: they wrap it here, so the gateway answers 4xx without knowing which library failed.
    """

    _STATUSES = (MALFORMED, TOO_LARGE, UNSUPPORTED, UNPROCESSABLE)

    def __init__(self, status: int, code: str, message: str) -> None:
        if status not in self._STATUSES:
            raise ValueError(f"UploadError status must be one of {self._STATUSES}, got {status}")
        super().__init__(message, status=status, code=code)

    def __repr__(self) -> str:
        return f"UploadError({self.status}, {self.code!r}, {self.message!r})"


class InputError(SFPCError, ValueError):
    """The decoded image or its affine cannot be segmented; the message says why."""

    status = 422
    code = "invalid_image"


class ServiceError(SFPCError):
    """A request the pipeline refuses (an option, a model, the image's size on the model grid)."""


class ModelNotFound(ServiceError):
    status = 404
    code = "model_not_found"


class OptionError(ServiceError):
    status = 422
    code = "invalid_option"


class NoModels(ServiceError):
    status = 503
    code = "no_model_loaded"


class BackendError(SFPCError, RuntimeError):
    """An inference backend failed; the message says what to check or do next."""

    status = 502
    code = "backend_error"


class BackendUnavailable(BackendError):
    """The backend cannot serve right now (server down, model not loaded, runtime missing)."""

    status = 503
    code = "backend_unavailable"

    def __init__(self, message: str, **kwargs: Any) -> None:
        kwargs.setdefault("headers", {"Retry-After": "5"})
        super().__init__(message, **kwargs)


class Cancelled(SFPCError):
    """The run was stopped through its ``cancel`` event (timeout or job cancellation)."""

    status = 504
    code = "timeout"


class JobError(SFPCError):
    """A job request the API refuses (unknown job, results not ready, queue full...)."""

    def __init__(self, status: int, code: str, message: str,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message, status=status, code=code, headers=headers)
