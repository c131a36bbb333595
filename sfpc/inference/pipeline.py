"""The service layer: served models, segmentation options, and one upload -> artefacts call.

Both the synchronous endpoint (``POST /v1/segment``) and the asynchronous jobs run this code, so
an upload gives the same files whichever way it came in:

- :class:`ModelRegistry` loads every export directory of the settings once, at start-up, with
  the configured backend, and hands out :class:`LoadedModel` by name;
- :class:`SegmentOptions` is what a request may choose (model, outputs, uncertainty, series,
  response format);
- :meth:`SegmentationService.run` turns a decoded :class:`~sfpc.io.Volume` into an
  :class:`ArtefactSet` (files + report). It is synchronous, CPU-bound and thread-safe: callers
  run it in a thread pool. A ``cancel`` event stops it between backend calls (request timeout,
  job cancellation) with :class:`Cancelled`.

Artefact file names are fixed and documented (docs/server.md): ``mask.nii.gz``,
``segmentation.dcm``, ``entropy.nii.gz``, ``mutual_information.nii.gz``, ``overlay.png``,
``report.json``; several of them travel as one zip.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform

import sfpc
from sfpc.errors import Cancelled, ModelNotFound, NoModels, OptionError
from sfpc.inference.backends import Backend, make_backend
from sfpc.inference.contract import ModelMetadata
from sfpc.inference.engine import Engine, SegmentationResult, flip_unavailable
from sfpc.inference.options import (
    FORMATS,
    OUTPUT_FILES,
    SegmentOptions,
)
from sfpc.inference.preprocess import resampled_shape, spacing_from_affine
from sfpc.inference.review import review_flag
from sfpc.inference.uncertainty import region_statistics
from sfpc.io import artefacts as files

log = logging.getLogger("sfpc.inference.pipeline")

STAGES = ("decode", "preprocess", "inference", "postprocess", "encode")
MANIFEST_FILE = "artefacts.json"


# ----------------------------------------------------------------------------------------------
# Run-time settings
# ----------------------------------------------------------------------------------------------


class RuntimeSettings(Protocol):
    """What the pipeline reads of its settings: the gateway's ``Settings`` has these fields, and
    :class:`RuntimeConfig` holds them for ``sfpc predict`` and the Python API."""

    model_dirs: Sequence[Path]
    default_model: str | None
    backend: str
    onnx_providers: str
    onnx_intra_op_threads: int | None
    triton_url: str | None
    triton_protocol: str
    triton_timeout_s: float
    triton_model_names: Mapping[str, str]
    sw_batch_size: int | None
    max_upload_bytes: int
    max_decompressed_bytes: int
    max_voxels: int
    max_files: int
    max_compression_ratio: float


@dataclass
class RuntimeConfig:
    """The pipeline's settings outside the gateway; the defaults are the gateway's."""

    model_dirs: Sequence[Path] = ()
    default_model: str | None = None
    backend: str = "onnxruntime"
    onnx_providers: str = "auto"
    onnx_intra_op_threads: int | None = None
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


# ----------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------


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
            "num_classes": m.num_classes,
            "class_names": list(m.class_names),
            "orientation": m.orientation,
            "plane": m.plane if m.spatial_dims == 2 else None,
            "spacing": m.spacing,
            "input_mode": m.input_mode,
            "patch_size": list(m.patch_size),
            "normalisation": m.normalisation,
            "uncertainty": m.has_uncertainty,
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
        metadata = ModelMetadata.load(export_dir)
        backend = self._backend(export_dir, metadata)
        try:
            engine = Engine(backend, metadata, sw_batch_size=self.settings.sw_batch_size)
        except Exception:
            backend.close()
            raise
        log.info("model loaded", extra={"model": metadata.name, "version": metadata.version,
                                        "backend": self.settings.backend})
        return LoadedModel(metadata.name, metadata, backend, engine, export_dir)

    def _backend(self, export_dir: Path, metadata: ModelMetadata) -> Backend:
        s = self.settings
        if s.backend == "onnxruntime":
            return make_backend("onnxruntime", export_dir=export_dir,
                                providers=s.onnx_providers,
                                intra_op_threads=s.onnx_intra_op_threads)
        if not s.triton_url:
            raise ValueError("backend 'triton' needs triton_url (SFPC_TRITON_URL=host:port)")
        return make_backend("triton", url=s.triton_url, protocol=s.triton_protocol,
                            model_name=s.triton_model_names.get(metadata.name, metadata.name),
                            timeout_s=s.triton_timeout_s)

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


# ----------------------------------------------------------------------------------------------
# Artefacts
# ----------------------------------------------------------------------------------------------


@dataclass
class Artefact:
    """One result file: held in memory (bytes) or on disk (a Path)."""

    filename: str
    media_type: str
    content: bytes | Path

    def read(self) -> bytes:
        return self.content if isinstance(self.content, bytes) else Path(self.content).read_bytes()

    @property
    def size(self) -> int:
        if isinstance(self.content, bytes):
            return len(self.content)
        return Path(self.content).stat().st_size


@dataclass
class ArtefactSet:
    """The files of one segmentation and its report (a JSON-able dict)."""

    artefacts: list[Artefact]
    report: dict[str, Any] = field(default_factory=dict)

    def get(self, filename: str) -> Artefact | None:
        return next((a for a in self.artefacts if a.filename == filename), None)

    @property
    def filenames(self) -> list[str]:
        return [a.filename for a in self.artefacts]

    def response(self, format: str = "auto") -> Artefact:
        """The one file to send for ``format`` (a zip of all when several; see SegmentOptions)."""
        if format not in FORMATS:
            raise OptionError(f"format {format!r} is not one of {', '.join(FORMATS)}")
        single = {"nifti": "mask.nii.gz", "dicom-seg": "segmentation.dcm"}.get(format)
        if single is not None:
            found = self.get(single)
            if found is None:
                raise OptionError(f"format={format} needs {single}, which was not produced")
            return found
        if format == "auto" and len(self.artefacts) == 1:
            return self.artefacts[0]
        members = [(a.filename, a.content) for a in self.artefacts]
        return Artefact(files.ZIP_NAME, files.ZIP_MEDIA_TYPE, files.zip_bytes(members))

    def response_body(self, format: str = "auto") -> tuple[str, bytes | Path]:
        """``(media_type, bytes or file path)`` of :meth:`response`."""
        chosen = self.response(format)
        return chosen.media_type, chosen.content

    def save(self, directory: str | Path) -> Path:
        """Write every artefact and a manifest (file names, media types, report) to
        ``directory``; :meth:`load` reads it back with the files left on disk."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        for artefact in self.artefacts:
            (out / artefact.filename).write_bytes(artefact.read())
        manifest = {"artefacts": [{"filename": a.filename, "media_type": a.media_type}
                                  for a in self.artefacts], "report": self.report}
        path = out / MANIFEST_FILE
        path.write_text(json.dumps(manifest, indent=1))
        return path

    @classmethod
    def load(cls, directory: str | Path) -> ArtefactSet:
        src = Path(directory)
        manifest = json.loads((src / MANIFEST_FILE).read_text())
        items = [Artefact(e["filename"], e["media_type"], src / e["filename"])
                 for e in manifest["artefacts"]]
        return cls(items, manifest.get("report", {}))


