"""Checks of an upload's grid against a model's, made before any heavy work.

All of them read the orientation transform from the upload's voxel axes to the model's
orientation, computed once per request by :func:`model_transform` and handed to the engine too.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from sfpc.errors import OptionError
from sfpc.inference.contract import PLANE_CODES
from sfpc.inference.engine import Engine, SegmentationResult
from sfpc.inference.preprocess import orientation_transform, resampled_shape, spacing_from_affine
from sfpc.inference.uncertainty import volume_statistics


def model_transform(affine: np.ndarray, engine: Engine) -> np.ndarray | None:
    """The orientation transform of ``affine`` to ``engine``'s model orientation, or None for an
    affine nibabel cannot orient (the engine's validation then says what is wrong with it)."""
    try:
        return orientation_transform(np.asarray(affine, dtype=np.float64),
                                     engine.metadata.orientation)
    except ValueError:
        return None


def check_model_grid(image: np.ndarray, affine: np.ndarray, engine: Engine, max_voxels: int,
                     transform: np.ndarray | None) -> None:
    """Refuse an upload whose grid, resampled to the model's spacing, would be enormous: an
    absurd voxel size in the header (1e30 mm) is small on disk and huge after resampling.
    ``transform`` is :func:`model_transform` (None: nothing to check here)."""
    if transform is None:
        return
    aff = np.asarray(affine, dtype=np.float64)
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


def single_slice_axis(image: np.ndarray, engine: Engine,
                      transform: np.ndarray | None) -> int | None:
    """The spatial axis of a one-slice upload when it is the through-plane axis of a 2D model
    (None otherwise: a 3D model, several slices, or an affine the engine will refuse); a slice
    the model would cut across is an :class:`OptionError`."""
    if engine.metadata.spatial_dims != 2 or image.ndim not in (3, 4):
        return None
    spatial = image.shape[-3:]
    ones = [axis for axis, n in enumerate(spatial) if n == 1]
    if len(ones) != 1 or min(n for n in spatial if n != 1) < 2:
        return None
    if transform is None:
        return None  # a bad affine: the engine's validation says what is wrong with it
    if int(transform[ones[0], 0]) == engine.plane_axis:
        return ones[0]
    codes = str(engine.metadata.orientation).upper()
    normal = codes[int(transform[ones[0], 0])]
    plane = next(name for name, letters in PLANE_CODES.items() if normal in letters)
    raise OptionError(
        f"the upload is a single {plane} slice, but model {engine.metadata.name!r} segments "
        f"{engine.metadata.plane} slices: send {engine.metadata.plane} images or a volume",
        code="slice_plane_mismatch")


def first_slice(result: SegmentationResult, axis: int, engine: Engine) -> SegmentationResult:
    """``result`` of a doubled single-slice upload cut back to its first slice, with the
    volumes recounted on that slice. The map statistics are the engine's, taken on the model
    grid of the two identical slices: every class, band and mean there is that of one slice
    repeated, so they are the one slice's."""
    index = (slice(None),) * axis + (slice(0, 1),)
    mask = np.ascontiguousarray(result.mask[index])
    levels = {name: np.ascontiguousarray(values[index])
              for name, values in result.map_levels().items()}
    voxel_ml = abs(float(np.linalg.det(np.asarray(result.affine)[:3, :3]))) / 1000.0
    volumes = volume_statistics(mask, result.class_names, voxel_ml)
    statistics = dict(result.statistics)
    statistics["classes"] = {name: {**entry, **volumes["classes"][name]}
                             for name, entry in result.statistics["classes"].items()}
    statistics["case"] = {**result.statistics["case"], **volumes["case"]}
    geometry = dict(result.geometry)
    geometry["input_shape"] = list(mask.shape)
    return dataclasses.replace(result, mask=mask, statistics=statistics, geometry=geometry,
                               entropy_levels=levels.get("entropy"),
                               mi_levels=levels.get("mutual_information"))
