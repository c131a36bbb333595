"""Prometheus metrics and structured JSON logs of the gateway.

Metrics live in the process-wide default registry, created once at import, so that every app
built in a process (tests build several) shares them. The jobs subsystem sets the queue depth
through :data:`QUEUE_DEPTH` (``QUEUE_DEPTH.labels(queue="jobs").set(n)``) or
:func:`set_queue_depth`.

Logs are one JSON object per line with the request id of the HTTP request being served. Patient
data never enters them: messages are fixed strings and the extra fields are counters, timings,
codes, shapes and model names; DICOM header values (names, ids, dates, UIDs) are never logged.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
import time
import uuid
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sfpc.errors import error_body

REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("sfpc_request_id", default="-")

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300,
                    600)

REQUESTS = Counter("sfpc_http_requests_total", "HTTP requests answered",
                   ["method", "route", "status"])
REQUEST_SECONDS = Histogram("sfpc_http_request_duration_seconds", "HTTP request latency",
                            ["method", "route"], buckets=_LATENCY_BUCKETS)
STAGE_SECONDS = Histogram("sfpc_stage_duration_seconds", "Segmentation stage latency "
                          "(decode, preprocess, inference, postprocess, encode)", ["stage"],
                          buckets=_LATENCY_BUCKETS)
SEGMENTATIONS = Counter("sfpc_segmentations_total", "Segmentations run",
                        ["model", "outcome"])
ERRORS = Counter("sfpc_errors_total", "Error responses by kind (the JSON error code)",
                 ["code", "status"])
QUEUE_DEPTH = Gauge("sfpc_queue_depth", "Requests or jobs waiting for a worker", ["queue"])
IN_FLIGHT = Gauge("sfpc_segmentations_in_flight", "Segmentations running now")

for _queue in ("sync", "jobs"):
    QUEUE_DEPTH.labels(queue=_queue).set(0)


def observe_stage(stage: str, seconds: float) -> None:
    """Record the duration of one segmentation stage."""
    STAGE_SECONDS.labels(stage=stage).observe(max(0.0, float(seconds)))


def set_queue_depth(depth: int, queue: str = "jobs") -> None:
    """Export how many requests (``queue="sync"``) or jobs (``"jobs"``) wait for a worker."""
    QUEUE_DEPTH.labels(queue=queue).set(depth)


def count_error(code: str, status: int) -> None:
    ERRORS.labels(code=code, status=str(status)).inc()


def metrics_payload() -> tuple[bytes, str]:
    """The exposition text and its content type, for GET /metrics."""
    return generate_latest(), CONTENT_TYPE_LATEST


# ----------------------------------------------------------------------------------------------
# Logging
# ----------------------------------------------------------------------------------------------

# Attributes every LogRecord has; anything else was passed through ``extra=`` and is logged.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, request id, extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", None) or REQUEST_ID.get(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in entry and key != "color_message":
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = REQUEST_ID.get()
        return True


OWN_LOGGERS = ("sfpc", "uvicorn")


class _RedactThirdParty(logging.Filter):
    """Withhold the text of other libraries' records (pydicom, highdicom, nibabel, warnings):
    they may quote header values (names, dates, ids) or client file names. The logger, level and
    warning category are kept, so an operator still sees that something was reported."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.split(".")[0] in OWN_LOGGERS:
            return True
        source = record.name
        if record.name == "py.warnings":
            category = re.search(r"(\w+Warning):", str(record.msg))
            source = f"{record.name} {category.group(1) if category else ''}".strip()
        record.msg = f"{record.levelname.lower()} from {source} (text withheld: it may quote " \
                     "DICOM header values)"
        record.args = None
        record.exc_info = None
        record.exc_text = None
        return True


def configure_logging(level: str = "INFO", json_lines: bool = True) -> None:
    """Send every log record to stderr, as JSON lines (or plain text), through one handler.

    The ``sfpc`` and ``uvicorn`` loggers log at ``level``; other libraries at WARNING, with their
    text withheld (:class:`_RedactThirdParty`); Python warnings are captured into the same stream.
    uvicorn's access log is silenced: the gateway logs each request itself, with its request id
    and route template, and without query strings (which could carry identifiers).
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_RequestIdFilter())
    handler.addFilter(_RedactThirdParty())
    if json_lines:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(
            "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    for name in (*OWN_LOGGERS, "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.setLevel(level)
        logger.propagate = True
    logging.getLogger("uvicorn.access").disabled = True
    logging.captureWarnings(True)


# ----------------------------------------------------------------------------------------------
# Per-request context: id, access log, metrics, last-resort 500
# ----------------------------------------------------------------------------------------------

_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_REQUEST_ID_OK = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
access_log = logging.getLogger("sfpc.server.access")
error_log = logging.getLogger("sfpc.server.error")


class RequestContextMiddleware:
    """Outermost middleware: gives each request an id (the client's X-Request-ID when it is a
    short token, else a new one), echoes it in the response, logs one line per request (method,
    route template, status, duration: never the query string or body), counts requests and
    latencies by route template, and turns any exception that escaped the app into a 500 JSON body
    carrying the request id (the traceback goes to the log)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = _header(scope, b"x-request-id")
        request_id = given if given and _REQUEST_ID_OK.match(given) else uuid.uuid4().hex
        token = REQUEST_ID.set(request_id)
        scope.setdefault("state", {})["request_id"] = request_id
        status = {"code": 500, "started": False}
        t0 = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = int(message["status"])
                status["started"] = True
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", request_id.encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception as exc:  # the last resort: a bug, reported as such
            error_log.exception("unhandled error", extra={"error_type": type(exc).__name__})
            if not status["started"]:
                await send_json_error(
                    send_with_id, 500, "internal_error",
                    "the server failed on this request; this is a bug: report it with the "
                    "request id", request_id=request_id)
        finally:
            seconds = time.perf_counter() - t0
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            method = scope.get("method", "")
            if method not in _METHODS:
                method = "other"  # client-chosen strings must not become label values
            REQUESTS.labels(method=method, route=template, status=str(status["code"])).inc()
            REQUEST_SECONDS.labels(method=method, route=template).observe(seconds)
            access_log.info("request", extra={"method": method, "route": template,
                                              "status": status["code"],
                                              "duration_s": round(seconds, 4)})
            REQUEST_ID.reset(token)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return None


async def send_json_error(send: Send, status: int, code: str, message: str, *,
                          close: bool = False, request_id: str | None = None) -> None:
    """Send a complete JSON error response from ASGI middleware."""
    count_error(code, status)
    body = json.dumps(error_body(code, message, request_id=request_id or REQUEST_ID.get())
                      ).encode()
    headers = [(b"content-type", b"application/json"),
               (b"content-length", str(len(body)).encode())]
    if close:
        # The client may still be sending: tell it this connection is done.
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
