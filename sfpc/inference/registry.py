"""The served models: settings, the backend factory, and the registry that loads every export once.

:class:`ModelRegistry` reads each export directory of the settings once, at start-up: its metadata
through the one loader (:func:`~sfpc.inference.contract.load_metadata`), then a backend and an
:class:`~sfpc.inference.engine.Engine` over that same parsed metadata. A broken export fails the
construction, so the gateway refuses to start rather than answer 500 on the first request.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from sfpc.errors import ModelNotFound, NoModels
from sfpc.inference.backends import Backend, make_backend
from sfpc.inference.contract import ModelMetadata, load_metadata
from sfpc.inference.engine import Engine, flip_unavailable

log = logging.getLogger("sfpc.inference.registry")


class RuntimeSettings(Protocol):
    """What the pipeline reads of its settings: the gateway's ``Settings`` has these fields, and
    :class:`RuntimeConfig` holds them for ``sfpc predict`` and the Python API. Read-only
    properties, so that narrower field types (a Literal backend, a list of paths) conform."""

    @property
    def model_dirs(self) -> Sequence[Path]: ...

    @property
    def default_model(self) -> str | None: ...

    @property
    def backend(self) -> str: ...

    @property
    def onnx_providers(self) -> str: ...

    @property
    def onnx_intra_op_threads(self) -> int | None: ...

    @property
    def onnx_trt_cache_dir(self) -> str | None: ...

    @property
    def onnx_trt_fp16(self) -> bool: ...

    @property
    def triton_url(self) -> str | None: ...

    @property
    def triton_protocol(self) -> str: ...

    @property
    def triton_timeout_s(self) -> float: ...

    @property
    def triton_model_names(self) -> Mapping[str, str]: ...

    @property
    def sw_batch_size(self) -> int | None: ...

    @property
    def max_upload_bytes(self) -> int: ...

    @property
    def max_decompressed_bytes(self) -> int: ...

    @property
    def max_voxels(self) -> int: ...

    @property
    def max_files(self) -> int: ...

    @property
    def max_compression_ratio(self) -> float: ...


@dataclass
class RuntimeConfig:
    """The pipeline's settings outside the gateway; the defaults are the gateway's."""

    model_dirs: Sequence[Path] = ()
    default_model: str | None = None
    backend: str = "onnxruntime"
    onnx_providers: str = "auto"
    onnx_intra_op_threads: int | None = None
    onnx_trt_cache_dir: str | None = None
    onnx_trt_fp16: bool = False
    triton_url: str | None = None
    triton_protocol: str = "grpc"
    triton_timeout_s: float = 60.0
    triton_model_names: Mapping[str, str] = field(default_factory=dict)
    sw_batch_size: int | None = None
    max_upload_bytes: int = 1 << 30
    max_decompressed_bytes: int = 2 << 30
    max_voxels: int = 1 << 28
    max_files: int = 10_000
    max_compression_ratio: float = 250.0


def build_backend(settings: RuntimeSettings, export_dir: Path,
                  metadata: ModelMetadata) -> Backend:
    """The backend ``settings`` choose for one export: ONNX Runtime over the export's graphs
    (``metadata`` already loaded, not read again), or Triton serving the model under its
    metadata name (or ``settings.triton_model_names[name]``)."""
    if settings.backend == "onnxruntime":
        return make_backend("onnxruntime", export_dir=export_dir, metadata=metadata,
                            providers=settings.onnx_providers,
                            intra_op_threads=settings.onnx_intra_op_threads,
                            trt_cache_dir=settings.onnx_trt_cache_dir,
                            trt_fp16=settings.onnx_trt_fp16)
    if not settings.triton_url:
        raise ValueError("backend 'triton' needs triton_url (SFPC_TRITON_URL=host:port)")
    return make_backend("triton", url=settings.triton_url, protocol=settings.triton_protocol,
                        model_name=settings.triton_model_names.get(metadata.name, metadata.name),
                        timeout_s=settings.triton_timeout_s)


@dataclass
class LoadedModel:
    """One served model: its metadata, backend and engine."""

    name: str
    metadata: ModelMetadata
    backend: Backend
    engine: Engine
    export_dir: Path

    def describe(self) -> dict[str, Any]:
        """Public facts for /v1/models (no file system paths)."""
        m = self.metadata
        return {
            "name": m.name,
            "version": m.version,
            "task": m.task,
            "spatial_dims": m.spatial_dims,
            "in_channels": m.in_channels,
            # What an upload carries: a 2.5D network's extra channels are neighbour slices the
            # engine stacks itself.
            "image_channels": m.image_channels,
            "context_slices": m.context_slices,
            "num_classes": m.num_classes,
            "class_names": list(m.class_names),
            "orientation": m.orientation,
            "plane": m.plane if m.spatial_dims == 2 else None,
            "spacing": m.spacing,
            "input_mode": m.input_mode,
            "patch_size": list(m.patch_size),
            "normalisation": m.normalisation,
            "uncertainty": m.has_uncertainty,
            "uncertainty_method": m.maps_method(),
            "flip": flip_unavailable(m) is None,
            "perturbation": {k: m.perturbation.get(k) for k in ("kind", "M", "tau", "eps_grid")},
            "temperature": m.temperature,
            "quality": m.quality,
            "metrics": m.metrics,
            "sfpc_version": m.sfpc_version,
            "created": m.created,
            "backend": self.backend.__class__.__name__,
            "ready": self.ready(),
        }

    def ready(self) -> bool:
        try:
            return bool(self.backend.ready())
        except Exception:  # a backend that cannot even answer is not ready
            return False


class ModelRegistry:
    """Every model of ``settings.model_dirs``, loaded once with the configured backend.

    Model names come from each export's metadata and must be unique. A broken export fails the
    construction (the server refuses to start rather than 500 on the first request).
    """

    def __init__(self, settings: RuntimeSettings, *,
                 model_dirs: Sequence[str | Path] | None = None) -> None:
        self.settings = settings
        self._models: dict[str, LoadedModel] = {}
        dirs = [Path(d) for d in (settings.model_dirs if model_dirs is None else model_dirs)]
        try:
            for export_dir in dirs:
                model = self._load(export_dir)
                if model.name in self._models:
                    raise ValueError(
                        f"two model directories export the name {model.name!r} "
                        f"({self._models[model.name].export_dir} and {export_dir}); re-export one "
                        "with `sfpc export --name`"
                    )
                self._models[model.name] = model
        except Exception:
            self.close()
            raise
        self.default_name = settings.default_model or next(iter(self._models), None)
        if self.default_name is not None and self.default_name not in self._models:
            names = ", ".join(self._models) or "none"
            self.close()
            raise ValueError(f"default_model {self.default_name!r} is not among the served "
                             f"models ({names})")

    def _load(self, export_dir: Path) -> LoadedModel:
        if not export_dir.is_dir():
            raise FileNotFoundError(f"model directory {export_dir} does not exist")
        # Parsed and checked once here; the backend and the engine get this object. A Triton
        # model's graphs live on the server, so its directory may hold the metadata alone.
        metadata = load_metadata(export_dir,
                                 require_graphs=self.settings.backend == "onnxruntime")
        backend = build_backend(self.settings, export_dir, metadata)
        try:
            engine = Engine(backend, metadata, sw_batch_size=self.settings.sw_batch_size)
        except Exception:
            backend.close()
            raise
        log.info("model loaded", extra={"model": metadata.name, "version": metadata.version,
                                        "backend": self.settings.backend})
        return LoadedModel(metadata.name, metadata, backend, engine, export_dir)

    @property
    def names(self) -> list[str]:
        return list(self._models)

    def get(self, name: str | None = None) -> LoadedModel:
        """The model called ``name``, or the default model; :class:`ModelNotFound` otherwise."""
        if not self._models:
            raise NoModels("no model is loaded; start the server with `sfpc serve --model DIR`")
        key = self.default_name if name is None else name
        model = self._models.get(key or "")
        if model is None:
            raise ModelNotFound(f"no model named {name!r} is served; choose one of "
                                f"{', '.join(self._models)} (GET /v1/models)",
                                detail={"available": list(self._models)})
        return model

    def describe(self) -> dict[str, Any]:
        """The /v1/models body: the default model's name and each model's metadata."""
        return {"default": self.default_name,
                "models": [m.describe() for m in self._models.values()]}

    def ready(self) -> bool:
        """At least one model, and every backend ready."""
        return bool(self._models) and all(m.ready() for m in self._models.values())

    def close(self) -> None:
        for model in self._models.values():
            try:
                model.backend.close()
            except Exception:  # closing is best effort at shutdown
                log.warning("closing backend failed", extra={"model": model.name})
        self._models.clear()


__all__ = ["LoadedModel", "ModelRegistry", "RuntimeConfig", "RuntimeSettings", "build_backend"]
