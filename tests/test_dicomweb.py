"""``sfpc client pacs``: a real Orthanc with its DICOMweb plugin, a real gateway, the real MR
series of the shared data folder.

The series goes into Orthanc through Orthanc's own REST API; the client finds it by QIDO-RS,
retrieves it by WADO-RS, segments it, and stores the SEG (and the uncertainty map) back by
STOW-RS. Oracles: Orthanc's native REST API (what the PACS holds), highdicom and pydicom (what
the stored objects reference), and the DICOM and NIfTI geometry equations (every pixel of the
stored parametric map against the gateway's entropy map at the same point in space).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tests.support.models import tiny_models
from tests.support.orthanc import PASSWORD, USER, OrthancServer, missing_reason
from tests.support.paths import DATA, DATA_MISSING, DICOM_SERIES
from tests.support.server import GatewayServer

pytest.importorskip("torch")  # the tiny model is trained and exported with torch
pytest.importorskip("dicomweb_client", reason="pip install dicomweb-client (extra 'pacs')")
# Real Orthanc and gateway processes: not in `make test-fast`.
pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not DATA.is_dir(), reason=DATA_MISSING),
              pytest.mark.skipif(missing_reason() is not None, reason=str(missing_reason()))]

SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
PM_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.30"


@pytest.fixture(scope="module")
def sources():
    import pydicom

    return [pydicom.dcmread(p) for p in sorted(DICOM_SERIES.iterdir())]


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory, sources):
    server = OrthancServer(tmp_path_factory.mktemp("orthanc"))
    with server:
        server.upload(sorted(DICOM_SERIES.iterdir()))
        yield server


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    models = tiny_models(tmp_path_factory.getbasetemp())
    env = {"SFPC_DATA_DIR": str(tmp_path_factory.mktemp("data")),
           "SFPC_ONNX_INTRA_OP_THREADS": "1"}
    with GatewayServer([models["tiny3d"]], tmp_path_factory.mktemp("log") / "gw.log",
                       env=env) as srv:
        yield srv


@pytest.fixture(scope="module")
def config_file(tmp_path_factory, orthanc, gateway) -> Path:
    """URL and user in a config file; the password in a file named by an environment
    variable, as a systemd credential would be."""
    folder = tmp_path_factory.mktemp("config")
    (folder / "pacs-password").write_text(PASSWORD + "\n")
    path = folder / "client.yaml"
    path.write_text(f"gateway:\n  url: {gateway.url}\n"
                    f"pacs:\n  url: {orthanc.dicomweb_url}\n  username: {USER}\n")
    return path


def run_pacs(config_file: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SFPC_")}
    env["SFPC_PACS_PASSWORD_FILE"] = str(config_file.parent / "pacs-password")
    return subprocess.run([sys.executable, "-m", "sfpc.cli", "client", "pacs", *args,
                           "--config", str(config_file), "--no-progress"], env=env,
                          capture_output=True, text=True, timeout=180)


def dicomweb(orthanc: OrthancServer):
    import requests
    from dicomweb_client import DICOMwebClient

    session = requests.Session()
    session.auth = (USER, PASSWORD)
    return DICOMwebClient(url=orthanc.dicomweb_url, session=session)


def stored_series(orthanc: OrthancServer, description_prefix: str) -> list[dict]:
    return [s for s in orthanc.series_tags()
            if str(s.get("SeriesDescription", "")).startswith(description_prefix)]


# ----------------------------------------------------------------------------------------------


def test_seg_stored_by_stow_is_found_by_qido_and_references_the_source(
        orthanc, config_file, sources, tmp_path):
    import highdicom as hd

    study = sources[0].StudyInstanceUID
    series = sources[0].SeriesInstanceUID
    out = tmp_path / "out"
    first = run_pacs(config_file, str(out), "--modality", "MR")
    assert first.returncode == 0, first.stderr
    assert "1 inputs: 1 done" in first.stdout

    # What the PACS holds, by its own API: the source series and one SEG series in its study.
    segs = stored_series(orthanc, "SFPC segmentation")
    assert len(segs) == 1 and segs[0]["Modality"] == "SEG" and segs[0]["study_uid"] == study

    # Found again by QIDO-RS, retrieved by WADO-RS.
    dw = dicomweb(orthanc)
    found = dw.search_for_series(study_instance_uid=study, search_filters={"Modality": "SEG"})
    assert len(found) == 1
    seg_series = found[0]["0020000E"]["Value"][0]
    instances = dw.retrieve_series(study, seg_series)
    assert len(instances) == 1
    seg = hd.seg.Segmentation.from_dataset(instances[0])
    assert seg.SOPClassUID == SEG_SOP_CLASS
    assert seg.StudyInstanceUID == study
    referenced = seg.ReferencedSeriesSequence[0]
    assert referenced.SeriesInstanceUID == series
    assert {i.ReferencedSOPInstanceUID for i in referenced.ReferencedInstanceSequence} == {
        ds.SOPInstanceUID for ds in sources}
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["structure1"]
    # The stored SEG is the gateway's, byte for byte in content: its local copy has its UID.
    local = out / study / series / "segmentation.dcm"
    import pydicom

    assert pydicom.dcmread(local).SOPInstanceUID == seg.SOPInstanceUID

    manifest = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    done = [r for r in manifest if r["status"] == "done"]
    assert len(done) == 1 and done[0]["series_uid"] == series
    assert [s["sop_instance_uid"] for s in done[0]["delivered"]["stored"]] == [
        seg.SOPInstanceUID]

    # A rerun (the cron job firing again) stores nothing new.
    again = run_pacs(config_file, str(out), "--modality", "MR")
    assert again.returncode == 0, again.stderr
    assert "1 inputs: 0 done, 1 already done" in again.stdout
    assert len(stored_series(orthanc, "SFPC segmentation")) == 1


def test_uncertainty_map_lands_on_the_source_pixels(orthanc, config_file, sources, tmp_path):
    import pydicom

    study = sources[0].StudyInstanceUID
    series = sources[0].SeriesInstanceUID
    out = tmp_path / "out"
    # No modality filter: the SEG stored by the previous test must not become an input.
    dry = run_pacs(config_file, str(out), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.count("segment  ") == 1 and series in dry.stdout
    one = run_pacs(config_file, str(out), "--series", series, "--dry-run")
    assert one.returncode == 0 and one.stdout.count("segment  ") == 1
    none = run_pacs(config_file, str(out), "--series", "1.2.3.4", "--dry-run")
    assert none.returncode == 0 and "no matching image series" in none.stderr

    result = run_pacs(config_file, str(out), "--uncertainty-map")
    assert result.returncode == 0, result.stderr
    maps = stored_series(orthanc, "SFPC uncertainty")
    assert len(maps) == 1 and maps[0]["study_uid"] == study
    pm = pydicom.dcmread(io.BytesIO(orthanc.instance_file(maps[0]["instances"][0])))
    assert pm.SOPClassUID == PM_SOP_CLASS and pm.StudyInstanceUID == study
    assert pm.ReferencedSeriesSequence[0].SeriesInstanceUID == series

    # Every pixel of every frame against the entropy map at the same point in space:
    # DICOM: p = IPP + col * dc * row_dir + row * dr * col_dir (LPS mm);
    # NIfTI: voxel = inverse(affine) @ (RAS = diag(-1, -1, 1) @ LPS).
    entropy = nib.load(out / study / series / "entropy.nii.gz")
    values = np.asanyarray(entropy.dataobj)
    inverse = np.linalg.inv(entropy.affine)
    shared = pm.SharedFunctionalGroupsSequence[0]
    orientation = np.array(shared.PlaneOrientationSequence[0].ImageOrientationPatient, float)
    row_dir, col_dir = orientation[:3], orientation[3:]
    dr, dc = (float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing)
    pixels = pm.pixel_array.reshape(-1, pm.Rows, pm.Columns)
    rows, cols = np.meshgrid(np.arange(pm.Rows), np.arange(pm.Columns), indexing="ij")
    assert len(pm.PerFrameFunctionalGroupsSequence) == len(sources) == pixels.shape[0]
    for frame, group in zip(pixels, pm.PerFrameFunctionalGroupsSequence, strict=True):
        origin = np.array(group.PlanePositionSequence[0].ImagePositionPatient, float)
        lps = (origin[None, None] + cols[..., None] * dc * row_dir
               + rows[..., None] * dr * col_dir)
        ras = lps * np.array([-1.0, -1.0, 1.0])
        voxel = ras @ inverse[:3, :3].T + inverse[:3, 3]
        index = np.rint(voxel).astype(int)
        # Pixel centres on voxel centres, up to the in-plane drift of this oblique series'
        # slice positions (a few hundredths of a voxel), which one affine cannot hold.
        np.testing.assert_allclose(voxel, index, atol=0.15)
        expected = values[index[..., 0], index[..., 1], index[..., 2]]
        np.testing.assert_allclose(frame, expected, atol=1e-6)
    assert float(values.max()) > 0  # a map with something in it
