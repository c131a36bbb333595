"""Slice order and the voxel-to-RAS affine of a stack of DICOM frames.

Slices are sorted by their position along the slice normal ``n = row x column`` (the cross product
of the two ImageOrientationPatient cosines), never by file name or InstanceNumber, which scanners
and anonymisers renumber freely. The voxel axes are: X along the row cosine (column index, spaced
by PixelSpacing[1]), Y along the column cosine (row index, PixelSpacing[0]), Z along ``n`` with the
spacing measured from the positions, ``(d_last - d_first) / (N - 1)``, not SliceThickness (gapped
acquisitions, e.g. 5 mm slices every 7 mm, are common). The origin is the first sorted slice's
ImagePositionPatient; the matrix is built in DICOM's LPS and flipped to RAS. This is the grid ITK
(SimpleITK's ImageSeriesReader) builds for the same files.

Unevenly spaced slices are refused (422), not resampled: a missing slice usually means an
incomplete upload, and silently interpolating across it would hide that. A gap counts as uneven
when it differs from the mean spacing by more than ``max(10 %, 0.1 mm)``, which tolerates
positions rounded to 0.1 mm. Slices whose positions drift within the plane (CT gantry tilt) make a
sheared grid and are refused too, above half a pixel of drift.

Files without ImagePositionPatient/ImageOrientationPatient (secondary captures, some multi-frame
objects) get an *assumed* geometry, reported on the volume: frames in InstanceNumber/frame order,
the orientation and origin the file has (else axial LPS at 0), SpacingBetweenSlices or
SliceThickness (else 1 mm).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from sfpc.errors import UNPROCESSABLE, UploadError
from sfpc.io.dicom_frames import Frame, Instance
from sfpc.io.volume import LPS_TO_RAS

SPACING_REL_TOLERANCE = 0.10
SPACING_ABS_TOLERANCE = 0.1  # mm
DUPLICATE_POSITION = 0.01  # mm along the normal: closer slices are the same position
MAX_DRIFT_PIXELS = 0.5
_DEFAULT_ORIENTATION = np.array([1.0, 0.0, 0.0, 0.0, 1.0, 0.0])


@dataclass
class StackGeometry:
    frames: list[Frame]  # in slice order (Z index)
    affine: np.ndarray  # voxel (column, row, slice) -> RAS mm
    slice_spacing: float
    kind: str  # "patient" or "assumed"
    warnings: list[str] = field(default_factory=list)


def arrange(instances: Sequence[Instance], frames: Sequence[Frame]) -> StackGeometry:
    """Sort ``frames`` (one stack) and build their affine, or explain in a 422 why not."""
    if all(f.position is not None and f.orientation is not None for f in frames):
        return _patient_geometry(instances, list(frames))
    return _assumed_geometry(instances, list(frames))


def _patient_geometry(instances: Sequence[Instance], frames: list[Frame]) -> StackGeometry:
    warnings: list[str] = []
    first = frames[0]
    assert first.orientation is not None
    row, col = first.orientation[:3], first.orientation[3:]
    normal = np.cross(row, col)
    # A stable sort over a deterministic pre-order keeps equal positions in a reproducible order.
    pre = sorted(frames, key=lambda f: (f.instance, f.frame_number or 0))
    depth = np.array([float(_position(f) @ normal) for f in pre])
    order = np.argsort(depth, kind="stable")
    frames = [pre[i] for i in order]
    depth = depth[order]
    n = len(frames)
    pixel = _pixel_spacing(first, warnings)
    if n == 1:
        spacing = _single_slice_spacing(first, warnings)
    else:
        gaps = np.diff(depth)
        duplicates = int(np.count_nonzero(gaps < DUPLICATE_POSITION))
        if duplicates:
            raise UploadError(
                UNPROCESSABLE, "duplicate_positions",
                f"{duplicates + 1} or more slices of the series share a position (e.g. "
                f"{_name(instances, frames[int(np.argmax(gaps < DUPLICATE_POSITION))])}): the "
                "series holds several volumes (echoes, phases, time points or diffusion "
                "directions); upload a single volume",
            )
        spacing = float(depth[-1] - depth[0]) / (n - 1)
        _check_uniform(instances, frames, gaps, spacing)
        _check_drift(instances, frames, depth, normal, min(pixel))
    linear = np.column_stack([row * pixel[1], col * pixel[0], normal * spacing])
    return StackGeometry(frames, _ras_affine(linear, frames[0].position), spacing, "patient",
                         warnings)


def _position(frame: Frame) -> np.ndarray:
    """The frame's ImagePositionPatient; :func:`arrange` sends only frames that have one to the
    patient geometry."""
    assert frame.position is not None
    return frame.position


def _assumed_geometry(instances: Sequence[Instance], frames: list[Frame]) -> StackGeometry:
    def key(f: Frame) -> tuple[int, int, int]:
        number = instances[f.instance].integer("InstanceNumber")
        return (number if number is not None else 1 << 62, f.frame_number or 0, f.instance)

    frames = sorted(frames, key=key)
    first = frames[0]
    missing = "ImagePositionPatient/ImageOrientationPatient"
    warnings = [
        f"the files have no complete {missing}: geometry is assumed (slices in "
        "InstanceNumber/frame order"
        + (", axial orientation" if first.orientation is None else "")
        + (", origin 0" if first.position is None else "") + ")"
    ]
    orientation = first.orientation if first.orientation is not None else _DEFAULT_ORIENTATION
    row, col = orientation[:3], orientation[3:]
    pixel = _pixel_spacing(first, warnings)
    spacing = _single_slice_spacing(first, warnings)
    linear = np.column_stack([row * pixel[1], col * pixel[0], np.cross(row, col) * spacing])
    origin = first.position if first.position is not None else np.zeros(3)
    return StackGeometry(frames, _ras_affine(linear, origin), spacing, "assumed", warnings)


def _ras_affine(linear: np.ndarray, origin: np.ndarray | None) -> np.ndarray:
    lps = np.eye(4)
    lps[:3, :3] = linear
    lps[:3, 3] = origin if origin is not None else 0.0
    return LPS_TO_RAS @ lps


def _pixel_spacing(frame: Frame, warnings: list[str]) -> tuple[float, float]:
    if frame.pixel_spacing is None:
        warnings.append("no PixelSpacing: 1 mm pixels assumed")
        return 1.0, 1.0
    return frame.pixel_spacing


def _single_slice_spacing(frame: Frame, warnings: list[str]) -> float:
    value = frame.spacing_between or frame.thickness
    if value is None:
        warnings.append("no SpacingBetweenSlices or SliceThickness: 1 mm slices assumed")
        return 1.0
    return float(value)


def _check_uniform(instances: Sequence[Instance], frames: list[Frame], gaps: np.ndarray,
                   spacing: float) -> None:
    tolerance = max(SPACING_REL_TOLERANCE * spacing, SPACING_ABS_TOLERANCE)
    worst = int(np.argmax(np.abs(gaps - spacing)))
    if abs(gaps[worst] - spacing) > tolerance:
        raise UploadError(
            UNPROCESSABLE, "non_uniform_spacing",
            f"slices are not evenly spaced: gaps between sorted slices range from "
            f"{gaps.min():.3g} to {gaps.max():.3g} mm around a mean of {spacing:.3g} mm (the "
            f"largest deviation between {_name(instances, frames[worst])} and "
            f"{_name(instances, frames[worst + 1])}); a slice may be missing or the series "
            "mixes stacks: upload the complete series",
        )


def _check_drift(instances: Sequence[Instance], frames: list[Frame], depth: np.ndarray,
                 normal: np.ndarray, pixel: float) -> None:
    origin = _position(frames[0])
    positions = np.stack([_position(f) for f in frames])
    in_plane = positions - origin - np.outer(depth - depth[0], normal)
    drift = np.linalg.norm(in_plane, axis=1)
    worst = int(np.argmax(drift))
    if drift[worst] > MAX_DRIFT_PIXELS * pixel:
        extent = float(depth[worst] - depth[0])
        angle = float(np.degrees(np.arctan2(drift[worst], abs(extent)))) if extent else 90.0
        raise UploadError(
            UNPROCESSABLE, "sheared_series",
            f"slice positions drift {drift[worst]:.3g} mm within the image plane over "
            f"{abs(extent):.3g} mm (a {angle:.2g} degree shear, e.g. CT gantry tilt, at "
            f"{_name(instances, frames[worst])}): sheared grids are not supported; resample "
            "the series to an orthogonal grid first",
        )


def _name(instances: Sequence[Instance], frame: Frame) -> str:
    name = instances[frame.instance].name
    return f"{name} frame {frame.frame_number}" if frame.frame_number else name
