"""What a decoded upload is (:class:`Volume`), the limits decoding runs under, and the checks every
decoder applies to its result (voxel count, finite values, an orthonormal affine).

Conventions: ``Volume.array`` is spatial ``(X, Y, Z)`` or channel-first ``(C, X, Y, Z)`` and
``Volume.affine`` maps voxel indices to RAS+ millimetres (NIfTI's convention), which is what
``Engine.segment(image, affine)`` takes. A DICOM volume keeps the scanner's voxel order
(X = column, Y = row, Z = slice sorted along the slice normal): ``array[:, :, k]`` is the transpose
of the pixel matrix of source frame ``source_frames[k]``, so a mask maps back onto the source
frames without resampling (see :meth:`Volume.to_source_frames`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sfpc.errors import TOO_LARGE, UNPROCESSABLE, UploadError

# Real scanners' direction cosines are orthonormal to ~1e-5 (float32 NIfTI headers, rounded DICOM
# strings); beyond this the grid is sheared, which reorientation cannot represent. Same value as
# the engine's check, so an upload that decodes is one the engine accepts.
ORTHONORMAL_TOLERANCE = 1e-3
# LPS (DICOM patient coordinates) to RAS (NIfTI world coordinates): flip x and y.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True)
class Limits:
    """Resource limits for one upload; the defaults fit one CT/MR study on a modest server.

    ``min_spatial`` is the fewest voxels allowed along each spatial axis: 1 accepts a single 2D
    slice (returned as ``(X, Y, 1)``); a gateway serving a 3D model passes 2 or more.
    """

    max_upload_bytes: int = 1 << 30  # the raw bytes received, all files together
    max_decompressed_bytes: int = 2 << 30  # archive/gzip expansion and decoded pixel bytes
    max_voxels: int = 1 << 28  # spatial voxels x channels (a float32 copy is 1 GiB)
    max_files: int = 10_000  # files in an upload, members in an archive
    max_compression_ratio: float = 250.0  # zip bomb guard: uncompressed / compressed size
    min_spatial: int = 1

    def __post_init__(self) -> None:
        for name in ("max_upload_bytes", "max_decompressed_bytes", "max_voxels", "max_files",
                     "min_spatial"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"Limits.{name} must be >= 1, got {getattr(self, name)!r}")
        if not self.max_compression_ratio > 1:
            raise ValueError("Limits.max_compression_ratio must be > 1")


@dataclass(frozen=True)
class FrameRef:
    """One source frame of a DICOM volume: its instance and, if multi-frame, frame (1-based)."""

    sop_instance_uid: str
    frame_number: int | None  # None for single-frame instances
    dataset_index: int  # index into ``Volume.dicom_datasets``


@dataclass(frozen=True)
class SeriesSummary:
    """One series (or geometry-consistent part of one) found in a DICOM upload."""

    series_instance_uid: str | None
    modality: str | None
    series_number: int | None
    series_description: str | None
    n_instances: int
    n_frames: int
    eligible: bool
    reason: str  # why it is (not) segmentable, in words

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class SeriesInfo:
    """The series chosen from a DICOM upload, why it was chosen, and what else was there."""

    series_instance_uid: str | None
    study_instance_uid: str | None
    frame_of_reference_uid: str | None
    modality: str | None
    series_number: int | None
    series_description: str | None
    n_instances: int
    n_frames: int
    rule: str  # the selection rule that picked this series, in words
    others: tuple[SeriesSummary, ...]
    transfer_syntaxes: tuple[str, ...]  # names of the transfer syntaxes of the chosen files
    geometry: str  # "patient" (positions/orientation from the files) or "assumed" (none there)
    slice_spacing: float  # mm between sorted slice centres (assumed value without geometry)

    def to_dict(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["others"] = [s.to_dict() for s in self.others]
        out["transfer_syntaxes"] = list(self.transfer_syntaxes)
        return out


@dataclass
class Volume:
    """A decoded upload ready for ``Engine.segment(volume.array, volume.affine)``."""

    array: np.ndarray  # (X, Y, Z) or channel-first (C, X, Y, Z)
    affine: np.ndarray  # 4x4 voxel -> RAS+ mm
    source: str  # "nifti" | "dicom"
    series: SeriesInfo | None = None  # DICOM only
    dicom_datasets: list[Any] = field(default_factory=list)  # DICOM: sorted, without pixel data
    source_frames: tuple[FrameRef, ...] = ()  # DICOM: source frame of each slice array[..., k]
    nifti_header: Any = None  # NIfTI only: nibabel header, to write outputs on the same grid
    warnings: list[str] = field(default_factory=list)

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return tuple(int(n) for n in self.array.shape[-3:])

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size (mm) along each array axis."""
        lengths = np.sqrt((np.asarray(self.affine)[:3, :3] ** 2).sum(axis=0))
        return tuple(float(v) for v in lengths)  # type: ignore[return-value]

    def to_source_frames(self, array: np.ndarray) -> np.ndarray:
        """A spatial ``(X, Y, Z)`` array on this volume's grid as DICOM frames ``(Z, rows, cols)``,
        frame ``k`` belonging to ``source_frames[k]``."""
        array = np.asarray(array)
        if array.shape != self.spatial_shape:
            raise ValueError(f"array shape {array.shape} != volume shape {self.spatial_shape}")
        return np.ascontiguousarray(np.transpose(array, (2, 1, 0)))

    def describe(self) -> dict[str, Any]:
        """JSON-able summary for reports and logs."""
        return {
            "source": self.source,
            "shape": list(self.array.shape),
            "dtype": str(self.array.dtype),
            "spacing_mm": list(self.spacing),
            "affine": np.asarray(self.affine).tolist(),
            "series": None if self.series is None else self.series.to_dict(),
            "warnings": list(self.warnings),
        }


