"""GET /v1/models and /v1/models/{name}: the metadata of each served model."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Path, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field

from sfpc.server.routers import error_responses
from sfpc.server.security import require_api_key

router = APIRouter(tags=["models"], dependencies=[Depends(require_api_key)])


class ModelInfo(BaseModel):
    name: str
    version: str
    task: str = ""
    spatial_dims: int = Field(description="2: slice by slice along `plane`; 3: volumetric.")
    in_channels: int = Field(description="The network's input channels (2.5D models: image "
                             "channels x (2 context_slices + 1)).")
    image_channels: int = Field(description="Channels (volumes) an upload carries.")
    context_slices: int = Field(0, description="2D models: neighbouring slices on each side "
                                "fed as extra channels (the engine stacks them).")
    num_classes: int
    class_names: list[str] = Field(description="Label value i of the mask is class_names[i].")
    orientation: str = Field(description="Axis codes the model works in (uploads may use any).")
    plane: str | None = Field(None, description="2D models: the plane slices are taken in.")
    spacing: list[float | None] | None = Field(None, description="Voxel size (mm) of the model "
                                               "grid; None keeps the upload's.")
    input_mode: str
    patch_size: list[int]
    normalisation: dict[str, Any] | None = None
    uncertainty: bool = Field(description="Whether the FLPM uncertainty graph is served.")
    uncertainty_method: dict[str, Any] | None = Field(None, description="What produces the "
                                                      "uncertainty maps: method, samples per "
                                                      "pass, tau, graph kind and the maps.")
    flip: bool = Field(True, description="Whether requests may ask for flip=true (false for "
                       "models trained without flips).")
    perturbation: dict[str, Any] = Field(default_factory=dict)
    temperature: float = Field(1.0, description="Calibration temperature applied to every "
                               "softmax (plain and uncertainty mode).")
    quality: dict[str, Any] = Field(default_factory=dict, description="The per-case review "
                                    "flag's rule: measure, threshold and how it was chosen "
                                    "(empty: no flag).")
    metrics: dict[str, Any] = Field(default_factory=dict, description="Validation metrics "
                                    "recorded at training.")
    sfpc_version: str = ""
    created: str = ""
    backend: str
    ready: bool


class ModelList(BaseModel):
    default: str | None = Field(description="The model used when a request names none.")
    models: list[ModelInfo]


@router.get("/v1/models", response_model=ModelList, summary="List served models",
            responses=error_responses(401))
async def list_models(request: Request) -> Any:
    """Every served model with its classes, geometry and uncertainty support."""
    registry = request.app.state.registry
    return await run_in_threadpool(registry.describe)


@router.get("/v1/models/{name}", response_model=ModelInfo, summary="One served model",
            responses=error_responses(401, 404))
async def get_model(request: Request,
                    name: str = Path(description="Model name from GET /v1/models.",
                                     max_length=200)) -> Any:
    registry = request.app.state.registry
    return await run_in_threadpool(lambda: registry.get(name).describe())
