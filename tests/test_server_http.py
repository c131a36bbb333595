"""The gateway over real HTTP: a uvicorn process on 127.0.0.1 serving two small real models.

Oracles: nibabel (the returned NIfTI's shape, affine and header codes against the upload's),
nibabel's orientation transforms (a reoriented upload gives the same mask, reoriented), numpy
sums over the returned files (report volumes and means), entropy >= mutual information (the
identity H(p_bar) - MI = mean_m H(p_m) >= 0), Pillow (the PNG decodes), highdicom / pydicom (the
SEG references the source series), SimpleITK's ImageSeriesReader (DICOM geometry).
"""

from __future__ import annotations

import gzip
import io
import json
import socket
import sys
import threading
import time
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tests.support.models import tiny_models
from tests.support.paths import DATA, DATA_MISSING, DICOM_SERIES, NIFTI_IMAGES, TRANSFER_SYNTAXES
from tests.support.server import GatewayServer, nifti_upload

httpx = pytest.importorskip("httpx")
# Real gateway processes (uvicorn via `sfpc serve`): not in `make test-fast`.
pytestmark = pytest.mark.integration

needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=DATA_MISSING)
KEYS = ["test-key-one", "second key"]
ORIGIN = "https://viewer.example.org"


# ----------------------------------------------------------------------------------------------
# Fixtures
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    return tiny_models(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def spool(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("spool")


@pytest.fixture(scope="module")
def server(models, spool, tmp_path_factory):
    # Every upload is spooled to disk (threshold 0), so the clean-up paths are exercised.
    env = {"SFPC_TEMP_DIR": str(spool), "SFPC_SPOOL_MEMORY_BYTES": "0",
           "SFPC_DATA_DIR": str(tmp_path_factory.mktemp("data"))}
    log = tmp_path_factory.mktemp("log") / "gateway.log"
    with GatewayServer([models["tiny3d"], models["tiny2d"]], log, env=env) as srv:
        yield srv


@pytest.fixture(scope="module")
def secured(models, tmp_path_factory):
    env = {"SFPC_API_KEYS": json.dumps(KEYS), "SFPC_MAX_UPLOAD_BYTES": "300000",
           "SFPC_REQUEST_TIMEOUT_S": "0.1", "SFPC_CORS_ORIGINS": json.dumps([ORIGIN]),
           "SFPC_DATA_DIR": str(tmp_path_factory.mktemp("data_secured"))}
    log = tmp_path_factory.mktemp("log_secured") / "gateway.log"
    with GatewayServer([models["tiny3d"]], log, env=env) as srv:
        yield srv


def post(srv: GatewayServer, files, params=None, headers=None, timeout: float = 120.0):
    return httpx.post(f"{srv.url}/v1/segment", files=files, params=params, headers=headers,
                      timeout=timeout)


def upload_file(path: Path) -> list[tuple[str, tuple[str, bytes]]]:
    return [("file", (path.name, path.read_bytes()))]


def read_nifti(data: bytes) -> nib.Nifti1Image:
    raw = gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data
    return nib.Nifti1Image.from_bytes(raw) if raw[344:347] in (b"n+1",) else \
        nib.Nifti2Image.from_bytes(raw)


def assert_error(response, status: int | None = None) -> dict:
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:500])
    if status is not None:
        assert response.status_code == status, response.text[:500]
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert error["code"] and error["message"], error
    assert error["request_id"] == response.headers["x-request-id"]
    return error


def metric(srv: GatewayServer, name: str) -> float:
    """The value of one sample, ``name`` being its full key (with labels, if any)."""
    text = httpx.get(f"{srv.url}/metrics", timeout=10).text
    for line in text.splitlines():
        key, _, value = line.rpartition(" ")
        if key == name:
            return float(value)
    raise AssertionError(f"{name} not in /metrics")


