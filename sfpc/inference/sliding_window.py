"""Sliding-window inference in numpy, shared by training evaluation and the serving engine.

No torch here: the gateway runs ONNX graphs, so `predict` is any callable from a float32 batch
of windows to arrays. Window placement, padding, Gaussian weights and blending reproduce
``monai.inferers.sliding_window_inference`` (padding_mode="constant", cval=0) so that a model
evaluated in training and the same model served give the same maps.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

PredictOutput = Mapping[str, np.ndarray] | np.ndarray
Predictor = Callable[[np.ndarray], PredictOutput]
Progress = Callable[[int, int], None]

BARE_OUTPUT_KEY = "out"
_MODES = ("gaussian", "constant")


def gaussian_importance_map(
    roi_size: Sequence[int], sigma_scale: float | Sequence[float] = 0.125
) -> np.ndarray:
    """Separable Gaussian window weights (float32, peak 1 at the centre, sigma = sigma_scale *
    size per axis), floored at max(min, 1e-3) like MONAI's ``compute_importance_map``."""
    roi = tuple(int(r) for r in roi_size)
    scales = _per_axis(sigma_scale, len(roi), "sigma_scale")
    weights = np.ones((), dtype=np.float32)
    for size, scale in zip(roi, scales, strict=True):
        sigma = size * float(scale)
        x = np.arange(-(size - 1) / 2.0, (size - 1) / 2.0 + 1, dtype=np.float32)
        g = np.exp(x**2 / np.float32(-2 * sigma**2))
        weights = np.multiply.outer(weights, g)
    # A very narrow sigma underflows the corners to 0, which would divide by zero where only one
    # window covers a voxel.
    floor = max(float(weights.min()), 1e-3)
    return np.maximum(weights, np.float32(floor)).astype(np.float32)


def _per_axis(value: float | Sequence[float], ndim: int, name: str) -> tuple[float, ...]:
    if isinstance(value, (int, float, np.integer, np.floating)):
        return (float(value),) * ndim
    vals = tuple(float(v) for v in value)
    if len(vals) != ndim:
        raise ValueError(f"{name} needs 1 or {ndim} values, got {value!r}")
    return vals


def _roi_tuple(roi_size: int | Sequence[int], image_size: Sequence[int]) -> tuple[int, ...]:
    ndim = len(image_size)
    if isinstance(roi_size, (int, np.integer)):
        roi_size = (int(roi_size),) * ndim
    roi = tuple(roi_size)
    if len(roi) != ndim:
        raise ValueError(f"roi_size has {len(roi)} axes, the image has {ndim} spatial axes")
    # MONAI's convention: a missing or non-positive roi axis takes the whole image axis.
    pairs = zip(roi, image_size, strict=True)
    return tuple(int(s) if r is None or r <= 0 else int(r) for r, s in pairs)


def scan_interval(
    image_size: Sequence[int], roi_size: Sequence[int], overlap: float | Sequence[float]
) -> tuple[int, ...]:
    """Stride per axis: int(roi * (1 - overlap)), at least 1; a roi equal to the image: one step."""
    overlaps = _per_axis(overlap, len(image_size), "overlap")
    out = []
    for size, roi, ov in zip(image_size, roi_size, overlaps, strict=True):
        if not 0.0 <= ov < 1.0:
            raise ValueError(f"overlap must be in [0, 1), got {overlap!r}")
        out.append(roi if roi == size else max(int(roi * (1 - ov)), 1))
    return tuple(out)


def window_starts(
    image_size: Sequence[int], roi_size: Sequence[int], interval: Sequence[int]
) -> list[tuple[int, ...]]:
    """Corner of every window (row-major, last axis fastest) over an image at least roi-sized;
    the last window on each axis is shifted back to sit flush with the image edge."""
    per_axis = []
    for size, roi, step in zip(image_size, roi_size, interval, strict=True):
        if roi > size:
            raise ValueError(f"roi {roi} larger than the (padded) image axis {size}")
        n = max(math.ceil((size - roi) / step), 0) + 1
        per_axis.append([min(i * step, size - roi) for i in range(n)])
    grids = np.meshgrid(*per_axis, indexing="ij")
    corners = zip(*(g.ravel() for g in grids), strict=True)
    return [tuple(int(v) for v in corner) for corner in corners]


