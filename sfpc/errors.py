"""Errors a user can act on, shared by every layer: each has a stable ``code`` and the HTTP
``status`` the gateway answers with; the command line maps them to exit codes."""

from __future__ import annotations

from typing import Any


class ServiceError(Exception):
    """A request the service refuses; ``status`` is the HTTP status, ``code`` a stable slug."""

    status = 422
    code = "invalid_request"

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None,
                 detail: Any = None) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        if code is not None:
            self.code = code
        self.detail = detail


class ModelNotFound(ServiceError):
    status = 404
    code = "model_not_found"


class OptionError(ServiceError):
    status = 422
    code = "invalid_option"


class NoModels(ServiceError):
    status = 503
    code = "no_model_loaded"


class Cancelled(Exception):
    """The run was stopped through its ``cancel`` event (timeout or job cancellation)."""