def wait_until(condition, timeout: float = 30.0, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(step)
    return False


# ----------------------------------------------------------------------------------------------
# Operations
# ----------------------------------------------------------------------------------------------


def test_health_ready_models(server):
    assert httpx.get(f"{server.url}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{server.url}/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready", "models": {"tiny3d": True, "tiny2d": True}}
    listing = httpx.get(f"{server.url}/v1/models").json()
    assert listing["default"] == "tiny3d"
    by_name = {m["name"]: m for m in listing["models"]}
    assert set(by_name) == {"tiny3d", "tiny2d"}
    assert by_name["tiny3d"]["spatial_dims"] == 3 and by_name["tiny3d"]["uncertainty"]
    assert by_name["tiny3d"]["uncertainty_method"]["method"] == "flpm"
    assert by_name["tiny3d"]["image_channels"] == by_name["tiny3d"]["in_channels"]
    assert by_name["tiny3d"]["context_slices"] == 0
    one = httpx.get(f"{server.url}/v1/models/tiny2d").json()
    assert one["class_names"] == ["background", "structure1", "structure2"]
    assert "export_dir" not in one  # no server paths leak
    assert_error(httpx.get(f"{server.url}/v1/models/nope"), 404)
    assert_error(httpx.get(f"{server.url}/no/such/endpoint"), 404)
    assert_error(httpx.delete(f"{server.url}/healthz"), 405)
    schema = httpx.get(f"{server.url}/openapi.json").json()
    body = schema["paths"]["/v1/segment"]["post"]["requestBody"]
    assert "multipart/form-data" in body["content"]


@needs_data
def test_metrics_count_requests_stages_and_errors(server):
    path = DATA / "lesions" / "breast1_image.nii.gz"
    assert post(server, upload_file(path)).status_code == 200
    assert_error(post(server, [("file", ("x.bin", b"not an image"))]))
    text = httpx.get(f"{server.url}/metrics").text
    assert 'sfpc_http_requests_total{method="POST",route="/v1/segment",status="200"}' in text
    for stage in ("decode", "preprocess", "inference", "postprocess", "encode"):
        assert f'sfpc_stage_duration_seconds_count{{stage="{stage}"}}' in text
    assert 'sfpc_errors_total{code="unsupported_format",status="415"}' in text
    assert 'sfpc_queue_depth{queue="sync"} 0.0' in text
    assert 'sfpc_queue_depth{queue="jobs"}' in text


# ----------------------------------------------------------------------------------------------
# NIfTI round trips
# ----------------------------------------------------------------------------------------------


def assert_same_grid(returned: nib.Nifti1Image, upload: nib.Nifti1Image) -> None:
    assert returned.shape == upload.shape[:3]
    assert np.array_equal(returned.affine, upload.affine)
    assert int(returned.header["sform_code"]) == int(upload.header["sform_code"])
    assert int(returned.header["qform_code"]) == int(upload.header["qform_code"])


@needs_data
@pytest.mark.parametrize("path", NIFTI_IMAGES, ids=lambda p: p.name.split(".")[0])
def test_real_nifti_round_trips_with_exact_grid(server, path):
    upload = nib.load(path)
    response = post(server, upload_file(path))
    assert response.status_code == 200, response.text[:500]
    assert response.headers["content-type"] == "application/gzip"
    assert response.headers["x-sfpc-model"] == "tiny3d"
    assert 'filename="mask.nii.gz"' in response.headers["content-disposition"]
    mask = read_nifti(response.content)
    assert_same_grid(mask, upload)
    values = np.asarray(mask.dataobj)
    assert values.dtype == np.uint8 and set(np.unique(values)) <= {0, 1}


def _reoriented(image: nib.Nifti1Image, codes: str) -> nib.Nifti1Image:
    return image.as_reoriented(nib.orientations.ornt_transform(
        nib.orientations.io_orientation(image.affine), nib.orientations.axcodes2ornt(codes)))


@needs_data
@pytest.mark.parametrize("codes", ["PIR", "SLA", "RAS", "ILP"])
def test_reoriented_upload_gives_the_reoriented_mask(server, codes):
    path = DATA / "organs" / "mr_d_image.nii.gz"
    original = nib.load(path)
    reference = read_nifti(post(server, upload_file(path)).content)
    moved = _reoriented(original, codes)
    assert nib.aff2axcodes(moved.affine) == tuple(codes)
    response = post(server, [("file", ("moved.nii.gz", nifti_upload(
        np.asarray(moved.dataobj), moved.affine)))])
    assert response.status_code == 200, response.text[:500]
    mask = read_nifti(response.content)
    assert mask.shape == moved.shape and np.allclose(mask.affine, moved.affine, atol=1e-5)
    # Same anatomy on a permuted / flipped grid: the engine works in RAS, so the mask brought
    # back to the original orientation equals the original upload's mask.
    back = _reoriented(nib.Nifti1Image(np.asarray(mask.dataobj), mask.affine),
                       "".join(nib.aff2axcodes(original.affine)))
    assert np.array_equal(np.asarray(back.dataobj), np.asarray(reference.dataobj))


@needs_data
@pytest.mark.parametrize("path", [DATA / "organs" / "mr_d_image.nii.gz",
                                  DATA / "lesions" / "breast1_image.nii.gz"],
                         ids=["mr_d", "breast1"])
def test_2d_model_round_trips(server, path):
    response = post(server, upload_file(path), params={"model": "tiny2d"})
    assert response.status_code == 200, response.text[:500]
    assert response.headers["x-sfpc-model"] == "tiny2d"
    mask = read_nifti(response.content)
    assert_same_grid(mask, nib.load(path))
    assert set(np.unique(np.asarray(mask.dataobj))) <= {0, 1, 2}


def test_oblique_nifti2_upload_keeps_its_header_version(server):
    rng = np.random.default_rng(3)
    image = rng.normal(size=(20, 18, 16)).astype(np.float32)
    angle = np.deg2rad(25)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0],
                         [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([1.1, 0.9, 2.5])
    affine[:3, 3] = [-10.5, 20.25, 3.0]
    data = nifti_upload(image, affine, nifti2=True)
    response = post(server, [("file", ("oblique.nii.gz", data))])
    assert response.status_code == 200, response.text[:500]
    raw = gzip.decompress(response.content)
    assert raw[4:7] == b"n+2"  # NIfTI-2 in, NIfTI-2 out: the float64 affine survives exactly
    mask = nib.Nifti2Image.from_bytes(raw)
    assert mask.shape == image.shape
    assert np.array_equal(mask.affine, nib.Nifti2Image.from_bytes(gzip.decompress(data)).affine)


def test_single_slice_goes_to_a_2d_model_but_not_a_3d_one(server):
    rng = np.random.default_rng(4)
    image = rng.normal(size=(40, 30, 1)).astype(np.float32)
    files = [("file", ("slice.nii.gz", nifti_upload(image, np.diag([0.8, 0.8, 3.0, 1.0]))))]
    error = assert_error(post(server, files), 422)
    assert "3D" in error["message"] or "voxels" in error["message"]
    response = post(server, files, params={"model": "tiny2d"})
    assert response.status_code == 200, response.text[:500]
    assert read_nifti(response.content).shape == (40, 30, 1)


# ----------------------------------------------------------------------------------------------
# Uncertainty artefacts
# ----------------------------------------------------------------------------------------------


@needs_data
def test_map_precision_changes_the_map_files_and_nothing_else(server):
    """uint8 maps are the uint16 maps to within half a 1/255 step, on the same grid and header;
    the mask, the report's measurements and the overlay are the same bytes or values."""
    path = DATA / "organs" / "mr_d_image.nii.gz"
    outputs = "mask_nifti,entropy_nifti,mi_nifti,report_json"
    archives = {}
    for precision in ("uint8", "uint16"):
        response = post(server, upload_file(path),
                        params={"outputs": outputs, "map_precision": precision})
        assert response.status_code == 200, response.text[:500]
        archives[precision] = zipfile.ZipFile(io.BytesIO(response.content))
    small, large = archives["uint8"], archives["uint16"]
    assert small.read("mask.nii.gz") == large.read("mask.nii.gz")
    reports = {p: json.loads(a.read("report.json")) for p, a in archives.items()}
    assert reports["uint8"]["classes"] == reports["uint16"]["classes"]
    assert reports["uint8"]["case"] == reports["uint16"]["case"]
    for name in ("entropy", "mutual_information"):
        assert reports["uint8"]["map_files"][name]["dtype"] == "uint8"
        assert reports["uint16"]["map_files"][name]["max_error"] == pytest.approx(0.5 / 65535,
                                                                                  abs=2e-7)
    for name in ("entropy", "mutual_information"):
        a, b = (read_nifti(x.read(f"{name}.nii.gz")) for x in (small, large))
        assert (a.get_data_dtype(), b.get_data_dtype()) == (np.uint8, np.uint16)
        np.testing.assert_array_equal(a.affine, b.affine)
        assert a.shape == b.shape
        # Worked by hand: the uint8 file spans q = ceil(max level / 255) uint16 levels per
        # level (its scl_slope is q / 65535), and each uint16 level l is stored as round(l / q).
        levels16 = np.asarray(b.dataobj.get_unscaled()).astype(np.int64)
        q = int(np.ceil(levels16.max() / 255))
        assert a.dataobj.slope == pytest.approx(q / 65535, rel=1e-6)
        np.testing.assert_array_equal(np.asarray(a.dataobj.get_unscaled()),
                                      np.floor((levels16 + q // 2) / q).astype(np.uint8))
        error = reports["uint8"]["map_files"][name]["max_error"]
        assert error == pytest.approx(0.5 * q / 65535 + 0.5 / 65535, abs=2e-7)
        assert np.abs(np.asarray(a.dataobj) - np.asarray(b.dataobj)).max() <= error
        assert len(small.read(f"{name}.nii.gz")) <= len(large.read(f"{name}.nii.gz"))


@needs_data
def test_uncertainty_artefacts_in_one_zip(server):
    from PIL import Image

    path = DATA / "organs" / "mr_d_image.nii.gz"
    upload = nib.load(path)
    outputs = "mask_nifti,entropy_nifti,mi_nifti,overlay_png,report_json"
    response = post(server, upload_file(path), params={"outputs": outputs})
    assert response.status_code == 200, response.text[:500]
    assert response.headers["content-type"] == "application/zip"
    archive = zipfile.ZipFile(io.BytesIO(response.content))
    assert sorted(archive.namelist()) == sorted(
        ["mask.nii.gz", "entropy.nii.gz", "mutual_information.nii.gz", "overlay.png",
         "report.json"])
    mask_img = read_nifti(archive.read("mask.nii.gz"))
    maps = {name: read_nifti(archive.read(f"{name}.nii.gz"))
            for name in ("entropy", "mutual_information")}
    assert_same_grid(mask_img, upload)
    for image in maps.values():
        assert_same_grid(image, upload)
        # Maps travel as uint8 with scl_slope by default (issue 13): readers get floats.
        assert image.get_data_dtype() == np.uint8
        assert 0 < image.dataobj.slope <= 1 / 255 + 1e-9
    mask = np.asarray(mask_img.dataobj)
    entropy = np.asarray(maps["entropy"].dataobj)
    mi = np.asarray(maps["mutual_information"].dataobj)
    assert entropy.min() >= 0 and entropy.max() <= 1 and mi.min() >= 0
    # MI = H(p_bar) - mean_m H(p_m) and every H(p_m) >= 0, so MI <= H(p_bar) voxel by voxel.
    assert np.all(mi <= entropy + 1e-6)
    assert mi.max() > 0  # the perturbations really disagree somewhere

    png = Image.open(io.BytesIO(archive.read("overlay.png")))
    png.load()
    assert png.mode == "RGB" and png.width >= 400 and png.height >= 300

    report = json.loads(archive.read("report.json"))
    voxel_ml = abs(np.linalg.det(upload.affine[:3, :3])) / 1000.0
    assert report["voxel_volume_ml"] == pytest.approx(voxel_ml)
    for k, name in enumerate(["background", "structure1"]):
        entry = report["classes"][name]
        inside = mask == k
        assert entry["voxels"] == int(inside.sum())
        assert entry["volume_ml"] == pytest.approx(inside.sum() * voxel_ml, rel=1e-9)
        if inside.any():
            # The map statistics are taken on the model grid (test_engine checks them exactly
            # there): the same field sampled on another grid, so the means agree closely.
            assert entry["mean_entropy"] == pytest.approx(float(entropy[inside].mean()),
                                                          abs=0.01)
            assert entry["mean_mutual_information"] == pytest.approx(float(mi[inside].mean()),
                                                                     abs=0.01)
    assert report["map_statistics_grid"] == "model"
    band = report["classes"]["structure1"]["boundary_mean_entropy"]
    assert band is None or entropy.min() <= band <= entropy.max()
    assert report["model"]["name"] == "tiny3d" and report["model"]["version"] == "0.0.1"
    assert report["input"]["shape"] == list(upload.shape)
    assert report["input"]["source"] == "nifti"
    assert set(report["timings"]) >= {"decode", "preprocess", "inference", "postprocess",
                                      "encode", "total"}
    assert all(v >= 0 for v in report["timings"].values())
    assert {a["filename"] for a in report["artefacts"]} == {
        "mask.nii.gz", "entropy.nii.gz", "mutual_information.nii.gz", "overlay.png"}


@needs_data
def test_flip_runs_the_mirrored_pass_and_says_so(server):
    path = DATA / "organs" / "mr_d_image.nii.gz"
    reports = {}
    for flip in ("false", "true"):
        r = post(server, upload_file(path), params={"outputs": "report_json",
                                                     "uncertainty": "true", "flip": flip})
        assert r.status_code == 200, r.text[:500]
        reports[flip] = r.json()
    assert reports["true"]["model"]["flip"] is True and reports["false"]["model"]["flip"] is False
    assert reports["true"]["n_windows"] == 2 * reports["false"]["n_windows"]
    assert reports["true"]["case"] != reports["false"]["case"]  # statistics of other maps
    assert_error(post(server, upload_file(path), params={"flip": "sideways"}), 422)
    listing = httpx.get(f"{server.url}/v1/models").json()
    assert all(m["flip"] is True for m in listing["models"])  # no augment record: allowed


def test_response_packing_and_media_types(server):
    rng = np.random.default_rng(5)
    files = [("file", ("v.nii.gz", nifti_upload(rng.normal(size=(24, 20, 12)).astype(np.float32),
                                                np.diag([2.0, 2.0, 3.0, 1.0]))))]
    report = post(server, files, params={"outputs": "report_json"})
    assert report.headers["content-type"] == "application/json"
    assert report.json()["outputs"] == ["report_json"]
    overlay = post(server, files, params={"outputs": "overlay_png"})
    assert overlay.headers["content-type"] == "image/png"
    assert overlay.content[:8] == b"\x89PNG\r\n\x1a\n"
    zipped = post(server, files, params={"format": "zip"})
    assert zipfile.ZipFile(io.BytesIO(zipped.content)).namelist() == ["mask.nii.gz"]
    # Options as form fields work like query parameters; uncertainty alone adds the maps.
    form = post(server, files + [("uncertainty", (None, "true"))])
    assert sorted(zipfile.ZipFile(io.BytesIO(form.content)).namelist()) == sorted(
        ["mask.nii.gz", "entropy.nii.gz", "mutual_information.nii.gz", "report.json"])
    assert post(server, files, params={"outputs": ["mask_nifti", "report_json"]}).headers[
        "content-type"] == "application/zip"


# ----------------------------------------------------------------------------------------------
# Bad input: always a 4xx JSON body naming the problem, and the server keeps serving
# ----------------------------------------------------------------------------------------------


def _nifti_bytes_raw(array: np.ndarray, affine=None) -> bytes:
    return nib.Nifti1Image(array, np.eye(4) if affine is None else affine).to_bytes()


def _bad_uploads() -> dict[str, tuple[list, dict, int | None]]:
    rng = np.random.default_rng(6)
    good = _nifti_bytes_raw(rng.normal(size=(10, 10, 10)).astype(np.float32))
    nan = rng.normal(size=(10, 10, 10)).astype(np.float32)
    nan[3, 4, 5] = np.nan
    shear = np.eye(4)
    shear[0, 1] = 0.7
    traversal = io.BytesIO()
    with zipfile.ZipFile(traversal, "w") as z:
        z.writestr("../../etc/evil.dcm", b"x" * 200)
    f = "file"
    return {
        "random_bytes": ([(f, ("a.nii.gz", rng.bytes(3000)))], {}, None),
        "truncated_gzip": ([(f, ("t.nii.gz", gzip.compress(good)[:400]))], {}, None),
        "truncated_nifti": ([(f, ("t.nii", good[:352 + 500]))], {}, None),
        "header_only": ([(f, ("h.nii", good[:200]))], {}, None),
        "nan": ([(f, ("n.nii", _nifti_bytes_raw(nan)))], {}, 422),
        "4d": ([(f, ("4d.nii", _nifti_bytes_raw(np.zeros((8, 8, 8, 3), np.float32))))], {}, 422),
        "one_voxel": ([(f, ("1.nii", _nifti_bytes_raw(np.ones((1, 1, 1), np.int16))))], {}, 422),
        "2d_for_3d": ([(f, ("2d.nii", _nifti_bytes_raw(np.ones((16, 16), np.int16))))], {}, 422),
        "sheared_affine": ([(f, ("s.nii", _nifti_bytes_raw(np.ones((8, 8, 8), np.float32),
                                                             shear)))], {}, 422),
        "empty_file": ([(f, ("e.nii", b""))], {}, None),
        "zip_slip": ([(f, ("s.zip", traversal.getvalue()))], {}, 400),
        "no_file": ([("model", (None, "tiny3d"))], {}, 400),
        "text_not_file": ([(f, (None, "image.nii.gz"))], {}, 400),
        "unknown_model": ([(f, ("g.nii", good))], {"model": "nope"}, 404),
        "bad_output": ([(f, ("g.nii", good))], {"outputs": "everything"}, 422),
        "bad_format": ([(f, ("g.nii", good))], {"format": "tiff"}, 422),
        "seg_for_nifti": ([(f, ("g.nii", good))], {"outputs": "seg_dicom"}, 422),
        "unknown_field": ([(f, ("g.nii", good)), ("colour", (None, "red"))], {}, 422),
    }


BAD = _bad_uploads()


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_upload_is_a_4xx_json_error(server, case):
    files, params, status = BAD[case]
    error = assert_error(post(server, files, params=params), status)
    assert len(error["message"]) > 15
    assert server.healthy()


def test_not_multipart_is_415(server):
    response = httpx.post(f"{server.url}/v1/segment", content=b"\x1f\x8b" + b"0" * 100,
                          headers={"Content-Type": "application/gzip"})
    assert_error(response, 415)
    response = httpx.post(f"{server.url}/v1/segment", content=b"--x\r\nbroken",
                          headers={"Content-Type": "multipart/form-data; boundary=x"})
    assert_error(response)


# ----------------------------------------------------------------------------------------------
# DICOM
# ----------------------------------------------------------------------------------------------


def _series_files() -> list[Path]:
    return sorted(DICOM_SERIES.glob("*.dcm"))


def _series_zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in _series_files():
            archive.write(path, f"series/{path.name}")
    return buffer.getvalue()


def _sitk_affine(image) -> np.ndarray:
    """SimpleITK's LPS geometry as a NIfTI RAS affine (voxel index order x, y, z)."""
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    spacing = np.asarray(image.GetSpacing())
    affine = np.eye(4)
    affine[:3, :3] = direction * spacing
    affine[:3, 3] = image.GetOrigin()
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine


@needs_data
def test_dicom_zip_gives_a_seg_referencing_the_series(server):
    import highdicom as hd
    import pydicom

    sources = [pydicom.dcmread(p, stop_before_pixels=True) for p in _series_files()]
    series_uid = sources[0].SeriesInstanceUID
    response = post(server, [("file", ("series.zip", _series_zip()))])
    assert response.status_code == 200, response.text[:500]
    assert response.headers["content-type"] == "application/dicom"
    assert response.headers["x-sfpc-series-uid"] == series_uid
    seg = hd.seg.Segmentation.from_dataset(pydicom.dcmread(io.BytesIO(response.content)))
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series_uid
    referenced = {item.ReferencedSOPInstanceUID
                  for item in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced == {ds.SOPInstanceUID for ds in sources}
    labels = [s.SegmentLabel for s in seg.SegmentSequence]
    assert labels == ["structure1"]
    assert seg.StudyInstanceUID == sources[0].StudyInstanceUID


@needs_data
def test_dicom_files_with_nifti_match_simpleitk_geometry(server):
    import pydicom
    import SimpleITK as sitk

    files = [("file", (p.name, p.read_bytes())) for p in _series_files()[::-1]]  # order lies
    response = post(server, files, params={"outputs": "seg_dicom,mask_nifti,report_json"})
    assert response.status_code == 200, response.text[:500]
    archive = zipfile.ZipFile(io.BytesIO(response.content))
    assert sorted(archive.namelist()) == ["mask.nii.gz", "report.json", "segmentation.dcm"]
    mask = read_nifti(archive.read("mask.nii.gz"))
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(DICOM_SERIES)))
    reference = reader.Execute()
    assert mask.shape == reference.GetSize()
    assert np.allclose(mask.affine, _sitk_affine(reference), atol=1e-3)
    report = json.loads(archive.read("report.json"))
    assert report["input"]["source"] == "dicom"
    series = report["input"]["series"]
    assert series["series_instance_uid"] == pydicom.dcmread(
        _series_files()[0], stop_before_pixels=True).SeriesInstanceUID
    assert series["rule"]
    # The SEG and the NIfTI of one request hold the same segmented voxels.
    seg = pydicom.dcmread(io.BytesIO(archive.read("segmentation.dcm")))
    assert int(np.count_nonzero(seg.pixel_array)) == int(
        np.count_nonzero(np.asarray(mask.dataobj)))


@needs_data
@pytest.mark.parametrize("path", sorted(TRANSFER_SYNTAXES.glob("*.dcm")) if DATA.is_dir()
                         else [], ids=lambda p: p.stem)
def test_each_transfer_syntax_decodes_or_gets_a_clear_4xx(server, path):
    import pydicom

    source = pydicom.dcmread(path)
    response = post(server, upload_file(path), params={"model": "tiny2d",
                                                       "outputs": "mask_nifti"})
    if response.status_code == 200:
        mask = read_nifti(response.content)
        frames = int(getattr(source, "NumberOfFrames", 1) or 1)
        # The mask has one voxel per source pixel: columns x rows x frames.
        assert mask.shape == (source.Columns, source.Rows, frames)
    else:
        error = assert_error(response)
        # Undecodable pixel data is a 415; single slices the axial 2D model would cut across
        # are refused by name.
        assert response.status_code == 415 or error["code"] == "slice_plane_mismatch", error
    assert server.healthy()


# ----------------------------------------------------------------------------------------------
# Concurrency, clean-up, logs
# ----------------------------------------------------------------------------------------------


@needs_data
def test_healthz_answers_while_a_segmentation_runs(server):
    path = DATA / "lesions" / "lung1_image.nii.gz"
    outcome: dict[str, object] = {}

    def run() -> None:
        outcome["response"] = post(server, upload_file(path))

    worker = threading.Thread(target=run)
    worker.start()
    try:
        assert wait_until(lambda: metric(server, "sfpc_segmentations_in_flight") >= 1)
        latencies = []
        while metric(server, "sfpc_segmentations_in_flight") >= 1 and len(latencies) < 20:
            t0 = time.perf_counter()
            assert httpx.get(f"{server.url}/healthz", timeout=5).status_code == 200
            latencies.append(time.perf_counter() - t0)
        assert latencies and max(latencies) < 1.0, latencies
    finally:
        worker.join(timeout=120)
    assert outcome["response"].status_code == 200


@needs_data
def test_temporary_files_removed_on_success_error_and_disconnect(server, spool):
    def empty() -> bool:
        return not any(spool.iterdir())

    path = DATA / "lesions" / "breast1_image.nii.gz"
    assert post(server, upload_file(path)).status_code == 200
    assert wait_until(empty, 5), list(spool.iterdir())
    assert_error(post(server, [("file", ("x.nii.gz", b"\x1f\x8b" + b"\x00" * 500))]))
    assert wait_until(empty, 5), list(spool.iterdir())

    # A client that sends a large upload, waits for the work to start, then hangs up.
    big = DATA / "lesions" / "lung1_image.nii.gz"
    request = httpx.Request("POST", f"{server.url}/v1/segment?uncertainty=true",
                            files=upload_file(big))
    body = request.read()
    head = ["POST /v1/segment?uncertainty=true HTTP/1.1", f"Host: 127.0.0.1:{server.port}",
            f"Content-Type: {request.headers['content-type']}",
            f"Content-Length: {len(body)}", "", ""]
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall("\r\n".join(head).encode() + body)
        assert wait_until(lambda: metric(server, "sfpc_segmentations_in_flight") >= 1)
        assert any(spool.iterdir())  # the upload is on disk while it is processed
    t0 = time.monotonic()
    # Cancelled at the next backend call, well before the full uncertainty run would end.
    assert wait_until(lambda: metric(server, "sfpc_segmentations_in_flight") == 0, 60)
    assert wait_until(empty, 10), list(spool.iterdir())
    assert time.monotonic() - t0 < 30
    assert server.healthy()


@needs_data
def test_logs_are_json_with_request_ids_and_no_patient_data(server):
    import pydicom

    response = post(server, [("file", ("series.zip", _series_zip()))],
                    headers={"X-Request-ID": "trace-abc.123"})
    assert response.status_code == 200
    assert response.headers["x-request-id"] == "trace-abc.123"
    assert httpx.get(f"{server.url}/healthz", headers={"X-Request-ID": "bad id!"}).headers[
        "x-request-id"] != "bad id!"
    records = server.log_records()  # every line parses as JSON
    mine = [r for r in records if r.get("request_id") == "trace-abc.123"]
    assert any(r.get("route") == "/v1/segment" and r.get("status") == 200 for r in mine)
    source = pydicom.dcmread(_series_files()[0], stop_before_pixels=True)
    text = server.log_text()
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "StudyDate",
                    "InstitutionName", "SeriesInstanceUID", "StudyInstanceUID"):
        value = str(source.get(keyword, "") or "").strip()
        if len(value) >= 4:
            assert value not in text, keyword


# ----------------------------------------------------------------------------------------------
# Security and limits (a second server: API keys, small upload limit, short timeout, CORS)
# ----------------------------------------------------------------------------------------------


def _small_upload() -> list:
    rng = np.random.default_rng(7)
    return [("file", ("v.nii.gz", nifti_upload(rng.normal(size=(12, 12, 12)).astype(np.float32),
                                               np.eye(4))))]


def test_api_keys_are_required_on_data_endpoints(secured):
    files = _small_upload()
    error = assert_error(post(secured, files), 401)
    assert error["code"] == "missing_api_key"
    assert assert_error(post(secured, files, headers={"X-API-Key": "wrong"}), 401)[
        "code"] == "invalid_api_key"
    assert assert_error(post(secured, files, headers={"Authorization": "Bearer wrong"}),
                        401)["code"] == "invalid_api_key"
    assert_error(httpx.get(f"{secured.url}/v1/models"), 401)
    assert_error(httpx.get(f"{secured.url}/v1/jobs"), 401)  # the jobs router too
    assert httpx.get(f"{secured.url}/v1/models", headers={"X-API-Key": KEYS[0]}).status_code == 200
    # Probes and scrapers need no key.
    for path in ("/healthz", "/readyz", "/metrics"):
        assert httpx.get(f"{secured.url}{path}").status_code == 200


def test_valid_key_passes_then_the_timeout_applies(secured):
    # 0.1 s is below any segmentation: a valid key gets past auth and then gets a 504 JSON body.
    # The volume takes seconds, not tenths: on a loaded machine the event loop can be starved
    # past the deadline while a short segmentation finishes, and then answer 200 (seen in CI).
    for headers in ({"X-API-Key": KEYS[0]}, {"Authorization": f"Bearer {KEYS[1]}"}):
        volume = np.zeros((288, 288, 192), np.int16)
        volume[40:240, 40:240, 30:160] = 100
        files = [("file", ("big.nii.gz", nifti_upload(volume, np.eye(4))))]
        response = post(secured, files, headers=headers)
        assert response.status_code == 504, response.text[:300]
        body = response.json()["error"]
        assert body["code"] == "timeout" and "request timeout" in body["message"]
    assert wait_until(lambda: metric(secured, "sfpc_segmentations_in_flight") == 0, 30)
    assert secured.healthy()


def test_oversized_upload_is_413_by_length_and_while_streaming(secured):
    headers = {"X-API-Key": KEYS[0]}
    big = [("file", ("big.nii", b"\x00" * 400_000))]
    error = assert_error(post(secured, big, headers=headers), 413)
    assert "300,000" in error["message"]

    encoded = httpx.Request("POST", "http://x/", files=big)  # one boundary for header and body
    data = encoded.read()

    def chunks():  # a generator body goes out chunked, with no Content-Length
        for start in range(0, len(data), 65536):
            yield data[start:start + 65536]

    content_type = encoded.headers["content-type"]
    response = httpx.post(f"{secured.url}/v1/segment", content=chunks(),
                          headers={**headers, "Content-Type": content_type}, timeout=30)
    assert response.status_code == 413, response.text[:300]
    assert response.json()["error"]["code"] == "upload_too_large"
    assert secured.healthy()


def test_cors_is_off_by_default_and_on_for_configured_origins(server, secured):
    preflight = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "X-API-Key"}
    on = httpx.options(f"{secured.url}/v1/segment", headers=preflight)
    assert on.headers.get("access-control-allow-origin") == ORIGIN
    off = httpx.options(f"{server.url}/v1/segment", headers=preflight)
    assert "access-control-allow-origin" not in off.headers
    other = httpx.options(f"{secured.url}/v1/segment",
                          headers={**preflight, "Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in other.headers


def test_cors_exposes_every_header_a_result_carries(secured):
    """A browser client reads the result headers of /v1/segment and job results only when CORS
    exposes them; X-SFPC-Model-Version was once missing."""
    response = httpx.get(f"{secured.url}/healthz", headers={"Origin": ORIGIN})
    exposed = {h.strip().lower()
               for h in response.headers["access-control-expose-headers"].split(",")}
    assert {"x-request-id", "x-sfpc-model", "x-sfpc-model-version", "x-sfpc-series-uid",
            "x-sfpc-artefacts", "content-disposition"} <= exposed


def test_serve_refuses_a_public_host_without_keys_and_needs_a_model(models, tmp_path):
    import subprocess

    base = [sys.executable, "-m", "sfpc.cli", "serve"]
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("SFPC_")}
    public = subprocess.run(base + ["--host", "0.0.0.0", "--model", str(models["tiny3d"])],
                            capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path)
    assert public.returncode == 2
    assert "API keys" in public.stderr and "0.0.0.0" in public.stderr
    # No --model means the embedded default model (tests/test_default_model.py serves it);
    # the public-host rule still holds for it.
    embedded = subprocess.run(base + ["--host", "0.0.0.0"], capture_output=True, text=True,
                              timeout=60, env=env, cwd=tmp_path)
    assert embedded.returncode == 2 and "API keys" in embedded.stderr
    wrong = subprocess.run(base + ["--model", str(tmp_path)], capture_output=True, text=True,
                           timeout=60, env=env, cwd=tmp_path)
    assert wrong.returncode == 2 and "sfpc_model.json" in wrong.stderr
