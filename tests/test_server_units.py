"""Gateway pieces without a server: settings sources, the loopback rule, API key comparison,
the overlay's display convention and slice choice, the service's output rules."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from sfpc.errors import OptionError
from sfpc.inference.options import SegmentOptions
from sfpc.io.overlay import _display, choose_slices, class_colour, render_overlay, zoom_box
from sfpc.server.security import keys_match
from sfpc.server.settings import Settings, is_loopback_host, load_settings


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    import os

    for key in list(os.environ):
        if key.startswith("SFPC_"):
            monkeypatch.delenv(key)


def test_settings_from_env_json_and_comma_lists(monkeypatch):
    monkeypatch.setenv("SFPC_CORS_ORIGINS", "https://a.org, https://b.org")
    monkeypatch.setenv("SFPC_API_KEYS", '["k1", "k 2"]')
    monkeypatch.setenv("SFPC_MODEL_DIRS", "/m/one,/m/two")
    monkeypatch.setenv("SFPC_CONCURRENCY", "3")
    s = Settings()
    assert s.cors_origins == ["https://a.org", "https://b.org"]
    assert s.key_values() == ["k1", "k 2"]
    assert [str(p) for p in s.model_dirs] == ["/m/one", "/m/two"]
    assert s.concurrency == 3
    assert "k1" not in s.model_dump_json()  # secrets never serialise in clear


@pytest.mark.parametrize("suffix", [".toml", ".json", ".yaml"])
def test_config_file_below_env_and_arguments(tmp_path, monkeypatch, suffix):
    if suffix == ".yaml":
        pytest.importorskip("yaml")
    values = {"port": 9001, "host": "10.0.0.5", "api_keys": ["from-file"],
              "request_timeout_s": 12.5}
    path = tmp_path / f"gateway{suffix}"
    if suffix == ".toml":
        path.write_text('port = 9001\nhost = "10.0.0.5"\napi_keys = ["from-file"]\n'
                        "request_timeout_s = 12.5\n")
    else:  # JSON is valid YAML
        path.write_text(json.dumps(values))
    monkeypatch.setenv("SFPC_PORT", "9002")
    s = load_settings(path, host="127.0.0.1")
    assert s.port == 9002  # environment over file
    assert s.host == "127.0.0.1"  # arguments over everything
    assert s.key_values() == ["from-file"] and s.request_timeout_s == 12.5
    with pytest.raises(FileNotFoundError):
        load_settings(tmp_path / "missing.toml")


@pytest.mark.parametrize("host,loopback", [
    ("127.0.0.1", True), ("127.1.2.3", True), ("::1", True), ("[::1]", True),
    ("localhost", True), ("0.0.0.0", False), ("::", False), ("192.168.1.10", False),
    ("gateway.hospital.org", False)])
def test_loopback_rule(host, loopback):
    assert is_loopback_host(host) is loopback
    settings = Settings(host=host)
    if loopback:
        settings.check_startable()
    else:
        with pytest.raises(ValueError, match="API keys"):
            settings.check_startable()
        Settings(host=host, api_keys=["a-key"]).check_startable()


def test_keys_match_exactly():
    assert keys_match("abc", ["x", "abc"])
    assert not keys_match("abc ", ["abc"]) and not keys_match("ab", ["abc"])
    assert not keys_match("anything", [])
    assert keys_match("clé-ü", ["clé-ü"])


def test_output_rules():
    assert SegmentOptions().resolve_outputs("nifti") == ["mask_nifti"]
    assert SegmentOptions().resolve_outputs("dicom") == ["seg_dicom"]
    assert SegmentOptions(uncertainty=True).resolve_outputs("nifti") == [
        "mask_nifti", "entropy_nifti", "mi_nifti", "report_json"]
    assert SegmentOptions(outputs=["mi_nifti"]).wants_uncertainty()
    assert not SegmentOptions(outputs=["overlay_png"]).wants_uncertainty()
    assert SegmentOptions(outputs=["report_json"], format="nifti").resolve_outputs("nifti") == [
        "mask_nifti", "report_json"]
    with pytest.raises(OptionError) as info:
        SegmentOptions(format="dicom-seg").resolve_outputs("nifti")
    assert info.value.status == 422 and info.value.code == "seg_needs_dicom"
    with pytest.raises(ValueError):
        SegmentOptions(outputs=[])


# ----------------------------------------------------------------------------------------------
# Overlay
# ----------------------------------------------------------------------------------------------


def test_display_is_radiological():
    # RAS slice (x, y): x grows to the patient's right, y to anterior. On screen the patient's
    # right is on the viewer's left and anterior is up.
    s = np.zeros((5, 4))
    s[4, 3] = 1  # right-most, anterior-most voxel
    s[0, 0] = 2  # left-most, posterior-most voxel
    shown = _display(s)
    assert shown.shape == (4, 5)
    assert shown[0, 0] == 1 and shown[-1, -1] == 2


def test_choose_slices_spans_the_structure():
    mask = np.zeros((4, 4, 50), np.uint8)
    mask[1, 1, 20:31] = 1
    picks, found = choose_slices(mask, 6)
    assert found and picks[0] == 20 and picks[-1] == 30 and len(picks) == 6
    picks, found = choose_slices(np.zeros((4, 4, 9), np.uint8), 12)
    assert not found and picks == list(range(9))


def test_zoom_box_only_for_small_structures():
    mask = np.zeros((200, 200, 3), np.uint8)
    mask[100:106, 50:58, 1] = 1
    box = zoom_box(mask, (1.0, 1.0))
    assert box is not None
    (bx, by) = box
    assert bx.start <= 100 and bx.stop >= 106 and by.start <= 50 and by.stop >= 58
    assert (bx.stop - bx.start) == pytest.approx(by.stop - by.start, abs=1)  # square in mm
    mask[10:190, 10:190, 1] = 1
    assert zoom_box(mask, (1.0, 1.0)) is None


def test_overlay_draws_outlines_heat_and_legend():
    from PIL import Image

    image = np.random.default_rng(0).normal(size=(48, 40, 12)).astype(np.float32)
    mask = np.zeros(image.shape, np.uint8)
    mask[10:30, 10:25, 3:9] = 1
    mask[32:40, 20:30, 4:7] = 2
    heat = np.zeros(image.shape, np.float32)
    heat[5:20, 5:20] = 0.9
    affine = np.diag([-1.5, -1.5, 3.0, 1.0])  # LPS voxel order
    def draw(uncertainty):
        png = render_overlay(image, affine, mask, ["bg", "tumour", "oedema"],
                             uncertainty=uncertainty, volumes_ml={"tumour": 12.5, "oedema": 3.0},
                             title="test")
        return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)

    with_heat, without = draw(heat), draw(None)
    colours = {tuple(c) for c in with_heat.reshape(-1, 3)}
    assert class_colour(1) in colours and class_colour(2) in colours

    def warm(picture):  # red-yellow tint over grey: red well above blue
        return int(np.count_nonzero(picture[..., 0] - picture[..., 2] > 60))

    # The heat map tints 15 x 15 voxels on each of 12 slices; without it only the colour bar's
    # absence and grey tiles remain.
    assert warm(with_heat) > warm(without) + 1000


def _outlines_by_morphology(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Oracle: per class, the inside boundary (binary erosion with the cross, image edge
    outside) grown by one pixel (binary dilation with the cross), drawn in class order."""
    from scipy import ndimage

    out = np.zeros(labels.shape, np.uint8)
    for k in range(1, num_classes):
        inside = labels == k
        edge = inside & ~ndimage.binary_erosion(inside, border_value=0)
        out[ndimage.binary_dilation(edge, iterations=1)] = k
    return out