# ----------------------------------------------------------------------------------------------
# The service
# ----------------------------------------------------------------------------------------------

StageObserver = Callable[[str, float], None]


class SegmentationService:
    """Decode uploads and segment volumes with the registry's models; see the module docstring.

    ``on_stage(stage, seconds)`` is called after each stage (the gateway's metrics).
    """

    def __init__(self, registry: ModelRegistry, settings: RuntimeSettings, *,
                 on_stage: StageObserver | None = None) -> None:
        self.registry = registry
        self.settings = settings
        self.on_stage = on_stage or (lambda stage, seconds: None)

    # -- decoding ---------------------------------------------------------------------------
    def limits(self, model: LoadedModel | None = None) -> Any:
        """The upload :class:`~sfpc.io.Limits` built from the settings; a 3D ``model``
        needs at least 2 voxels per axis, a 2D one accepts single slices."""
        from sfpc.io import Limits

        # Settings fields carry the Limits field names, so each limit is configured once.
        wanted = {f.name for f in dataclasses.fields(Limits)}
        given = {k: getattr(self.settings, k) for k in wanted if hasattr(self.settings, k)}
        if "min_spatial" in wanted:
            given["min_spatial"] = 2 if model is None or model.metadata.spatial_dims == 3 else 1
        return Limits(**given)

    def decode(self, uploads: Sequence[tuple[str, bytes | Path]],
               options: SegmentOptions | None = None) -> tuple[Any, float]:
        """Decode uploaded files into a Volume; returns it with the seconds it took.

        Raises the I/O layer's UploadError (``.status``, ``.code``) for bad files.
        """
        from sfpc.io import decode_upload

        options = options or SegmentOptions()
        model = self.registry.get(options.model)
        t0 = time.perf_counter()
        kwargs: dict[str, Any] = {"max_channels": model.metadata.in_channels}
        if options.series_uid:
            kwargs["series_uid"] = options.series_uid
        volume = decode_upload(list(uploads), self.limits(model), **kwargs)
        seconds = time.perf_counter() - t0
        self.on_stage("decode", seconds)
        return volume, seconds

    def segment_upload(self, uploads: Sequence[tuple[str, bytes | Path]],
                       options: SegmentOptions, *,
                       cancel: threading.Event | None = None) -> ArtefactSet:
        """:meth:`decode` then :meth:`run`, the decode time in the report."""
        _check_cancel(cancel)
        volume, seconds = self.decode(uploads, options)
        return self.run(volume, options, cancel=cancel, extra_timings={"decode": seconds})

    # -- segmentation -----------------------------------------------------------------------
    def run(self, volume: Any, options: SegmentOptions, *,
            cancel: threading.Event | None = None,
            extra_timings: Mapping[str, float] | None = None) -> ArtefactSet:
        """Segment a decoded Volume and encode the requested artefacts."""
        _check_cancel(cancel)
        t_start = time.perf_counter()
        model = self.registry.get(options.model)
        source = str(getattr(volume, "source", "nifti"))
        outputs = options.resolve_outputs(source)
        uncertainty = options.wants_uncertainty()
        if "overlay_png" in outputs and model.metadata.has_uncertainty:
            uncertainty = True  # the overlay's heat map is the reason to look at it
        if uncertainty and not model.metadata.has_uncertainty:
            raise OptionError(
                f"model {model.name!r} was exported without an uncertainty graph; ask for "
                "outputs without entropy_nifti / mi_nifti and uncertainty=false",
                code="uncertainty_unavailable")
        reason = flip_unavailable(model.metadata) if options.flip else None
        if reason:
            raise OptionError(reason, code="flip_unavailable")

        def progress(done: int, total: int) -> None:
            _check_cancel(cancel)

        image = np.asarray(volume.array)
        check_model_grid(image, volume.affine, model.engine, self.settings.max_voxels)
        single = single_slice_axis(image, volume.affine, model.engine)
        if single is not None:
            # A 2D model segments each slice on its own: a copy of the one slice beside it makes
            # the upload a volume the engine takes, and changes nothing in the first slice.
            axis = single + image.ndim - 3
            image = np.concatenate([image, image], axis=axis)
        result = model.engine.segment(image, volume.affine, uncertainty=uncertainty,
                                      flip=options.flip, progress=progress)
        if single is not None:
            result = first_slice(result, single, model.engine)
        for stage in ("preprocess", "inference", "postprocess"):
            self.on_stage(stage, result.timings.get(stage, 0.0))
        _check_cancel(cancel)

        t0 = time.perf_counter()
        report = self._report(volume, model, result, outputs, extra_timings)
        produced = self._encode(volume, model, result, outputs, report)
        encode = time.perf_counter() - t0
        self.on_stage("encode", encode)
        report["timings"]["encode"] = encode
        report["timings"]["total"] = (time.perf_counter() - t_start
                                      + float((extra_timings or {}).get("decode", 0.0)))
        report["artefacts"] = [{"filename": a.filename, "media_type": a.media_type,
                                "bytes": a.size} for a in produced]
        if "report_json" in outputs:
            name, media = OUTPUT_FILES["report_json"]
            produced.append(Artefact(name, media, files.report_bytes(report)))
        return ArtefactSet(produced, report)

    def _report(self, volume: Any, model: LoadedModel, result: SegmentationResult,
                outputs: Iterable[str], extra_timings: Mapping[str, float] | None) -> dict:
        engine_report = result.to_report()
        timings = {stage: 0.0 for stage in STAGES}
        timings.update({k: float(v) for k, v in (extra_timings or {}).items()})
        for stage in ("preprocess", "inference", "postprocess"):
            timings[stage] = float(result.timings.get(stage, 0.0))
        timings["backend"] = float(result.timings.get("backend", 0.0))
        statistics = engine_report["statistics"]
        report = {
            "sfpc_version": sfpc.__version__,
            "model": {**engine_report["model"], "task": model.metadata.task},
            "input": {
                "source": str(getattr(volume, "source", "nifti")),
                "shape": [int(n) for n in np.shape(volume.array)],
                "affine": engine_report["affine"],
                "spacing_mm": engine_report["geometry"]["input_spacing"],
                "series": _public_series(getattr(volume, "series", None)),
            },
            "outputs": list(outputs),
            "uncertainty": result.uncertainty,
            "uncertainty_maps": engine_report["uncertainty_maps"],
            "class_names": engine_report["class_names"],
            "voxel_volume_ml": statistics["voxel_volume_ml"],
            "band_width_voxels": statistics["band_width_voxels"],
            "classes": statistics["classes"],
            "case": statistics["case"],
            "geometry": engine_report["geometry"],
            "n_windows": engine_report["n_windows"],
            "timings": timings,
        }
        quality = review_flag(model.metadata, statistics, result.uncertainty,
                           bool(result.model.get("flip")))
        if quality is not None:
            report["quality"] = quality
        return report

    def _encode(self, volume: Any, model: LoadedModel, result: SegmentationResult,
                outputs: Sequence[str], report: Mapping[str, Any]) -> list[Artefact]:
        header = getattr(volume, "nifti_header", None)
        produced: list[Artefact] = []
        for name in outputs:
            filename, media = OUTPUT_FILES[name]
            if name == "mask_nifti":
                data = files.nifti_bytes(result.mask, result.affine, header,
                                         description=f"sfpc {model.name} mask")
            elif name == "entropy_nifti":
                data = files.nifti_bytes(result.entropy, result.affine, header,
                                         description="sfpc predictive entropy / ln K")
            elif name == "mi_nifti":
                data = files.nifti_bytes(result.mutual_information, result.affine, header,
                                         description="sfpc mutual information / ln K")
            elif name == "seg_dicom":
                data = files.dicom_seg_bytes(result.mask, volume, result.class_names,
                                             model.metadata)
            elif name == "overlay_png":
                from sfpc.io.overlay import render_overlay

                volumes = {name: entry["volume_ml"]
                           for name, entry in report["classes"].items()}
                data = render_overlay(volume.array, result.affine, result.mask,
                                      result.class_names, uncertainty=result.entropy,
                                      volumes_ml=volumes,
                                      title=f"{model.name} {model.metadata.version}")
            else:  # report_json is written last, once the report holds every artefact
                continue
            produced.append(Artefact(filename, media, data))
        return produced


