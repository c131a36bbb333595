"""HTTP answers for errors: the JSON body of :mod:`sfpc.errors`, with the request id, counted in
the metrics; one exception handler for every :class:`~sfpc.errors.SFPCError`."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from sfpc.errors import SFPCError, error_body, http_code
from sfpc.server.observability import REQUEST_ID, count_error

log = logging.getLogger("sfpc.server.app")


def error_response(status: int, code: str, message: str, detail: Any = None,
                   headers: Mapping[str, str] | None = None) -> JSONResponse:
    """The one JSON error shape, with the request id; counted by code in the metrics."""
    count_error(code, status)
    if status >= 500:
        log.warning("error response", extra={"status": status, "code": code})
    return JSONResponse(status_code=status,
                        content=error_body(code, message, detail, REQUEST_ID.get()),
                        headers=dict(headers) if headers else None)


def response_for(exc: SFPCError) -> JSONResponse:
    headers = dict(exc.headers)
    if exc.status == 401:
        headers.setdefault("WWW-Authenticate", "Bearer")
    return error_response(exc.status, exc.code, exc.message, exc.detail, headers)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(SFPCError)
    async def _sfpc(request: Request, exc: SFPCError) -> JSONResponse:
        return response_for(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [{"field": ".".join(str(p) for p in e.get("loc", ())),
                     "message": str(e.get("msg", ""))} for e in exc.errors()]
        text = "; ".join(f"{p['field']}: {p['message']}" for p in problems)
        return error_response(422, "invalid_request", f"invalid request: {text}", problems)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = str(exc.detail)
        if exc.status_code == 404:
            message = f"no endpoint at {request.url.path}; see /docs for the API"
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        return error_response(exc.status_code, http_code(exc.status_code), message,
                              headers=getattr(exc, "headers", None))
