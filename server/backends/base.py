"""The contract every inference backend of the gateway fulfils, and its errors.

A backend runs the exported SFPC graphs (see `sfpc_model.json` in an export directory) on a batch
laid out channel-first, [B, C_in, *spatial], float32. Plain inference returns the class logits;
uncertainty inference returns the mean softmax over the M feature-perturbed predictions and the mean
per-sample entropy, from which the gateway derives predictive entropy and mutual information.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import numpy as np

INPUT_NAME = "image"
PLAIN_OUTPUTS: tuple[str, ...] = ("logits",)
UNCERTAINTY_OUTPUTS: tuple[str, ...] = ("mean_probs", "mean_entropy")


class BackendError(RuntimeError):
    """An inference backend failed; the message says what to check or do next."""


class BackendUnavailable(BackendError):
    """The backend cannot serve right now (server down, model not loaded, runtime missing)."""


@runtime_checkable
class Backend(Protocol):
    """What the gateway needs from an inference engine."""

    def infer(self, batch: np.ndarray, *, uncertainty: bool = False) -> dict[str, np.ndarray]:
        """Run one batch [B, C_in, *spatial].

        Plain: {"logits": [B, K, *spatial]}. Uncertainty: {"mean_probs": [B, K, *spatial],
        "mean_entropy": [B, 1, *spatial]}. All float32.
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


def check_batch(batch: np.ndarray, metadata: Mapping[str, Any] | None = None) -> np.ndarray:
    """Validate a batch against the export metadata and return it as C-contiguous float32.

    Checked before inference so that a wrong upload is reported in the user's terms (axes,
    channels, patch size) rather than as a runtime's shape error.
    """
    arr = np.asarray(batch)
    if arr.dtype.kind not in "fiub":
        raise BackendError(f"input batch has dtype {arr.dtype}; send a numeric (float32) array")
    if metadata is not None:
        spatial_dims = int(metadata["spatial_dims"])
        if arr.ndim != spatial_dims + 2:
            raise BackendError(
                f"input batch has shape {arr.shape}; a {spatial_dims}D model expects "
                f"[B, C_in, {', '.join('S' for _ in range(spatial_dims))}] (channel-first)"
            )
        in_channels = int(metadata["in_channels"])
        if arr.shape[1] != in_channels:
            raise BackendError(
                f"input batch has {arr.shape[1]} channels (axis 1 of {arr.shape}); "
                f"the model expects {in_channels}"
            )
        if not metadata.get("dynamic_spatial", True):
            patch = tuple(int(p) for p in metadata["patch_size"])
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
