"""Python clients of the SFPC gateway: :class:`SFPCClient` (blocking) and
:class:`AsyncSFPCClient` (asyncio), one method per endpoint, typed results.

Both share the request descriptions and response parsers of this module (``_Call`` and the
``_op_*`` functions); only the send loop differs. Failures become :mod:`sfpc.clients.models`
errors: :class:`APIError` for an error status (with the server's code and request id),
:class:`TransportError` when the gateway cannot be reached, :class:`RequestTimeout` when it does
not answer in time.

Retries (:class:`RetryPolicy`): a refused connection is always retried, since the request never
arrived; a 503 or 429 is retried after the server's ``Retry-After`` or an exponential backoff;
a connection that broke mid-request is retried only for requests that are safe to repeat
(reads, and synchronous segmentations, which change nothing on the server), never for a job
submission or a cancellation, which could then happen twice.

    with SFPCClient("http://127.0.0.1:8000", api_key=key) as client:
        result = client.segment("ct.nii.gz", outputs=["mask_nifti", "report_json"])
        result.save("out/ct")

The segmentation options (``model``, ``outputs``, ``uncertainty``, ``flip``, ``series_uid``,
``format``) are keyword arguments named after the fields of
:class:`~sfpc.inference.options.SegmentOptions`, the schema the gateway reads them with; a name
that is no field raises TypeError here, and values are checked by the gateway (422
``invalid_option``), so that a client talks to a newer gateway without an update.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import logging
import os
import random
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeGuard, TypeVar, cast
from urllib.parse import quote

import httpx

import sfpc
from sfpc.clients.models import (
    APIError,
    Health,
    Job,
    JobFailed,
    JobPage,
    JobStatus,
    JobSubmitted,
    ModelInfo,
    ModelList,
    Readiness,
    RequestTimeout,
    SegmentResult,
    TransportError,
    WaitTimeout,
    safe_name,
)
from sfpc.inference.options import option_fields, option_params
from sfpc.io.files import write_atomic

log = logging.getLogger("sfpc.clients")
T = TypeVar("T")

Upload = str | os.PathLike[str] | tuple[str, bytes]
"""A file to send: a path (a folder sends every file under it, e.g. a DICOM series), or a
``(name, content)`` pair."""
Uploads = Upload | Sequence[Upload]

DEFAULT_TIMEOUT_S = 300.0
DEFAULT_CONNECT_TIMEOUT_S = 10.0


# ----------------------------------------------------------------------------------------------
# Retries
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently to retry.

    ``attempts`` counts every try (1 = never retry). The n-th retry waits
    ``min(max_backoff_s, backoff_s * 2**(n-1))``, scaled by a random factor in [0.5, 1] when
    ``jitter`` (so that many clients do not retry in lockstep); a server's ``Retry-After`` is
    honoured instead, up to ``max_backoff_s``.
    """

    attempts: int = 5
    backoff_s: float = 0.5
    max_backoff_s: float = 30.0
    jitter: bool = True
    statuses: frozenset[int] = field(default_factory=lambda: frozenset({429, 503}))

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("RetryPolicy.attempts must be >= 1")
        if self.backoff_s < 0 or self.max_backoff_s < 0:
            raise ValueError("RetryPolicy backoffs must be >= 0")

    def delay(self, retry: int, retry_after: float | None = None) -> float:
        """Seconds to wait before retry number ``retry`` (1-based)."""
        if retry_after is not None:
            return max(0.0, min(self.max_backoff_s, retry_after))
        wait = min(self.max_backoff_s, self.backoff_s * 2 ** (retry - 1))
        return wait * random.uniform(0.5, 1.0) if self.jitter else wait

    def may_retry(self, exc: httpx.TransportError, idempotent: bool) -> bool:
        """Whether a transport failure may be retried: a request that never reached the
        server always; one that may have, only when repeating it is harmless."""
        if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout, httpx.WriteError)):
            return True
        return idempotent and isinstance(exc, (httpx.ReadError, httpx.RemoteProtocolError))


NO_RETRY = RetryPolicy(attempts=1)


