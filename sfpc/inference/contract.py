"""The model's metadata: written once (at training, completed at export), read everywhere else.

This file is the single source of truth for serving: classes, spatial dims and plane, patch size,
spacing, orientation, normalisation, perturbation settings, calibration, training provenance and
the sha256 of each exported graph. Torch-free so that the gateway can import it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

METADATA_FILE = "sfpc_model.json"
SCHEMA_VERSION = 1

PLANE_AXIS = {"sagittal": 0, "coronal": 1, "axial": 2}  # axis of a RAS-oriented array


@dataclass
class ModelMetadata:
    name: str = "sfpc"
    version: str = "0.1.0"
    task: str = ""
    spatial_dims: int = 2
    in_channels: int = 1
    num_classes: int = 2
    class_names: list[str] = field(default_factory=lambda: ["background", "foreground"])
    # Geometry: arrays are reoriented to `orientation` before anything else. 2D models run on
    # slices of `plane`. `spacing` (mm per axis of the oriented array; None = keep) is the grid
    # the model was trained on; `input_mode` "resize" instead scales each slice to patch_size
    # (the paper's 2D recipe).
    orientation: str = "RAS"
    plane: str = "axial"
    spacing: list[float | None] | None = None
    input_mode: str = "spacing"
    patch_size: list[int] = field(default_factory=lambda: [256, 256])
    dynamic_spatial: bool = True
    normalisation: dict[str, Any] = field(default_factory=lambda: {"kind": "minmax"})
    perturbation: dict[str, Any] = field(
        default_factory=lambda: {"kind": "flpm", "M": 4, "tau": 0.1, "eps_grid": None}
    )
    inference: dict[str, Any] = field(
        default_factory=lambda: {"overlap": 0.5, "mode": "gaussian", "sigma_scale": 0.125,
                                 "sw_batch_size": 4}
    )
    temperature: float = 1.0
    # How the uncertainty graph computes its M predictions: "folded" (FLPM folded into the
    # classifier weights) or "stacked" (perturbed feature stack); "" when there is none.
    uncertainty_graph: str = "folded"
    # Per-case quality flag: {"measure": "boundary_uncertainty", "threshold": float, ...}, chosen
    # on validation data (issue 7); empty = the server reports no flag.
    quality: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    graphs: dict[str, dict[str, str]] = field(default_factory=dict)
    net: dict[str, Any] = field(default_factory=dict)
    sfpc_version: str = ""
    created: str = ""
    schema_version: int = SCHEMA_VERSION

    @property
    def plane_axis(self) -> int:
        return PLANE_AXIS[self.plane]

    @property
    def has_uncertainty(self) -> bool:
        return "uncertainty" in self.graphs

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        if path.is_dir():
            path = path / METADATA_FILE
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n")
        return path

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelMetadata:
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown metadata fields {sorted(unknown)}; is this file newer "
                             f"than this version of sfpc?")
        return cls(**d)

    @classmethod
    def load(cls, path: str | Path) -> ModelMetadata:
        path = Path(path)
        if path.is_dir():
            path = path / METADATA_FILE
        if not path.exists():
            raise FileNotFoundError(f"no model metadata at {path} (expected {METADATA_FILE} "
                                    f"written by `sfpc export`)")
        return cls.from_dict(json.loads(path.read_text()))


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# The embedded default model (`sfpc serve` and `sfpc predict` without --model), shipped as package
# data of `sfpc` so that a wheel carries it.
DEFAULT_MODEL_DIR = Path(__file__).resolve().parents[1] / "default_model"
