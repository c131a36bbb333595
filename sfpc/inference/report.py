"""The JSON report of one segmentation (``report.json``, and the jobs API's result): model, input,
statistics, quality flag and timings, with the DICOM series facts stripped of patient identity."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

import sfpc
from sfpc.inference.contract import ModelMetadata
from sfpc.inference.engine import SegmentationResult
from sfpc.inference.review import review_flag
from sfpc.io import SeriesInfo, Volume

STAGES = ("decode", "preprocess", "inference", "postprocess", "encode")


def build_report(volume: Volume, metadata: ModelMetadata, result: SegmentationResult,
                 outputs: Iterable[str], extra_timings: Mapping[str, float] | None
                 ) -> dict[str, Any]:
    """The report of ``result`` (``volume`` segmented by the model of ``metadata``) before
    encoding: the caller adds the encode time, the total and the artefacts."""
    engine_report = result.to_report()
    timings = {stage: 0.0 for stage in STAGES}
    timings.update({k: float(v) for k, v in (extra_timings or {}).items()})
    for stage in ("preprocess", "inference", "postprocess"):
        timings[stage] = float(result.timings.get(stage, 0.0))
    timings["backend"] = float(result.timings.get("backend", 0.0))
    if "postprocess_concurrent" in result.timings:
        timings["postprocess_concurrent"] = float(result.timings["postprocess_concurrent"])
    statistics = engine_report["statistics"]
    report = {
        "sfpc_version": sfpc.__version__,
        "model": {**engine_report["model"], "task": metadata.task},
        "input": {
            "source": volume.source,
            "shape": [int(n) for n in np.shape(volume.array)],
            "affine": engine_report["affine"],
            "spacing_mm": engine_report["geometry"]["input_spacing"],
            "series": public_series(volume.series),
        },
        "outputs": list(outputs),
        "uncertainty": result.uncertainty,
        "uncertainty_maps": engine_report["uncertainty_maps"],
        "class_names": engine_report["class_names"],
        "voxel_volume_ml": statistics["voxel_volume_ml"],
        "band_width_voxels": statistics["band_width_voxels"],
        # Where the map statistics were taken (the model grid) and the band's width there in mm,
        # so that a reader can compare them with statistics taken on the input grid.
        **{key: statistics[key] for key in ("map_statistics_grid", "band_width_mm")
           if key in statistics},
        "classes": statistics["classes"],
        "case": statistics["case"],
        "geometry": engine_report["geometry"],
        "n_windows": engine_report["n_windows"],
        "timings": timings,
    }
    quality = review_flag(metadata, statistics, result.uncertainty,
                          bool(result.model.get("flip")))
    if quality is not None:
        report["quality"] = quality
    return report


# Technical facts of a DICOM series that reports may carry. An allow list, so that a future field
# of the I/O layer cannot leak identity (names, ids, dates) into reports by accident.
_SERIES_KEYS = frozenset({
    "series_instance_uid", "study_instance_uid", "frame_of_reference_uid", "modality",
    "series_number", "series_description", "n_instances", "n_frames", "rule", "others",
    "transfer_syntaxes", "geometry", "slice_spacing", "eligible", "reason",
})


def public_series(series: SeriesInfo | None) -> dict[str, Any] | None:
    """The series facts of a DICOM upload without patient identity (None for other uploads)."""
    if series is None:
        return None
    return _public(series.to_dict())


def _public(facts: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _public(v) if isinstance(v, Mapping) else
            [_public(x) if isinstance(x, Mapping) else _jsonable(x) for x in v]
            if isinstance(v, (list, tuple)) else _jsonable(v)
            for k, v in facts.items() if k in _SERIES_KEYS}


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