# ----------------------------------------------------------------------------------------------
# Requests and responses (shared by both clients)
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Call:
    method: str
    path: str
    params: dict[str, Any] = field(default_factory=dict)
    uploads: tuple[tuple[str, bytes | Path], ...] = ()
    idempotent: bool = True
    accept: frozenset[int] = frozenset()  # error statuses the parser handles itself
    timeout: httpx.Timeout | None = None


Parser = Callable[[httpx.Response], T]


def expand_uploads(files: Uploads) -> list[tuple[str, bytes | Path]]:
    """``files`` as ``(name, bytes or path)`` pairs; a folder becomes its files, sorted."""
    items: Sequence[Upload]
    if isinstance(files, (str, os.PathLike)) or _is_pair(files):
        items = [files]
    else:
        items = cast("Sequence[Upload]", files)
    out: list[tuple[str, bytes | Path]] = []
    for item in items:
        if _is_pair(item):
            name, content = item
            out.append((str(name), bytes(content)))
            continue
        if isinstance(item, tuple):
            raise TypeError(f"an upload given as a tuple is (file name, bytes), not {item!r}"[:200])
        path = Path(item)
        if path.is_dir():
            out += [(p.name, p) for p in sorted(path.rglob("*")) if p.is_file()]
        elif path.is_file():
            out.append((path.name, path))
        else:
            raise FileNotFoundError(f"no such file or folder: {path}")
    if not out:
        raise ValueError("nothing to upload: no file was given (or the folder is empty)")
    return out


def _is_pair(value: object) -> TypeGuard[tuple[str, bytes]]:
    return (isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], str)
            and isinstance(value[1], (bytes, bytearray, memoryview)))


@contextlib.contextmanager
def _multipart(uploads: Sequence[tuple[str, bytes | Path]]) -> Iterator[list[Any] | None]:
    """httpx ``files=`` for one attempt; paths are opened here (and streamed, not read into
    memory), so a retry sends them again from the start."""
    if not uploads:
        yield None
        return
    with contextlib.ExitStack() as stack:
        parts = []
        for name, content in uploads:
            body = stack.enter_context(open(content, "rb")) if isinstance(content, Path) \
                else content
            parts.append(("file", (name, body, "application/octet-stream")))
        yield parts


def _call_timeout(call: _Call) -> httpx.Timeout | Any:
    """The call's own timeout, or the client's (httpx's marker for "not overridden")."""
    return httpx.USE_CLIENT_DEFAULT if call.timeout is None else call.timeout


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


def api_error(response: httpx.Response) -> APIError:
    """The :class:`APIError` for an error response (the server's JSON error body, or the text
    of whatever answered instead, e.g. a proxy)."""
    code, message, detail, request_id = f"http_{response.status_code}", "", None, None
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        error = body["error"]
        code = str(error.get("code") or code)
        message = str(error.get("message") or "")
        detail = error.get("detail")
        request_id = error.get("request_id")
    if not message:
        message = response.text.strip()[:500] or response.reason_phrase
    return APIError(response.status_code, code, message, detail=detail,
                    request_id=request_id or response.headers.get("x-request-id"),
                    retry_after=_retry_after(response), method=response.request.method,
                    url=str(response.request.url.copy_with(query=None)))


def _filename(response: httpx.Response) -> str | None:
    disposition = response.headers.get("content-disposition", "")
    for part in disposition.split(";"):
        key, _, value = part.strip().partition("=")
        if key.lower() == "filename" and value:
            return value.strip().strip('"')
    return None


def _json_model(cls: type[T]) -> Parser[T]:
    return lambda response: cls.model_validate(response.json())  # type: ignore[attr-defined]


def _parse_ready(response: httpx.Response) -> Readiness:
    body = response.json()
    if response.status_code == 200:
        return Readiness.model_validate(body)
    error = body.get("error", {}) if isinstance(body, dict) else {}
    models = (error.get("detail") or {}).get("models") or {}
    return Readiness(status=str(error.get("code") or "not_ready"), models=models)


def _parse_result(response: httpx.Response) -> SegmentResult:
    return SegmentResult.from_body(response.content, response.headers.get("content-type", ""),
                                   _filename(response), response.headers)


def _job_path(job_id: str) -> str:
    return f"/v1/jobs/{quote(str(job_id), safe='')}"


