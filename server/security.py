"""Who may call the gateway, and how much they may send.

- API keys: when ``settings.api_keys`` is set, every data endpoint (segmentation, models, jobs)
  needs one, in ``X-API-Key: <key>`` or ``Authorization: Bearer <key>``; the operations endpoints
  (/healthz, /readyz, /metrics) stay open for probes and scrapers. A server listening on
  anything but loopback refuses to start without keys (:meth:`Settings.check_startable`).
- Body size: :class:`BodyLimitMiddleware` answers 413 before reading a body whose
  Content-Length is over the limit, and stops reading a body (chunked or lying about its length)
  as soon as it passes the limit.
"""

from __future__ import annotations

import hmac

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sfpc.errors import SFPCError
from sfpc.server.observability import send_json_error

API_KEY_HEADER = "X-API-Key"
_api_key = APIKeyHeader(name=API_KEY_HEADER, auto_error=False,
                        description="An API key of the server (settings.api_keys).")
_bearer = HTTPBearer(auto_error=False, description="The same API key as a bearer token.")


class Unauthorized(SFPCError):
    status = 401
    code = "unauthorized"


def keys_match(given: str, accepted: list[str]) -> bool:
    """Constant-time comparison against every accepted key (no early exit on a match, so the
    timing does not tell which key or how many keys exist)."""
    given_bytes = given.encode("utf-8", "surrogatepass")
    found = False
    for key in accepted:
        found |= hmac.compare_digest(given_bytes, key.encode("utf-8", "surrogatepass"))
    return found


async def require_api_key(
    request: Request,
    api_key: str | None = Depends(_api_key),
    bearer: HTTPAuthorizationCredentials | None = Depends(_bearer),
) -> None:
    """FastAPI dependency of every data endpoint: 401 unless a configured key was sent (a no-op
    when the server has no keys, which only a loopback server may)."""
    accepted: list[str] = request.app.state.api_keys
    if not accepted:
        return
    given = api_key or (bearer.credentials if bearer is not None else None)
    if not given:
        raise Unauthorized(f"this server needs an API key: send it in the {API_KEY_HEADER} "
                           "header or as Authorization: Bearer <key>", code="missing_api_key")
    if not keys_match(given, accepted):
        raise Unauthorized("the API key is not valid for this server", code="invalid_api_key")


class BodyTooLarge(SFPCError):
    status = 413
    code = "upload_too_large"


def too_large_message(limit: int) -> str:
    return (f"the request body is larger than this server's limit of {limit:,} bytes "
            "(settings.max_upload_bytes); send a smaller upload or ask the operator to raise it")


class BodyLimitMiddleware:
    """413 for request bodies over ``limit`` bytes, decided as early as possible.

    A declared Content-Length over the limit is answered before any body byte is read. Otherwise
    the body is counted while it streams in; past the limit, ``receive`` raises
    :class:`BodyTooLarge` (the segmentation endpoint maps it to 413) and, whatever the route did
    with that, the response is replaced by the 413, so no endpoint can turn it into another error.
    """

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = int(limit)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.limit:
            await send_json_error(send, 413, BodyTooLarge.code, too_large_message(self.limit),
                                  close=True)
            return
        state = {"seen": 0, "over": False, "started": False}

        async def limited_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                state["seen"] += len(message.get("body", b""))
                if state["seen"] > self.limit:
                    state["over"] = True
                    raise BodyTooLarge(too_large_message(self.limit))
            return message

        async def guarded_send(message: Message) -> None:
            if state["over"]:
                if message["type"] == "http.response.start" and not state["started"]:
                    state["started"] = True
                    await send_json_error(send, 413, BodyTooLarge.code,
                                          too_large_message(self.limit), close=True)
                return  # the route's own response is dropped
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except BodyTooLarge:
            if not state["started"]:
                state["started"] = True
                await send_json_error(send, 413, BodyTooLarge.code, too_large_message(self.limit),
                                      close=True)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