@pytest.mark.parametrize("num_classes", [2, 4, 9])
def test_outlines_equal_erosion_and_dilation_per_class(num_classes):
    from sfpc.io.overlay import outline_labels

    rng = np.random.default_rng(num_classes)
    for shape in [(1, 1), (1, 9), (7, 1), (3, 3), (60, 45)]:
        # Noise (every pixel a boundary), blobs, and labels beyond the classes (not drawn).
        noise = rng.integers(0, num_classes + 2, size=shape).astype(np.uint8)
        blobs = np.zeros(shape, np.uint8)
        blobs[shape[0] // 4: 3 * shape[0] // 4 + 1, shape[1] // 3:] = 1
        blobs[shape[0] // 2:, : shape[1] // 2 + 1] = num_classes - 1
        for labels in (noise, blobs):
            np.testing.assert_array_equal(outline_labels(labels, num_classes),
                                          _outlines_by_morphology(labels, num_classes))


def test_tile_blends_heat_where_it_shows_and_draws_outlines():
    """A tile against the blend worked on the whole float image: grey, heat blended with
    alpha ramping from HEAT_FLOOR to HEAT_FULL, outlines on top, truncated to uint8."""
    from PIL import Image

    from sfpc.io.overlay import (
        HEAT_ALPHA,
        HEAT_FLOOR,
        HEAT_FULL,
        HEAT_LUT,
        _palette,
        _render_tile,
    )

    rng = np.random.default_rng(5)
    grey = rng.integers(0, 256, size=(80, 70), dtype=np.uint8)
    heat = np.clip(rng.normal(0.1, 0.2, size=(80, 70)), 0, 1).astype(np.float32)
    heat[:10] = HEAT_FLOOR  # exactly at the floor: transparent
    labels = np.zeros((80, 70), np.uint8)
    labels[20:50, 10:40] = 1
    labels[40:70, 30:60] = 2
    size = (50, 57)
    tile = _render_tile(grey, labels, heat, size, 3)
    assert tile.shape == (57, 50, 3) and tile.dtype == np.uint8

    g = np.asarray(Image.fromarray(grey).resize(size, Image.Resampling.BILINEAR), np.float32)
    h = np.clip(np.asarray(Image.fromarray(heat, mode="F").resize(
        size, Image.Resampling.BILINEAR)), 0, 1)
    alpha = np.clip((h - HEAT_FLOOR) / (HEAT_FULL - HEAT_FLOOR), 0, 1) * HEAT_ALPHA
    rgb = (g[..., None] * (1 - alpha[..., None])
           + HEAT_LUT[(h * 255).astype(np.uint8)].astype(np.float32) * alpha[..., None])
    lab = np.asarray(Image.fromarray(labels).resize(size, Image.Resampling.NEAREST))
    lines = _outlines_by_morphology(lab, 3)
    rgb[lines > 0] = _palette(3)[lines[lines > 0]]
    expected = np.clip(rgb, 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(tile, expected)
    assert (lines > 0).any() and (alpha > 0).any() and (alpha == 0).any()
    # Without heat: grey and outlines only.
    plain = _render_tile(grey, labels, None, size, 3)
    grey_only = np.repeat(g.astype(np.uint8)[..., None], 3, axis=2)
    np.testing.assert_array_equal(plain[lines == 0], grey_only[lines == 0])


# ----------------------------------------------------------------------------------------------
# Readiness with an unreachable Triton (in process: no Triton server is needed to be absent)
# ----------------------------------------------------------------------------------------------


def test_unreachable_triton_is_not_ready_and_answers_503(tmp_path):
    pytest.importorskip("tritonclient.grpc")
    import gzip
    import socket

    import nibabel as nib
    from fastapi.testclient import TestClient

    from sfpc.inference.contract import ModelMetadata
    from sfpc.server.app import create_app

    # The Triton backend reads only the metadata here; the graphs live on the (absent) server.
    ModelMetadata(name="remote", spatial_dims=3, num_classes=2, patch_size=[16, 16, 16],
                  class_names=["background", "organ"]).save(tmp_path)
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    settings = Settings(model_dirs=[tmp_path], backend="triton",
                        triton_url=f"127.0.0.1:{port}", triton_timeout_s=2.0,
                        data_dir=tmp_path / "jobs")
    with TestClient(create_app(settings)) as client:
        assert client.get("/healthz").status_code == 200
        ready = client.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["error"]["detail"]["models"] == {"remote": False}
        volume = np.random.default_rng(0).normal(size=(8, 8, 8)).astype(np.float32)
        upload = gzip.compress(nib.Nifti1Image(volume, np.eye(4)).to_bytes())
        response = client.post("/v1/segment", files={"file": ("v.nii.gz", upload)})
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "backend_unavailable"
        assert response.headers["retry-after"]


@pytest.mark.parametrize("field,value", [("xyzt_units", 120), ("sform_code", 200),
                                         ("qform_code", 77), ("intent_code", 9999),
                                         ("slice_code", 250), ("scl_slope", np.nan),
                                         ("dim_info", 255)])
def test_mask_nifti_survives_odd_header_fields(field, value):
    """Found by the fuzz test: header fields a reader tolerates must not break the writer, and
    the mask keeps the upload's affine (as nibabel reads it)."""
    import gzip

    import nibabel as nib

    from sfpc.io.artefacts import nifti_bytes

    upload = nib.Nifti1Image(np.zeros((4, 5, 6), np.int16), np.diag([1.5, 2.0, 3.0, 1.0]))
    upload.header[field] = value
    read = nib.Nifti1Image.from_bytes(upload.to_bytes())
    mask = np.zeros((4, 5, 6), np.uint8)
    mask[1, 2, 3] = 1
    out = nib.Nifti1Image.from_bytes(gzip.decompress(nifti_bytes(mask, read.affine, read.header)))
    assert np.array_equal(out.affine, read.affine)
    assert np.array_equal(np.asarray(out.dataobj), mask)


def test_upload_endpoints_document_exactly_the_segment_options():
    """/v1/segment and /v1/jobs take SegmentOptions' fields, no more and no fewer, both as
    query parameters and as form fields, with the schema's choices (oracle: the field list and
    the artefact names written out by hand)."""
    from fastapi import FastAPI

    from sfpc.server.routers import jobs, segment

    app = FastAPI()
    app.include_router(segment.router)
    app.include_router(jobs.router)
    spec = app.openapi()
    fields = ["model", "outputs", "uncertainty", "flip", "series_uid", "map_precision", "format"]
    assert list(SegmentOptions.model_fields) == fields
    for path in ("/v1/segment", "/v1/jobs"):
        operation = spec["paths"][path]["post"]
        assert [p["name"] for p in operation["parameters"] if p["in"] == "query"] == fields
        body = operation["requestBody"]["content"]["multipart/form-data"]["schema"]
        assert list(body["properties"]) == ["file", *fields]
        assert body["required"] == ["file"] and body["additionalProperties"] is False
        properties = body["properties"]
        assert properties["outputs"]["items"]["enum"] == [
            "mask_nifti", "seg_dicom", "entropy_nifti", "mi_nifti", "overlay_png", "report_json",
            "pmap_dicom", "sr_dicom", "sc_dicom", "rtstruct_dicom"]
        assert properties["format"]["enum"] == ["auto", "nifti", "dicom-seg", "zip"]
        assert properties["model"]["maxLength"] == 200
        assert properties["series_uid"]["maxLength"] == 64
        assert properties["uncertainty"]["type"] == properties["flip"]["type"] == "boolean"


def test_option_text_parses_alike_from_query_form_and_command_line():
    import argparse

    from sfpc.inference.options import add_option_arguments, options_from_args, parse_options

    expected = SegmentOptions(outputs=["mask_nifti", "entropy_nifti", "report_json"],
                              uncertainty=True, flip=False, series_uid="1.2.3", format="zip")
    query = {"outputs": ["mask_nifti,entropy_nifti", "report_json"], "uncertainty": True,
             "series_uid": "1.2.3", "format": "zip"}
    form = {"outputs": ["mask_nifti", "entropy_nifti,report_json"], "uncertainty": ["yes"],
            "flip": ["off"], "series_uid": ["1.2.3"], "format": ["zip"]}
    parser = argparse.ArgumentParser()
    add_option_arguments(parser)
    args = parser.parse_args(["--outputs", "mask_nifti,entropy_nifti", "report_json",
                              "--uncertainty", "--series-uid", "1.2.3", "--format", "zip"])
    for raw in (query, form, options_from_args(args)):
        assert parse_options(raw) == expected
    with pytest.raises(OptionError) as info:
        parse_options({"uncertainty": "maybe"})
    assert info.value.code == "invalid_option"
    with pytest.raises(OptionError) as info:
        parse_options({"format": "tiff", "colour": "red"})
    assert {p["field"] for p in info.value.detail} == {"format", "colour"}


def test_an_uncertainty_request_restores_only_the_maps_its_outputs_draw_on() -> None:
    from sfpc.inference.pipeline import maps_needed

    assert maps_needed(["mask_nifti", "report_json"]) == set()
    assert maps_needed(["entropy_nifti", "overlay_png", "report_json"]) == {"entropy"}
    assert maps_needed(["mi_nifti"]) == {"mutual_information"}
    assert maps_needed(["seg_dicom", "pmap_dicom", "mi_nifti"]) == {"entropy",
                                                                    "mutual_information"}


def test_overlay_slices_and_window_of_a_reoriented_view() -> None:
    """A NIfTI upload reaches the overlay as a reoriented (non-contiguous) view: the slices and
    the grey window taken from it equal those of its contiguous copy (a full np.percentile)."""
    from sfpc.io.overlay import _window

    rng = np.random.default_rng(3)
    mask = np.zeros((40, 30, 50), np.uint8, order="F")
    mask[5:20, 3:9, 12:31] = 2
    view = mask[::-1, :, ::-1].transpose(1, 0, 2)
    assert not view.flags.c_contiguous and not view.flags.f_contiguous
    assert choose_slices(view, 6) == choose_slices(np.ascontiguousarray(view), 6)
    # Slices 12..30 of 50, reversed: 19..37, six spread evenly (np.linspace rounded).
    assert choose_slices(view, 6)[0] == [19, 23, 26, 30, 33, 37]
    image = rng.normal(40.0, 300.0, size=(300, 200, 80)).astype(np.float32)
    lo, hi = _window(image[::-1].transpose(2, 1, 0))
    exact = np.percentile(image, [0.5, 99.5])
    assert lo == pytest.approx(exact[0], abs=15.0) and hi == pytest.approx(exact[1], abs=15.0)