def check_model_grid(image: np.ndarray, affine: Any, engine: Engine, max_voxels: int) -> None:
    """Refuse an upload whose grid, resampled to the model's spacing, would be enormous: an
    absurd voxel size in the header (1e30 mm) is small on disk and huge after resampling."""
    try:
        aff = np.asarray(affine, dtype=np.float64)
        transform = ornt_transform(io_orientation(aff), axcodes2ornt(
            tuple(engine.metadata.orientation)))
    except ValueError:
        return  # a bad affine: the engine's validation says what is wrong with it
    spatial = image.shape[-3:]
    shape, spacing = [0, 0, 0], [0.0, 0.0, 0.0]
    for axis, size in zip(range(3), spatial, strict=True):
        target = int(transform[axis, 0])
        shape[target] = int(size)
        spacing[target] = float(np.sqrt((aff[:3, axis] ** 2).sum()))
    grid = shape
    if engine.target_spacing is not None:
        if not all(np.isfinite(spacing)) or min(spacing) <= 0:
            return  # the engine's affine validation reports these
        grid = list(resampled_shape(shape, spacing, engine.target_spacing, engine.resample_axes))
    voxels = math.prod(grid) * (image.shape[0] if image.ndim == 4 else 1)
    if voxels > max_voxels:
        raise OptionError(
            f"the image (shape {tuple(spatial)}, voxel size "
            f"{', '.join(f'{v:.4g}' for v in spacing_from_affine(aff))} mm) would have "
            f"{voxels:,} voxels on the grid of model {engine.metadata.name!r}, over the limit of "
            f"{max_voxels:,}; check the voxel size in the file's header",
            code="model_grid_too_large")


