"""The model contract: what an export directory holds and what every reader may rely on.

``sfpc_model.json`` is written once (at training, completed by ``sfpc export``) and read
everywhere else: classes, spatial dims and plane, patch size, spacing, orientation,
normalisation, perturbation settings, calibration, training provenance and the sha256 of each
exported graph and of the weights file the graphs share. This module is the single source of
truth for

- the metadata schema (:class:`ModelMetadata`) and its one loader, :func:`load_metadata`, which
  reads the file once and checks it once (:func:`metadata_problems`);
- the names the exported graphs and the Triton repository use (inputs, outputs, the metadata
  parameter of the model configuration);
- the plane -> array axis rule (:func:`plane_axis`), in the model's orientation;
- the checksummed reading of the graphs (:func:`read_graph_bytes`, :func:`verify_graph_file`) and
  of their shared weights (:func:`read_weights_bytes`, :func:`verify_weights_file`).

Torch-free, numpy-free and nibabel-free, so that the gateway, the clients and the exporter all
import it.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sfpc.errors import BackendError

METADATA_FILE = "sfpc_model.json"
SCHEMA_VERSION = 1

# ----------------------------------------------------------------------------------------------
# The graphs' names: model/export.py names the ONNX tensors with these, the backends and the
# Triton clients feed and read them.
# ----------------------------------------------------------------------------------------------

SEG_GRAPH = "seg"  # image -> logits
UNCERTAINTY_GRAPH = "uncertainty"  # image, temperature -> mean_probs, mean_entropy
# What can produce the uncertainty graph's samples (issue 18; docs/uncertainty.md compares them):
# FLPM before the classifier (the paper's, served by default), FLPM at several decoder depths,
# Monte Carlo dropout, and a deep ensemble exported as one graph.
UNCERTAINTY_METHODS = ("flpm", "flpm_stages", "mc_dropout", "ensemble")
GRAPH_KINDS = (SEG_GRAPH, UNCERTAINTY_GRAPH)
INPUT_NAME = "image"  # [B, C_in, *spatial] float32
TEMPERATURE_NAME = "temperature"  # [B, 1] float32, uncertainty graph only
PLAIN_OUTPUTS: tuple[str, ...] = ("logits",)
UNCERTAINTY_OUTPUTS: tuple[str, ...] = ("mean_probs", "mean_entropy")
# A Triton repository serves the seg graph as <name> and the uncertainty graph as
# <name>_uncertainty, each with the metadata JSON as this model-config parameter.
UNCERTAINTY_SUFFIX = "_uncertainty"
METADATA_PARAMETER = "sfpc_model_json"

# ----------------------------------------------------------------------------------------------
# Geometry and intensity vocabulary
# ----------------------------------------------------------------------------------------------

# The axis codes (nibabel's) that lie along the normal of each plane.
PLANE_CODES = {"sagittal": "LR", "coronal": "AP", "axial": "SI"}
_AXIS_PAIRS = ("LR", "AP", "SI")
INPUT_MODES = ("spacing", "resize")
# How an image reaches the model grid: "area" averages the input voxels an output voxel covers
# on every axis that shrinks (what a scanner's thicker voxel integrates) and interpolates
# linearly where it grows; "linear" interpolates everywhere, which on a 4x finer scan passes
# its noise through almost unfiltered (docs/robustness.md). Metadata without the field predates
# it and was served with "linear".
RESAMPLING_MODES = ("area", "linear")
NORMALISATION_KINDS = ("ct_window", "zscore", "minmax")
# Keys a metadata file must state itself: the dataclass would fill them with defaults that
# describe some other model.
REQUIRED_KEYS = ("spatial_dims", "in_channels", "num_classes", "graphs")


def check_orientation(orientation: Any) -> str:
    """``orientation`` as three axis codes, one of each pair L/R, A/P, S/I ("RAS", "LPS"...);
    ValueError otherwise."""
    codes = str(orientation) if isinstance(orientation, str) else ""
    used = sorted(next((i for i, pair in enumerate(_AXIS_PAIRS) if c in pair), -1)
                  for c in codes)
    if len(codes) != 3 or used != [0, 1, 2]:
        raise ValueError(f"orientation {orientation!r} is not three axis codes with one of each "
                         "of L/R, A/P, S/I (e.g. 'RAS')")
    return codes


def plane_axis(plane: str, orientation: str = "RAS") -> int:
    """The axis of an array in ``orientation`` that ``plane``'s slices are normal to.

    In RAS: sagittal 0, coronal 1, axial 2. Training (always RAS) and serving (the export's
    orientation) both ask here, so a 2D model is run on the slices it was trained on.
    """
    if not isinstance(plane, str) or plane not in PLANE_CODES:
        raise ValueError(f"plane {plane!r} is not one of {', '.join(PLANE_CODES)}")
    codes = check_orientation(orientation)
    return next(axis for axis, code in enumerate(codes) if code in PLANE_CODES[plane])


def validate_normalisation(spec: Mapping[str, Any]) -> dict[str, Any]:
    """Check a normalisation spec and return it as a plain JSON-able dict with defaults filled."""
    if not isinstance(spec, Mapping) or "kind" not in spec:
        raise ValueError(f"normalisation spec must be a dict with a 'kind' key, got {spec!r}")
    kind = spec["kind"]
    if kind == "ct_window":
        window = spec.get("window")
        if window is None or len(window) != 2:
            raise ValueError("ct_window normalisation needs 'window': [lo, hi]")
        lo, hi = float(window[0]), float(window[1])
        if not hi > lo:
            raise ValueError(f"ct_window needs hi > lo, got window {window!r}")
        out_ct: dict[str, Any] = {"kind": kind, "window": [lo, hi]}
        # nnU-Net's CT scheme: clip to the window, then z-score with the training set's
        # foreground mean and std (instead of scaling the window to [0, 1]).
        if ("mean" in spec) != ("std" in spec):
            raise ValueError("ct_window takes 'mean' and 'std' together (z-score after clipping)")
        if "mean" in spec:
            mean, std = float(spec["mean"]), float(spec["std"])
            if not (math.isfinite(mean) and math.isfinite(std) and std > 0):
                raise ValueError(f"ct_window needs a finite mean and std > 0, got {mean}, {std}")
            out_ct.update(mean=mean, std=std)
        return out_ct
    if kind == "zscore":
        foreground = spec.get("foreground", "nonzero")
        if foreground not in ("nonzero", "all"):
            raise ValueError(f"zscore 'foreground' must be 'nonzero' or 'all', got {foreground!r}")
        return {"kind": kind, "foreground": foreground}
    if kind == "minmax":
        out: dict[str, Any] = {"kind": kind}
        percentiles = spec.get("percentiles")
        if percentiles is not None:
            if len(percentiles) != 2:
                raise ValueError("minmax 'percentiles' must be [lower, upper]")
            lo, hi = float(percentiles[0]), float(percentiles[1])
            if not 0.0 <= lo < hi <= 100.0:
                raise ValueError(
                    f"minmax percentiles must satisfy 0 <= lo < hi <= 100, got {percentiles!r}"
                )
            out["percentiles"] = [lo, hi]
        return out
    raise ValueError(
        f"unknown normalisation kind {kind!r}; expected one of {', '.join(NORMALISATION_KINDS)}"
    )


# ----------------------------------------------------------------------------------------------
# The metadata
# ----------------------------------------------------------------------------------------------


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
    # 2.5D: k slices on each side of a 2D model's slice go in as extra channels, so the network
    # sees the anatomy above and below what it labels (the one thing a 3D model sees that a 2D
    # one does not) at a 2D model's cost. The network takes in_channels = image channels x
    # (2k + 1), slice-major (slice z-k first, each slice's image channels together), the edge
    # slice repeated past the volume's ends. Neighbours are taken on the model grid, so its
    # slice spacing must be fixed (``spacing`` names the plane axis' mm): "the next slice"
    # then means the same distance whatever the scan's slice thickness. 0 (and metadata
    # without the field): a plain 2D model.
    context_slices: int = 0
    resampling: str = "linear"
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
    # Which method produced the uncertainty maps (issue 18), one of UNCERTAINTY_METHODS: "flpm"
    # (M feature-level perturbations in one pass, the paper's); "" in exports from before the
    # field, read as the perturbation's kind (see ``maps_method``).
    uncertainty_method: str = ""
    # Per-case quality flag: {"measure": "boundary_uncertainty", "threshold": float, ...}, chosen
    # on validation data (issue 7); empty = the server reports no flag.
    quality: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    graphs: dict[str, dict[str, str]] = field(default_factory=dict)
    # The ONNX external data file the graphs' weights live in, stored once for all of them
    # (sfpc.model.shared_weights): {"file": "weights.bin", "sha256": hex}. Empty: every graph
    # carries its own weights (exports from before it existed, or `--inline-weights`).
    weights: dict[str, str] = field(default_factory=dict)
    net: dict[str, Any] = field(default_factory=dict)
    sfpc_version: str = ""
    created: str = ""
    schema_version: int = SCHEMA_VERSION

    @property
    def plane_axis(self) -> int:
        """Axis of the oriented array that 2D slices are normal to (see :func:`plane_axis`)."""
        return plane_axis(self.plane, self.orientation)

    @property
    def slice_stack(self) -> int:
        """Slices per network input: 2k + 1 for a 2.5D model (``context_slices`` k), else 1."""
        k = self.context_slices
        return 2 * k + 1 if _is_int(k) and k > 0 else 1

    @property
    def image_channels(self) -> int:
        """The channels of an image to segment: ``in_channels`` less the neighbour slices that
        2.5D models stack onto each slice."""
        return self.in_channels // self.slice_stack

    @property
    def has_uncertainty(self) -> bool:
        return UNCERTAINTY_GRAPH in self.graphs

    def maps_method(self) -> dict[str, Any] | None:
        """What produces the uncertainty maps, for reports and /v1/models; None without an
        uncertainty graph."""
        if not self.has_uncertainty:
            return None
        p = self.perturbation or {}
        return {"method": self.uncertainty_method or str(p.get("kind") or ""),
                "samples": int(p.get("M") or 0), "tau": p.get("tau"),
                "graph": self.uncertainty_graph,
                "maps": ["entropy (of the mean prediction)",
                         "mutual_information (entropy minus mean sample entropy)"]}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        if path.is_dir():
            path = path / METADATA_FILE
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n")
        return path

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelMetadata:
        """The metadata of a dict (a checkpoint's, or a parsed file); unknown keys are a
        ValueError. Values are not checked here: see :func:`check_servable`."""
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown metadata fields {sorted(unknown)}; is this file newer "
                             f"than this version of sfpc?")
        return cls(**d)

    @classmethod
    def load(cls, path: str | Path, *, require_graphs: bool = True) -> ModelMetadata:
        """:func:`load_metadata`."""
        return load_metadata(path, require_graphs=require_graphs)


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _spacing_problem(spacing: Any, spatial_dims: Any) -> str | None:
    if spacing is None:
        return None
    if _is_number(spacing):
        return None if math.isfinite(spacing) and spacing > 0 else (
            f"spacing {spacing!r} (mm, > 0)")
    allowed = (3, 2) if spatial_dims == 2 else (3,)
    if not isinstance(spacing, (list, tuple)) or len(spacing) not in allowed:
        return (f"spacing {spacing!r} needs 3 entries (2, the in-plane ones, for a 2D model), "
                "one per axis of the oriented array, null for an axis kept as it is")
    if any(v is not None and not (_is_number(v) and math.isfinite(v) and v > 0)
           for v in spacing):
        return f"spacing {spacing!r} (each entry mm > 0, or null)"
    return None


def _context_problems(meta: ModelMetadata, spacing_ok: bool) -> list[str]:
    k = meta.context_slices
    if not (_is_int(k) and k >= 0):
        return [f"context_slices {k!r} (an integer >= 0: neighbour slices on each side)"]
    if k == 0:
        return []
    problems = []
    if meta.spatial_dims != 2:
        problems.append(f"context_slices {k} is for 2D models (neighbouring slices as "
                        f"channels); a {meta.spatial_dims}D model sees them already: set it to 0")
    if meta.input_mode != "spacing":
        problems.append(f"context_slices {k} with input_mode {meta.input_mode!r}: neighbours "
                        "are taken on the model grid, which only input_mode 'spacing' fixes")
    if _is_int(meta.in_channels) and meta.in_channels % (2 * k + 1):
        problems.append(f"in_channels {meta.in_channels} is not a multiple of the {2 * k + 1} "
                        f"slices context_slices {k} stacks")
    if spacing_ok and meta.spatial_dims == 2:
        try:
            axis = plane_axis(meta.plane, meta.orientation)
        except ValueError:
            return problems  # reported with the plane or the orientation
        spacing = meta.spacing
        fixed = _is_number(spacing) or (
            isinstance(spacing, (list, tuple)) and len(spacing) == 3 and spacing[axis] is not None)
        if not fixed:
            problems.append(f"context_slices {k} needs the model grid's slice spacing: spacing "
                            f"{spacing!r} leaves axis {axis} (normal to {meta.plane} slices) "
                            "at the scan's own, give it in mm, e.g. [3.0, 3.0, 3.0]")
    return problems


def _inference_problems(inference: Any) -> list[str]:
    if not isinstance(inference, Mapping):
        return [f"inference {inference!r} (a dict of sliding-window settings)"]
    problems = []
    overlap = inference.get("overlap", 0.5)
    values = overlap if isinstance(overlap, (list, tuple)) else [overlap]
    if not all(_is_number(v) and 0 <= v < 1 for v in values):
        problems.append(f"inference.overlap {overlap!r} (in [0, 1))")
    batch = inference.get("sw_batch_size", 4)
    if not (_is_int(batch) and batch >= 1):
        problems.append(f"inference.sw_batch_size {batch!r} (an integer >= 1)")
    return problems


def metadata_problems(meta: ModelMetadata) -> list[str]:
    """Everything that keeps ``meta`` from being served, each in the terms of the field to fix
    (empty when it is servable). The one check behind :func:`load_metadata` and the engine."""
    problems: list[str] = []
    if not isinstance(meta.name, str) or not meta.name:
        problems.append(f"name {meta.name!r} (a non-empty string)")
    if _is_int(meta.schema_version) and meta.schema_version > SCHEMA_VERSION:
        problems.append(f"schema_version {meta.schema_version} is newer than this sfpc reads "
                        f"({SCHEMA_VERSION}); upgrade sfpc")
    if meta.spatial_dims not in (2, 3) or not _is_int(meta.spatial_dims):
        problems.append(f"spatial_dims {meta.spatial_dims!r} (2 or 3)")
    patch = meta.patch_size
    if (not isinstance(patch, (list, tuple)) or len(patch) != meta.spatial_dims
            or not all(_is_int(p) and p >= 1 for p in patch)):
        problems.append(f"patch_size {patch!r} for a {meta.spatial_dims}D model")
    if not (_is_int(meta.num_classes) and 2 <= meta.num_classes <= 256):
        problems.append(f"num_classes {meta.num_classes!r} (2..256 fit a uint8 mask)")
    names = meta.class_names if isinstance(meta.class_names, (list, tuple)) else None
    if names is None or len(names) != meta.num_classes:
        count = "no" if names is None else len(names)
        problems.append(f"{count} class_names for {meta.num_classes} classes")
    if not (_is_int(meta.in_channels) and meta.in_channels >= 1):
        problems.append(f"in_channels {meta.in_channels!r}")
    if meta.input_mode not in INPUT_MODES:
        problems.append(f"input_mode {meta.input_mode!r} (one of {INPUT_MODES})")
    if meta.resampling not in RESAMPLING_MODES:
        problems.append(f"resampling {meta.resampling!r} (one of {RESAMPLING_MODES})")
    temperature = meta.temperature or 1.0  # 0 / null: uncalibrated
    if not (_is_number(temperature) and math.isfinite(temperature) and temperature > 0):
        problems.append(f"temperature {meta.temperature!r} (must be finite and > 0)")
    try:
        check_orientation(meta.orientation)
    except ValueError:
        problems.append(f"orientation {meta.orientation!r} (three axis codes such as 'RAS')")
    if not isinstance(meta.plane, str) or meta.plane not in PLANE_CODES:
        problems.append(f"plane {meta.plane!r} (one of {', '.join(PLANE_CODES)})")
    spacing = _spacing_problem(meta.spacing, meta.spatial_dims)
    if spacing:
        problems.append(spacing)
    problems += _context_problems(meta, spacing_ok=spacing is None)
    if meta.normalisation is not None:
        try:
            validate_normalisation(meta.normalisation)
        except (TypeError, ValueError) as exc:
            problems.append(str(exc))
    problems += _inference_problems(meta.inference)
    problems += _graph_problems(meta)
    problems += _weights_problems(meta)
    problems += _perturbation_problems(meta)
    if not isinstance(meta.quality, Mapping):
        problems.append(f"quality {meta.quality!r} (a dict, empty for no review flag)")
    elif meta.quality and not (_is_number(meta.quality.get("threshold"))
                               and math.isfinite(meta.quality["threshold"])):
        problems.append(f"quality.threshold {meta.quality.get('threshold')!r} (a number; "
                        "run `sfpc calibrate` again or empty 'quality')")
    return problems


def _graph_problems(meta: ModelMetadata) -> list[str]:
    if not isinstance(meta.graphs, Mapping):
        return [f"graphs {meta.graphs!r} (a dict of graph kind -> {{file, sha256}})"]
    problems = []
    for kind, entry in meta.graphs.items():
        if kind not in GRAPH_KINDS:
            problems.append(f"graphs.{kind} (graph kinds are {', '.join(GRAPH_KINDS)})")
        elif not isinstance(entry, Mapping) or not isinstance(entry.get("file"), str):
            problems.append(f"graphs.{kind} {entry!r} (needs 'file' and 'sha256')")
    return problems


def _weights_problems(meta: ModelMetadata) -> list[str]:
    weights = meta.weights
    if not isinstance(weights, Mapping):
        return [f"weights {weights!r} (a dict {{file, sha256}}, empty for inline weights)"]
    if not weights:
        return []
    file = weights.get("file")
    if not isinstance(file, str) or not file or Path(file).name != file or file in (".", ".."):
        return [f"weights.file {file!r} (the name of a file in the export directory)"]
    return []


def _perturbation_problems(meta: ModelMetadata) -> list[str]:
    perturbation = meta.perturbation
    if not isinstance(perturbation, Mapping):
        return [f"perturbation {perturbation!r} (a dict)"]
    m = perturbation.get("M") or 0
    if not (_is_int(m) and m >= 0):
        return [f"perturbation.M {m!r} (an integer >= 0)"]
    if isinstance(meta.graphs, Mapping) and UNCERTAINTY_GRAPH in meta.graphs and m < 1:
        return [f"perturbation.M {m!r}: the uncertainty graph averages M >= 1 perturbed "
                "predictions"]
    return []


def check_servable(meta: ModelMetadata) -> ModelMetadata:
    """``meta`` when it can be served; ValueError listing every problem otherwise."""
    problems = metadata_problems(meta)
    if problems:
        raise ValueError(f"model metadata of {meta.name!r} is not servable: "
                         f"{'; '.join(problems)}")
    return meta


def load_metadata(path: str | Path, *, require_graphs: bool = True) -> ModelMetadata:
    """The metadata of an export directory (or of its ``sfpc_model.json``), read once and checked
    once; :class:`BackendError` saying how to fix the export otherwise.

    ``require_graphs`` (default) also asks for the 'seg' graph entry: a model served by Triton
    keeps its graphs on the server, and its directory may hold the metadata alone.
    """
    path = Path(path)
    file = path / METADATA_FILE if path.is_dir() else path
    if not file.is_file():
        raise BackendError(
            f"{file} not found: point at a directory written by `sfpc export` (it holds "
            f"seg.onnx, seg_uncertainty.onnx, their weights.bin and {METADATA_FILE})"
        )
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BackendError(f"{file} is not valid JSON ({exc}); re-export the model "
                           "with `sfpc export`") from exc
    if not isinstance(raw, dict):
        raise BackendError(f"{file} holds a JSON {type(raw).__name__}, not an object; "
                           "re-export the model with `sfpc export`")
    missing = [key for key in REQUIRED_KEYS if key not in raw]
    if missing:
        raise BackendError(f"{file} lacks the keys {missing}; re-export the model "
                           "with `sfpc export`")
    try:
        meta = ModelMetadata.from_dict(raw)
    except ValueError as exc:
        raise BackendError(f"{file} does not match this version of sfpc: {exc}") from exc
    problems = metadata_problems(meta)
    if require_graphs and isinstance(meta.graphs, Mapping) and SEG_GRAPH not in meta.graphs:
        problems.append(f"no '{SEG_GRAPH}' graph under 'graphs'")
    if problems:
        raise BackendError(f"{file} describes a model that cannot be served: "
                           f"{'; '.join(problems)}. Correct these fields or re-export the "
                           "model with `sfpc export`")
    return meta


# ----------------------------------------------------------------------------------------------
# Graph files and their checksums
# ----------------------------------------------------------------------------------------------


def sha256_bytes(data: bytes) -> str:
    """Hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def graph_path(export_dir: str | Path, meta: ModelMetadata, kind: str) -> Path:
    """Where graph ``kind`` lives; BackendError when it was not exported or is missing."""
    if kind not in GRAPH_KINDS:
        raise ValueError(f"graph kind must be one of {GRAPH_KINDS}, not {kind!r}")
    entry = meta.graphs.get(kind)
    if entry is None:
        raise BackendError(f"the export in {export_dir} has no '{kind}' graph under 'graphs' "
                           f"in {METADATA_FILE}; re-export the model")
    path = Path(export_dir) / entry["file"]
    if not path.is_file():
        raise BackendError(f"graph file {path} listed in {METADATA_FILE} is missing; copy the "
                           "whole export directory")
    return path


def _check_digest(path: Path, actual: str, expected: Any) -> None:
    if not expected:
        raise BackendError(
            f"{METADATA_FILE} records no sha256 for {path.name}; re-export the model so the "
            "file can be verified before it is served"
        )
    if actual != str(expected).lower():
        raise BackendError(
            f"checksum mismatch for {path}: sha256 {actual} but {METADATA_FILE} records "
            f"{expected}. The file was modified or copied incompletely; re-export or re-copy "
            "the whole export directory"
        )


def read_graph_bytes(export_dir: str | Path, meta: ModelMetadata, kind: str) -> bytes:
    """Bytes of graph ``kind``, verified against the SHA-256 recorded at export time.

    Hashing the same bytes that are then loaded means a file swapped between check and load
    cannot slip through.
    """
    path = graph_path(export_dir, meta, kind)
    data = path.read_bytes()
    _check_digest(path, sha256_bytes(data), meta.graphs[kind].get("sha256"))
    return data


def verify_graph_file(export_dir: str | Path, meta: ModelMetadata, kind: str) -> Path:
    """Path of graph ``kind`` after checking its SHA-256 (streamed, for copying large graphs)."""
    path = graph_path(export_dir, meta, kind)
    _check_digest(path, sha256_file(path), meta.graphs[kind].get("sha256"))
    return path


def weights_path(export_dir: str | Path, meta: ModelMetadata) -> Path | None:
    """Where the graphs' shared weights file lives (None: the graphs carry their own weights);
    BackendError when the metadata names one that is missing."""
    if not meta.weights:
        return None
    path = Path(export_dir) / meta.weights["file"]
    if not path.is_file():
        raise BackendError(f"weights file {path} listed in {METADATA_FILE} is missing; copy the "
                           "whole export directory")
    return path


def read_weights_bytes(export_dir: str | Path, meta: ModelMetadata) -> tuple[str, bytes] | None:
    """The shared weights file's name (as the graphs' external data locations give it) and its
    bytes, verified against the recorded SHA-256; None when the graphs carry their own weights.
    """
    path = weights_path(export_dir, meta)
    if path is None:
        return None
    data = path.read_bytes()
    _check_digest(path, sha256_bytes(data), meta.weights.get("sha256"))
    return path.name, data


def verify_weights_file(export_dir: str | Path, meta: ModelMetadata) -> Path | None:
    """Path of the shared weights file after checking its SHA-256 (streamed); None when the
    graphs carry their own weights."""
    path = weights_path(export_dir, meta)
    if path is not None:
        _check_digest(path, sha256_file(path), meta.weights.get("sha256"))
    return path


# The embedded default model (`sfpc serve` and `sfpc predict` without --model), shipped as package
# data of `sfpc` so that a wheel carries it.
DEFAULT_MODEL_DIR = Path(__file__).resolve().parents[1] / "default_model"
