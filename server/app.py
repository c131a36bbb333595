"""The FastAPI application of the SFPC gateway: ``create_app(settings)``.

Models are loaded when the app is created, so a broken export stops the server before it binds
its port. Middleware, outermost first: request context (request id, access log, metrics,
last-resort 500 JSON), body size limit (413), CORS when origins are configured. Every error a
client can cause is a 4xx JSON body ``{"error": {"code", "message", "detail"?, "request_id"}}``.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI
from fastapi.concurrency import run_in_threadpool
from fastapi.middleware.cors import CORSMiddleware

import sfpc
from sfpc.inference.pipeline import ModelRegistry, SegmentationService
from sfpc.server.error_handlers import install_error_handlers
from sfpc.server.observability import (
    RequestContextMiddleware,
    observe_stage,
)
from sfpc.server.routers import dicomweb as dicomweb_router
from sfpc.server.routers import jobs as jobs_router
from sfpc.server.routers import models as models_router
from sfpc.server.routers import ops as ops_router
from sfpc.server.routers import segment as segment_router
from sfpc.server.routers.segment import SegmentationPool
from sfpc.server.security import BodyLimitMiddleware, require_api_key
from sfpc.server.settings import Settings

log = logging.getLogger("sfpc.server.app")

DESCRIPTION = """
Semi-supervised medical image segmentation (SFPC) with voxel-wise uncertainty.

Upload a NIfTI volume or a DICOM series to `POST /v1/segment` and get the mask back with the
upload's exact shape and affine (NIfTI) or as a DICOM SEG; ask for predictive entropy and mutual
information maps, a PNG overlay and a JSON report. Batch pipelines submit jobs to `/v1/jobs`.
When the server has API keys, send one in `X-API-Key` or `Authorization: Bearer`.
"""

def create_app(settings: Settings | None = None, *,
               registry: ModelRegistry | None = None) -> FastAPI:
    """Build the gateway: load the models of ``settings`` (or use ``registry``), mount the
    routers, and refuse a network-facing configuration without API keys."""
    settings = settings or Settings()
    settings.check_startable()
    registry = registry or ModelRegistry(settings)
    service = SegmentationService(registry, settings, on_stage=observe_stage)
    pool = SegmentationPool(settings.concurrency)
    manager = jobs_router.JobManager.from_settings(settings, service)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        manager.start()
        log.info("gateway ready", extra={"models": registry.names,
                                         "default_model": registry.default_name})
        try:
            yield
        finally:
            # Stopping joins worker threads: off the event loop.
            await run_in_threadpool(manager.stop)
            pool.shutdown()
            registry.close()

    app = FastAPI(title="SFPC Seg gateway", version=sfpc.__version__, description=DESCRIPTION,
                  lifespan=lifespan, root_path=settings.root_path)
    app.state.settings = settings
    app.state.registry = registry
    app.state.service = service
    app.state.pool = pool
    app.state.api_keys = settings.key_values()
    app.state.job_manager = manager

    install_error_handlers(app)
    app.include_router(ops_router.router)
    app.include_router(models_router.router)
    app.include_router(segment_router.router)
    app.include_router(jobs_router.router, dependencies=[Depends(require_api_key)])
    app.include_router(dicomweb_router.router, dependencies=[Depends(require_api_key)])

    # Added innermost first: CORS (only when configured), body limit, request context.
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins,
                           allow_methods=["GET", "POST", "DELETE"],
                           allow_headers=["X-API-Key", "Authorization", "Content-Type",
                                          "X-Request-ID"],
                           expose_headers=["X-Request-ID", *segment_router.RESULT_HEADERS,
                                           "Content-Disposition"])
    app.add_middleware(BodyLimitMiddleware, limit=settings.max_upload_bytes)
    app.add_middleware(RequestContextMiddleware)
    return app


def app_from_env() -> FastAPI:
    """uvicorn factory (``uvicorn --factory sfpc.server.app:app_from_env``): settings from the
    environment and SFPC_CONFIG_FILE."""
    from sfpc.server.observability import configure_logging

    settings = Settings()
    configure_logging(settings.log_level, settings.log_json)
    return create_app(settings)