def single_slice_axis(image: np.ndarray, affine: Any, engine: Engine) -> int | None:
    """The spatial axis of a one-slice upload when it is the through-plane axis of a 2D model
    (None otherwise: a 3D model, several slices, or a slice the model would cut across)."""
    if engine.metadata.spatial_dims != 2 or image.ndim not in (3, 4):
        return None
    spatial = image.shape[-3:]
    ones = [axis for axis, n in enumerate(spatial) if n == 1]
    if len(ones) != 1 or min(n for n in spatial if n != 1) < 2:
        return None
    try:
        transform = ornt_transform(io_orientation(np.asarray(affine, dtype=np.float64)),
                                   axcodes2ornt(tuple(engine.metadata.orientation)))
    except ValueError:
        return None  # a bad affine: the engine's validation says what is wrong with it
    if int(transform[ones[0], 0]) == engine.plane_axis:
        return ones[0]
    codes = str(engine.metadata.orientation).upper()
    normal = codes[int(transform[ones[0], 0])]
    plane = next(name for name, letters in _PLANES.items() if normal in letters)
    raise OptionError(
        f"the upload is a single {plane} slice, but model {engine.metadata.name!r} segments "
        f"{engine.metadata.plane} slices: send {engine.metadata.plane} images or a volume",
        code="slice_plane_mismatch")


