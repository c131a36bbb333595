"""The inference engine: one path from an uploaded volume to a mask and uncertainty maps.

Every caller (HTTP gateway, CLI, benchmarks) goes through :class:`Engine`, so a volume segmented
anywhere is preprocessed, tiled, stitched and restored the same way:

1. validate the array and its affine (:class:`InputError` with a message a user can act on);
2. :func:`~sfpc.inference.preprocess.prepare_image`: reorient to the model's orientation,
   resample to its spacing (in-plane only for 2D models, except 2.5D ones: their neighbouring
   slices lie at a fixed spacing), normalise - the trainer's own code;
3. sliding window over the model grid (3D) or slice by slice along the model's plane (2D; a
   2.5D model, ``context_slices`` k, gets each slice's k neighbours on both sides as channels,
   gathered window by window), with Gaussian blending; plain mode blends softmax(logits / T),
   uncertainty mode blends the graph's mean probabilities and mean per-sample entropy, the graph
   dividing each sample's logits by the T it is fed (M never materialises here);
   With ``flip`` every window also runs mirrored along its first axis (left-right in RAS for 3D,
   axial and coronal models; anterior-posterior for sagittal 2D ones) and the two outputs are
   averaged (test-time augmentation): twice the cost, for models
   trained with flips; in uncertainty mode the mean of the two passes' moments is the moment of
   all 2M samples;
4. restore the probabilities to the input grid (linear, voxel edges aligned as in
   ``preprocess.restore``) and take the argmax there, so that masks are smooth at the input's
   resolution. Uncertainty maps are computed where they are cheapest, on the model grid, from
   the blended moments, and restored linearly beside the probabilities; on the input grid they
   are held as uint16 levels (``sfpc.io.artefacts.MAP_LEVELS`` steps of [0, 1], within
   ``MAP_MAX_ERROR``), which the NIfTI files store as they are or rounded to 8 bits (the
   request's ``map_precision``). Their region statistics (mean
   per class and in the boundary band) are taken on the model grid too: the band is then
   ``band`` model voxels whatever the upload's resolution, as when the review threshold was
   chosen, and costs a ninth of the input grid's filters for a 0.7 mm CT at 2 mm.

Memory is bounded by streaming: 2D models are run, restored and reduced one slab of slices at a
time (their through-plane axis is not resampled, so slabs are independent; a 2.5D model's is, to
its fixed slice spacing, and each slab is interpolated along it to input slices holding back the
one or two model slices the next input slices still need), and 3D probabilities are restored in
slabs of rows. Nothing proportional to K x input voxels is ever held, only the
model-grid image, the uint8 mask and the two uint16 maps; the map statistics are taken as the
slabs arrive (:mod:`~sfpc.inference.streamed_statistics`), holding a slab and its band margin.
The input-grid outputs take the memory order of the upload's array (NIfTI arrays are
Fortran-ordered), so that writing the files is a copy of contiguous slabs, not a transposition.
Accumulators are float32 throughout: float16's 11-bit mantissa would blend Gaussian weights
spanning three orders of magnitude with ~1e-3 relative error, enough to flip argmax ties, and
streaming already keeps the footprint small.

Streaming also lets the stages overlap (``concurrent_restore``): the backend computes the next
slab in a worker thread (:mod:`~sfpc.inference.prefetch`) while this one restores the last, and
a 2D model's image, when its slices are independent, is prepared slab by slab in a third, the
sliding window waiting only on the slices it reads. On a machine with a core to spare only the
first slab's preparation and the last slab's restore are not hidden behind the network. Results
are identical either way: slabs are prepared and restored in order, each by one thread.

No torch import anywhere below (the gateway runs ONNX graphs).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from nibabel.orientations import apply_orientation

from sfpc.errors import BackendError, InputError
from sfpc.inference.backends.base import Backend
from sfpc.inference.contract import (
    INPUT_MODES,
    PLAIN_OUTPUTS,
    UNCERTAINTY_OUTPUTS,
    ModelMetadata,
    check_servable,
    plane_axis,
)
from sfpc.inference.prefetch import FilledAhead, prefetched
from sfpc.inference.preprocess import (
    Geometry,
    linear_neighbours,
    prepare_image,
    prepare_image_in_slabs,
    resample_to_shape,
    spacing_from_affine,
)
from sfpc.inference.sliding_window import (
    Predictor,
    scan_interval,
    slicewise_inference,
    sliding_window_inference,
    window_starts,
)
from sfpc.inference.streamed_statistics import StreamedMapStatistics
from sfpc.inference.uncertainty import (
    DEFAULT_BAND,
    class_sums,
    count_statistics,
    merge_statistics,
    uncertainty_maps,
)
from sfpc.io.artefacts import decode_map, quantise_map

Progress = Callable[[int, int], None]

PLAIN_KEY = "probs"
MAPS_KEY = "maps"  # the normalised maps restored, stacked as channels
MAP_NAMES = ("entropy", "mutual_information")  # the uncertainty maps, in channel order
# The uncertainty graph's two moments are blended and restored under their own names.
UNCERTAINTY_KEYS = UNCERTAINTY_OUTPUTS
# Per slab of streamed work, the float32 maps of one slab stay near this size.
DEFAULT_SLAB_BYTES = 64 << 20
# Slabs a 2D volume is at least cut into when restoring runs beside the network: the last
# slab's restore is what the overlap cannot hide.
PIPELINE_SLABS = 8
# Model slices prepared per step when the image is prepared behind the network.
PREPARE_SLICES = 16
# Direction cosines of real scanners' affines are orthonormal to ~1e-5 (float32 NIfTI headers,
# DICOM rounding); anything beyond this is a sheared grid that reorientation cannot represent.
ORTHOGONALITY_TOLERANCE = 1e-3
_FINITE_CHECK_VOXELS = 1 << 22


# ----------------------------------------------------------------------------------------------
# Input validation
# ----------------------------------------------------------------------------------------------


def validate_image(image: Any, in_channels: int) -> np.ndarray:
    """Check an upload and return it channel-first (C, X, Y, Z), without copying when possible.

    Accepts (X, Y, Z) for single-channel models or (C, X, Y, Z), any integer, boolean or float
    dtype; needs at least 2 voxels per spatial axis and only finite values.
    """
    try:
        arr = np.asarray(image)
    except (TypeError, ValueError) as exc:
        raise InputError(f"image is not a numeric array: {exc}") from exc
    if arr.dtype.kind not in "biuf":
        raise InputError(f"image has dtype {arr.dtype}; send integer or floating-point voxels")
    if arr.ndim == 3:
        if in_channels != 1:
            raise InputError(
                f"image has shape {arr.shape} (one channel) but the model expects "
                f"{in_channels} channels: send a channel-first (C, X, Y, Z) array"
            )
        arr = arr[None]
    elif arr.ndim == 4:
        if arr.shape[0] != in_channels:
            hint = ""
            if arr.shape[-1] == in_channels:
                hint = " (it looks channel-last: move the channel axis first)"
            raise InputError(
                f"image has {arr.shape[0]} channels on axis 0 of shape {arr.shape} but the model "
                f"expects {in_channels}; arrays are channel-first (C, X, Y, Z){hint}"
            )
    else:
        raise InputError(
            f"image has {arr.ndim} dimensions (shape {arr.shape}); expected a 3D volume "
            "(X, Y, Z) or a channel-first (C, X, Y, Z) array"
        )
    small = [axis for axis, n in enumerate(arr.shape[1:]) if n < 2]
    if small:
        raise InputError(
            f"image of spatial shape {arr.shape[1:]} has fewer than 2 voxels along axis "
            f"{', '.join(str(a) for a in small)}; a volume needs at least 2 voxels per axis"
        )
    if arr.dtype.kind == "f":
        _check_finite(arr)
    return arr


def _check_finite(arr: np.ndarray) -> None:
    # Chunked: isfinite of a whole CT is a 100 MB temporary. Over the first spatial axis, or
    # the last of a column-major (NIfTI, DICOM) image, whose chunks are then contiguous.
    n_nan = n_inf = 0
    axis = arr.ndim - 1 if arr.flags.f_contiguous and not arr.flags.c_contiguous else 1
    rows = max(1, _FINITE_CHECK_VOXELS * arr.shape[axis] // max(1, arr.size))
    for start in range(0, arr.shape[axis], rows):
        chunk = arr[(slice(None),) * axis + (slice(start, start + rows),)]
        if np.isfinite(chunk).all():
            continue
        n_nan += int(np.count_nonzero(np.isnan(chunk)))
        n_inf += int(np.count_nonzero(np.isinf(chunk)))
    if n_nan or n_inf:
        parts = [f"{n} {name} value{'s' if n > 1 else ''}"
                 for n, name in ((n_nan, "NaN"), (n_inf, "Inf")) if n]
        raise InputError(
            f"image contains {' and '.join(parts)}; replace non-finite voxels (e.g. with the "
            "background intensity) before segmenting"
        )


def validate_affine(affine: Any) -> np.ndarray:
    """Check a NIfTI-style 4x4 voxel-to-RAS+ affine: finite, [0, 0, 0, 1] last row, non-zero
    voxel sizes, orthogonal direction cosines. Returns it as float64."""
    try:
        a = np.asarray(affine, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InputError(f"affine is not a numeric 4x4 matrix: {exc}") from exc
    if a.shape != (4, 4):
        raise InputError(f"affine must be a 4x4 matrix, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise InputError("affine contains NaN or Inf entries")
    if not np.allclose(a[3], [0.0, 0.0, 0.0, 1.0], atol=1e-6):
        raise InputError(f"affine's last row must be [0, 0, 0, 1], got {a[3].tolist()}")
    linear = a[:3, :3]
    spacing = np.sqrt((linear**2).sum(axis=0))
    zero = [axis for axis, s in enumerate(spacing) if not s > 1e-8]
    if zero:
        raise InputError(
            f"affine is singular: voxel axis {', '.join(map(str, zero))} has zero length "
            "(a voxel size of 0 mm)"
        )
    cosines = linear / spacing
    if abs(np.linalg.det(cosines)) < 1e-6:
        raise InputError("affine is singular: its voxel axes are linearly dependent")
    off = float(np.abs(cosines.T @ cosines - np.eye(3)).max())
    if off > ORTHOGONALITY_TOLERANCE:
        raise InputError(
            f"affine's direction cosines are not orthogonal (largest |cos| between voxel axes "
            f"{off:.3g} > {ORTHOGONALITY_TOLERANCE}): sheared grids are not supported; resample "
            "the image to an orthogonal grid first"
        )
    return a


# ----------------------------------------------------------------------------------------------
# Linear resampling of a block of rows (bounded-memory restore)
# ----------------------------------------------------------------------------------------------


def resample_linear(
    array: np.ndarray, shape: Sequence[int], *, axis: int = 0, start: int = 0,
    stop: int | None = None,
) -> np.ndarray:
    """Rows ``start:stop`` along spatial ``axis`` of ``resample_to_shape(array, shape, order=1)``.

    Same grid as :func:`~sfpc.inference.preprocess.resample_to_shape` (voxel edges aligned, edge
    values extended) computed separably in float32, so a block of the output costs memory
    proportional to the block. ``array`` is spatial or has leading channel axes; an axis whose
    length already matches is sliced, not interpolated (a view when nothing changes).
    """
    shape = tuple(int(n) for n in shape)
    arr = np.asarray(array)
    lead = arr.ndim - len(shape)
    if lead < 0:
        raise ValueError(f"cannot resample array of shape {arr.shape} to {shape}")
    stop = shape[axis] if stop is None else stop
    if not 0 <= start < stop <= shape[axis]:
        raise ValueError(f"rows {start}:{stop} outside output axis {axis} of length {shape[axis]}")
    # The restricted axis first: every later pass then works on the block only.
    out = _linear_axis(arr, lead + axis, shape[axis], start, stop)
    for other, n in enumerate(shape):
        if other != axis:
            out = _linear_axis(out, lead + other, n, 0, n)
    return out


def _linear_axis(a: np.ndarray, axis: int, n_out: int, start: int, stop: int) -> np.ndarray:
    n_in = a.shape[axis]
    if n_in == n_out:
        return a[(slice(None),) * axis + (slice(start, stop),)]
    i0, i1, w = linear_neighbours(n_in, n_out, start, stop)
    w = w.reshape((-1,) + (1,) * (a.ndim - axis - 1))
    lo = np.take(a, i0, axis=axis).astype(np.float32, copy=False)
    hi = np.take(a, i1, axis=axis).astype(np.float32, copy=False)
    hi -= lo
    hi *= w
    hi += lo
    return hi


# ----------------------------------------------------------------------------------------------
# Model-grid inference, shared with training/evaluate.py
# ----------------------------------------------------------------------------------------------


def iter_model_grid(
    predict: Predictor,
    image: np.ndarray,
    *,
    spatial_dims: int,
    patch_size: Sequence[int],
    plane_axis: int = 2,
    input_mode: str = "spacing",
    overlap: float | Sequence[float] = 0.5,
    mode: str = "gaussian",
    sigma_scale: float | Sequence[float] = 0.125,
    sw_batch_size: int = 4,
    slab_slices: int | None = None,
    context_slices: int = 0,
    ready: Callable[[int], None] | None = None,
) -> Iterator[tuple[int, int, int, dict[str, np.ndarray]]]:
    """Run ``predict`` over a preprocessed (C, X, Y, Z) volume; yields ``(axis, start, stop,
    maps)``: the blended maps {name: (K, ...)} of rows ``start:stop`` along spatial ``axis``.

    3D: one sliding window over the whole volume (one block, axis 0). 2D: slices along
    ``plane_axis``, ``slab_slices`` at a time (all at once when None); with ``input_mode``
    "resize" each slice is scaled to ``patch_size`` (bilinear, voxel edges aligned: the
    ``resample_to_shape`` the 2D trainer uses to resize its slices), predicted, and the maps are
    scaled back the same way. Results do not depend on the slab size: every window is
    independent of the others. ``context_slices`` k (2D, "spacing" only): each slice goes in with
    its k neighbours on both sides as channels (the contract's ``context_slices``); a slab then
    reads k slices beyond each of its ends, so that its border slices see the same neighbours
    as in a single pass. ``ready(n)`` (2D), when given, is called before a slab is read and
    returns once slices ``0:n`` along ``plane_axis`` hold their values: the image may still be
    being prepared behind the network (:meth:`Engine.segment`).
    """
    patch = tuple(int(p) for p in patch_size)
    common: dict[str, Any] = {"overlap": overlap, "mode": mode, "sigma_scale": sigma_scale,
              "sw_batch_size": sw_batch_size}
    k = int(context_slices)
    if k < 0 or (k and (spatial_dims != 2 or input_mode != "spacing")):
        raise ValueError(f"context_slices {context_slices} (>= 0, and > 0 only for 2D models "
                         "with input_mode 'spacing')")
    if spatial_dims == 3:
        yield 0, 0, image.shape[1], sliding_window_inference(image, patch, predict, **common)
        return
    if spatial_dims != 2:
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    if input_mode not in INPUT_MODES:
        raise ValueError(f"input_mode must be one of {INPUT_MODES}, got {input_mode!r}")
    n = image.shape[plane_axis + 1]
    step = n if slab_slices is None else max(1, int(slab_slices))
    for first in range(0, n, step):
        last = min(first + step, n)
        # The slab and up to k slices on either side, a view: clamping neighbours to it is
        # clamping them to the volume, since it stops short of k only at the volume's ends.
        lo, hi = max(0, first - k), min(n, last + k)
        if ready is not None:
            ready(hi)
        slab = image[(slice(None),) * (plane_axis + 1) + (slice(lo, hi),)]
        if input_mode == "resize":
            maps = _resized_slicewise(slab, plane_axis, patch, predict, common)
        else:
            maps = slicewise_inference(slab, plane_axis, patch, predict, context_slices=k,
                                       slices=(first - lo, last - lo), **common)
        yield plane_axis, first, last, maps


def _resized_slicewise(slab: np.ndarray, plane_axis: int, patch: tuple[int, ...],
                       predict: Predictor, common: dict[str, Any]) -> dict[str, np.ndarray]:
    shape = slab.shape[1:]
    in_plane = [a for a in range(3) if a != plane_axis]
    resized_shape = list(shape)
    for a, p in zip(in_plane, patch, strict=True):
        resized_shape[a] = p
    # A zoom factor of exactly 1 along the plane axis leaves each slice untouched, so this equals
    # resizing every slice on its own.
    resized = resample_to_shape(slab, resized_shape, 1)
    maps = slicewise_inference(resized, plane_axis, patch, predict, **common)
    return {name: np.ascontiguousarray(resample_linear(v, shape)) for name, v in maps.items()}


def predict_model_grid(
    predict: Predictor, image: np.ndarray, **settings: Any
) -> dict[str, np.ndarray]:
    """All maps of :func:`iter_model_grid` assembled on the whole model grid (K x voxels held:
    for evaluation and tests; :meth:`Engine.segment` streams instead)."""
    out: dict[str, np.ndarray] = {}
    spatial = image.shape[1:]
    for axis, start, stop, maps in iter_model_grid(predict, image, **settings):
        for name, values in maps.items():
            if name not in out:
                out[name] = np.empty((values.shape[0], *spatial), dtype=np.float32)
            out[name][(slice(None),) * (axis + 1) + (slice(start, stop),)] = values
    return out


def count_windows(model_shape: Sequence[int], *, spatial_dims: int, patch_size: Sequence[int],
                  plane_axis: int = 2, input_mode: str = "spacing",
                  overlap: float | Sequence[float] = 0.5) -> int:
    """How many windows :func:`iter_model_grid` runs on a model grid of ``model_shape``."""
    shape = [int(n) for n in model_shape]
    n_slices = 1
    if spatial_dims == 2:
        n_slices = shape.pop(plane_axis)
        if input_mode == "resize":
            return n_slices
    padded = [max(n, int(p)) for n, p in zip(shape, patch_size, strict=True)]
    roi = [int(p) for p in patch_size]
    return n_slices * len(window_starts(padded, roi, scan_interval(padded, roi, overlap)))


def model_grid_settings(meta: ModelMetadata, *, overlap: float | Sequence[float] | None = None,
                        mode: str | None = None, sigma_scale: float | Sequence[float] | None = None,
                        sw_batch_size: int | None = None) -> dict[str, Any]:
    """The keyword arguments of :func:`iter_model_grid` that a model's metadata fixes: its
    geometry (dimensions, patch, plane, input mode, 2.5D ``context_slices``) and, unless given,
    its ``inference`` settings (``sw_batch_size`` at least 16 for 2D models, as in training
    evaluation). The one place that turns the contract into model-grid settings, so that code
    running windows its own way (evaluation, method comparisons, direct predictors) cannot
    leave a field out. No ``slab_slices``: results do not depend on it
    (:meth:`Engine.grid_settings` adds the engine's memory budget)."""
    inference = dict(meta.inference or {})
    if sw_batch_size is None:
        sw_batch_size = int(inference.get("sw_batch_size", 4))
        if meta.spatial_dims == 2:
            sw_batch_size = max(sw_batch_size, 16)
    if sw_batch_size < 1:
        raise ValueError(f"sw_batch_size must be >= 1, got {sw_batch_size}")
    settings: dict[str, Any] = {
        "spatial_dims": meta.spatial_dims, "patch_size": list(meta.patch_size),
        "plane_axis": plane_axis(meta.plane, meta.orientation), "input_mode": meta.input_mode,
        "overlap": inference.get("overlap", 0.5) if overlap is None else overlap,
        "mode": inference.get("mode", "gaussian") if mode is None else mode,
        "sigma_scale": inference.get("sigma_scale", 0.125) if sigma_scale is None
        else sigma_scale,
        "sw_batch_size": int(sw_batch_size),
    }
    if meta.context_slices:
        settings["context_slices"] = int(meta.context_slices)
    return settings


def softmax(logits: np.ndarray, axis: int = 1, temperature: float = 1.0) -> np.ndarray:
    """softmax(logits / temperature) over ``axis``, float32, overflow-safe."""
    z = np.asarray(logits, dtype=np.float32) / np.float32(temperature)
    z -= z.max(axis=axis, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=axis, keepdims=True)
    return z


# ----------------------------------------------------------------------------------------------
# The engine
# ----------------------------------------------------------------------------------------------


@dataclass
class SegmentationResult:
    """A mask on the input grid, optional uncertainty maps, and what to report about them.

    ``mask`` (uint8, the input's spatial shape) is meant to be saved with ``affine`` (the
    input's). In uncertainty mode ``entropy_levels`` and ``mi_levels`` hold H(p_bar)/ln K and
    (H(p_bar) - mean_m H(p_m))/ln K on the input grid as uint16 levels (value x MAP_LEVELS,
    rounded); the ``entropy`` and ``mutual_information`` properties decode them to float32 in
    [0, 1] (a float copy each time: slice the levels for part of a large volume).
    """

    mask: np.ndarray
    affine: np.ndarray
    class_names: list[str]
    uncertainty: bool
    statistics: dict[str, Any]
    timings: dict[str, float]
    n_windows: int
    entropy_levels: np.ndarray | None = None
    mi_levels: np.ndarray | None = None
    model: dict[str, Any] = field(default_factory=dict)
    geometry: dict[str, Any] = field(default_factory=dict)

    @property
    def entropy(self) -> np.ndarray | None:
        return None if self.entropy_levels is None else decode_map(self.entropy_levels)

    @property
    def mutual_information(self) -> np.ndarray | None:
        return None if self.mi_levels is None else decode_map(self.mi_levels)

    def map_levels(self) -> dict[str, np.ndarray]:
        """The uncertainty maps present, by name, as uint16 levels (see the class docstring)."""
        found = {"entropy": self.entropy_levels, "mutual_information": self.mi_levels}
        return {k: v for k, v in found.items() if v is not None}

    def maps(self) -> dict[str, np.ndarray]:
        """The uncertainty maps present, by name, decoded to float32."""
        return {k: decode_map(v) for k, v in self.map_levels().items()}

    def to_report(self) -> dict[str, Any]:
        """Everything but the arrays, as JSON-able builtins."""
        return {
            "model": dict(self.model),
            "uncertainty": self.uncertainty,
            "uncertainty_maps": {
                "entropy": "predictive entropy H(p_bar) / ln K, in [0, 1]",
                "mutual_information": "(H(p_bar) - mean_m H(p_m)) / ln K, in [0, 1]",
            } if self.uncertainty else {},
            "class_names": list(self.class_names),
            "shape": [int(n) for n in self.mask.shape],
            "affine": np.asarray(self.affine, dtype=float).tolist(),
            "geometry": self.geometry,
            "statistics": self.statistics,
            "timings": {k: float(v) for k, v in self.timings.items()},
            "n_windows": int(self.n_windows),
        }


class Engine:
    """Segment volumes with an exported SFPC model through any :class:`Backend`.

    ``sw_batch_size`` windows go to the backend per call (default: the metadata's
    ``inference.sw_batch_size``, at least 16 for 2D models as in training evaluation).
    ``progress(done, total)`` is called with window counts after every backend call.
    ``slab_bytes`` caps the float32 maps of one streamed slab; ``band`` is the boundary band
    width (voxels of the input grid) of the statistics. ``concurrent_restore``: slabs are
    restored to the input grid in this thread while the backend computes the next ones in a
    worker thread, and a 2D model's image is prepared slab by slab in a third when its slices
    are independent (False: one stage after the other, as before issue 13's measurements).
    ``metadata.temperature`` T calibrates
    every mode: plain mode takes softmax(logits / T) here, uncertainty mode feeds T to the
    graph, whose softmax is inside. Thread-safe if the backend is.
    """

    def __init__(
        self,
        backend: Backend,
        metadata: ModelMetadata,
        *,
        sw_batch_size: int | None = None,
        progress: Progress | None = None,
        slab_bytes: int = DEFAULT_SLAB_BYTES,
        band: int = DEFAULT_BAND,
        concurrent_restore: bool = True,
    ) -> None:
        self.backend = backend
        self.concurrent_restore = bool(concurrent_restore)
        self.metadata = metadata
        self.progress = progress
        self.slab_bytes = int(slab_bytes)
        self.band = int(band)
        check_servable(metadata)
        settings = model_grid_settings(metadata, sw_batch_size=sw_batch_size)
        self.overlap = settings["overlap"]
        self.mode = settings["mode"]
        self.sigma_scale = settings["sigma_scale"]
        self.sw_batch_size = settings["sw_batch_size"]
        self.plane_axis = plane_axis(metadata.plane, metadata.orientation)
        self.target_spacing, self.resample_axes = _target_spacing(metadata, self.plane_axis)

    # -- the three stages, public for callers that need the model grid (evaluation, tests) ----
    def preprocess(self, image: Any, affine: Any) -> tuple[np.ndarray, Geometry]:
        """Validate, then reorient / resample / normalise to the model grid (C, X', Y', Z')."""
        arr = validate_image(image, self.metadata.image_channels)
        aff = validate_affine(affine)
        return self._prepare(arr, aff)

    def infer_model_grid(self, model_image: np.ndarray, *, uncertainty: bool = False,
                         flip: bool = False) -> dict[str, np.ndarray]:
        """Blended maps on the whole model grid: {"probs"} (softmax of logits / temperature) or
        {"mean_probs", "mean_entropy"} (natural log, samples at the same temperature), each
        (K or 1, X', Y', Z') float32."""
        self._check_uncertainty(uncertainty)
        self._check_flip(flip)
        counter = _Counter()
        total = self._total(model_image.shape[1:]) * (2 if flip else 1)
        predict = self._predictor(uncertainty, counter, total, self.progress, flip=flip)
        return predict_model_grid(predict, model_image, **self.grid_settings(model_image))

    def segment(self, image: Any, affine: Any, *, uncertainty: bool = False,
                flip: bool = False, progress: Progress | None = None,
                transform: np.ndarray | None = None,
                maps: Collection[str] | None = None) -> SegmentationResult:
        """Mask (and uncertainty maps) of ``image`` on its own grid; see the module docstring.

        ``transform`` is the orientation transform of ``affine`` to the model's orientation
        (:func:`~sfpc.inference.preprocess.orientation_transform`) when the caller already
        computed it for its own checks. ``maps`` names the uncertainty maps to restore to the
        input grid (of :data:`MAP_NAMES`; None: all): restoring and storing a map costs as much
        as the mask, and the statistics are taken on the model grid whatever is restored."""
        self._check_uncertainty(uncertainty)
        wanted = _wanted_maps(maps) if uncertainty else ()
        self._check_flip(flip)
        timings = {"preprocess": 0.0, "inference": 0.0, "backend": 0.0, "postprocess": 0.0}
        t_start = time.perf_counter()
        arr = validate_image(image, self.metadata.image_channels)
        aff = validate_affine(affine)
        in_slabs = self._prepare_in_slabs(arr, aff, transform)
        filler: FilledAhead | None = None
        if in_slabs is None:
            model_image, geometry = self._prepare(arr, aff, transform)
        else:
            # The model image is prepared slab by slab behind the network, which waits only
            # for the first slab.
            model_image, geometry, fill = in_slabs
            n = geometry.model_shape[self.plane_axis]
            filler = FilledAhead(fill, n, PREPARE_SLICES)
        with filler or contextlib.nullcontext():
            if filler is not None:
                filler.ready(PREPARE_SLICES)
            timings["preprocess"] = time.perf_counter() - t_start
            result = self._segment_prepared(arr, aff, model_image, geometry, filler, timings,
                                            t_start, uncertainty=uncertainty, flip=flip,
                                            progress=progress, wanted=wanted)
        if filler is not None:
            timings["preprocess_concurrent"] = max(0.0, filler.busy_s - timings["preprocess"])
        return result

    def _segment_prepared(self, arr: np.ndarray, aff: np.ndarray, model_image: np.ndarray,
                          geometry: Geometry, filler: FilledAhead | None,
                          timings: dict[str, float], t_start: float, *, uncertainty: bool,
                          flip: bool, progress: Progress | None,
                          wanted: tuple[str, ...]) -> SegmentationResult:
        """:meth:`segment` from the model image on: run, restore, count. ``filler`` is still
        preparing the model image when given (the sliding window waits on its slices)."""
        outputs = _Outputs(geometry, uncertainty, _order_of(arr), wanted,
                           class_names=[str(c) for c in self.metadata.class_names],
                           axis=0 if self.metadata.spatial_dims == 3 else self.plane_axis,
                           band=self.band)
        counter = _Counter()
        total = self._total(geometry.model_shape) * (2 if flip else 1)
        predict = self._predictor(uncertainty, counter, total, progress or self.progress,
                                  flip=flip)
        settings = self.grid_settings(model_image)
        if self.concurrent_restore:
            settings = self._pipelined(settings, geometry.model_shape)
        if filler is not None:
            settings["ready"] = filler.ready
        chunks = iter_model_grid(predict, model_image, **settings)
        rows = self._resampled_slices(geometry)

        def restore(axis: int, start: int, stop: int, maps: dict[str, np.ndarray]) -> None:
            if rows is None:
                self._restore_chunk(outputs, geometry, axis, start, stop, maps)
                return
            restored = self._model_grid_maps(outputs, axis, start, stop, maps)
            for first, last, block in rows.push(start, stop, restored):
                self._restore_rows(outputs, geometry, axis, (first, last), block)

        if self.concurrent_restore:
            # The network computes the next slab while this thread restores the last one; the
            # stages then overlap, and the timings split the wall clock: inference until the
            # last slab came back, postprocess after it. What restoring cost beside the network
            # is reported on its own.
            t0 = last = time.perf_counter()
            busy = 0.0
            with prefetched(chunks) as ahead:
                for axis, start, stop, maps in ahead:
                    last = time.perf_counter()
                    restore(axis, start, stop, maps)
                    busy += time.perf_counter() - last
                    del maps
            end = time.perf_counter()
            timings["inference"] = last - t0
            timings["postprocess"] = end - last
            timings["postprocess_concurrent"] = max(0.0, busy - (end - last))
        else:
            while True:
                t0 = time.perf_counter()
                try:
                    axis, start, stop, maps = next(chunks)
                except StopIteration:
                    timings["inference"] += time.perf_counter() - t0
                    break
                t1 = time.perf_counter()
                timings["inference"] += t1 - t0
                restore(axis, start, stop, maps)
                del maps
                timings["postprocess"] += time.perf_counter() - t1
        del model_image, chunks

        t0 = time.perf_counter()
        voxel_ml = abs(float(np.linalg.det(aff[:3, :3]))) / 1000.0
        statistics = self._statistics(outputs, geometry, voxel_ml)
        timings["postprocess"] += time.perf_counter() - t0
        timings["backend"] = counter.seconds
        timings["total"] = time.perf_counter() - t_start
        meta = self.metadata
        return SegmentationResult(
            mask=outputs.mask,
            affine=aff,
            class_names=[str(c) for c in meta.class_names],
            uncertainty=uncertainty,
            statistics=statistics,
            timings=timings,
            n_windows=counter.windows,
            entropy_levels=outputs.levels.get("entropy"),
            mi_levels=outputs.levels.get("mutual_information"),
            model={"name": meta.name, "version": meta.version, "spatial_dims": meta.spatial_dims,
                   "temperature": float(meta.temperature or 1.0),
                   "perturbations": int(meta.perturbation.get("M") or 0) if uncertainty else 0,
                   "uncertainty_method": meta.maps_method() if uncertainty else None,
                   "flip": bool(flip)},
            geometry={
                "input_shape": list(geometry.input_shape),
                "input_spacing": list(spacing_from_affine(aff)),
                "model_shape": list(geometry.model_shape),
                "model_spacing": list(spacing_from_affine(np.asarray(geometry.affine))),
                "orientation": meta.orientation,
            },
        )

    # -- internals ---------------------------------------------------------------------------
    def _statistics(self, outputs: _Outputs, geometry: Geometry,
                    voxel_ml: float) -> dict[str, Any]:
        """Volumes from the input-grid mask; map summaries from the model grid (see the module
        docstring)."""
        names = self.metadata.class_names
        # Counted as the slabs were written, most of it beside the network.
        if int(outputs.counts.sum()) != outputs.mask.size:
            raise RuntimeError(f"the restore wrote {int(outputs.counts.sum())} labels into a "
                               f"mask of {outputs.mask.size} voxels")
        volumes = count_statistics(outputs.counts, names, voxel_ml)
        if outputs.map_statistics is None:
            return merge_statistics(volumes, None, band_width_voxels=self.band)
        maps = outputs.map_statistics.result()
        spacing = spacing_from_affine(np.asarray(geometry.affine))
        return merge_statistics(volumes, maps, map_statistics_grid="model",
                                band_width_mm=[round(self.band * float(v), 4) for v in spacing])

    def _prepare_in_slabs(self, arr: np.ndarray, aff: np.ndarray,
                          transform: np.ndarray | None = None
                          ) -> tuple[np.ndarray, Geometry, Callable[[int, int], None]] | None:
        """For a 2D model run beside the restore: the image prepared slice by slice along the
        plane axis (:func:`prepare_image_in_slabs`), when its slices are independent."""
        if not self.concurrent_restore or self.metadata.spatial_dims != 2:
            return None
        meta = self.metadata
        return prepare_image_in_slabs(arr, aff, meta.normalisation, self.target_spacing,
                                      self.resample_axes, orientation=meta.orientation,
                                      transform=transform, resampling=meta.resampling,
                                      axis=self.plane_axis)

    def _prepare(self, arr: np.ndarray, aff: np.ndarray,
                 transform: np.ndarray | None = None) -> tuple[np.ndarray, Geometry]:
        return prepare_image(arr, aff, self.metadata.normalisation, self.target_spacing,
                             self.resample_axes, orientation=self.metadata.orientation,
                             transform=transform, resampling=self.metadata.resampling)

    def _check_uncertainty(self, uncertainty: bool) -> None:
        if uncertainty and not self.metadata.has_uncertainty:
            raise InputError(
                f"model {self.metadata.name!r} was exported without an uncertainty graph "
                "(no FLPM); request plain segmentation"
            )

    def _check_flip(self, flip: bool) -> None:
        reason = flip_unavailable(self.metadata) if flip else None
        if reason:
            raise InputError(reason)

    def grid_settings(self, model_image: np.ndarray) -> dict[str, Any]:
        """The keyword arguments of :func:`iter_model_grid` / :func:`predict_model_grid` this
        engine runs ``model_image`` (its :meth:`preprocess` output) with: callers that bring
        their own window predictor then tile, stack neighbours and blend as it does."""
        meta = self.metadata
        settings = model_grid_settings(meta, overlap=self.overlap, mode=self.mode,
                                       sigma_scale=self.sigma_scale,
                                       sw_batch_size=self.sw_batch_size)
        if meta.spatial_dims == 2:
            # Budget the larger of the model slice and the slice it is resized to.
            plane = [n for a, n in enumerate(model_image.shape[1:]) if a != self.plane_axis]
            if meta.input_mode == "resize":
                plane = [max(n, int(p)) for n, p in zip(plane, meta.patch_size, strict=True)]
            per_slice = (meta.num_classes + 1) * 4 * math.prod(plane)
            slices = max(1, self.slab_bytes // per_slice)
            if slices >= self.sw_batch_size:
                slices -= slices % self.sw_batch_size  # whole batches where windows allow
            settings["slab_slices"] = slices
        return settings

    def _pipelined(self, settings: dict[str, Any], model_shape: Sequence[int]) -> dict[str, Any]:
        """``settings`` with slabs small enough that restoring the last one, which nothing
        overlaps, is a small part of the restore: at least PIPELINE_SLABS slabs, each of whole
        window batches when it holds one or more.

        A volume with fewer slices than PIPELINE_SLABS batches runs partial batches instead:
        the 20-slice series with batches of 16 made two slabs, 16 and 4 slices, and the first
        slab's restore (its maps upsampled 4.2x in-plane) outlasted the second slab's
        network. Slabs of 2 slices hide it: the series' uncertainty requests' inference stage
        0.42 s -> 0.35 s, against 0.34 s plain (benchmarks/request_cost.py)."""
        slab = settings.get("slab_slices")
        if slab is None:
            return settings
        n = int(model_shape[self.plane_axis])
        batch = int(self.sw_batch_size)
        per_slab = max(1, n // PIPELINE_SLABS)
        target = per_slab // batch * batch if per_slab >= batch else per_slab
        return {**settings, "slab_slices": min(int(slab), max(1, target))}

    def _total(self, model_shape: Sequence[int]) -> int:
        meta = self.metadata
        return count_windows(model_shape, spatial_dims=meta.spatial_dims,
                             patch_size=meta.patch_size, plane_axis=self.plane_axis,
                             input_mode=meta.input_mode, overlap=self.overlap)

    def _predictor(self, uncertainty: bool, counter: _Counter, total: int,
                   progress: Progress | None = None, *, flip: bool = False) -> Predictor:
        backend, temperature = self.backend, float(self.metadata.temperature or 1.0)
        expected = UNCERTAINTY_OUTPUTS if uncertainty else PLAIN_OUTPUTS
        # The graph applies T in uncertainty mode. T = 1 is its default, and leaving the argument
        # out then keeps Backend implementations that predate it (the benchmarks' eager and
        # M-pass wrappers) working for uncalibrated models.
        options: dict[str, Any] = {"uncertainty": uncertainty}
        if uncertainty and temperature != 1.0:
            options["temperature"] = temperature

        def predict(batch: np.ndarray) -> dict[str, np.ndarray]:
            t0 = time.perf_counter()
            raw = backend.infer(batch, **options)
            counter.seconds += time.perf_counter() - t0
            missing = [k for k in expected if k not in raw]
            if missing:
                raise BackendError(f"backend returned {sorted(raw)}, missing {missing}")
            counter.windows += batch.shape[0]
            if progress is not None:
                progress(counter.windows, total)
            if uncertainty:
                return {k: raw[k] for k in UNCERTAINTY_KEYS}
            return {PLAIN_KEY: softmax(raw[PLAIN_OUTPUTS[0]], axis=1, temperature=temperature)}

        if not flip:
            return predict

        def predict_flipped(batch: np.ndarray) -> dict[str, np.ndarray]:
            # Both passes carry the same number of samples, so averaging their means (and mean
            # entropies) gives the moments of all the samples together.
            plain = predict(batch)
            mirrored = predict(np.ascontiguousarray(np.flip(batch, axis=FLIP_AXIS)))
            return {k: 0.5 * (v + np.flip(mirrored[k], axis=FLIP_AXIS)) for k, v in plain.items()}

        return predict_flipped

    def _resampled_slices(self, geometry: Geometry) -> _AxisRows | None:
        """For a 2D model whose slice axis was resampled (2.5D: its slice spacing is fixed),
        what turns its slabs into rows of the oriented input grid; None when model slices are
        input slices (or for 3D models, restored whole)."""
        axis = self.plane_axis
        n_in, n_out = geometry.model_shape[axis], geometry.oriented_shape[axis]
        if self.metadata.spatial_dims != 2 or n_in == n_out:
            return None
        plane = math.prod(n for a, n in enumerate(geometry.model_shape) if a != axis)
        channels = self.metadata.num_classes + len(MAP_NAMES)
        rows = max(1, self.slab_bytes // (channels * 4 * plane))
        return _AxisRows(axis, n_in, n_out, rows)

    def _restore_chunk(self, outputs: _Outputs, geometry: Geometry, axis: int, start: int,
                       stop: int, maps: Mapping[str, np.ndarray]) -> None:
        """Resample the model-grid rows ``start:stop`` (along ``axis``) to the oriented input
        grid in slabs of rows, and write mask and maps into the outputs; in uncertainty mode
        the maps are computed here, on the model grid, and counted there for the statistics."""
        restored = self._model_grid_maps(outputs, axis, start, stop, maps)
        if stop - start == geometry.model_shape[axis]:
            self._restore_rows(outputs, geometry, axis, None, restored)
            return
        # A 2D slab: its plane axis was not resampled, so model rows are oriented rows.
        if geometry.model_shape[axis] != geometry.oriented_shape[axis]:
            raise RuntimeError(f"partial chunk along axis {axis}, which was resampled")
        self._restore_rows(outputs, geometry, axis, (start, stop), restored)

    def _model_grid_maps(self, outputs: _Outputs, axis: int, start: int, stop: int,
                         maps: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """What is restored of the model-grid rows ``start:stop``: the probabilities, and in
        uncertainty mode the maps asked for (stacked); the maps are computed here, on the model
        grid, and counted there for the statistics."""
        if PLAIN_KEY in maps:
            return {PLAIN_KEY: maps[PLAIN_KEY]}
        probs = maps["mean_probs"]
        found = uncertainty_maps(probs, maps["mean_entropy"])
        outputs.push_model_grid(start, probs, found)
        restored = {PLAIN_KEY: probs}
        if outputs.levels:
            restored[MAPS_KEY] = np.stack([found[name] for name in outputs.levels])
        return restored

    def _restore_rows(self, outputs: _Outputs, geometry: Geometry, axis: int,
                      oriented_rows: tuple[int, int] | None,
                      restored: dict[str, np.ndarray]) -> None:
        """Resample ``restored`` to the oriented input grid in slabs of rows and write mask and
        maps into the outputs. ``oriented_rows`` None: it spans the whole model grid along
        ``axis``; (first, last): it is already on the oriented rows first:last along ``axis``."""
        out_shape = list(geometry.oriented_shape)
        offset = 0
        if oriented_rows is not None:
            out_shape[axis] = oriented_rows[1] - oriented_rows[0]
            offset = oriented_rows[0]
        channels = sum(v.shape[0] for v in restored.values())
        row_bytes = channels * 4 * math.prod(n for a, n in enumerate(out_shape) if a != axis)
        rows = max(1, self.slab_bytes // max(1, row_bytes))
        probs = restored.pop(PLAIN_KEY)
        blocks = label_blocks(probs, out_shape)
        # Labels are a byte per voxel, so they take as many more rows per step as fit the
        # same bytes; few rows per gather would make numpy move a few bytes at a time.
        row_voxels = math.prod(n for a, n in enumerate(out_shape) if a != axis)
        label_rows = max(rows, self.slab_bytes // max(1, row_voxels))
        for first in range(0, out_shape[axis], label_rows):
            last = min(first + label_rows, out_shape[axis])
            index = (slice(None),) * axis + (slice(offset + first, offset + last),)
            outputs.write_labels(index, restore_labels(probs, out_shape, axis=axis, start=first,
                                                       stop=last, blocks=blocks))
        if not restored:
            return
        for first in range(0, out_shape[axis], rows):
            last = min(first + rows, out_shape[axis])
            block = {name: resample_linear(v, out_shape, axis=axis, start=first, stop=last)
                     for name, v in restored.items()}
            index = (slice(None),) * axis + (slice(offset + first, offset + last),)
            outputs.write(index, block)


class _AxisRows:
    """Model-grid slabs along an axis that was resampled, turned into rows of the oriented
    input grid along it (linear, the mapping of :func:`resample_linear`), so that a 2D model
    whose slice spacing is fixed streams its slabs as the others do. Holds the model rows that
    output rows still to come interpolate from (a row or two of the previous slab)."""

    def __init__(self, axis: int, n_in: int, n_out: int, max_rows: int) -> None:
        self.axis, self.n_in, self.n_out, self.max_rows = axis, n_in, n_out, max(1, max_rows)
        self.i0, self.i1, self.w = linear_neighbours(n_in, n_out)
        self.held: dict[str, np.ndarray] = {}
        self.start = 0  # the model row of the first held row
        self.done = 0  # output rows produced

    def push(self, start: int, stop: int, maps: Mapping[str, np.ndarray]
             ) -> Iterator[tuple[int, int, dict[str, np.ndarray]]]:
        """Take the model rows ``start:stop`` (slabs in order); yield ``(first, last, block)``
        for every output row range whose neighbours have all arrived."""
        a = self.axis + 1
        if not self.held:
            self.held, self.start = dict(maps), start
        elif start != self.start + next(iter(self.held.values())).shape[a]:
            raise RuntimeError(f"model rows {start}:{stop} do not follow the rows held")
        else:
            self.held = {k: np.concatenate([v, maps[k]], axis=a) for k, v in self.held.items()}
        # i1 grows with the output row: the rows before the first one needing row `stop` are
        # complete.
        ready = self.n_out if stop >= self.n_in else int(np.searchsorted(self.i1, stop))
        for first in range(self.done, ready, self.max_rows):
            last = min(first + self.max_rows, ready)
            i0, i1 = self.i0[first:last] - self.start, self.i1[first:last] - self.start
            w = self.w[first:last].reshape((-1,) + (1,) * (self.held[PLAIN_KEY].ndim - a - 1))
            block = {}
            for name, values in self.held.items():
                lo = np.take(values, i0, axis=a).astype(np.float32, copy=False)
                hi = np.take(values, i1, axis=a).astype(np.float32, copy=False)
                hi -= lo
                hi *= w
                hi += lo
                block[name] = hi
            yield first, last, block
        self.done = ready
        # A model grid finer than the input's skips rows: keep none beyond what is held.
        keep = min(int(self.i0[ready]), stop) if ready < self.n_out else stop
        self.held = {k: v[(slice(None),) * a + (slice(keep - self.start, None),)]
                     for k, v in self.held.items()}
        self.start = keep


# Of a (B, C, *spatial) window batch: the window's first axis (R-L in RAS, except for sagittal
# 2D models, whose slices start with A-P).
FLIP_AXIS = 2


def flip_unavailable(meta: ModelMetadata) -> str | None:
    """Why ``meta``'s model must not be run with ``flip`` (None when it may).

    A model trained without flips (``training.augment.flip`` false, e.g. abdominal models, where
    mirroring swaps liver and spleen) would see anatomy it never saw. Metadata without the
    field (exports of other trainers) is allowed: the caller knows its model.
    """
    augment = (meta.training or {}).get("augment") or {}
    if augment.get("flip") is False:
        return (f"model {meta.name!r} was trained without flips (training.augment.flip is "
                "false): mirrored inputs would show it anatomy it never saw; request without "
                "flip")
    return None


class _Counter:
    def __init__(self) -> None:
        self.windows = 0
        self.seconds = 0.0


def argmax_channels(probs: np.ndarray) -> np.ndarray:
    """``np.argmax(probs, axis=0)`` as uint8 (ties to the lowest class, as argmax): one
    comparison pass per class, a few times faster than numpy's strided reduction over a leading
    axis of a handful of classes, and no int64 index array."""
    best = probs[0].copy()
    labels = np.zeros(best.shape, dtype=np.uint8)
    for k in range(1, probs.shape[0]):
        higher = probs[k] > best
        labels[higher] = k
        np.maximum(best, probs[k], out=best)
    return labels


def _axis_grid(n_in: int, n_out: int, start: int, stop: int
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Output rows ``start:stop`` of an axis resampled from ``n_in`` to ``n_out`` voxels: the
    lower and upper input neighbours and the upper one's weight (the mapping of
    :func:`_linear_axis`)."""
    if n_in == n_out:
        i0 = np.arange(start, stop, dtype=np.intp)
        return i0, i0, np.zeros(len(i0), dtype=np.float32)
    return linear_neighbours(n_in, n_out, start, stop)


def label_blocks(probs: np.ndarray, shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """The model-grid labels of ``probs`` and, per voxel, whether it and its upper neighbours
    along the axes resampled to ``shape`` (the corners of the output voxels it starts) all have
    that label. Forward max/min over a width-2 window, the edge repeated as the upper neighbour
    is clamped there."""
    labels = argmax_channels(probs)
    high, low = labels, labels
    for a, (n_in, n_out) in enumerate(zip(labels.shape, shape, strict=True)):
        if n_in != n_out:
            index: list[Any] = [slice(None)] * labels.ndim
            index[a] = np.r_[1:n_in, n_in - 1]
            high = np.maximum(high, high[tuple(index)])
            low = np.minimum(low, low[tuple(index)])
    return labels, high == low


def restore_labels(probs: np.ndarray, shape: Sequence[int], *, axis: int = 0, start: int = 0,
                   stop: int | None = None,
                   blocks: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """``argmax_channels(resample_linear(probs, shape, axis=axis, start=start, stop=stop))``
    without resampling every class everywhere.

    Linear interpolation is a convex combination of the 2^d model-grid voxels around an output
    voxel; where those all have the same argmax k, p_k exceeds every other class at each of them
    and so in any convex combination: the output's label is k. Only output voxels whose
    neighbours disagree (along the label boundaries, a few percent of a CT) are interpolated,
    class by class; the rest is a gather of uint8 labels. ``blocks``: :func:`label_blocks` of
    ``probs`` for ``shape``, when several row ranges are restored from the same ``probs``.
    """
    probs = np.asarray(probs)
    in_shape = probs.shape[1:]
    shape = tuple(int(n) for n in shape)
    stop = shape[axis] if stop is None else stop
    grids = [_axis_grid(n_in, n_out, start if a == axis else 0, stop if a == axis else n_out)
             for a, (n_in, n_out) in enumerate(zip(in_shape, shape, strict=True))]
    labels, uniform = blocks if blocks is not None else label_blocks(probs, shape)
    resampled = [a for a, (n_in, n_out) in enumerate(zip(in_shape, shape, strict=True))
                 if n_in != n_out]
    # Axes that are not resampled are sliced first, on the small model grid, so that the
    # gathers along the others write a contiguous output and nothing is copied after them.
    kept = tuple(slice(int(i0[0]), int(i0[-1]) + 1) if a not in resampled and len(i0)
                 else slice(None) for a, (i0, _, _) in enumerate(grids))
    if probs.shape[0] <= 128:
        # One uint8 gather for both: the label in the low bits, "neighbours differ" in the top.
        out = (labels | (~uniform).view(np.uint8) << 7)[kept]
        for a in resampled:
            out = np.take(out, grids[a][0], axis=a)
        out = np.ascontiguousarray(out)
        flat = np.flatnonzero(out.reshape(-1) >= 128)
        out &= 127
    else:
        out, differ = labels[kept], ~uniform[kept]
        for a in resampled:
            out = np.take(out, grids[a][0], axis=a)
            differ = np.take(differ, grids[a][0], axis=a)
        out = np.ascontiguousarray(out)
        flat = np.flatnonzero(differ.reshape(-1))
    if flat.size:
        edge = np.unravel_index(flat, out.shape)
        corners = [(i0[e], i1[e], w[e]) for (i0, i1, w), e in zip(grids, edge, strict=True)]
        # Corners as flat indices into (K, voxels): one 1-D take per class and corner instead
        # of a multi-axis fancy index.
        strides = np.cumprod((1,) + in_shape[:0:-1])[::-1]
        table = probs.reshape(probs.shape[0], -1)
        mixed = np.zeros((probs.shape[0], flat.size), dtype=np.float32)
        for bits in range(1 << len(resampled)):
            index = np.zeros(flat.size, dtype=np.intp)
            weight = np.ones(flat.size, dtype=np.float32)
            for a, (i0, i1, w) in enumerate(corners):
                if a in resampled and bits >> resampled.index(a) & 1:
                    index += i1 * strides[a]
                    weight *= w
                else:
                    index += i0 * strides[a]
                    if a in resampled:
                        weight *= 1 - w
            mixed += np.take(table, index, axis=1) * weight
        out.reshape(-1)[flat] = argmax_channels(mixed)
    return out


def _wanted_maps(maps: Collection[str] | None) -> tuple[str, ...]:
    if maps is None:
        return MAP_NAMES
    unknown = set(maps) - set(MAP_NAMES)
    if unknown:
        raise ValueError(f"unknown uncertainty maps {sorted(unknown)}; choose from {MAP_NAMES}")
    return tuple(name for name in MAP_NAMES if name in maps)


def _order_of(arr: np.ndarray) -> Literal["C", "F"]:
    """The memory order of a channel-first image's spatial block: "F" for a Fortran-ordered
    upload (NIfTI), "C" otherwise."""
    spatial = arr[0] if arr.ndim == 4 else arr
    return "F" if spatial.flags.f_contiguous and not spatial.flags.c_contiguous else "C"


class _Outputs:
    """Input-grid results, written through views in the model's orientation (no final copy),
    with the class counts of the labels written; in uncertainty mode also the map statistics,
    taken on the model grid as its slabs arrive."""

    def __init__(self, geometry: Geometry, uncertainty: bool,
                 order: Literal["C", "F"] = "C", maps: Sequence[str] = MAP_NAMES, *,
                 class_names: Sequence[str], axis: int, band: int) -> None:
        shape = geometry.input_shape
        self.num_classes = len(class_names)
        # Voxels per label written so far: the volumes, without a pass over the whole mask.
        self.counts = np.zeros(self.num_classes, dtype=np.int64)
        transform = np.asarray(geometry.transform)
        self.mask = np.zeros(shape, dtype=np.uint8, order=order)
        self._mask_view = apply_orientation(self.mask, transform)
        # The input-grid maps restored, as uint16 levels, in MAP_NAMES order (the order of the
        # channels _restore_chunk stacks).
        self.levels: dict[str, np.ndarray] = {}
        # The map statistics, taken on the model grid as its slabs arrive along `axis`.
        self.map_statistics: StreamedMapStatistics | None = None
        if uncertainty:
            self.levels = {name: np.zeros(shape, dtype=np.uint16, order=order)
                           for name in maps}
            self._map_views = tuple(apply_orientation(v, transform)
                                    for v in self.levels.values())
            self.map_statistics = StreamedMapStatistics(
                geometry.model_shape[axis], axis, class_names, MAP_NAMES, band)
        if tuple(self._mask_view.shape) != tuple(geometry.oriented_shape):
            raise RuntimeError(f"oriented view {self._mask_view.shape} != "
                               f"{geometry.oriented_shape}")

    def push_model_grid(self, start: int, probs: np.ndarray,
                        maps: Mapping[str, np.ndarray]) -> None:
        assert self.map_statistics is not None
        self.map_statistics.push(start, argmax_channels(probs), maps)

    def write_labels(self, index: tuple[slice, ...], labels: np.ndarray) -> None:
        assign_tiled(self._mask_view[index], labels)
        self.counts += class_sums(labels, None, self.num_classes).astype(np.int64)

    def write(self, index: tuple[slice, ...], block: Mapping[str, np.ndarray]) -> None:
        for view, values in zip(self._map_views, block[MAPS_KEY], strict=True):
            assign_tiled(view[index], quantise_map(values))


def assign_tiled(dst: np.ndarray, src: np.ndarray, tile: int = 16) -> None:
    """``dst[...] = src``, in tiles when the two run fastest along different axes.

    A C-ordered block written into a Fortran-ordered upload's (reoriented) outputs is a
    transpose; numpy walks one side with a large stride and misses the cache on every element
    (512^2 x 400 uint8: 2.1 s). Tiles of ``tile`` rows along both fast axes keep both sides in
    cache (0.47 s)."""
    if dst.shape != src.shape:
        raise ValueError(f"cannot assign {src.shape} to {dst.shape}")
    fast_dst = _fastest_axis(dst)
    fast_src = _fastest_axis(src)
    if dst.ndim < 2 or fast_dst == fast_src:
        dst[...] = src
        return
    index: list[Any] = [slice(None)] * dst.ndim
    for i in range(0, dst.shape[fast_dst], tile):
        index[fast_dst] = slice(i, i + tile)
        for j in range(0, dst.shape[fast_src], tile):
            index[fast_src] = slice(j, j + tile)
            dst[tuple(index)] = src[tuple(index)]


def _fastest_axis(a: np.ndarray) -> int:
    """The axis of ``a`` with the smallest stride among those longer than one."""
    strides = [(abs(st), ax) for ax, (st, n) in enumerate(zip(a.strides, a.shape, strict=True))
               if n > 1]
    return min(strides)[1] if strides else a.ndim - 1


# ----------------------------------------------------------------------------------------------
# Metadata helpers
# ----------------------------------------------------------------------------------------------


def _target_spacing(
    meta: ModelMetadata, slice_axis: int
) -> tuple[list[float | None] | float | None, list[int] | None]:
    """prepare_image's target spacing and resample axes: 2D models resample in-plane only,
    except 2.5D ones (``context_slices``), whose neighbours lie at the slice spacing the metadata
    fixes. ``meta.spacing`` has passed :func:`~sfpc.inference.contract.check_servable`."""
    spacing = meta.spacing
    in_plane = ([a for a in range(3) if a != slice_axis]
                if meta.spatial_dims == 2 and not meta.context_slices else None)
    if spacing is None:
        return None, in_plane
    if isinstance(spacing, (int, float)):
        return float(spacing), in_plane
    values = [None if v is None else float(v) for v in spacing]
    if in_plane is not None and len(values) == 2:
        full: list[float | None] = [None, None, None]
        for a, v in zip(in_plane, values, strict=True):
            full[a] = v
        return full, in_plane
    return values, in_plane
