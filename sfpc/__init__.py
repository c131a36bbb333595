"""SFPC Seg: semi-supervised segmentation with feature-perturbed consistency, with uncertainty.

``from sfpc import predict`` segments a file on this machine (see :mod:`sfpc.inference.predict`);
it is imported on first use, so that ``import sfpc`` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# No import of them here, not even for type checkers: the clients import this package for its
# version, and must not be seen (import-linter) reaching the inference pipeline through it.
_LAZY = {"predict": "sfpc.inference.predict", "Predictor": "sfpc.inference.predict",
         "PredictionResult": "sfpc.inference.predict"}
__all__ = ["PredictionResult", "Predictor", "__version__", "predict"]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'sfpc' has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name]), name)