_PLANES = {"sagittal": "LR", "coronal": "AP", "axial": "SI"}


def first_slice(result: SegmentationResult, axis: int, engine: Engine) -> SegmentationResult:
    """``result`` of a doubled single-slice upload cut back to its first slice, with the
    statistics recomputed on that slice."""
    index = (slice(None),) * axis + (slice(0, 1),)
    mask = np.ascontiguousarray(result.mask[index])
    maps = {name: np.ascontiguousarray(values[index]) for name, values in result.maps().items()}
    voxel_ml = abs(float(np.linalg.det(np.asarray(result.affine)[:3, :3]))) / 1000.0
    statistics = region_statistics(mask, maps, result.class_names, voxel_ml, band=engine.band)
    geometry = dict(result.geometry)
    geometry["input_shape"] = list(mask.shape)
    return dataclasses.replace(result, mask=mask, statistics=statistics, geometry=geometry,
                               entropy=maps.get("entropy"),
                               mutual_information=maps.get("mutual_information"))


def _check_cancel(cancel: threading.Event | None) -> None:
    if cancel is not None and cancel.is_set():
        raise Cancelled("segmentation cancelled")


_SERIES_KEYS = frozenset({
    "series_instance_uid", "study_instance_uid", "frame_of_reference_uid", "modality",
    "series_number", "series_description", "n_instances", "n_frames", "rule", "others",
    "transfer_syntaxes", "geometry", "slice_spacing", "eligible", "reason",
})


def _public_series(series: Any) -> Any:
    """The series facts of a DICOM upload without patient identity (names, ids, dates).

    Only known technical keys are kept, so that a future field of the I/O layer cannot leak
    identity into reports by accident.
    """
    if series is None:
        return None
    if hasattr(series, "to_dict"):
        series = series.to_dict()
    elif not isinstance(series, Mapping):
        series = dict(getattr(series, "__dict__", {}))
    return {k: _public_series(v) if isinstance(v, Mapping) else
            [_public_series(x) if isinstance(x, Mapping) else _jsonable(x) for x in v]
            if isinstance(v, (list, tuple)) else _jsonable(v)
            for k, v in series.items() if k in _SERIES_KEYS}


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


__all__ = [
    "STAGES", "Artefact", "ArtefactSet", "LoadedModel", "ModelRegistry", "RuntimeConfig",
    "RuntimeSettings", "SegmentationService",
]
