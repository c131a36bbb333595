"""Operations endpoints: liveness, readiness and Prometheus metrics (no API key: probes and
scrapers call them, and they reveal no patient data)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from sfpc.server.observability import metrics_payload
from sfpc.server.routers import ErrorBody

router = APIRouter(tags=["operations"])


class Health(BaseModel):
    status: str = Field(description="'ok' while the process serves requests.")


class Readiness(BaseModel):
    status: str = Field(description="'ready' when every served model's backend is ready.")
    models: dict[str, bool] = Field(description="Readiness of each served model.")


@router.get("/healthz", response_model=Health, summary="Liveness")
async def healthz() -> Health:
    """The process is up and its event loop answers (segmentations run in worker threads)."""
    return Health(status="ok")


@router.get("/readyz", response_model=Readiness, summary="Readiness",
            responses={503: {"model": ErrorBody, "description": "Not ready"}})
async def readyz(request: Request) -> Any:
    """200 when models are loaded and every backend answers (Triton: server live and model
    ready); 503 with the same per-model detail otherwise."""
    registry = request.app.state.registry
    # A Triton backend asks its server over the network: keep that off the event loop.
    models = await run_in_threadpool(lambda: {m: registry.get(m).ready() for m in registry.names})
    if models and all(models.values()):
        return Readiness(status="ready", models=models)
    message = ("no model is loaded" if not models else
               "not ready: " + ", ".join(name for name, ok in models.items() if not ok))
    return JSONResponse(status_code=503, content={"error": {
        "code": "not_ready", "message": message, "detail": {"models": models}}})


@router.get("/metrics", summary="Prometheus metrics", response_class=Response,
            responses={200: {"content": {"text/plain": {}},
                             "description": "Prometheus text exposition format"}})
async def metrics() -> Response:
    """Requests, latencies (per route and per segmentation stage), queue depth, errors by kind."""
    body, content_type = metrics_payload()
    return Response(content=body, media_type=content_type)
