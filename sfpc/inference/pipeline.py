"""The service layer: one upload -> artefacts call over the served models.

Both the synchronous endpoint (``POST /v1/segment``), the asynchronous jobs and ``sfpc predict``
run this code, so an upload gives the same files whichever way it came in:

- :class:`~sfpc.inference.registry.ModelRegistry` (re-exported here with
  :class:`LoadedModel`, :class:`RuntimeSettings` and :class:`RuntimeConfig`) loads every export
  directory once, at start-up, and hands out models by name;
- :class:`~sfpc.inference.options.SegmentOptions` is what a request may choose;
- :meth:`SegmentationService.run` turns a decoded :class:`~sfpc.io.Volume` into an
  :class:`ArtefactSet` (files + report). It resolves the model once, computes the orientation
  transform of the upload once (:mod:`sfpc.inference.grid` checks it, the engine reuses it), runs
  the engine, then builds the report (:mod:`sfpc.inference.report`) and encodes the files. It is
  synchronous, CPU-bound and thread-safe: callers run it in a thread pool. A ``cancel`` event
  stops it between backend calls (request timeout, job cancellation) with :class:`Cancelled`.

Artefact file names are fixed and documented (docs/server.md): ``mask.nii.gz``,
``segmentation.dcm``, ``entropy.nii.gz``, ``mutual_information.nii.gz``, ``overlay.png``,
``report.json``; several of them travel as one zip.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sfpc.errors import Cancelled, OptionError
from sfpc.inference.engine import SegmentationResult, flip_unavailable
from sfpc.inference.grid import check_model_grid, first_slice, model_transform, single_slice_axis
from sfpc.inference.options import (
    DICOM_OUTPUTS,
    FORMATS,
    OUTPUT_FILES,
    SHOWS_UNCERTAINTY,
    SegmentOptions,
)
from sfpc.inference.registry import LoadedModel, ModelRegistry, RuntimeConfig, RuntimeSettings
from sfpc.inference.report import STAGES, build_report
from sfpc.io import Limits, Volume, decode_upload
from sfpc.io import artefacts as files
from sfpc.io.artefacts import decode_map
from sfpc.io.overlay import render_overlay

Progress = Callable[[int, int], None]
StageObserver = Callable[[str, float], None]


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
    # The engine's arrays behind the files, for in-process callers (sfpc predict's Python API).
    result: SegmentationResult | None = field(default=None, repr=False, compare=False)

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


# ----------------------------------------------------------------------------------------------
# The service
# ----------------------------------------------------------------------------------------------


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
    def limits(self, model: LoadedModel | None = None) -> Limits:
        """The upload :class:`~sfpc.io.Limits` built from the settings; a 3D ``model``
        needs at least 2 voxels per axis, a 2D one accepts single slices."""
        # Settings fields carry the Limits field names, so each limit is configured once.
        wanted = {f.name for f in dataclasses.fields(Limits)}
        given = {k: getattr(self.settings, k) for k in wanted if hasattr(self.settings, k)}
        given["min_spatial"] = 2 if model is None or model.metadata.spatial_dims == 3 else 1
        return Limits(**given)

    def decode(self, uploads: Sequence[tuple[str, bytes | Path]],
               options: SegmentOptions | None = None) -> tuple[Volume, float]:
        """Decode uploaded files into a Volume; returns it with the seconds it took.

        Raises the I/O layer's UploadError (``.status``, ``.code``) for bad files.
        """
        options = options or SegmentOptions()
        return self._decode(self.registry.get(options.model), uploads, options)

    def _decode(self, model: LoadedModel, uploads: Sequence[tuple[str, bytes | Path]],
                options: SegmentOptions) -> tuple[Volume, float]:
        t0 = time.perf_counter()
        # The image's channels, not the network's: a 2.5D model stacks neighbour slices onto
        # each, so a multi-volume upload is refused here, with the decoder's 4xx, not later.
        volume = decode_upload(list(uploads), self.limits(model),
                               max_channels=model.metadata.image_channels,
                               series_uid=options.series_uid or None)
        seconds = time.perf_counter() - t0
        self.on_stage("decode", seconds)
        return volume, seconds

    def segment_upload(self, uploads: Sequence[tuple[str, bytes | Path]],
                       options: SegmentOptions, *,
                       cancel: threading.Event | None = None,
                       progress: Progress | None = None,
                       all_maps: bool = False) -> ArtefactSet:
        """:meth:`decode` then :meth:`run` with the same model, the decode time in the
        report."""
        _check_cancel(cancel)
        model = self.registry.get(options.model)
        volume, seconds = self._decode(model, uploads, options)
        return self._run(model, volume, options, cancel=cancel,
                         extra_timings={"decode": seconds}, progress=progress,
                         all_maps=all_maps)

    # -- segmentation -----------------------------------------------------------------------
    def run(self, volume: Volume, options: SegmentOptions, *,
            cancel: threading.Event | None = None,
            extra_timings: Mapping[str, float] | None = None,
            progress: Progress | None = None, all_maps: bool = False) -> ArtefactSet:
        """Segment a decoded Volume and encode the requested artefacts; ``progress(done,
        total)`` after every backend call (window counts). The result's input-grid maps are
        those the outputs need (:func:`maps_needed`), or both with ``all_maps``."""
        _check_cancel(cancel)
        return self._run(self.registry.get(options.model), volume, options, cancel=cancel,
                         extra_timings=extra_timings, progress=progress, all_maps=all_maps)

    def _run(self, model: LoadedModel, volume: Volume, options: SegmentOptions, *,
             cancel: threading.Event | None, extra_timings: Mapping[str, float] | None,
             progress: Progress | None, all_maps: bool = False) -> ArtefactSet:
        t_start = time.perf_counter()
        outputs = options.resolve_outputs(volume.source)
        derived = [name for name in outputs if name in DICOM_OUTPUTS]
        if derived:
            # A series that cannot be referenced (blank UIDs) is refused now, not after the
            # inference its derived objects would have been written from.
            from sfpc.io.dicom_seg import check_derivable

            check_derivable(volume, derived)
        uncertainty = options.wants_uncertainty()
        if SHOWS_UNCERTAINTY.intersection(outputs) and model.metadata.has_uncertainty:
            uncertainty = True  # the overlay's heat map is the reason to look at it
        if uncertainty and not model.metadata.has_uncertainty:
            raise OptionError(
                f"model {model.name!r} was exported without an uncertainty graph; ask for "
                "outputs without entropy_nifti / mi_nifti and uncertainty=false",
                code="uncertainty_unavailable")
        reason = flip_unavailable(model.metadata) if options.flip else None
        if reason:
            raise OptionError(reason, code="flip_unavailable")

        def on_windows(done: int, total: int) -> None:
            _check_cancel(cancel)
            if progress is not None:
                progress(done, total)

        engine = model.engine
        image = np.asarray(volume.array)
        transform = model_transform(volume.affine, engine)
        check_model_grid(image, volume.affine, engine, self.settings.max_voxels, transform)
        single = single_slice_axis(image, engine, transform)
        if single is not None:
            # A 2D model segments each slice on its own: a copy of the one slice beside it makes
            # the upload a volume the engine takes, and changes nothing in the first slice.
            axis = single + image.ndim - 3
            image = np.concatenate([image, image], axis=axis)
        result = engine.segment(image, volume.affine, uncertainty=uncertainty,
                                flip=options.flip, progress=on_windows, transform=transform,
                                maps=None if all_maps else maps_needed(outputs))
        if single is not None:
            result = first_slice(result, single, engine)
        for stage in ("preprocess", "inference", "postprocess"):
            self.on_stage(stage, result.timings.get(stage, 0.0))
        _check_cancel(cancel)

        t0 = time.perf_counter()
        report = build_report(volume, model.metadata, result, outputs, extra_timings)
        # Engine levels per stored level of each map file (its own, so that a map of small
        # values such as the mutual information keeps its resolution in 8 bits).
        levels = result.map_levels()
        steps = {name: files.map_file_step(levels[name], options.map_precision)
                 for output, name in MAP_NIFTI.items() if output in outputs}
        produced = self._encode(volume, model, result, outputs, report, options.map_precision,
                                steps)
        encode = time.perf_counter() - t0
        self.on_stage("encode", encode)
        report["timings"]["encode"] = encode
        report["timings"]["total"] = (time.perf_counter() - t_start
                                      + float((extra_timings or {}).get("decode", 0.0)))
        report["artefacts"] = [{"filename": a.filename, "media_type": a.media_type,
                                "bytes": a.size} for a in produced]
        if steps:
            # How the map files store [0, 1]: what a reader's values may differ from the maps by.
            report["map_files"] = {
                name: {"dtype": options.map_precision, "step": step * files.MAP_STEP,
                       "max_error": files.map_file_error(step)}
                for name, step in steps.items()}
        if "report_json" in outputs:
            name, media = OUTPUT_FILES["report_json"]
            produced.append(Artefact(name, media, files.report_bytes(report)))
        return ArtefactSet(produced, report, result)

    def _encode(self, volume: Volume, model: LoadedModel, result: SegmentationResult,
                outputs: Sequence[str], report: Mapping[str, Any], precision: str,
                steps: Mapping[str, int]) -> list[Artefact]:
        """The files ``outputs`` name, in that order; each map file at ``precision`` in its
        ``steps`` (:func:`~sfpc.io.artefacts.map_file_step`). Files that depend on no other
        file are encoded side by side in threads: deflate (ISA-L), PNG and numpy release the
        GIL, and on a large CT the mask and a map each take a second of deflate."""
        header = volume.nifti_header
        # The maps these outputs need (maps_needed), as the engine's uint16 levels.
        maps = result.map_levels()
        wanted = set(outputs)
        jobs: dict[str, Callable[[], bytes]] = {}
        # The overlay is the longest job of a small series (its tiles in threads of their
        # own): queued first, it starts at once and the files are deflated beside it, instead
        # of starting last on a thread the files have freed.
        if wanted & {"overlay_png", "sc_dicom"}:  # rendered once for both
            volumes = {name: entry["volume_ml"] for name, entry in report["classes"].items()}
            jobs["overlay_png"] = lambda: render_overlay(
                volume.array, result.affine, result.mask, result.class_names,
                uncertainty=result.entropy_levels, volumes_ml=volumes,
                title=f"{model.name} {model.metadata.version}")
        if "mask_nifti" in wanted:
            jobs["mask_nifti"] = lambda: files.nifti_bytes(
                result.mask, result.affine, header, description=f"sfpc {model.name} mask")
        for output, name in MAP_NIFTI.items():
            if output in wanted:
                jobs[output] = functools.partial(
                    files.map_nifti_bytes, maps[name], result.affine, header,
                    description=MAP_DESCRIPTIONS[name], precision=precision, step=steps[name])
        if "seg_dicom" in wanted:
            jobs["seg_dicom"] = lambda: files.dicom_seg_bytes(
                result.mask, volume, result.class_names, model.metadata)
        if wanted & {"pmap_dicom", "sr_dicom", "rtstruct_dicom", "sc_dicom"}:
            from sfpc.io import dicom_results
        if "pmap_dicom" in wanted:
            jobs["pmap_dicom"] = lambda: dicom_results.parametric_map_bytes(
                decode_map(maps["entropy"]), volume, model.metadata)
        if "rtstruct_dicom" in wanted:
            jobs["rtstruct_dicom"] = lambda: dicom_results.rtstruct_bytes(
                result.mask, volume, result.class_names, model.metadata)
        data = _run_all(jobs)
        # What is drawn from other files comes after them: the SR references the SEG's
        # segments when there is one, the secondary capture is the overlay's PNG.
        if "sr_dicom" in wanted:
            data["sr_dicom"] = dicom_results.measurement_report_bytes(
                report, volume, model.metadata, data.get("seg_dicom"))
        if "sc_dicom" in wanted:
            data["sc_dicom"] = dicom_results.secondary_capture_bytes(
                data["overlay_png"], volume, model.metadata)
        # report_json is written last, once the report holds every artefact
        return [Artefact(*OUTPUT_FILES[name], data[name]) for name in outputs
                if name != "report_json"]


def _run_all(jobs: Mapping[str, Callable[[], bytes]]) -> dict[str, bytes]:
    """Each job's bytes, the jobs run in up to files.ENCODE_THREADS threads; the first error raised
    (in ``jobs`` order) is raised here, once all have finished."""
    if len(jobs) <= 1 or files.ENCODE_THREADS == 1:
        return {name: job() for name, job in jobs.items()}
    with ThreadPoolExecutor(max_workers=min(files.ENCODE_THREADS, len(jobs)),
                            thread_name_prefix="sfpc-encode") as pool:
        futures = {name: pool.submit(job) for name, job in jobs.items()}
    return {name: future.result() for name, future in futures.items()}


# The map each NIfTI map output stores, and the description written in its header.
MAP_NIFTI = {"entropy_nifti": "entropy", "mi_nifti": "mutual_information"}
MAP_DESCRIPTIONS = {"entropy": "sfpc entropy / ln K", "mutual_information": "sfpc MI / ln K"}
# The input-grid uncertainty map each output is drawn from; an uncertainty request restores
# only those its outputs need (the report's statistics come from the model grid).
MAPS_OF_OUTPUT = {**MAP_NIFTI, "overlay_png": "entropy", "sc_dicom": "entropy",
                  "pmap_dicom": "entropy"}


def maps_needed(outputs: Sequence[str]) -> set[str]:
    """The uncertainty maps ``outputs`` are drawn from (see MAPS_OF_OUTPUT)."""
    return {MAPS_OF_OUTPUT[name] for name in outputs if name in MAPS_OF_OUTPUT}


def _check_cancel(cancel: threading.Event | None) -> None:
    if cancel is not None and cancel.is_set():
        raise Cancelled("segmentation cancelled")


__all__ = [
    "STAGES", "Artefact", "ArtefactSet", "LoadedModel", "ModelRegistry", "Progress",
    "RuntimeConfig", "RuntimeSettings", "SegmentationService", "StageObserver",
]
