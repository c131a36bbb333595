"""`sfpc predict` and `sfpc.predict`: local inference writes what the gateway answers.

Oracles: a real gateway process (`sfpc serve`) given the same input and options (its masks, maps
and error codes), nibabel and pydicom reading the files written, and the folder layout the
command documents. Both sides run ONNX Runtime at one thread, so that their floats are
computed in the same order.
"""

from __future__ import annotations

import gzip
import io
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from sfpc.inference.contract import DEFAULT_MODEL_DIR
from sfpc.io.artefacts import map_max_error
from tests.support.paths import DATA_MISSING, DICOM_SERIES, ORGANS, REPO_ROOT
from tests.support.server import GatewayServer

httpx = pytest.importorskip("httpx")
CT = ORGANS / "ct_a_image.nii.gz"
needs_data = pytest.mark.skipif(not CT.is_file() or not DICOM_SERIES.is_dir(),
                                reason=DATA_MISSING)
ENV_ONE_THREAD = {"SFPC_ONNX_INTRA_OP_THREADS": "1"}


def sfpc_predict(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sfpc.cli", "predict", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, timeout=600)


def nifti_array(data: bytes | Path) -> np.ndarray:
    if isinstance(data, Path):
        return np.asanyarray(nib.load(str(data)).dataobj)
    return np.asanyarray(nib.Nifti1Image.from_bytes(gzip.decompress(data)).dataobj)


def unzip(content: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(content)) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict-gateway")
    env = {**ENV_ONE_THREAD, "SFPC_DATA_DIR": str(root / "data")}
    with GatewayServer([DEFAULT_MODEL_DIR], root / "gateway.log", env=env) as server:
        yield server


def segment(gateway: GatewayServer, files: list[Path], **params: str) -> httpx.Response:
    handles = [open(path, "rb") for path in files]
    try:
        return httpx.post(f"{gateway.url}/v1/segment", params={"format": "zip", **params},
                          files=[("file", (p.name, h))
                                 for p, h in zip(files, handles, strict=True)],
                          timeout=300)
    finally:
        for handle in handles:
            handle.close()


@pytest.fixture(scope="module")
def ct_run(tmp_path_factory) -> Path:
    """`sfpc predict -i ct_a_image.nii.gz -o out --uncertainty`, once for the module."""
    if not CT.is_file():
        pytest.skip(DATA_MISSING)
    work = tmp_path_factory.mktemp("predict-ct")
    done = sfpc_predict("-i", CT, "-o", "out", "--uncertainty", "--threads", "1", cwd=work)
    assert done.returncode == 0, done.stderr
    assert "ct_a_image: mask.nii.gz, entropy.nii.gz" in done.stdout
    return work / "out"


def test_import_sfpc_stays_light() -> None:
    code = ("import sys, sfpc; assert 'numpy' not in sys.modules, 'numpy'; "
            "assert 'sfpc.inference' not in sys.modules; from sfpc import predict; "
            "assert predict.__module__ == 'sfpc.inference.predict'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=REPO_ROOT, timeout=120)
    assert done.returncode == 0, done.stderr


@needs_data
@pytest.mark.integration
def test_nifti_with_uncertainty_writes_the_gateways_artefacts(gateway, ct_run: Path) -> None:
    response = segment(gateway, [CT], uncertainty="true")
    assert response.status_code == 200, response.text[:400]
    served = unzip(response.content)
    assert sorted(p.name for p in ct_run.iterdir()) == sorted(served)
    assert sorted(served) == ["entropy.nii.gz", "mask.nii.gz", "mutual_information.nii.gz",
                              "report.json"]
    mask = nifti_array(ct_run / "mask.nii.gz")
    np.testing.assert_array_equal(mask, nifti_array(served["mask.nii.gz"]))
    assert mask.shape == nib.load(str(CT)).shape and (mask == 2).sum() > 1000  # a liver
    for name in ("entropy.nii.gz", "mutual_information.nii.gz"):
        np.testing.assert_array_equal(nifti_array(ct_run / name), nifti_array(served[name]))
    np.testing.assert_allclose(nib.load(str(ct_run / "mask.nii.gz")).affine,
                               nib.load(str(CT)).affine, atol=1e-5)


@needs_data
@pytest.mark.integration
def test_dicom_folder_writes_the_gateways_mask_and_seg(gateway, tmp_path: Path) -> None:
    import pydicom

    outputs = ["mask_nifti", "seg_dicom", "report_json"]
    done = sfpc_predict("-i", DICOM_SERIES, "-o", "out", "--outputs", *outputs, "--threads", "1",
                        cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    files = sorted(DICOM_SERIES.glob("*.dcm"))
    response = segment(gateway, files, outputs=",".join(outputs))
    assert response.status_code == 200, response.text[:400]
    served = unzip(response.content)
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == sorted(served) == [
        "mask.nii.gz", "report.json", "segmentation.dcm"]
    np.testing.assert_array_equal(nifti_array(out / "mask.nii.gz"),
                                  nifti_array(served["mask.nii.gz"]))
    mine = pydicom.dcmread(out / "segmentation.dcm")
    theirs = pydicom.dcmread(io.BytesIO(served["segmentation.dcm"]))
    np.testing.assert_array_equal(mine.pixel_array, theirs.pixel_array)
    source = pydicom.dcmread(files[0], stop_before_pixels=True)
    assert mine.ReferencedSeriesSequence[0].SeriesInstanceUID == source.SeriesInstanceUID


@needs_data
@pytest.mark.integration
def test_bad_input_exits_2_with_the_gateways_code(gateway, tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("not an image, just some words\n" * 20)
    done = sfpc_predict("-i", text, "-o", "out", cwd=tmp_path)
    response = segment(gateway, [text])
    assert 400 <= response.status_code < 500
    code = response.json()["error"]["code"]
    assert done.returncode == 2
    assert done.stderr.startswith(f"sfpc predict: {code}: "), done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()
    # An option the gateway refuses is refused with its code too.
    refused = segment(gateway, [CT], flip="true")
    done = sfpc_predict("-i", CT, "-o", "out", "--flip", cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.startswith(f"sfpc predict: {refused.json()['error']['code']}: ")
    # Usage errors are argparse's: exit 2 as well.
    done = sfpc_predict("-i", CT, "-o", "out", "--outputs", "everything", cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr


@needs_data
def test_folder_of_two_cases_writes_two_output_folders(tmp_path: Path) -> None:
    cases = tmp_path / "cases"
    (cases / "exams").mkdir(parents=True)
    shutil.copy(CT, cases / "ct_a_image.nii.gz")
    shutil.copytree(DICOM_SERIES, cases / "exams" / "mr")
    (cases / "README.txt").write_text("not a case")
    done = sfpc_predict("-i", cases, "-o", "out", "--threads", "1", "--quiet", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    out = tmp_path / "out"
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [
        "ct_a_image/mask.nii.gz", "exams/mr/segmentation.dcm"]
    assert "README.txt" in done.stderr and done.stdout == ""  # --quiet: no summary


@needs_data
def test_python_api_returns_the_arrays_of_the_cli_files(ct_run: Path, tmp_path: Path) -> None:
    from sfpc import PredictionResult, predict

    result = predict(CT, uncertainty=True, threads=1)
    assert isinstance(result, PredictionResult)
    assert result.mask.dtype == np.uint8
    np.testing.assert_array_equal(result.mask, nifti_array(ct_run / "mask.nii.gz"))
    # The files hold the maps as uint8 (the default map_precision) with scl_slope: equal
    # within the error the report states for each file, at most map_max_error("uint8").
    files = {"entropy": "entropy.nii.gz", "mutual_information": "mutual_information.nii.gz"}
    arrays = {"entropy": result.entropy, "mutual_information": result.mutual_information}
    for name, filename in files.items():
        stated = result.report["map_files"][name]
        assert stated["dtype"] == "uint8" and stated["max_error"] <= map_max_error("uint8")
        assert nib.load(str(ct_run / filename)).get_data_dtype() == np.uint8
        np.testing.assert_allclose(nifti_array(ct_run / filename), arrays[name], rtol=0,
                                   atol=stated["max_error"])
    # This model's mutual information peaks below 1/255: its file keeps the engine's steps
    # instead of rounding the whole map to zero.
    assert result.mutual_information.max() < 1 / 255
    assert result.report["map_files"]["mutual_information"]["step"] == pytest.approx(1 / 65535)
    assert nifti_array(ct_run / "mutual_information.nii.gz").max() > 0
    np.testing.assert_allclose(result.affine, nib.load(str(CT)).affine, atol=1e-5)
    assert result.class_names == ["background", "spleen", "liver", "stomach"]
    assert result.report["model"]["name"] == "sfpc-organs-ct"
    assert result.review is not None and result.review["threshold"] > 0
    written = result.save(tmp_path / "api")
    assert sorted(p.name for p in written) == sorted(p.name for p in ct_run.iterdir())
    # The gateway restores only the maps its files need; the Python API keeps both.
    report_only = predict(CT, outputs=["report_json"], uncertainty=True, threads=1)
    np.testing.assert_array_equal(report_only.entropy, result.entropy)
    np.testing.assert_array_equal(report_only.mutual_information, result.mutual_information)
    # Without uncertainty there are no maps; format=zip packs the files as the gateway does.
    plain = predict(CT, outputs=["mask_nifti", "report_json"], format="zip", threads=1)
    assert plain.entropy is None and plain.mutual_information is None
    assert list(plain.artefacts) == ["sfpc_result.zip"]
    packed = unzip(plain.artefacts["sfpc_result.zip"])
    assert sorted(packed) == ["mask.nii.gz", "report.json"]
    np.testing.assert_array_equal(plain.mask, nifti_array(packed["mask.nii.gz"]))


def test_python_api_refuses_what_the_gateway_refuses(tmp_path: Path) -> None:
    from sfpc import predict
    from sfpc.errors import SFPCError

    with pytest.raises(SFPCError) as missing:
        predict(tmp_path / "absent.nii.gz")
    assert missing.value.code == "missing_file" and missing.value.exit_code == 2
    with pytest.raises(SFPCError) as bad:
        predict(tmp_path, outputs=["everything"])
    assert bad.value.code == "invalid_option"
    with pytest.raises(SFPCError) as no_model:
        predict(tmp_path, model=tmp_path)
    assert no_model.value.code == "model_not_found"
