"""The shipped default model: its files are what its metadata says, it still scores what its card
says on its validation slices, and `sfpc serve` with no --model serves it end to end."""

from __future__ import annotations

import gzip
import io
import json
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from sfpc.inference.contract import METADATA_FILE, ModelMetadata, sha256_file

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "sfpc" / "default_model"
ORGANS = REPO.parent / "shared" / "data" / "organs"
DICE_TOLERANCE = 0.01  # ONNX Runtime builds may differ in the last bits of a few voxels

needs_data = pytest.mark.skipif(not (ORGANS / "ct_a_image.nii.gz").exists(),
                                reason=f"{ORGANS} (the shared organ CTs) is not here")


@pytest.fixture(scope="module")
def meta() -> ModelMetadata:
    assert (MODEL / METADATA_FILE).is_file(), "the default model is not in sfpc/default_model"
    return ModelMetadata.load(MODEL)


def test_shipped_files_match_their_metadata(meta: ModelMetadata) -> None:
    import onnx

    assert set(meta.graphs) == {"seg", "uncertainty"}
    for graph in meta.graphs.values():
        assert sha256_file(MODEL / graph["file"]) == graph["sha256"], graph["file"]
    # The weights are stored once, in the file both graphs reference as external data.
    weights = meta.weights["file"]
    assert sha256_file(MODEL / weights) == meta.weights["sha256"]
    for graph in meta.graphs.values():
        model = onnx.load(str(MODEL / graph["file"]), load_external_data=False)
        locations = {entry.value for tensor in model.graph.initializer
                     for entry in tensor.external_data if entry.key == "location"}
        assert locations == {weights}, graph["file"]
    assert meta.class_names == ["background", "spleen", "liver", "stomach"]
    files = {p.name for p in MODEL.iterdir()}
    assert files == {METADATA_FILE, "MODEL_CARD.md", weights,
                     *(g["file"] for g in meta.graphs.values())}
    size = sum(p.stat().st_size for p in MODEL.iterdir())
    graphs = sum((MODEL / g["file"]).stat().st_size for g in meta.graphs.values())
    # The graphs without their weights are small; the weights once are what the model weighs.
    assert graphs < 0.02 * size and size < 1.05 * (MODEL / weights).stat().st_size
    assert size < 10e6, f"the shipped model is {size / 1e6:.1f} MB"
    card = (MODEL / "MODEL_CARD.md").read_text()
    for word in ("silver standard", "Apache-2.0", "spleen", "liver", "stomach"):
        assert word in card


@needs_data
def test_shipped_model_reaches_its_card_validation_dice(meta: ModelMetadata) -> None:
    from sfpc.training.default_model import validate_export

    measured = validate_export(MODEL, ORGANS)["metrics"]
    card = meta.metrics["validation"]
    for name in [*meta.class_names[1:], "mean"]:
        assert measured[name]["dice"] == pytest.approx(card[name]["dice"], abs=DICE_TOLERANCE), name


@needs_data
@pytest.mark.integration
def test_serve_with_no_model_segments_ct_with_uncertainty(tmp_path: Path) -> None:
    import httpx
    from PIL import Image

    from tests.support.server import GatewayServer

    source = ORGANS / "ct_a_image.nii.gz"
    image = nib.load(str(source))
    with GatewayServer([], tmp_path / "gateway.log") as server:
        models = httpx.get(f"{server.url}/v1/models", timeout=30).json()
        assert models["default"] == "sfpc-organs-ct"
        # trained without flips (they would swap liver and spleen): flip=true is refused
        assert models["models"][0]["flip"] is False
        with open(source, "rb") as f:
            refused = httpx.post(f"{server.url}/v1/segment", files={"file": (source.name, f)},
                                 params={"flip": "true"}, timeout=60)
        assert refused.status_code == 422, refused.text
        assert refused.json()["error"]["code"] == "flip_unavailable"
        assert "trained without flips" in refused.json()["error"]["message"]
        with open(source, "rb") as f:
            r = httpx.post(f"{server.url}/v1/segment", files={"file": (source.name, f)},
                           params={"outputs": "mask_nifti,entropy_nifti,overlay_png,report_json"},
                           timeout=300)
    assert r.status_code == 200, r.text
    z = zipfile.ZipFile(io.BytesIO(r.content))
    mask = nib.Nifti1Image.from_bytes(gzip.decompress(z.read("mask.nii.gz")))
    entropy = nib.Nifti1Image.from_bytes(gzip.decompress(z.read("entropy.nii.gz")))
    for out in (mask, entropy):
        assert out.shape == image.shape
        np.testing.assert_allclose(out.affine, image.affine, atol=1e-5)
    labels = np.asarray(mask.dataobj)
    assert set(np.unique(labels)) <= {0, 1, 2, 3} and (labels == 2).sum() > 1000  # a liver
    h = np.asarray(entropy.dataobj)
    assert 0 <= h.min() and h.max() <= 1 and h.max() > 0.1
    png = Image.open(io.BytesIO(z.read("overlay.png")))
    assert png.format == "PNG" and min(png.size) >= 256
    report = json.loads(z.read("report.json"))
    assert report["model"]["name"] == "sfpc-organs-ct"
    assert report["model"]["uncertainty_method"]["method"] == "flpm"
    assert report["model"]["uncertainty_method"]["samples"] == 4


def test_card_is_rendered_from_the_metadata_and_the_robustness_json(tmp_path: Path) -> None:
    import shutil

    from sfpc.training.default_model import render_card

    export = tmp_path / "export"
    shutil.copytree(MODEL, export)
    noisy = {"mean": 0.5, "spleen": 0.61, "liver": 0.72, "stomach": 0.17}
    clean = {"mean": 0.9, "spleen": 0.91, "liver": 0.92, "stomach": 0.87}
    rows = [{"shift": "noise 30HU", "dice": noisy, "review": {"review_recommended": True}},
            {"shift": "none", "dice": clean, "review": {"review_recommended": False}}]
    robustness = {"settings": {"command": "python benchmarks/robustness.py --json r.json"},
                  "shifts": rows, "ct_b": {"volumes_ml": {"spleen": 201.4, "liver": 1500.2,
                                                          "stomach": 90.0},
                                           "review": {"review_recommended": False}}}
    (tmp_path / "r.json").write_text(json.dumps(robustness))
    card = render_card(export, tmp_path / "r.json").read_text()
    meta = ModelMetadata.load(export)
    assert "| noise 30HU | 0.500 | 0.610 | 0.720 | 0.170 | fires |" in card
    assert "| none | 0.900 | 0.910 | 0.920 | 0.870 | silent |" in card
    assert "spleen 201 mL, liver 1500 mL, stomach 90 mL; review flag silent" in card
    assert "`python benchmarks/robustness.py --json r.json`" in card
    mean = meta.metrics["validation"]["mean"]["dice"]
    assert f"| mean | {mean:.3f} |" in card
    assert f"{meta.quality['threshold']:.4f}" in card
    without = render_card(export).read_text()
    assert "Not measured for this export" in without
