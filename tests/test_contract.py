"""The model contract: the plane -> axis rule, the one metadata loader and its errors, and the
registry handing one parsed metadata object to backend and engine.

Oracles: axes worked out by hand from the axis codes (and the RAS table training always used:
sagittal 0, coronal 1, axial 2); metadata files written here with json and edited by hand.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sfpc.errors import BackendError
from sfpc.inference.contract import (
    METADATA_FILE,
    ModelMetadata,
    check_servable,
    load_metadata,
    plane_axis,
)


@pytest.mark.parametrize("plane,orientation,axis", [
    # RAS, the grid training always uses: the table training read before (PLANE_AXIS).
    ("sagittal", "RAS", 0), ("coronal", "RAS", 1), ("axial", "RAS", 2),
    ("axial", "LPS", 2), ("coronal", "LPS", 1),
    # S/I first: axial slices are normal to axis 0; P along axis 2 makes coronal slices axis 2.
    ("axial", "SLP", 0), ("sagittal", "SLP", 1), ("coronal", "SLP", 2),
    ("sagittal", "AIR", 2), ("axial", "AIR", 1),
])
def test_plane_axis_honours_orientation(plane: str, orientation: str, axis: int) -> None:
    assert plane_axis(plane, orientation) == axis
    meta = ModelMetadata(plane=plane, orientation=orientation)
    assert meta.plane_axis == axis


def test_training_resample_axes_are_the_ras_ones() -> None:
    pytest.importorskip("torch")
    from sfpc.training.config import TrainConfig
    from sfpc.training.datamodule import resample_axes

    # In-plane axes of each plane in RAS, by hand.
    expected = {"axial": (0, 1), "coronal": (0, 2), "sagittal": (1, 2)}
    for plane, axes in expected.items():
        assert resample_axes(TrainConfig(spatial_dims=2, plane=plane)) == axes
    assert resample_axes(TrainConfig(spatial_dims=3)) is None


@pytest.mark.parametrize("plane,orientation", [("oblique", "RAS"), ("axial", "RAA"),
                                               ("axial", "ras"), ("axial", "RASL")])
def test_plane_axis_refuses_unknown_planes_and_orientations(plane: str, orientation: str) -> None:
    with pytest.raises(ValueError):
        plane_axis(plane, orientation)


def _write(folder: Path, **changes: object) -> Path:
    raw = ModelMetadata(name="m", spatial_dims=3, num_classes=3, patch_size=[16, 16, 16],
                        class_names=["bg", "a", "b"],
                        graphs={"seg": {"file": "seg.onnx", "sha256": "0" * 64}}).to_dict()
    for key, value in changes.items():
        if value is None:
            raw.pop(key)
        else:
            raw[key] = value
    (folder / METADATA_FILE).write_text(json.dumps(raw))
    return folder


def test_load_reads_a_valid_export_and_its_file(tmp_path: Path) -> None:
    meta = load_metadata(_write(tmp_path))
    assert (meta.name, meta.spatial_dims, meta.patch_size) == ("m", 3, [16, 16, 16])
    assert load_metadata(tmp_path / METADATA_FILE) == meta
    assert ModelMetadata.load(tmp_path) == meta


@pytest.mark.parametrize("changes,words", [
    ({"spatial_dims": None}, r"lacks the keys \['spatial_dims'\]"),
    ({"colour": "red"}, r"unknown metadata fields \['colour'\]"),
    ({"class_names": ["bg"]}, "1 class_names for 3 classes"),
    ({"patch_size": [16, 16]}, r"patch_size \[16, 16\] for a 3D model"),
    ({"orientation": "RAA"}, "orientation 'RAA'"),
    ({"plane": "oblique"}, "plane 'oblique'"),
    ({"resampling": "cubic"}, "resampling 'cubic'"),
    ({"spacing": [1.0, 0.0, 1.0]}, "spacing"),
    ({"normalisation": {"kind": "ct_window", "window": [5, 1]}}, "hi > lo"),
    ({"temperature": -1.0}, "temperature -1.0"),
    ({"graphs": {}}, "no 'seg' graph"),
    ({"graphs": {"seg": {"file": "seg.onnx"}, "uncertainty": {"file": "u.onnx"}},
      "perturbation": {"kind": "flpm", "M": 0}}, "perturbation.M 0"),
    ({"quality": {"measure": "boundary_uncertainty"}}, "quality.threshold None"),
    ({"inference": {"overlap": 1.0}}, r"inference.overlap 1.0 \(in \[0, 1\)\)"),
    ({"weights": {"file": "../weights.bin", "sha256": "0" * 64}},
     r"weights.file '../weights.bin' \(the name of a file in the export directory\)"),
    ({"weights": "weights.bin"}, r"weights 'weights.bin' \(a dict"),
])
def test_load_names_what_to_fix(tmp_path: Path, changes: dict, words: str) -> None:
    with pytest.raises(BackendError, match=words) as info:
        load_metadata(_write(tmp_path, **changes))
    assert str(tmp_path / METADATA_FILE) in str(info.value)


def test_weights_record_is_optional_and_checked(tmp_path: Path) -> None:
    """Metadata from before the shared weights file loads with no record (graphs carry their
    own weights); a recorded file is read only when its SHA-256 matches."""
    from sfpc.inference.contract import read_weights_bytes, sha256_bytes, verify_weights_file

    meta = load_metadata(_write(tmp_path, weights=None))
    assert meta.weights == {}
    assert read_weights_bytes(tmp_path, meta) is None
    assert verify_weights_file(tmp_path, meta) is None
    data = b"\1\2\3" * 100
    (tmp_path / "w.bin").write_bytes(data)
    meta = load_metadata(_write(tmp_path, weights={"file": "w.bin", "sha256": sha256_bytes(data)}))
    assert read_weights_bytes(tmp_path, meta) == ("w.bin", data)
    assert verify_weights_file(tmp_path, meta) == tmp_path / "w.bin"
    assert ModelMetadata.from_dict(meta.to_dict()) == meta
    (tmp_path / "w.bin").write_bytes(data[:-1])
    for read in (read_weights_bytes, verify_weights_file):
        with pytest.raises(BackendError, match=r"checksum mismatch for .*w\.bin"):
            read(tmp_path, meta)


def test_load_without_graphs_for_a_remote_model(tmp_path: Path) -> None:
    meta = load_metadata(_write(tmp_path, graphs={}), require_graphs=False)
    assert meta.graphs == {} and not meta.has_uncertainty


def test_load_refuses_files_that_are_not_metadata(tmp_path: Path) -> None:
    with pytest.raises(BackendError, match="sfpc_model.json not found"):
        load_metadata(tmp_path)
    (tmp_path / METADATA_FILE).write_text("{not json")
    with pytest.raises(BackendError, match="not valid JSON"):
        load_metadata(tmp_path)
    (tmp_path / METADATA_FILE).write_text("[1, 2]")
    with pytest.raises(BackendError, match="not an object"):
        load_metadata(tmp_path)


def test_servable_check_lists_every_problem() -> None:
    meta = ModelMetadata(num_classes=3, orientation="XYZ")
    with pytest.raises(ValueError, match="2 class_names for 3 classes; orientation 'XYZ'"):
        check_servable(meta)
    assert check_servable(ModelMetadata()) is not None


def test_registry_parses_once_and_shares_the_metadata(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from sfpc.inference.pipeline import ModelRegistry, RuntimeConfig
    from tests.support.models import export_fixture_model

    export_dir, _ = export_fixture_model(tmp_path / "export", patch_size=(16, 16, 16))
    registry = ModelRegistry(RuntimeConfig(model_dirs=[export_dir], onnx_intra_op_threads=1))
    try:
        model = registry.get()
        assert model.metadata == ModelMetadata.from_dict(
            json.loads((export_dir / METADATA_FILE).read_text()))
        # One object: the backend and the engine read what the registry loaded.
        assert model.backend.metadata is model.metadata  # type: ignore[attr-defined]
        assert model.engine.metadata is model.metadata
    finally:
        registry.close()


def test_maps_method_names_what_produces_the_maps() -> None:
    meta = ModelMetadata(graphs={"seg": {"file": "seg.onnx"},
                                 "uncertainty": {"file": "seg_uncertainty.onnx"}},
                         perturbation={"kind": "flpm", "M": 4, "tau": 0.1})
    # An export from before the field: the perturbation's kind names the method.
    assert meta.maps_method()["method"] == "flpm"
    assert meta.maps_method()["samples"] == 4 and meta.maps_method()["tau"] == 0.1
    meta.uncertainty_method = "ensemble"
    assert meta.maps_method()["method"] == "ensemble"
    assert ModelMetadata(graphs={"seg": {"file": "seg.onnx"}}).maps_method() is None