def _with_options_doc(method: Callable[..., T]) -> Callable[..., T]:
    """Append the segmentation options, from the schema, to ``method``'s docstring."""
    lines = [f"    ``{f.name}``: {f.description}" for f in option_fields()]
    method.__doc__ = (method.__doc__ or "").rstrip() + "\n\n    Options (SegmentOptions):\n" \
        + "\n".join(lines) + "\n"
    return method


# One description per endpoint, used by both clients.
def _op_segment(files: Uploads, options: Mapping[str, Any], timeout: float | None
                ) -> tuple[_Call, Parser[SegmentResult]]:
    call = _Call("POST", "/v1/segment", option_params(options), tuple(expand_uploads(files)),
                 idempotent=True, timeout=None if timeout is None else httpx.Timeout(timeout))
    return call, _parse_result


def _op_submit(files: Uploads, options: Mapping[str, Any]
               ) -> tuple[_Call, Parser[JobSubmitted]]:
    call = _Call("POST", "/v1/jobs", option_params(options), tuple(expand_uploads(files)),
                 idempotent=False)
    return call, _json_model(JobSubmitted)


def _op_jobs(status: JobStatus | str | None, limit: int, offset: int
             ) -> tuple[_Call, Parser[JobPage]]:
    params: dict[str, Any] = {"limit": limit, "offset": offset}
    if status is not None:
        params["status"] = JobStatus(status).value
    return _Call("GET", "/v1/jobs", params), _json_model(JobPage)


class _PollClock:
    """Polling intervals that grow from ``first`` to ``most``, and the caller's deadline."""

    def __init__(self, job_id: str, timeout: float | None, first: float, most: float) -> None:
        self.job_id = job_id
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.timeout = timeout
        self.interval = first
        self.most = most

    def next_wait(self, job: Job) -> float:
        if self.deadline is not None and time.monotonic() >= self.deadline:
            raise WaitTimeout(f"job {self.job_id} still {job.status.value} after "
                              f"{self.timeout:g} s")
        wait = self.interval
        if self.deadline is not None:
            wait = max(0.0, min(wait, self.deadline - time.monotonic()))
        self.interval = min(self.most, self.interval * 1.5)
        return wait


def _headers(api_key: str | None, headers: dict[str, str] | None) -> dict[str, str]:
    out = {"User-Agent": f"sfpc-client/{sfpc.__version__}"}
    if api_key:
        out["X-API-Key"] = api_key
    out.update(headers or {})
    return out


def _timeout(timeout: float | httpx.Timeout, connect_timeout: float) -> httpx.Timeout:
    if isinstance(timeout, httpx.Timeout):
        return timeout
    return httpx.Timeout(timeout, connect=min(connect_timeout, timeout))


def _transport_error(exc: httpx.TransportError, call: _Call, base_url: str, attempts: int
                     ) -> TransportError:
    where = f"{call.method} {base_url.rstrip('/')}{call.path}"
    if isinstance(exc, httpx.TimeoutException) and not isinstance(exc, httpx.ConnectTimeout):
        return RequestTimeout(f"{where}: no answer within the client's timeout "
                              f"({type(exc).__name__}); the work may still be running on the "
                              "server: raise the timeout or use a job")
    tries = f" after {attempts} attempts" if attempts > 1 else ""
    return TransportError(f"{where}: cannot reach the gateway{tries} "
                          f"({type(exc).__name__}: {exc})")


# ----------------------------------------------------------------------------------------------
# The blocking client
# ----------------------------------------------------------------------------------------------