def _as_output_dict(raw: PredictOutput) -> dict[str, np.ndarray]:
    if isinstance(raw, Mapping):
        return {str(k): np.asarray(v, dtype=np.float32) for k, v in raw.items()}
    return {BARE_OUTPUT_KEY: np.asarray(raw, dtype=np.float32)}


def _blend(
    images: np.ndarray,
    roi_size: int | Sequence[int],
    predict: Predictor,
    overlap: float | Sequence[float],
    sw_batch_size: int,
    mode: str,
    sigma_scale: float | Sequence[float],
    progress: Progress | None,
    context: int = 0,
    targets: tuple[int, int] | None = None,
) -> dict[str, np.ndarray]:
    """Blend windows of N images (N, C, *spatial), batching windows across the N images in
    image-major order. Returns name -> (K, N, *spatial) float32.

    ``targets`` (first, last): only images first..last-1 are predicted (N = last - first in the
    result); with ``context`` k each window carries the windows of images n-k..n+k as channels,
    slice-major, indices clamped to the N given (the edge image repeated)."""
    if sw_batch_size < 1:
        raise ValueError(f"sw_batch_size must be >= 1, got {sw_batch_size}")
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    if context < 0:
        raise ValueError(f"context must be >= 0, got {context}")
    n_given, channels, *image_size = images.shape
    first_image, last_image = (0, n_given) if targets is None else targets
    if not 0 <= first_image < last_image <= n_given:
        raise ValueError(f"images {first_image}:{last_image} outside the {n_given} given")
    n_images = last_image - first_image
    offsets = range(-context, context + 1)
    roi = _roi_tuple(roi_size, image_size)

    # Pad an image smaller than the roi symmetrically with zeros (the smaller half first, as
    # MONAI), then crop the blended output back.
    before = [max(r - s, 0) // 2 for r, s in zip(roi, image_size, strict=True)]
    after = [max(r - s, 0) - b for r, s, b in zip(roi, image_size, before, strict=True)]
    if any(before) or any(after):
        images = np.pad(images, [(0, 0), (0, 0), *zip(before, after, strict=True)])
    padded = tuple(images.shape[2:])

    corners = window_starts(padded, roi, scan_interval(padded, roi, overlap))
    windows = [tuple(slice(c, c + r) for c, r in zip(co, roi, strict=True)) for co in corners]
    if mode == "gaussian":
        importance = gaussian_importance_map(roi, sigma_scale)
    else:
        importance = np.ones(roi, dtype=np.float32)
    weight = np.zeros(padded, dtype=np.float32)
    for win in windows:
        weight[win] += importance

    total = n_images * len(windows)
    acc: dict[str, np.ndarray] = {}
    # The neighbours are gathered window by window into the batch: the stacked volume, 2k + 1
    # times the images, never exists.
    batch = np.empty((min(sw_batch_size, total), channels * len(offsets), *roi), dtype=np.float32)
    for first in range(0, total, sw_batch_size):
        ids = range(first, min(first + sw_batch_size, total))
        chunk = batch[: len(ids)]
        for i, idx in enumerate(ids):
            centre = first_image + idx // len(windows)
            win = windows[idx % len(windows)]
            for j, offset in enumerate(offsets):
                source = min(max(centre + offset, 0), n_given - 1)
                chunk[i, j * channels:(j + 1) * channels] = images[(source, slice(None)) + win]
        outputs = _as_output_dict(predict(chunk))
        if not acc:
            for name, out in outputs.items():
                acc[name] = np.zeros((out.shape[1], n_images, *padded), dtype=np.float32)
        if outputs.keys() != acc.keys():
            raise ValueError(f"predict returned outputs {sorted(outputs)}, earlier {sorted(acc)}")
        for name, out in outputs.items():
            expected = (len(ids), acc[name].shape[0], *roi)
            if out.shape != expected:
                raise ValueError(
                    f"predict output {name!r} has shape {out.shape}, expected {expected}"
                )
            for i, idx in enumerate(ids):
                target: tuple[Any, ...] = (slice(None), idx // len(windows),
                                           *windows[idx % len(windows)])
                acc[name][target] += out[i] * importance
        if progress is not None:
            progress(ids.stop, total)

    crop = tuple(slice(b, b + s) for b, s in zip(before, image_size, strict=True))
    result = {}
    for name, summed in acc.items():
        summed /= weight
        inner: tuple[slice, ...] = (slice(None), slice(None), *crop)
        result[name] = summed[inner]
    return result


def sliding_window_inference(
    image: np.ndarray,
    roi_size: int | Sequence[int],
    predict: Predictor,
    *,
    overlap: float | Sequence[float] = 0.5,
    sw_batch_size: int = 4,
    mode: str = "gaussian",
    sigma_scale: float | Sequence[float] = 0.125,
    progress: Progress | None = None,
) -> dict[str, np.ndarray]:
    """Run `predict` over overlapping windows of a channel-first image (C, X, Y[, Z]) and blend.

    `predict` takes float32 (B, C, *roi_size) and returns {name: (B, K_name, *roi_size)} or a bare
    array (returned under "out"). Returns {name: (K_name, X, Y[, Z]) float32}. `progress` is
    called as progress(windows_done, windows_total) after every batch.
    """
    img = np.asarray(image)
    if img.ndim not in (3, 4):
        raise ValueError(f"image must be (C, X, Y) or (C, X, Y, Z), got shape {img.shape}")
    blended = _blend(
        img[None], roi_size, predict, overlap, sw_batch_size, mode, sigma_scale, progress
    )
    return {name: np.ascontiguousarray(out[:, 0]) for name, out in blended.items()}


def slicewise_inference(
    volume: np.ndarray,
    axis: int,
    roi_size_2d: int | Sequence[int],
    predict: Predictor,
    *,
    overlap: float | Sequence[float] = 0.5,
    sw_batch_size: int = 16,
    mode: str = "gaussian",
    sigma_scale: float | Sequence[float] = 0.125,
    progress: Progress | None = None,
    context_slices: int = 0,
    slices: tuple[int, int] | None = None,
) -> dict[str, np.ndarray]:
    """Apply a 2D model to every slice of a volume (C, X, Y, Z) along spatial `axis` (0, 1 or 2,
    as MONAI's SliceInferer `spatial_dim`), with the 2D sliding window on each slice.

    Windows of different slices share predict batches of `sw_batch_size`, so a volume of S slices
    with one window each costs ceil(S / sw_batch_size) calls. Returns {name: (K, X, Y, Z)}.
    With `context_slices` k the model gets each slice's k neighbours on both sides as channels
    (slice-major: C channels of slice z-k, ..., of slice z+k), the volume's first or last slice
    repeated past its ends. `slices` (first, last) predicts only those slices (the result has
    last - first along `axis`), the others serving as their neighbours.
    """
    vol = np.asarray(volume)
    if vol.ndim != 4:
        raise ValueError(f"volume must be (C, X, Y, Z), got shape {vol.shape}")
    if axis not in (0, 1, 2, -1, -2, -3):
        raise ValueError(f"axis must be a spatial axis 0, 1 or 2, got {axis}")
    spatial_axis = axis % 3 + 1
    # The slices as (S, C, plane...), a view: each slice a 2D image of the batch.
    blended = _blend(
        np.moveaxis(vol, spatial_axis, 0), roi_size_2d, predict, overlap, sw_batch_size, mode,
        sigma_scale, progress, context=int(context_slices), targets=slices,
    )
    return {
        name: np.ascontiguousarray(np.moveaxis(out, 1, spatial_axis))
        for name, out in blended.items()
    }
