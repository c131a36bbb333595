"""Read an SFPC export directory: `sfpc_model.json` and its checksummed ONNX graphs.

Free of torch and onnx so that the serving side (ONNX Runtime or a Triton client) can use it.
Errors are BackendErrors whose messages say how to fix the export.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from sfpc.errors import BackendError
from sfpc.inference.contract import METADATA_FILE, ModelMetadata, sha256_file

__all__ = [
    "METADATA_FILE",
    "graph_entry",
    "graph_path",
    "read_export_metadata",
    "read_graph_bytes",
    "sha256_bytes",
    "sha256_file",
    "verify_graph_file",
]

GRAPH_KINDS = ("seg", "uncertainty")
_REQUIRED_KEYS = ("spatial_dims", "in_channels", "num_classes", "graphs")


def sha256_bytes(data: bytes) -> str:
    """Hex SHA-256 of `data`."""
    return hashlib.sha256(data).hexdigest()


def read_export_metadata(export_dir: str | Path) -> dict[str, Any]:
    """Load and sanity-check `sfpc_model.json` of an export directory."""
    path = Path(export_dir) / METADATA_FILE
    if not path.is_file():
        raise BackendError(
            f"{path} not found: point the backend at a directory written by the SFPC exporter "
            "(it holds seg.onnx, seg_uncertainty.onnx and sfpc_model.json)"
        )
    try:
        metadata = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise BackendError(f"{path} is not valid JSON ({exc}); re-export the model") from exc
    # Checked on the raw file: ModelMetadata would fill a missing key with its default.
    missing = [key for key in _REQUIRED_KEYS if key not in metadata]
    if missing:
        raise BackendError(f"{path} lacks the keys {missing}; re-export the model")
    try:
        metadata = ModelMetadata.from_dict(metadata).to_dict()
    except (TypeError, ValueError) as exc:
        raise BackendError(f"{path} does not match this version of sfpc: {exc}") from exc
    if "seg" not in metadata["graphs"]:
        raise BackendError(f"{path} names no 'seg' graph under 'graphs'; re-export the model")
    return metadata


def graph_entry(metadata: dict[str, Any], kind: str) -> dict[str, Any] | None:
    """The metadata entry of graph `kind` ('seg' or 'uncertainty'), or None if not exported."""
    if kind not in GRAPH_KINDS:
        raise ValueError(f"graph kind must be one of {GRAPH_KINDS}, not {kind!r}")
    return metadata["graphs"].get(kind)


def graph_path(export_dir: str | Path, metadata: dict[str, Any], kind: str) -> Path:
    """Where graph `kind` lives; raises BackendError when it was not exported or is missing."""
    entry = graph_entry(metadata, kind)
    if entry is None:
        raise BackendError(f"the export in {export_dir} has no '{kind}' graph; re-export it")
    path = Path(export_dir) / entry["file"]
    if not path.is_file():
        raise BackendError(f"graph file {path} listed in {METADATA_FILE} is missing")
    return path


def _check_digest(path: Path, actual: str, metadata: dict[str, Any], kind: str) -> None:
    expected = metadata["graphs"][kind].get("sha256")
    if not expected:
        raise BackendError(
            f"{METADATA_FILE} records no sha256 for {path.name}; re-export the model so the "
            "graph can be verified before it is served"
        )
    if actual != str(expected).lower():
        raise BackendError(
            f"checksum mismatch for {path}: sha256 {actual} but {METADATA_FILE} records "
            f"{expected}. The file was modified or copied incompletely; re-export or re-copy "
            "the whole export directory"
        )


def read_graph_bytes(export_dir: str | Path, metadata: dict[str, Any], kind: str) -> bytes:
    """Bytes of graph `kind`, verified against the SHA-256 recorded at export time.

    Hashing the same bytes that are then loaded means a file swapped between check and load
    cannot slip through.
    """
    path = graph_path(export_dir, metadata, kind)
    data = path.read_bytes()
    _check_digest(path, sha256_bytes(data), metadata, kind)
    return data


def verify_graph_file(export_dir: str | Path, metadata: dict[str, Any], kind: str) -> Path:
    """Path of graph `kind` after checking its SHA-256 (streamed, for copying large graphs)."""
    path = graph_path(export_dir, metadata, kind)
    _check_digest(path, sha256_file(path), metadata, kind)
    return path
