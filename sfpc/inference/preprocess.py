"""Intensity normalisation and voxel geometry shared by training and serving.

Only numpy, scipy and nibabel are imported here: the serving engine runs without torch and must
preprocess an upload exactly as the trainer preprocessed its cases, so both call these functions.

Array conventions: a spatial array has its spatial axes first (nibabel's order, anything after
them - e.g. the channels of a 4D NIfTI - is carried along); with ``channel_first=True`` the array
is MONAI-style ``(C, X, Y, Z)``. The canonical model grid is RAS.

Resampling aligns voxel *edges*, not the centres of the first and last voxels (scipy's
``grid_mode=True``): the physical extent ``shape * spacing`` is kept, and resampling back to the
original shape returns to the original grid.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
from nibabel.orientations import (
    apply_orientation,
    axcodes2ornt,
    inv_ornt_aff,
    io_orientation,
    ornt_transform,
)
from scipy import ndimage

# The normalisation spec is part of the model contract (checked when metadata is loaded); it is
# re-exported here beside the code that applies it.
from sfpc.inference.contract import NORMALISATION_KINDS as NORMALISATION_KINDS
from sfpc.inference.contract import RESAMPLING_MODES
from sfpc.inference.contract import validate_normalisation as validate_normalisation

# ----------------------------------------------------------------------------------------------
# Intensity normalisation
# ----------------------------------------------------------------------------------------------


def normalise(
    array: np.ndarray, spec: Mapping[str, Any], channel_axis: int | None = None
) -> np.ndarray:
    """Normalise intensities as described by ``spec``; returns a new float32 array.

    ``{"kind": "ct_window", "window": [lo, hi]}``: clip to the window, scale to [0, 1]; with
    ``"mean"`` and ``"std"``: clip, then subtract the mean and divide by the std (nnU-Net's CT).
    ``{"kind": "zscore", "foreground": "nonzero" | "all"}``: zero mean, unit variance over the
    foreground voxels; with "nonzero" the background stays exactly 0.
    ``{"kind": "minmax", "percentiles": [lo, hi]}`` (percentiles optional): scale to [0, 1],
    clipping to the given percentiles first.
    With ``channel_axis`` each channel is normalised on its own statistics. Constant images map
    to 0, never NaN.
    """
    spec = validate_normalisation(spec)
    data = np.asarray(array)
    if channel_axis is not None:
        moved = np.moveaxis(data, channel_axis, 0)
        out = np.stack([_normalise_one(channel, spec) for channel in moved])
        return np.moveaxis(out, 0, channel_axis)
    return _normalise_one(data, spec)


def _normalise_one(data: np.ndarray, spec: dict[str, Any]) -> np.ndarray:
    # One float32 working copy, then in-place arithmetic: a 512x512x400 CT must not cost several
    # copies of itself. Non-finite voxels (NaN padding in some MR exports) would poison every
    # statistic below, so they become 0 first.
    out = np.array(data, dtype=np.float32, copy=True)
    if not np.isfinite(out).all():
        np.nan_to_num(out, copy=False, nan=0.0, posinf=0.0, neginf=0.0)
    kind = spec["kind"]
    if kind == "ct_window":
        lo, hi = spec["window"]
        np.clip(out, lo, hi, out=out)
        if "mean" in spec:  # z-score with the training set's foreground statistics
            out -= np.float32(spec["mean"])
            out *= np.float32(1.0 / spec["std"])
            return out
        out -= np.float32(lo)
        out *= np.float32(1.0 / (hi - lo))
        return out
    if kind == "zscore":
        if spec["foreground"] == "nonzero":
            mask = out != 0
            if not mask.any():
                return out
            values = out[mask]
        else:
            mask, values = None, out
        mean = float(values.mean(dtype=np.float64))
        std = float(values.std(dtype=np.float64))
        scale = np.float32(1.0 / std if std > 0 else 0.0)
        out -= np.float32(mean)
        out *= scale
        if mask is not None:
            out[~mask] = 0.0  # background stays exactly 0
        return out
    # minmax
    if "percentiles" in spec:
        lo, hi = (float(v) for v in np.percentile(out, spec["percentiles"]))
        np.clip(out, lo, hi, out=out)
    else:
        lo, hi = float(out.min()), float(out.max())
    if hi <= lo:
        out[...] = 0.0
        return out
    out -= np.float32(lo)
    out *= np.float32(1.0 / (hi - lo))
    return out


# ----------------------------------------------------------------------------------------------
# Orientation
# ----------------------------------------------------------------------------------------------


def orientation_transform(affine: np.ndarray, target: str = "RAS") -> np.ndarray:
    """nibabel's orientation transform from ``affine``'s voxel axes to ``target``: one
    ``(new_axis, flip)`` row per spatial axis (closest axes for oblique images)."""
    return ornt_transform(io_orientation(np.asarray(affine, dtype=np.float64)),
                          axcodes2ornt(tuple(target)))


def to_orientation(
    array: np.ndarray,
    affine: np.ndarray,
    target: str = "RAS",
    channel_first: bool = False,
    transform: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reorder/flip voxel axes so they point along ``target`` (closest axes for oblique images).

    Returns ``(array, affine, transform)``; ``transform`` is :func:`orientation_transform` (pass
    it when already computed for this affine and target) and undoes with
    :func:`from_orientation`. The returned affine maps the new voxel indices to the same world
    points as before.
    """
    affine = np.asarray(affine, dtype=np.float64)
    n_spatial = affine.shape[0] - 1
    if transform is None:
        transform = orientation_transform(affine, target)
    spatial_shape = _spatial_shape(array, n_spatial, channel_first)
    new_affine = affine @ inv_ornt_aff(transform, spatial_shape)
    return _apply_ornt(array, transform, channel_first), new_affine, transform


def from_orientation(
    array: np.ndarray, transform: np.ndarray, channel_first: bool = False
) -> np.ndarray:
    """Put an array produced on the reoriented grid back into the input's voxel order."""
    transform = np.asarray(transform)
    inverse = np.empty_like(transform)
    for axis, (new_axis, flip) in enumerate(transform):
        inverse[int(new_axis)] = (axis, flip)
    return _apply_ornt(array, inverse, channel_first)


def _apply_ornt(array: np.ndarray, ornt: np.ndarray, channel_first: bool,
                contiguous: bool = True) -> np.ndarray:
    if channel_first:
        moved = np.moveaxis(array, 0, -1)
        out = np.moveaxis(apply_orientation(moved, ornt), -1, 0)
    else:
        out = apply_orientation(array, ornt)
    return np.ascontiguousarray(out) if contiguous else out


def _spatial_shape(array: np.ndarray, n_spatial: int, channel_first: bool) -> tuple[int, ...]:
    shape = array.shape[1:] if channel_first else array.shape
    if len(shape) < n_spatial:
        raise ValueError(f"array of shape {array.shape} has fewer than {n_spatial} spatial axes")
    return tuple(shape[:n_spatial])


# ----------------------------------------------------------------------------------------------
# Spacing and resampling
# ----------------------------------------------------------------------------------------------


def spacing_from_affine(affine: np.ndarray) -> tuple[float, ...]:
    """Voxel size along each voxel axis: the length of each column of the affine's linear part."""
    affine = np.asarray(affine, dtype=np.float64)
    linear = affine[:-1, :-1]
    return tuple(float(v) for v in np.sqrt((linear**2).sum(axis=0)))


def resampled_shape(
    shape: Sequence[int],
    spacing: Sequence[float],
    target_spacing: Sequence[float | None] | float,
    axes: Sequence[int] | None = None,
) -> tuple[int, ...]:
    """Spatial shape after resampling to ``target_spacing`` (extent kept, rounded, at least 1)."""
    targets = _targets(spacing, target_spacing, axes)
    return tuple(
        int(n) if t is None else max(1, int(round(n * float(s) / float(t))))
        for n, s, t in zip(shape, spacing, targets, strict=True)
    )


def resample_to_spacing(
    array: np.ndarray,
    spacing: Sequence[float],
    target_spacing: Sequence[float | None] | float,
    order: int,
    axes: Sequence[int] | None = None,
) -> np.ndarray:
    """Resample to a new voxel size keeping the physical extent.

    ``array`` is spatial (``ndim == len(spacing)``) or channel-first (one more leading axis).
    ``target_spacing`` is one number for all axes or one entry per axis, ``None`` keeping that
    axis; ``axes`` restricts resampling to those spatial axes (e.g. ``(0, 1)`` for in-plane only,
    as 2D models need). ``order`` 1 for images, 0 (nearest) for label maps.
    """
    n_spatial = len(spacing)
    spatial = array.shape[-n_spatial:]
    return resample_to_shape(array, resampled_shape(spatial, spacing, target_spacing, axes), order)


def resample_to_shape(array: np.ndarray, shape: Sequence[int], order: int,
                      dtype: Any = None) -> np.ndarray:
    """Resample the spatial axes (the last ``len(shape)``) to ``shape``, voxel edges aligned.

    Applied to the output of :func:`resample_to_spacing` with the original shape, it brings the
    array back onto the original grid (exactly that shape). ``dtype``: of the result (default
    the input's), computed in it: an int16 CT resampled straight into float32 needs no float
    copy of the input.
    """
    shape = tuple(int(n) for n in shape)
    if array.ndim == len(shape):
        return _zoom(array, shape, order, dtype)
    if array.ndim == len(shape) + 1:
        return np.stack([_zoom(channel, shape, order, dtype) for channel in array])
    raise ValueError(f"cannot resample array of shape {array.shape} to spatial shape {shape}")


def _zoom(array: np.ndarray, shape: tuple[int, ...], order: int,
          dtype: Any = None) -> np.ndarray:
    if array.shape == shape:
        return np.array(array, dtype=dtype, order="C")
    factors = [n_out / n_in for n_out, n_in in zip(shape, array.shape, strict=True)]
    # Edge clamping ("nearest") avoids darkening the border that zero padding would cause.
    out = ndimage.zoom(array, factors, order=order, mode="nearest", grid_mode=True,
                       output=dtype or array.dtype)
    if out.shape != shape:  # zoom rounds its output shape; guard against a float slip
        raise RuntimeError(f"zoom produced {out.shape}, expected {shape}")
    return out


def resample_affine(
    affine: np.ndarray, old_shape: Sequence[int], new_shape: Sequence[int]
) -> np.ndarray:
    """Affine of the grid produced by :func:`resample_to_shape` from ``old_shape``.

    New voxel ``i`` sits at old continuous index ``(i + 0.5) * old/new - 0.5`` along each axis.
    """
    affine = np.asarray(affine, dtype=np.float64)
    scale = np.asarray(old_shape, dtype=np.float64) / np.asarray(new_shape, dtype=np.float64)
    index_map = np.eye(len(scale) + 1)
    index_map[:-1, :-1] = np.diag(scale)
    index_map[:-1, -1] = 0.5 * scale - 0.5
    return affine @ index_map


def _targets(
    spacing: Sequence[float],
    target_spacing: Sequence[float | None] | float,
    axes: Sequence[int] | None,
) -> list[float | None]:
    n = len(spacing)
    if target_spacing is None or isinstance(target_spacing, numbers.Real):
        targets: list[float | None] = [target_spacing] * n  # type: ignore[list-item]
    else:
        # A sequence here: mypy does not narrow through numbers.Real.
        targets = list(cast(Sequence[float | None], target_spacing))
        if len(targets) != n:
            raise ValueError(f"target_spacing {target_spacing!r} does not match {n} spatial axes")
    if axes is not None:
        keep = set(range(n)) - {int(a) % n for a in axes}
        for axis in keep:
            targets[axis] = None
    for t in targets:
        if t is not None and not float(t) > 0:
            raise ValueError(f"target spacing must be positive, got {target_spacing!r}")
    return targets


# ----------------------------------------------------------------------------------------------
# The whole input pipeline, forwards and back
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Geometry:
    """What is needed to put a model-grid prediction back on the input image's grid."""

    input_shape: tuple[int, ...]  # spatial shape of the input, in its own voxel order
    transform: tuple[tuple[float, float], ...]  # orientation transform (see to_orientation)
    oriented_shape: tuple[int, ...]  # spatial shape after reorientation, before resampling
    model_shape: tuple[int, ...]  # spatial shape the model sees
    affine: tuple[tuple[float, ...], ...]  # affine of the model grid

    def to_dict(self) -> dict[str, Any]:
        return {
            "input_shape": list(self.input_shape),
            "transform": [list(row) for row in self.transform],
            "oriented_shape": list(self.oriented_shape),
            "model_shape": list(self.model_shape),
            "affine": [list(row) for row in self.affine],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Geometry:
        return cls(
            input_shape=tuple(int(v) for v in data["input_shape"]),
            transform=tuple((float(a), float(f)) for a, f in data["transform"]),
            oriented_shape=tuple(int(v) for v in data["oriented_shape"]),
            model_shape=tuple(int(v) for v in data["model_shape"]),
            affine=tuple(tuple(float(v) for v in row) for row in data["affine"]),
        )


def linear_neighbours(n_in: int, n_out: int, start: int = 0, stop: int | None = None
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Output voxels ``start:stop`` of an axis resampled linearly from ``n_in`` to ``n_out``
    voxels (scipy's ``grid_mode=True`` mapping, edges clamped): the lower and upper input
    neighbours and the upper one's weight (float32)."""
    stop = n_out if stop is None else stop
    x = np.clip((np.arange(start, stop, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5,
                0.0, n_in - 1)
    i0 = np.floor(x).astype(np.intp)
    return i0, np.minimum(i0 + 1, n_in - 1), (x - i0).astype(np.float32)


def axis_weights(n_in: int, n_out: int, mode: str = "area") -> np.ndarray:
    """The (n_out, n_in) matrix that resamples one axis, voxel edges aligned (scipy's
    ``grid_mode=True``): in "area" mode a shrinking axis averages the input voxels each output
    voxel covers, weighted by overlap (rows sum to 1); otherwise linear interpolation between
    the two nearest input centres, edges clamped (scipy's ``zoom(order=1, mode="nearest")``)."""
    if mode not in RESAMPLING_MODES:
        raise ValueError(f"resampling {mode!r} (one of {RESAMPLING_MODES})")
    scale = n_in / n_out
    if mode == "area" and n_out < n_in:
        lo = np.arange(n_out, dtype=np.float64)[:, None] * scale
        edges = np.arange(n_in, dtype=np.float64)[None, :]
        overlap = np.minimum(lo + scale, edges + 1) - np.maximum(lo, edges)
        return (np.clip(overlap, 0.0, None) / scale).astype(np.float32)
    i0, i1, w = linear_neighbours(n_in, n_out)
    weights = np.zeros((n_out, n_in), dtype=np.float32)
    rows = np.arange(n_out)
    np.add.at(weights, (rows, i0), 1.0 - w)
    np.add.at(weights, (rows, i1), w)
    return weights


def resample_area(array: np.ndarray, shape: Sequence[int], slab: int = 16) -> np.ndarray:
    """A (C, X, Y, Z) array (or a view of one, any dtype) resampled to spatial ``shape`` in
    float32 as :func:`axis_weights` "area" does: averaging on shrinking axes, linear on growing
    ones. X and Y are done slab by slab along Z, so a 512^2 x 400 int16 CT is never copied to
    float32 whole; Z last, on the (smaller) result."""
    shape = tuple(int(n) for n in shape)
    channels, *spatial = array.shape
    if len(spatial) != 3 or len(shape) != 3:
        raise ValueError(f"resample_area expects (C, X, Y, Z) and 3 sizes, got {array.shape}, "
                         f"{shape}")
    out = np.empty((channels, *shape), dtype=np.float32)
    for c in range(channels):
        plane = np.empty((shape[0], shape[1], spatial[2]), dtype=np.float32)
        for start in range(0, spatial[2], slab):
            # order "K" keeps the upload's layout; numpy's cumsum and take are only fast along
            # the last axis or the first of a C-ordered array, so a Fortran-ordered (NIfTI)
            # block is worked on as its transpose (Z, Y, X), which is C-ordered.
            block = np.array(array[c, :, :, start:start + slab], dtype=np.float32, order="K")
            if block.flags.f_contiguous and not block.flags.c_contiguous:
                t = _resample_axis(block.T, 2, shape[0])
                plane[:, :, start:start + slab] = _resample_axis(t, 1, shape[1]).T
            else:
                block = np.ascontiguousarray(block)
                for axis in (0, 1):
                    block = _resample_axis(block, axis, shape[axis])
                plane[:, :, start:start + slab] = block
        out[c] = _resample_axis(plane, 2, shape[2])
    return out


def _resample_axis(a: np.ndarray, axis: int, n_out: int) -> np.ndarray:
    n_in = a.shape[axis]
    if n_in == n_out:
        return a
    if n_out > n_in:  # linear: the weights have two entries per row, the matrix is small
        moved = np.tensordot(axis_weights(n_in, n_out, "linear"), a, axes=([1], [axis]))
        return np.moveaxis(moved, 0, axis)
    if axis == a.ndim - 1:
        return _area_last_axis(a, n_out)
    # The mean of a[lo:hi) for fractional edges is (F(hi) - F(lo)) / (hi - lo), F the integral
    # of the piecewise-constant row: F(x) = cumsum[k] - (1 - (x - k)) * a[k], k = min(floor x,
    # n_in - 1). Two passes over the block, where a weight matrix would be mostly zeros.
    total = _cumsum(a, axis)
    scale = n_in / n_out
    edges = np.arange(n_out + 1, dtype=np.float64) * scale
    k = np.minimum(np.floor(edges).astype(np.intp), n_in - 1)
    rest = (1.0 - (edges - k)).astype(np.float32)
    shape = [1] * a.ndim
    shape[axis] = n_out + 1
    integral = np.take(total, k, axis=axis)
    integral -= np.take(a, k, axis=axis) * rest.reshape(shape)
    lo = integral[(slice(None),) * axis + (slice(0, n_out),)]
    hi = integral[(slice(None),) * axis + (slice(1, n_out + 1),)]
    out = hi - lo
    out *= np.float32(1.0 / scale)
    return out


def _area_last_axis(a: np.ndarray, n_out: int) -> np.ndarray:
    """:func:`_resample_axis` shrinking the last axis: each output voxel is the overlap-weighted
    sum of the few input voxels it covers (the nonzeros of a row of :func:`axis_weights`), as
    one gather and multiply-add per position in that short run. A cumulative sum along the
    last axis is a chain of dependent adds, element by element, and this axis is the fastest
    of every NIfTI or DICOM volume (column-major, worked on as its C-ordered transpose); see
    benchmarks/encode_parts.py for the two timed side by side."""
    n_in = a.shape[-1]
    weights = axis_weights(n_in, n_out, "area")
    covered = weights > 0
    first = np.argmax(covered, axis=1)
    width = int(covered.sum(axis=1).max())
    rows = np.arange(n_out)
    out = np.zeros(a.shape[:-1] + (n_out,), dtype=np.float32)
    for j in range(width):
        index = np.minimum(first + j, n_in - 1)
        w = np.where(first + j < n_in, weights[rows, index], 0.0).astype(np.float32)
        out += np.take(a, index, axis=-1) * w
    return out


def _cumsum(a: np.ndarray, axis: int) -> np.ndarray:
    """``np.cumsum(a, axis, dtype=float32)``. numpy accumulates along any axis but the last one
    element by element (0.03 s for a 512^2 x 16 slab along its first axis); a loop of whole
    slices along the axis is one vectorised add per row."""
    if axis == a.ndim - 1:
        return np.cumsum(a, axis=axis, dtype=np.float32)
    out = np.empty(a.shape, dtype=np.float32)
    index: list[Any] = [slice(None)] * a.ndim
    previous = None
    for i in range(a.shape[axis]):
        index[axis] = i
        current = tuple(index)
        if previous is None:
            out[current] = a[current]
        else:
            np.add(out[previous], a[current], out=out[current])
        previous = current
    return out


def prepare_image(
    image: np.ndarray,
    affine: np.ndarray,
    normalisation: Mapping[str, Any] | None,
    target_spacing: Sequence[float | None] | float | None = None,
    resample_axes: Sequence[int] | None = None,
    orientation: str = "RAS",
    transform: np.ndarray | None = None,
    resampling: str = "linear",
) -> tuple[np.ndarray, Geometry]:
    """Reorient, resample and normalise a channel-first ``(C, X, Y, Z)`` image.

    The order (orientation, spacing, then intensity statistics on the model grid) is the one both
    the trainer and the server use. Returns the float32 model-grid image and its :class:`Geometry`.
    ``normalisation`` None leaves intensities as they are (float32). ``transform`` is the
    :func:`orientation_transform` of ``affine`` to ``orientation`` when the caller has it.
    ``resampling``: "linear" (scipy's trilinear zoom) or "area" (:func:`resample_area`), see
    :data:`~sfpc.inference.contract.RESAMPLING_MODES`.
    """
    plan = _Plan(image, affine, target_spacing, resample_axes, orientation, transform,
                 resampling)
    model = plan.resample(plan.oriented, plan.model_shape)
    if normalisation is not None:
        model = normalise(model, normalisation, channel_axis=0)
    return np.ascontiguousarray(model, dtype=np.float32), plan.geometry


def prepare_image_in_slabs(
    image: np.ndarray,
    affine: np.ndarray,
    normalisation: Mapping[str, Any] | None,
    target_spacing: Sequence[float | None] | float | None = None,
    resample_axes: Sequence[int] | None = None,
    orientation: str = "RAS",
    transform: np.ndarray | None = None,
    resampling: str = "linear",
    *,
    axis: int,
) -> tuple[np.ndarray, Geometry, Callable[[int, int], None]] | None:
    """:func:`prepare_image` cut along spatial ``axis`` of the model grid: the (empty) model
    image, its geometry, and ``fill(start, stop)``, which writes model slices ``start:stop``
    along ``axis``, so that a caller can run the network on the first slices while the rest are
    prepared. Filled whole, the image equals :func:`prepare_image`'s.

    None when the slices are not independent: ``axis`` is resampled, or the normalisation takes
    statistics over the whole image (only "ct_window", a per-voxel map, or none, qualify)."""
    if normalisation is not None and validate_normalisation(normalisation)["kind"] != "ct_window":
        return None
    plan = _Plan(image, affine, target_spacing, resample_axes, orientation, transform,
                 resampling)
    if plan.model_shape[axis] != plan.oriented.shape[axis + 1]:
        return None
    model = np.empty((plan.oriented.shape[0], *plan.model_shape), dtype=np.float32)

    def fill(start: int, stop: int) -> None:
        index = (slice(None),) * (axis + 1) + (slice(start, stop),)
        part = plan.oriented[index]
        shape = list(plan.model_shape)
        shape[axis] = part.shape[axis + 1]
        block = plan.resample(part, shape)
        model[index] = block if normalisation is None else normalise(block, normalisation,
                                                                     channel_axis=0)

    return model, plan.geometry, fill


class _Plan:
    """The reoriented view of an image and the model grid it is resampled to: the part of
    :func:`prepare_image` that reads no voxel."""

    def __init__(self, image: np.ndarray, affine: np.ndarray,
                 target_spacing: Sequence[float | None] | float | None,
                 resample_axes: Sequence[int] | None, orientation: str,
                 transform: np.ndarray | None, resampling: str) -> None:
        if resampling not in RESAMPLING_MODES:
            raise ValueError(f"resampling {resampling!r} (one of {RESAMPLING_MODES})")
        image = np.asarray(image)
        if image.ndim != 4:
            raise ValueError("prepare_image expects a (C, X, Y, Z) array, got shape "
                             f"{image.shape}")
        # The reoriented image is a view: a CT of 512 x 512 x 400 would otherwise be copied
        # twice at full size (to float32, then from NIfTI's Fortran order to C order) before the
        # resampling reads it once into the much smaller model grid, in float32.
        if image.dtype.kind == "b" or image.dtype == np.float16:
            image = image.astype(np.float32)  # types scipy.ndimage does not interpolate
        affine = np.asarray(affine, dtype=np.float64)
        if transform is None:
            transform = orientation_transform(affine, orientation)
        self.oriented = _apply_ornt(image, transform, channel_first=True, contiguous=False)
        new_affine = affine @ inv_ornt_aff(transform, image.shape[1:])
        oriented_shape = self.oriented.shape[1:]
        self.resampled = target_spacing is not None
        if target_spacing is not None:
            spacing = spacing_from_affine(new_affine)
            model_shape = resampled_shape(oriented_shape, spacing, target_spacing,
                                          resample_axes)
            new_affine = resample_affine(new_affine, oriented_shape, model_shape)
        else:
            model_shape = oriented_shape
        self.model_shape = tuple(int(v) for v in model_shape)
        self.resampling = resampling
        self.geometry = Geometry(
            input_shape=tuple(int(v) for v in image.shape[1:]),
            transform=tuple((float(a), float(f)) for a, f in transform),
            oriented_shape=tuple(int(v) for v in oriented_shape),
            model_shape=self.model_shape,
            affine=tuple(tuple(float(v) for v in row) for row in new_affine),
        )

    def resample(self, part: np.ndarray, shape: Sequence[int]) -> np.ndarray:
        """``part`` of the reoriented image (channel-first) on the model grid's spacing, as
        ``shape``, float32."""
        if not self.resampled:
            return np.ascontiguousarray(part, dtype=np.float32)
        if self.resampling == "area":
            return resample_area(part, shape)
        return resample_to_shape(part, shape, 1, dtype=np.float32)


def prepare_label(label: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Bring a spatial label map of the input onto the model grid (nearest neighbour)."""
    if tuple(label.shape) != geometry.input_shape:
        raise ValueError(f"label shape {label.shape} != image shape {geometry.input_shape}")
    oriented = _apply_ornt(np.asarray(label), np.asarray(geometry.transform), False)
    return resample_to_shape(oriented, geometry.model_shape, 0)


def restore(array: np.ndarray, geometry: Geometry, order: int = 0) -> np.ndarray:
    """Map a model-grid array (spatial, or channel-first) back to the input's grid and order.

    ``order`` 0 for label maps, 1 for probabilities or uncertainty maps.
    """
    channel_first = array.ndim == len(geometry.model_shape) + 1
    oriented = resample_to_shape(array, geometry.oriented_shape, order)
    return from_orientation(oriented, np.asarray(geometry.transform), channel_first=channel_first)
