"""Per-frame facts of DICOM instances: where each frame sits, how its pixels scale, and whether it
is an image this server can segment at all.

Classic single-frame images carry their geometry at the top level; enhanced multi-frame images
(Enhanced CT/MR, legacy-converted) carry it in functional groups, per frame
(PerFrameFunctionalGroupsSequence) or for all frames (SharedFunctionalGroupsSequence). Both end up
as one :class:`Frame` per frame.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import UID

from sfpc.errors import UNPROCESSABLE, UNSUPPORTED, UploadError

# Non-image or derived objects: never the series to segment, even when they carry pixels
# (a SEG, an RT dose grid). Modality is the quickest tell; SOP classes below catch the rest.
DERIVED_MODALITIES = {
    "SEG", "RTSTRUCT", "RTPLAN", "RTDOSE", "RTRECORD", "RTIMAGE", "SR", "PR", "KO", "REG", "DOC",
    "FID", "RWV", "PLAN", "AU", "ECG", "HD",
}
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
# Orientation vectors are unit length and orthogonal to ~1e-6 in real files (6 decimal digits).
_ORIENTATION_TOLERANCE = 1e-3


@dataclass
class Instance:
    """One parsed DICOM file."""

    name: str
    ds: Dataset

    def text(self, keyword: str) -> str | None:
        value = self.ds.get(keyword)
        text = str(value).strip() if value is not None else ""
        return text or None

    def integer(self, keyword: str) -> int | None:
        try:
            value = self.ds.get(keyword)
            return None if value is None or value == "" else int(value)
        except (TypeError, ValueError):
            return None

    @property
    def series_uid(self) -> str | None:
        return self.text("SeriesInstanceUID")

    @property
    def sop_uid(self) -> str | None:
        return self.text("SOPInstanceUID")

    @property
    def transfer_syntax(self) -> UID | None:
        meta = getattr(self.ds, "file_meta", None)
        ts = meta.get("TransferSyntaxUID") if meta is not None else None
        return UID(str(ts)) if ts else None

    @property
    def n_frames(self) -> int:
        return max(1, self.integer("NumberOfFrames") or 1)

    @property
    def has_pixels(self) -> bool:
        return any(k in self.ds for k in _PIXEL_KEYWORDS)


@dataclass
class Frame:
    """One frame (slice) of one instance."""

    instance: int  # index into the instance list
    frame_number: int | None  # 1-based, for multi-frame instances
    rows: int
    columns: int
    position: np.ndarray | None  # ImagePositionPatient (LPS mm) of the first pixel's centre
    orientation: np.ndarray | None  # ImageOrientationPatient: row cosine, then column cosine
    pixel_spacing: tuple[float, float] | None  # (between rows, between columns) in mm
    thickness: float | None
    spacing_between: float | None  # SpacingBetweenSlices, a fallback for single slices only
    slope: float
    intercept: float


def ineligibility(inst: Instance) -> tuple[int, str, str] | None:
    """Why ``inst`` cannot be the image to segment, as (status, code, words); None if it can."""
    modality = inst.text("Modality")
    if modality in DERIVED_MODALITIES:
        return UNSUPPORTED, "not_an_image", f"modality {modality} is not an image to segment"
    if not inst.has_pixels:
        return UNSUPPORTED, "not_an_image", "holds no image pixel data"
    photometric = inst.text("PhotometricInterpretation") or "MONOCHROME2"
    samples = inst.integer("SamplesPerPixel") or 1
    if samples != 1 or not photometric.startswith("MONOCHROME"):
        return (UNSUPPORTED, "colour_image",
                f"is a colour image ({photometric}); segmentation needs greyscale CT/MR/PET")
    if not inst.integer("Rows") or not inst.integer("Columns"):
        return UNPROCESSABLE, "bad_image_size", "has no Rows/Columns"
    return None


def frames_of(index: int, inst: Instance) -> list[Frame]:
    """All frames of an image instance with their geometry (None where the file has none)."""
    ds = inst.ds
    rows, columns = int(inst.integer("Rows") or 0), int(inst.integer("Columns") or 0)
    top_slope, top_intercept = _rescale(ds, 1.0, 0.0)
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    shared_seq = ds.get("SharedFunctionalGroupsSequence")
    shared = shared_seq[0] if shared_seq else None
    n = inst.n_frames
    multi = "NumberOfFrames" in ds
    frames = []
    for i in range(n):
        item = per_frame[i] if per_frame is not None and i < len(per_frame) else None

        def group(keyword: str, item: Any = item) -> Any:
            for source in (item, shared):
                if source is not None and keyword in source and len(source[keyword].value):
                    return source[keyword].value[0]
            return None

        position_item = group("PlanePositionSequence")
        orientation_item = group("PlaneOrientationSequence")
        measures = group("PixelMeasuresSequence")
        transform = group("PixelValueTransformationSequence")
        position = _vector(inst.name, position_item, "ImagePositionPatient", 3)
        orientation = _vector(inst.name, orientation_item, "ImageOrientationPatient", 6)
        if position is None and (n == 1 or per_frame is None) and i == 0:
            position = _vector(inst.name, ds, "ImagePositionPatient", 3)
        if orientation is None:
            orientation = _vector(inst.name, ds, "ImageOrientationPatient", 6)
        spacing = _vector(inst.name, measures, "PixelSpacing", 2)
        if spacing is None:
            spacing = _vector(inst.name, ds, "PixelSpacing", 2)
        slope, intercept = (_rescale(transform, top_slope, top_intercept)
                            if transform is not None else (top_slope, top_intercept))
        frames.append(Frame(
            instance=index,
            frame_number=i + 1 if multi else None,
            rows=rows,
            columns=columns,
            position=position,
            orientation=_orthonormal(inst.name, orientation),
            pixel_spacing=_spacing(inst.name, spacing),
            thickness=_positive(measures, "SliceThickness") or _positive(ds, "SliceThickness"),
            spacing_between=(_positive(measures, "SpacingBetweenSlices")
                             or _positive(ds, "SpacingBetweenSlices")),
            slope=slope,
            intercept=intercept,
        ))
    return frames


def _vector(name: str, source: Any, keyword: str, n: int) -> np.ndarray | None:
    if source is None or keyword not in source:
        return None
    value = source[keyword].value
    if value is None or value == "":
        return None
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        value = [value]
    try:
        values = [float(v) for v in value]
    except (TypeError, ValueError) as exc:
        raise UploadError(UNPROCESSABLE, "bad_geometry",
                          f"{name}: {keyword} is not numeric ({value!r})") from exc
    if len(values) != n or not np.isfinite(values).all():
        raise UploadError(
            UNPROCESSABLE, "bad_geometry",
            f"{name}: {keyword} must hold {n} finite numbers, got {value!r}",
        )
    return np.asarray(values, dtype=np.float64)


def _orthonormal(name: str, orientation: np.ndarray | None) -> np.ndarray | None:
    if orientation is None:
        return None
    row, col = orientation[:3], orientation[3:]
    lengths = np.linalg.norm(row), np.linalg.norm(col)
    if (abs(lengths[0] - 1) > _ORIENTATION_TOLERANCE or abs(lengths[1] - 1) > _ORIENTATION_TOLERANCE
            or abs(float(row @ col)) > _ORIENTATION_TOLERANCE):
        raise UploadError(
            UNPROCESSABLE, "non_orthonormal_affine",
            f"{name}: ImageOrientationPatient {orientation.tolist()} is not two orthogonal unit "
            "vectors",
        )
    return np.concatenate([row / lengths[0], col / lengths[1]])


def _spacing(name: str, spacing: np.ndarray | None) -> tuple[float, float] | None:
    if spacing is None:
        return None
    if not (spacing > 0).all():
        raise UploadError(UNPROCESSABLE, "singular_affine",
                          f"{name}: PixelSpacing {spacing.tolist()} must be positive")
    return float(spacing[0]), float(spacing[1])


def _positive(source: Any, keyword: str) -> float | None:
    if source is None or keyword not in source:
        return None
    try:
        value = float(source[keyword].value)
    except (TypeError, ValueError):
        return None
    return value if np.isfinite(value) and value > 0 else None


def _rescale(source: Any, slope: float, intercept: float) -> tuple[float, float]:
    def number(keyword: str, default: float) -> float:
        if source is None or keyword not in source:
            return default
        try:
            value = float(source[keyword].value)
        except (TypeError, ValueError):
            return default
        return value if np.isfinite(value) else default

    slope = number("RescaleSlope", slope)
    return (slope if slope != 0 else 1.0), number("RescaleIntercept", intercept)