# ----------------------------------------------------------------------------------------------
# Checks shared by the decoders
# ----------------------------------------------------------------------------------------------


def check_size(spatial_shape: tuple[int, ...], channels: int, itemsize: int,
               limits: Limits) -> None:
    """Reject a volume whose voxel count or decoded size is over the limits, before decoding it."""
    voxels = int(np.prod(spatial_shape, dtype=np.int64)) * max(1, channels)
    if voxels > limits.max_voxels:
        raise UploadError(
            TOO_LARGE, "too_many_voxels",
            f"the image has {voxels:,} voxels (shape {tuple(spatial_shape)}"
            f"{f' x {channels} channels' if channels > 1 else ''}); the limit is "
            f"{limits.max_voxels:,}: crop or downsample it before uploading",
        )
    if voxels * itemsize > limits.max_decompressed_bytes:
        raise UploadError(
            TOO_LARGE, "too_large_decoded",
            f"the decoded image would take {voxels * itemsize:,} bytes; the limit is "
            f"{limits.max_decompressed_bytes:,}",
        )


def check_min_spatial(spatial_shape: tuple[int, ...], limits: Limits) -> None:
    small = [axis for axis, n in enumerate(spatial_shape) if n < limits.min_spatial]
    if small:
        raise UploadError(
            UNPROCESSABLE, "too_few_voxels",
            f"the image has spatial shape {tuple(spatial_shape)}: fewer than "
            f"{limits.min_spatial} voxels along axis {', '.join(map(str, small))}"
            + (" (a single 2D slice); this model needs a 3D volume"
               if len(small) == 1 and spatial_shape[small[0]] == 1 else ""),
        )


def check_finite(array: np.ndarray) -> None:
    """422 when a float image holds NaN or Inf (the engine's statistics would be poisoned)."""
    if array.dtype.kind != "f":
        return
    flat = array.ravel(order="K")  # a view of a contiguous array in either order
    step = 1 << 22  # chunks: isfinite of a whole CT would be a large temporary
    n_nan = n_inf = 0
    for start in range(0, flat.size, step):
        chunk = flat[start:start + step]
        if np.isfinite(chunk).all():
            continue
        n_nan += int(np.count_nonzero(np.isnan(chunk)))
        n_inf += int(np.count_nonzero(np.isinf(chunk)))
    if n_nan or n_inf:
        parts = [f"{n:,} {name} value{'s' if n > 1 else ''}"
                 for n, name in ((n_nan, "NaN"), (n_inf, "Inf")) if n]
        raise UploadError(
            UNPROCESSABLE, "non_finite_values",
            f"the image contains {' and '.join(parts)}; replace non-finite voxels (e.g. with the "
            "background intensity) and upload again",
        )


def check_affine(affine: np.ndarray, what: str = "the image's affine") -> np.ndarray:
    """422 unless ``affine`` is a finite 4x4 with non-zero voxel sizes and orthonormal direction
    cosines (voxel sizes are separated out first, so anisotropic voxels are fine)."""
    a = np.asarray(affine, dtype=np.float64)
    if a.shape != (4, 4) or not np.isfinite(a).all():
        raise UploadError(UNPROCESSABLE, "bad_affine", f"{what} is not a finite 4x4 matrix")
    linear = a[:3, :3]
    zooms = np.sqrt((linear**2).sum(axis=0))
    if not (zooms > 1e-6).all():
        axes = ", ".join(str(i) for i, z in enumerate(zooms) if not z > 1e-6)
        raise UploadError(
            UNPROCESSABLE, "singular_affine",
            f"{what} is singular: voxel axis {axes} has zero length (a voxel size of 0 mm)",
        )
    cosines = linear / zooms
    if abs(np.linalg.det(cosines)) < 1e-6:
        raise UploadError(
            UNPROCESSABLE, "singular_affine",
            f"{what} is singular: its voxel axes are linearly dependent",
        )
    off = float(np.abs(cosines.T @ cosines - np.eye(3)).max())
    if off > ORTHONORMAL_TOLERANCE:
        raise UploadError(
            UNPROCESSABLE, "non_orthonormal_affine",
            f"{what} has non-orthogonal direction cosines (largest |cos| between voxel axes "
            f"{off:.3g} > {ORTHONORMAL_TOLERANCE}): sheared grids are not supported; resample the "
            "image to an orthogonal grid first",
        )
    return a
