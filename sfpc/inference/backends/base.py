"""The contract every inference backend of the gateway fulfils, and its errors.

A backend runs the exported SFPC graphs (their metadata and tensor names are in
`sfpc.inference.contract`) on a batch laid out channel-first, [B, C_in, *spatial], float32. Plain
inference returns the class logits; uncertainty inference returns the mean softmax over the M
feature-perturbed predictions and the mean per-sample entropy, from which the gateway derives
predictive entropy and mutual information.
The uncertainty graph takes the calibration temperature as a second input, [B, 1] float32; graphs
exported before that input existed can only serve temperature 1.
"""

from __future__ import annotations

import math
from typing import Any, Protocol, runtime_checkable

import numpy as np

from sfpc.errors import BackendError
from sfpc.inference.contract import (
    PLAIN_OUTPUTS,
    TEMPERATURE_NAME,
    UNCERTAINTY_OUTPUTS,
    ModelMetadata,
)


@runtime_checkable
class Backend(Protocol):
    """What the gateway needs from an inference engine."""

    def infer(
        self, batch: np.ndarray, *, uncertainty: bool = False, temperature: float = 1.0
    ) -> dict[str, np.ndarray]:
        """Run one batch [B, C_in, *spatial].

        Plain: {"logits": [B, K, *spatial]}, raw (the caller takes softmax(logits / T)).
        Uncertainty: {"mean_probs": [B, K, *spatial], "mean_entropy": [B, 1, *spatial]}, each
        sample's softmax taken of its logits / `temperature`. All float32.
        """
        ...

    def ready(self) -> bool:
        """True when `infer` is expected to succeed now; never raises."""
        ...

    def describe(self) -> dict[str, Any]:
        """JSON-serialisable facts about the backend (kind, model, devices, limits)."""
        ...

    def close(self) -> None:
        """Release sessions or connections; the backend is unusable afterwards."""
        ...


def output_names(uncertainty: bool) -> tuple[str, ...]:
    """The output tensors a request asks for."""
    return UNCERTAINTY_OUTPUTS if uncertainty else PLAIN_OUTPUTS


def check_temperature(temperature: float) -> float:
    """`temperature` as a float, or BackendError unless it is finite and > 0."""
    try:
        value = float(temperature)
    except (TypeError, ValueError) as exc:
        raise BackendError(f"temperature {temperature!r} is not a number") from exc
    if not (math.isfinite(value) and value > 0):
        raise BackendError(f"temperature must be finite and > 0, got {value}")
    return value


def temperature_input(batch_size: int, temperature: float) -> np.ndarray:
    """The uncertainty graph's `temperature` tensor: T for every image of the batch, [B, 1]."""
    return np.full((batch_size, 1), temperature, dtype=np.float32)


def untempered_graph_error(where: str, temperature: float) -> BackendError:
    """The error for a temperature other than 1 asked of a graph without the temperature input."""
    return BackendError(
        f"the uncertainty graph of {where} has no '{TEMPERATURE_NAME}' input (it was exported "
        f"before sfpc fed the calibration temperature to it), so it can only serve temperature "
        f"1, not {temperature:g}; re-export the model with `sfpc export` or set its "
        "temperature to 1"
    )


def check_batch(batch: np.ndarray, metadata: ModelMetadata | None = None) -> np.ndarray:
    """Validate a batch against the export metadata and return it as C-contiguous float32.

    Checked before inference so that a wrong upload is reported in the user's terms (axes,
    channels, patch size) rather than as a runtime's shape error.
    """
    arr = np.asarray(batch)
    if arr.dtype.kind not in "fiub":
        raise BackendError(f"input batch has dtype {arr.dtype}; send a numeric (float32) array")
    if metadata is not None:
        spatial_dims = int(metadata.spatial_dims)
        if arr.ndim != spatial_dims + 2:
            raise BackendError(
                f"input batch has shape {arr.shape}; a {spatial_dims}D model expects "
                f"[B, C_in, {', '.join('S' for _ in range(spatial_dims))}] (channel-first)"
            )
        in_channels = int(metadata.in_channels)
        if arr.shape[1] != in_channels:
            raise BackendError(
                f"input batch has {arr.shape[1]} channels (axis 1 of {arr.shape}); "
                f"the model expects {in_channels}"
            )
        if not metadata.dynamic_spatial:
            patch = tuple(int(p) for p in metadata.patch_size)
            if tuple(arr.shape[2:]) != patch:
                raise BackendError(
                    f"input spatial shape {tuple(arr.shape[2:])} differs from the model's fixed "
                    f"patch size {patch}; tile the image into patches (sliding window) first"
                )
    elif arr.ndim < 3:
        raise BackendError(f"input batch has shape {arr.shape}; expected [B, C_in, *spatial]")
    if arr.shape[0] < 1:
        raise BackendError("input batch is empty (batch axis 0 has length 0)")
    return np.ascontiguousarray(arr, dtype=np.float32)