class SFPCClient:
    """Blocking client of one gateway; thread-safe (one connection pool shared by threads).

    ``timeout``: seconds to wait for each answer (a synchronous segmentation can take minutes);
    ``connect_timeout``: seconds to open a connection; ``retry``: :class:`RetryPolicy`;
    ``api_key`` goes in ``X-API-Key``. ``transport``/``verify`` pass through to httpx.
    """

    def __init__(self, base_url: str, *, api_key: str | None = None,
                 timeout: float | httpx.Timeout = DEFAULT_TIMEOUT_S,
                 connect_timeout: float = DEFAULT_CONNECT_TIMEOUT_S,
                 retry: RetryPolicy | None = None, headers: dict[str, str] | None = None,
                 verify: bool | str = True, transport: httpx.BaseTransport | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.retry = retry or RetryPolicy()
        self._http = httpx.Client(base_url=self.base_url, headers=_headers(api_key, headers),
                                  timeout=_timeout(timeout, connect_timeout), verify=verify,
                                  transport=transport)

    # -- plumbing ---------------------------------------------------------------------------
    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> SFPCClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _send(self, call: _Call) -> httpx.Response:
        attempt = 0
        while True:
            attempt += 1
            try:
                with _multipart(call.uploads) as files:
                    response = self._http.request(call.method, call.path, params=call.params,
                                                  files=files, timeout=_call_timeout(call))
            except httpx.TransportError as exc:
                if attempt < self.retry.attempts and self.retry.may_retry(exc, call.idempotent):
                    wait = self.retry.delay(attempt)
                    log.info("%s %s: %s, retry %d in %.2f s", call.method, call.path,
                             type(exc).__name__, attempt, wait)
                    time.sleep(wait)
                    continue
                raise _transport_error(exc, call, self.base_url, attempt) from exc
            if response.is_success or response.status_code in call.accept:
                return response
            error = api_error(response)
            if attempt < self.retry.attempts and error.status in self.retry.statuses:
                wait = self.retry.delay(attempt, error.retry_after)
                log.info("%s %s: %d %s, retry %d in %.2f s", call.method, call.path,
                         error.status, error.code, attempt, wait)
                time.sleep(wait)
                continue
            raise error

    def _do(self, call: _Call, parse: Parser[T]) -> T:
        return parse(self._send(call))

    # -- operations -------------------------------------------------------------------------
    def health(self) -> Health:
        """``GET /healthz``: the process is up."""
        return self._do(_Call("GET", "/healthz"), _json_model(Health))

    def ready(self) -> Readiness:
        """``GET /readyz``: whether every model's backend answers (a 503 is not an error)."""
        return self._do(_Call("GET", "/readyz", accept=frozenset({503})), _parse_ready)

    def metrics(self) -> str:
        """``GET /metrics``: the Prometheus text exposition."""
        return self._do(_Call("GET", "/metrics"), lambda r: r.text)

    # -- models -----------------------------------------------------------------------------
    def models(self) -> ModelList:
        """``GET /v1/models``: every served model and the default one."""
        return self._do(_Call("GET", "/v1/models"), _json_model(ModelList))

    def model(self, name: str) -> ModelInfo:
        """``GET /v1/models/{name}``: one model's metadata."""
        return self._do(_Call("GET", f"/v1/models/{quote(name, safe='')}"),
                        _json_model(ModelInfo))

    # -- synchronous segmentation -----------------------------------------------------------
    @_with_options_doc
    def segment(self, files: Uploads, *, timeout: float | None = None,
                **options: Any) -> SegmentResult:
        """``POST /v1/segment``: segment ``files`` (a NIfTI file, DICOM files or a folder of
        them, a zip) and return the artefacts by file name."""
        return self._do(*_op_segment(files, options, timeout))

    # -- jobs -------------------------------------------------------------------------------
    @_with_options_doc
    def submit_job(self, files: Uploads, **options: Any) -> JobSubmitted:
        """``POST /v1/jobs``: queue a segmentation (retried while the queue is full)."""
        return self._do(*_op_submit(files, options))

    def job(self, job_id: str) -> Job:
        """``GET /v1/jobs/{id}``: status, attempts, timings, error and result names."""
        return self._do(_Call("GET", _job_path(job_id)), _json_model(Job))

    def jobs(self, status: JobStatus | str | None = None, *, limit: int = 50,
             offset: int = 0) -> JobPage:
        """``GET /v1/jobs``: one page of jobs, newest first."""
        return self._do(*_op_jobs(status, limit, offset))

    def iter_jobs(self, status: JobStatus | str | None = None, *, page_size: int = 100
                  ) -> Iterator[Job]:
        """Every job, newest first, page after page."""
        offset: int | None = 0
        while offset is not None:
            page = self.jobs(status, limit=page_size, offset=offset)
            yield from page.items
            offset = page.next_offset

    def cancel_job(self, job_id: str) -> Job:
        """``DELETE /v1/jobs/{id}``: cancel a queued or running job (409 once it ended)."""
        return self._do(_Call("DELETE", _job_path(job_id), idempotent=False), _json_model(Job))

    def job_results(self, job_id: str) -> SegmentResult:
        """``GET /v1/jobs/{id}/results``: the artefacts, as ``segment`` would return them."""
        return self._do(_Call("GET", f"{_job_path(job_id)}/results"), _parse_result)

    def job_result_file(self, job_id: str, filename: str) -> bytes:
        """``GET /v1/jobs/{id}/results/{filename}``: one artefact's bytes."""
        path = f"{_job_path(job_id)}/results/{quote(safe_name(filename), safe='')}"
        return self._do(_Call("GET", path), lambda r: r.content)

    def wait_job(self, job_id: str, *, timeout: float | None = None, poll_s: float = 0.25,
                 max_poll_s: float = 2.0) -> Job:
        """Poll until the job ends (succeeded, failed, cancelled, expired) and return it;
        :class:`WaitTimeout` after ``timeout`` seconds."""
        clock = _PollClock(job_id, timeout, poll_s, max_poll_s)
        while True:
            job = self.job(job_id)
            if job.status.terminal:
                return job
            time.sleep(clock.next_wait(job))

    def download_job(self, job_id: str, directory: str | Path, *, job: Job | None = None
                     ) -> list[Path]:
        """Write each result file of a succeeded job into ``directory``; returns the paths."""
        job = job or self.job(job_id)
        if job.status is not JobStatus.SUCCEEDED:
            raise JobFailed(job)
        return [write_atomic(Path(directory) / safe_name(name),
                             self.job_result_file(job_id, name)) for name in job.results]

    @_with_options_doc
    def run_job(self, files: Uploads, *, timeout: float | None = None,
                **options: Any) -> SegmentResult:
        """Submit, wait and fetch: ``segment`` through the job queue, for volumes too long
        for one HTTP request (``timeout``: seconds to wait for the job). :class:`JobFailed`
        when the job does not succeed."""
        submitted = self.submit_job(files, **options)
        job = self.wait_job(submitted.id, timeout=timeout)
        if job.status is not JobStatus.SUCCEEDED:
            raise JobFailed(job)
        return self.job_results(job.id)


# ----------------------------------------------------------------------------------------------
# The asyncio client
# ----------------------------------------------------------------------------------------------


class AsyncSFPCClient:
    """The asyncio twin of :class:`SFPCClient`: same arguments, same methods, awaited."""

    def __init__(self, base_url: str, *, api_key: str | None = None,
                 timeout: float | httpx.Timeout = DEFAULT_TIMEOUT_S,
                 connect_timeout: float = DEFAULT_CONNECT_TIMEOUT_S,
                 retry: RetryPolicy | None = None, headers: dict[str, str] | None = None,
                 verify: bool | str = True, transport: httpx.AsyncBaseTransport | None = None,
                 max_connections: int = 20) -> None:
        self.base_url = base_url.rstrip("/")
        self.retry = retry or RetryPolicy()
        self._http = httpx.AsyncClient(
            base_url=self.base_url, headers=_headers(api_key, headers),
            timeout=_timeout(timeout, connect_timeout), verify=verify, transport=transport,
            limits=httpx.Limits(max_connections=max_connections))

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncSFPCClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _send(self, call: _Call) -> httpx.Response:
        attempt = 0
        while True:
            attempt += 1
            try:
                with _multipart(call.uploads) as files:
                    response = await self._http.request(call.method, call.path,
                                                        params=call.params, files=files,
                                                        timeout=_call_timeout(call))
            except httpx.TransportError as exc:
                if attempt < self.retry.attempts and self.retry.may_retry(exc, call.idempotent):
                    wait = self.retry.delay(attempt)
                    log.info("%s %s: %s, retry %d in %.2f s", call.method, call.path,
                             type(exc).__name__, attempt, wait)
                    await asyncio.sleep(wait)
                    continue
                raise _transport_error(exc, call, self.base_url, attempt) from exc
            if response.is_success or response.status_code in call.accept:
                return response
            error = api_error(response)
            if attempt < self.retry.attempts and error.status in self.retry.statuses:
                wait = self.retry.delay(attempt, error.retry_after)
                log.info("%s %s: %d %s, retry %d in %.2f s", call.method, call.path,
                         error.status, error.code, attempt, wait)
                await asyncio.sleep(wait)
                continue
            raise error

    async def _do(self, call: _Call, parse: Parser[T]) -> T:
        return parse(await self._send(call))

    async def health(self) -> Health:
        return await self._do(_Call("GET", "/healthz"), _json_model(Health))

    async def ready(self) -> Readiness:
        return await self._do(_Call("GET", "/readyz", accept=frozenset({503})), _parse_ready)

    async def metrics(self) -> str:
        return await self._do(_Call("GET", "/metrics"), lambda r: r.text)

    async def models(self) -> ModelList:
        return await self._do(_Call("GET", "/v1/models"), _json_model(ModelList))

    async def model(self, name: str) -> ModelInfo:
        return await self._do(_Call("GET", f"/v1/models/{quote(name, safe='')}"),
                              _json_model(ModelInfo))

    @_with_options_doc
    async def segment(self, files: Uploads, *, timeout: float | None = None,
                      **options: Any) -> SegmentResult:
        """``POST /v1/segment``, as :meth:`SFPCClient.segment`."""
        return await self._do(*_op_segment(files, options, timeout))

    @_with_options_doc
    async def submit_job(self, files: Uploads, **options: Any) -> JobSubmitted:
        """``POST /v1/jobs``, as :meth:`SFPCClient.submit_job`."""
        return await self._do(*_op_submit(files, options))

    async def job(self, job_id: str) -> Job:
        return await self._do(_Call("GET", _job_path(job_id)), _json_model(Job))

    async def jobs(self, status: JobStatus | str | None = None, *, limit: int = 50,
                   offset: int = 0) -> JobPage:
        return await self._do(*_op_jobs(status, limit, offset))

    async def iter_jobs(self, status: JobStatus | str | None = None, *, page_size: int = 100
                        ) -> AsyncIterator[Job]:
        offset: int | None = 0
        while offset is not None:
            page = await self.jobs(status, limit=page_size, offset=offset)
            for job in page.items:
                yield job
            offset = page.next_offset

    async def cancel_job(self, job_id: str) -> Job:
        return await self._do(_Call("DELETE", _job_path(job_id), idempotent=False),
                              _json_model(Job))

    async def job_results(self, job_id: str) -> SegmentResult:
        return await self._do(_Call("GET", f"{_job_path(job_id)}/results"), _parse_result)

    async def job_result_file(self, job_id: str, filename: str) -> bytes:
        path = f"{_job_path(job_id)}/results/{quote(safe_name(filename), safe='')}"
        return await self._do(_Call("GET", path), lambda r: r.content)

    async def wait_job(self, job_id: str, *, timeout: float | None = None, poll_s: float = 0.25,
                       max_poll_s: float = 2.0) -> Job:
        clock = _PollClock(job_id, timeout, poll_s, max_poll_s)
        while True:
            job = await self.job(job_id)
            if job.status.terminal:
                return job
            await asyncio.sleep(clock.next_wait(job))

    async def download_job(self, job_id: str, directory: str | Path, *, job: Job | None = None
                           ) -> list[Path]:
        job = job or await self.job(job_id)
        if job.status is not JobStatus.SUCCEEDED:
            raise JobFailed(job)
        written = []
        for name in job.results:
            content = await self.job_result_file(job_id, name)
            written.append(write_atomic(Path(directory) / safe_name(name), content))
        return written

    @_with_options_doc
    async def run_job(self, files: Uploads, *, timeout: float | None = None,
                      **options: Any) -> SegmentResult:
        """Submit, wait and fetch, as :meth:`SFPCClient.run_job`."""
        submitted = await self.submit_job(files, **options)
        job = await self.wait_job(submitted.id, timeout=timeout)
        if job.status is not JobStatus.SUCCEEDED:
            raise JobFailed(job)
        return await self.job_results(job.id)


__all__ = ["AsyncSFPCClient", "NO_RETRY", "RetryPolicy", "SFPCClient", "Upload", "Uploads",
           "api_error", "expand_uploads"]
