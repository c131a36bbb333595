"""Inference backends for the SFPC gateway: in-process ONNX Runtime, or a remote Triton server.

Importing this package needs neither torch nor tritonclient; the Triton client is imported when a
TritonBackend is created.
"""

from __future__ import annotations

from typing import Any

from sfpc.errors import BackendError, BackendUnavailable
from sfpc.inference.backends.base import Backend
from sfpc.inference.backends.onnxruntime_backend import OnnxRuntimeBackend
from sfpc.inference.backends.triton_backend import TritonBackend

BACKEND_KINDS = ("onnxruntime", "triton")

__all__ = [
    "BACKEND_KINDS",
    "Backend",
    "BackendError",
    "BackendUnavailable",
    "OnnxRuntimeBackend",
    "TritonBackend",
    "make_backend",
]


def make_backend(kind: str, **settings: Any) -> Backend:
    """Build a backend by name: 'onnxruntime' (settings of OnnxRuntimeBackend, export_dir
    required) or 'triton' (settings of TritonBackend, url required)."""
    if kind == "onnxruntime":
        return OnnxRuntimeBackend(**settings)
    if kind == "triton":
        return TritonBackend(**settings)
    raise BackendError(f"unknown backend kind {kind!r}; choose one of {BACKEND_KINDS}")
