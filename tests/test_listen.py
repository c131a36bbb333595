"""DICOM pushed in, results back into the study: real parts only.

- dcmtk's ``storescu`` plays the modality and sends the real MR series to a real Orthanc; a Lua
  script makes Orthanc forward each stable MR/CT series to ``sfpc listen`` (C-STORE); the
  listener submits it as a job to a real gateway (the default model); the SEG, parametric map,
  SR and secondary capture go back into the same study in Orthanc by STOW-RS; they are queried
  back over DICOMweb (QIDO-RS, WADO-RS), each checked by dciodvfy and read by highdicom, the SR's
  numbers against the job's report.json.
- The same through STOW-RS: Orthanc's DICOMweb client sends the study to the gateway's
  ``POST /dicomweb/studies``; the gateway's route sends the results back to Orthanc.
- What must be refused or kept: an unknown calling AE (association rejected), a non-image SOP
  class (C-STORE 0x0122), an association aborted half-way and a listener killed before it
  submitted (the acknowledged instances are submitted after the restart), a series of mixed
  geometry (the gateway's 422 recorded, the instances kept), STOW-RS bodies of the wrong media
  type (415), with foreign or non-image parts (202/409 with FailedSOPSequence).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from sfpc.inference.contract import DEFAULT_MODEL_DIR
from tests.support.io import dciodvfy_errors, series_datasets, to_bytes
from tests.support.orthanc import PASSWORD, USER, OrthancServer, _free_ports, missing_reason
from tests.support.paths import DATA, DATA_MISSING
from tests.support.server import GatewayServer, stop_process

pytest.importorskip("pynetdicom")
pytest.importorskip("dicomweb_client", reason="pip install dicomweb-client (extra 'pacs')")
pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not DATA.is_dir(), reason=DATA_MISSING),
              pytest.mark.skipif(missing_reason() is not None, reason=str(missing_reason())),
              pytest.mark.skipif(shutil.which("storescu") is None,
                                 reason="dcmtk's storescu is not installed (apt-get install "
                                        "-y dcmtk)")]

OUTPUTS = ["seg_dicom", "pmap_dicom", "sr_dicom", "sc_dicom", "report_json"]
SOP = {"SEG": "1.2.840.10008.5.1.4.1.1.66.4", "PM": "1.2.840.10008.5.1.4.1.1.30",
       "SR": "1.2.840.10008.5.1.4.1.1.88.34", "SC": "1.2.840.10008.5.1.4.1.1.7"}
FORWARD_LUA = """
function OnStableSeries(seriesId, tags, metadata)
  if tags['Modality'] == 'MR' or tags['Modality'] == 'CT' then
    RestApiPost('/modalities/sfpc/store', seriesId)
  end
end
"""


def write_series(folder: Path, salt: str,
                 edit: Callable[[int, pydicom.Dataset], None] | None = None) -> list[Path]:
    """The real MR series with new valid UIDs (salted: each test its own study), as files."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, ds in enumerate(series_datasets()):
        for keyword in ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID",
                        "FrameOfReferenceUID"):
            setattr(ds, keyword, generate_uid(entropy_srcs=[salt, str(ds.get(keyword))]))
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        if edit is not None:
            edit(i, ds)
        path = folder / f"{i:03d}.dcm"
        path.write_bytes(to_bytes(ds))
        paths.append(path)
    return paths


class ListenProcess:
    """``sfpc listen --config FILE`` as a child process."""

    def __init__(self, config: dict[str, Any], folder: Path) -> None:
        self.config = config
        self.folder = folder
        self.path = folder / "listen.json"
        self.path.write_text(json.dumps(config))
        self.process: subprocess.Popen[str] | None = None

    @property
    def port(self) -> int:
        return int(self.config["listen"]["port"])

    @property
    def spool(self) -> Path:
        return Path(self.config["listen"]["spool"])

    def start(self) -> ListenProcess:
        log = open(self.folder / "listen.log", "a")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "sfpc.cli", "listen", "--config", str(self.path)],
            stdout=subprocess.PIPE, stderr=log, text=True,
            env={k: v for k, v in os.environ.items() if not k.startswith("SFPC_")})
        log.close()
        line = self.process.stdout.readline()  # printed once the port is bound
        assert line.startswith("sfpc listen:"), self.log()
        return self

    def log(self) -> str:
        path = self.folder / "listen.log"
        return path.read_text() if path.exists() else ""

    def states(self) -> list[dict[str, Any]]:
        folder = self.spool / "series"
        return [json.loads((d / "state.json").read_text()) | {"folder": str(d)}
                for d in sorted(folder.iterdir()) if (d / "state.json").is_file()] \
            if folder.is_dir() else []

    def wait_state(self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 90.0
                   ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [s for s in self.states() if predicate(s)]
            if found:
                return found[0]
            time.sleep(0.25)
        raise AssertionError(f"no series state matched within {timeout} s: {self.states()}\n"
                             f"{self.log()[-3000:]}")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        stop_process(self.process)


def listen_config(folder: Path, gateway_url: str, **more: Any) -> dict[str, Any]:
    (port,) = _free_ports(1)
    config = {"listen": {"ae_title": "SFPC", "host": "127.0.0.1", "port": port,
                         "spool": str(folder / "spool"), "quiet_s": 1, "poll_s": 0.2,
                         "retry_s": 1},
              "calling_aes": {"ORTHANC": {"outputs": OUTPUTS}, "MODALITY": {}},
              "gateway": {"url": gateway_url, "retries": 2}}
    for key, value in more.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    return config


def dicomweb(orthanc: OrthancServer) -> Any:
    import requests
    from dicomweb_client import DICOMwebClient

    session = requests.Session()
    session.auth = (USER, PASSWORD)
    return DICOMwebClient(url=orthanc.dicomweb_url, session=session)


def wait_for_results(orthanc: OrthancServer, study: str, count: int, timeout: float = 90.0
                     ) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        derived = [s for s in orthanc.series_tags()
                   if s["study_uid"] == study and s.get("Modality") != "MR"]
        if len(derived) >= count:
            return derived
        time.sleep(0.3)
    raise AssertionError(f"{count} result series did not arrive in study {study}: "
                         f"{orthanc.series_tags()}")


def check_results_in_study(orthanc: OrthancServer, study: str, sources: list[Path],
                           report: dict[str, Any], tmp_path: Path) -> None:
    """The SEG, parametric map, SR and SC of the study as QIDO-RS finds them and WADO-RS
    returns them: valid (dciodvfy), read by highdicom, referencing the source series, and the
    SR's numbers those of the report."""
    import highdicom as hd

    dw = dicomweb(orthanc)
    source = pydicom.dcmread(sources[0])
    found: dict[str, pydicom.Dataset] = {}
    for entry in dw.search_for_series(study_instance_uid=study):
        series_uid = entry["0020000E"]["Value"][0]
        if series_uid == source.SeriesInstanceUID:
            continue
        (instance,) = dw.retrieve_series(study, series_uid)
        kind = next(k for k, uid in SOP.items() if uid == instance.SOPClassUID)
        assert kind not in found, f"two {kind} objects in the study"
        found[kind] = instance
    assert set(found) == set(SOP), sorted(found)
    for kind, ds in found.items():
        buffer = io.BytesIO()
        pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
        assert dciodvfy_errors(buffer.getvalue(), tmp_path) == [], kind
        assert ds.StudyInstanceUID == study and ds.PatientID == source.PatientID, kind
    seg = hd.seg.Segmentation.from_dataset(found["SEG"])
    referenced = seg.ReferencedSeriesSequence[0]
    assert referenced.SeriesInstanceUID == source.SeriesInstanceUID
    assert {i.ReferencedSOPInstanceUID for i in referenced.ReferencedInstanceSequence} == {
        pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in sources}
    pm = hd.pm.ParametricMap.from_dataset(found["PM"])
    assert pm.ReferencedSeriesSequence[0].SeriesInstanceUID == source.SeriesInstanceUID
    assert 0.0 <= float(np.min(pm.pixel_array)) <= float(np.max(pm.pixel_array)) <= 1.0
    sc = hd.Image.from_dataset(found["SC"])
    assert sc.PhotometricInterpretation == "RGB" and sc.pixel_array.shape[-1] == 3

    sr = hd.sr.Comprehensive3DSR.from_dataset(found["SR"])
    groups = {g.tracking_identifier: g for g in
              sr.content.get_volumetric_roi_measurement_groups()}
    structures = {n: e for n, e in report["classes"].items() if e["label"] > 0}
    assert set(groups) == set(structures)
    for name, entry in structures.items():
        segment = groups[name].referenced_segment
        assert segment.referenced_sop_instance_uid == seg.SOPInstanceUID
        assert segment.referenced_segment_numbers == [entry["label"]]
        values = {m.name.meaning: m.value for m in groups[name].get_measurements()}
        assert values["Volume"] == pytest.approx(entry["volume_ml"], rel=1e-9)
        if entry["mean_entropy"] is not None:
            assert values["Mean normalised predictive entropy"] == pytest.approx(
                entry["mean_entropy"], rel=1e-9)
    (case,) = sr.content.get_image_measurement_groups()
    values = {m.name.meaning: m.value for m in case.get_measurements()}
    assert values["Review threshold"] == pytest.approx(report["quality"]["threshold"],
                                                       rel=1e-9)
    (flag,) = case.get_qualitative_evaluations()
    assert flag.value.meaning == ("Yes" if report["quality"]["review_recommended"] else "No")


# ----------------------------------------------------------------------------------------------
# Fixtures: one gateway (the default model) for the module
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pacs(tmp_path_factory) -> OrthancServer:
    """The PACS the results go back to; it also receives the STOW-RS test's study."""
    folder = tmp_path_factory.mktemp("pacs")
    lua = folder / "forward.lua"
    lua.write_text(FORWARD_LUA)
    (listen_port,) = _free_ports(1)
    server = OrthancServer(folder, dicom=True, extra={
        "StableAge": 1, "LuaScripts": [str(lua)],
        "DicomModalities": {"sfpc": ["SFPC", "127.0.0.1", listen_port]}})
    server.listen_port = listen_port  # type: ignore[attr-defined]
    with server:
        yield server


@pytest.fixture(scope="module")
def stow_pacs(tmp_path_factory) -> OrthancServer:
    """A second PACS without auto-forward: the source of the STOW-RS push."""
    with OrthancServer(tmp_path_factory.mktemp("stow-pacs")) as server:
        yield server


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, stow_pacs) -> GatewayServer:
    destinations = {"pacs": {"kind": "dicomweb", "url": stow_pacs.dicomweb_url,
                             "username": USER, "password": PASSWORD, "backoff_s": 0.5}}
    env = {"SFPC_DATA_DIR": str(tmp_path_factory.mktemp("data")),
           "SFPC_ONNX_INTRA_OP_THREADS": "1",
           "SFPC_DESTINATIONS": json.dumps(destinations),
           "SFPC_ROUTES": json.dumps([{"model": "*", "destinations": ["pacs"]}]),
           "SFPC_DICOMWEB_OPTIONS": json.dumps({"outputs": OUTPUTS})}
    with GatewayServer([DEFAULT_MODEL_DIR], tmp_path_factory.mktemp("log") / "gw.log",
                       env=env) as server:
        yield server


@pytest.fixture(scope="module")
def listener(tmp_path_factory, pacs, gateway) -> ListenProcess:
    folder = tmp_path_factory.mktemp("listen")
    config = listen_config(
        folder, gateway.url,
        listen={"port": pacs.listen_port},
        destinations={"pacs": {"kind": "dicomweb", "url": pacs.dicomweb_url,
                               "username": USER, "password": PASSWORD}},
        routes=[{"calling_ae": "ORTHANC", "destinations": ["pacs"]}])
    process = ListenProcess(config, folder).start()
    yield process
    process.stop()


def job_view(gateway: GatewayServer, job_id: str) -> dict[str, Any]:
    import httpx

    return httpx.get(f"{gateway.url}/v1/jobs/{job_id}", timeout=30).json()


# ----------------------------------------------------------------------------------------------
# The two push paths, end to end
# ----------------------------------------------------------------------------------------------


def test_series_pushed_through_orthanc_comes_back_into_its_study(
        pacs, listener, gateway, tmp_path) -> None:
    sources = write_series(tmp_path / "series", "c-store")
    study = pydicom.dcmread(sources[0], stop_before_pixels=True).StudyInstanceUID
    sent = subprocess.run(["storescu", "-aet", "MODALITY", "-aec", "ORTHANC", "127.0.0.1",
                           str(pacs.dicom_port), *map(str, sources)],
                          capture_output=True, text=True, timeout=60)
    assert sent.returncode == 0, sent.stdout + sent.stderr

    state = listener.wait_state(lambda s: s["study_uid"] == study
                                and s["status"] in ("delivered", "failed", "delivery_failed"))
    assert state["status"] == "delivered", state
    assert state["calling_ae"] == "ORTHANC" and state["instances"] == len(sources)
    (delivery,) = state["deliveries"]
    assert delivery["destination"] == "pacs" and delivery["status"] == "delivered"
    assert len(delivery["instances"]) == 4  # SEG, PM, SR, SC
    view = job_view(gateway, state["job_id"])
    assert view["status"] == "succeeded" and view["inputs"] == len(sources)
    assert view["options"]["outputs"] == OUTPUTS
    # Delivered: the patient data left the spool, the results stayed.
    assert not list((Path(state["folder"]) / "instances").glob("*.dcm"))
    report = json.loads((Path(state["folder"]) / "results" / "report.json").read_text())

    wait_for_results(pacs, study, 4)
    check_results_in_study(pacs, study, sources, report, tmp_path)
    stored = {i["sop_instance_uid"] for i in delivery["instances"]}
    in_pacs = {pacs.get(f"/instances/{i}")["MainDicomTags"]["SOPInstanceUID"]
               for s in pacs.series_tags() if s["study_uid"] == study
               and s.get("Modality") != "MR" for i in s["instances"]}
    assert stored == in_pacs


def test_study_stored_by_stow_rs_on_the_gateway_comes_back(
        stow_pacs, gateway, tmp_path) -> None:
    sources = write_series(tmp_path / "series", "stow-rs")
    study = pydicom.dcmread(sources[0], stop_before_pixels=True).StudyInstanceUID
    stow_pacs.upload(sources)
    study_id = next(s["ParentStudy"] for s in
                    (stow_pacs.get(f"/series/{i}") for i in stow_pacs.get("/series")))
    # Orthanc's own DICOMweb client pushes the study to the gateway.
    stow_pacs.post("/dicom-web/servers/sfpc", {"Url": f"{gateway.url}/dicomweb/"},
                   method="PUT")
    stow_pacs.post("/dicom-web/servers/sfpc/stow", {"Resources": [study_id]})

    deadline = time.monotonic() + 90
    jobs: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        import httpx

        items = httpx.get(f"{gateway.url}/v1/jobs", timeout=30).json()["items"]
        jobs = [j for j in items if j["options"].get("series_uid") == pydicom.dcmread(
            sources[0], stop_before_pixels=True).SeriesInstanceUID]
        if jobs and jobs[0]["status"] not in ("queued", "running"):
            break
        time.sleep(0.3)
    (job,) = jobs
    assert job["status"] == "succeeded", job
    assert job["inputs"] == len(sources)
    (delivery,) = job["deliveries"]
    assert delivery["status"] == "delivered", delivery.get("error")
    assert delivery["target"] == stow_pacs.dicomweb_url
    import httpx

    report = httpx.get(f"{gateway.url}/v1/jobs/{job['id']}/results/report.json",
                       timeout=30).json()
    wait_for_results(stow_pacs, study, 4)
    check_results_in_study(stow_pacs, study, sources, report, tmp_path)


# ----------------------------------------------------------------------------------------------
# What is refused, and what is never lost
# ----------------------------------------------------------------------------------------------


def _scu(calling: str = "MODALITY") -> Any:
    from pynetdicom import AE, StoragePresentationContexts

    ae = AE(ae_title=calling)
    ae.requested_contexts = StoragePresentationContexts
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    return ae


def test_unknown_calling_ae_is_rejected(listener, tmp_path) -> None:
    before = listener.states()
    assoc = _scu("STRANGER").associate("127.0.0.1", listener.port, ae_title="SFPC")
    assert assoc.is_rejected
    rejection = assoc.acceptor.primitive
    # Rejected permanently by the service user: calling AE title not recognised (PS3.8 7.1.1).
    assert (rejection.result, rejection.result_source, rejection.diagnostic) == (0x01, 0x01,
                                                                                 0x03)
    # Another called AE title than the listener's is refused too.
    wrong = _scu("MODALITY").associate("127.0.0.1", listener.port, ae_title="NOT-SFPC")
    assert wrong.is_rejected and wrong.acceptor.primitive.diagnostic == 0x07
    # dcmtk's storescu sees the same.
    sources = write_series(tmp_path / "series", "stranger")
    sent = subprocess.run(["storescu", "-aet", "STRANGER", "-aec", "SFPC", "127.0.0.1",
                           str(listener.port), str(sources[0])],
                          capture_output=True, text=True, timeout=60)
    assert sent.returncode != 0 and "Rejected" in sent.stdout + sent.stderr
    # Our own C-STORE sender treats a rejection as final: one attempt, no retry.
    from sfpc.io.dicom_net import Destination, send

    waits: list[float] = []
    record = send("listener", Destination(kind="dimse", host="127.0.0.1", port=listener.port,
                                          ae_title="SFPC", calling_ae_title="STRANGER",
                                          attempts=3),
                  [("a.dcm", sources[0].read_bytes())], sleep=waits.append)
    assert (record["status"], record["attempts"], waits) == ("failed", 1, [])
    assert "rejected" in record["error"]
    assert listener.states() == before


def test_non_image_sop_class_is_refused_with_0122(listener) -> None:
    from pydicom.data import get_testdata_file

    report = pydicom.dcmread(get_testdata_file("test-SR.dcm"))  # pydicom's Comprehensive SR
    assert report.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33"
    before = listener.states()
    assoc = _scu().associate("127.0.0.1", listener.port, ae_title="SFPC")
    assert assoc.is_established
    try:
        status = assoc.send_c_store(report)
    finally:
        assoc.release()
    assert status.Status == 0x0122  # Refused: SOP Class not supported
    assert listener.states() == before  # written nowhere


def test_aborted_association_and_killed_listener_lose_nothing(gateway, tmp_path) -> None:
    config = listen_config(tmp_path, gateway.url, listen={"quiet_s": 4})
    process = ListenProcess(config, tmp_path).start()
    sources = write_series(tmp_path / "series", "abort")
    acknowledged = []
    try:
        assoc = _scu().associate("127.0.0.1", process.port, ae_title="SFPC")
        assert assoc.is_established
        for path in sources[:7]:
            ds = pydicom.dcmread(path)
            assert assoc.send_c_store(ds).Status == 0x0000
            acknowledged.append(ds.SOPInstanceUID)
        assoc.abort()  # the modality's cable pulled half-way
        (state,) = process.states()
        spooled = sorted(p.name for p in (Path(state["folder"]) / "instances").iterdir())
        assert spooled == sorted(f"{uid}.dcm" for uid in acknowledged)
        assert state["status"] == "receiving"
        process.kill()  # before the quiet period ended: nothing was submitted
        assert "job_id" not in process.states()[0]
    finally:
        process.kill()

    restarted = ListenProcess(config, tmp_path).start()
    try:
        state = restarted.wait_state(lambda s: s["status"] in ("delivered", "failed"))
    finally:
        restarted.stop()
    assert state["status"] == "delivered", state  # no route: kept in the spool only
    view = job_view(gateway, state["job_id"])
    assert view["status"] == "succeeded" and view["inputs"] == len(acknowledged)


def test_series_of_mixed_geometry_is_recorded_failed_and_kept(gateway, tmp_path) -> None:
    config = listen_config(tmp_path, gateway.url, listen={"keep_instances": False})
    process = ListenProcess(config, tmp_path).start()

    def shift(index: int, ds: pydicom.Dataset) -> None:
        # The second half of the series 30 mm further along its normal: two stacks with a gap,
        # in one series.
        if index >= 10:
            cosines = np.asarray([float(v) for v in ds.ImageOrientationPatient])
            normal = np.cross(cosines[:3], cosines[3:])
            position = np.asarray([float(v) for v in ds.ImagePositionPatient]) + 30 * normal
            ds.ImagePositionPatient = [f"{v:.4f}" for v in position]

    sources = write_series(tmp_path / "series", "mixed", shift)
    try:
        sent = subprocess.run(["storescu", "-aet", "MODALITY", "-aec", "SFPC", "127.0.0.1",
                               str(process.port), *map(str, sources)],
                              capture_output=True, text=True, timeout=60)
        assert sent.returncode == 0, sent.stdout + sent.stderr
        state = process.wait_state(lambda s: s["status"] in ("delivered", "failed"))
    finally:
        process.stop()
    assert state["status"] == "failed", state
    assert state["error"]["code"] == "non_uniform_spacing", state["error"]
    assert state["error"]["job_status"] == "failed"
    assert job_view(gateway, state["job_id"])["error"]["code"] == "non_uniform_spacing"
    spooled = list((Path(state["folder"]) / "instances").glob("*.dcm"))
    assert len(spooled) == len(sources)  # nothing received is lost


def test_stow_rs_answers_as_the_standard_says(gateway, tmp_path) -> None:
    import httpx

    from sfpc.io.dicom_net import multipart_related

    sources = write_series(tmp_path / "series", "stow-status")
    study = pydicom.dcmread(sources[0], stop_before_pixels=True).StudyInstanceUID
    url = f"{gateway.url}/dicomweb/studies"
    not_dicom = b"this is no DICOM file"
    # A study's URL: images of another study are refused (0xC409), the rest accepted: 202.
    other = write_series(tmp_path / "other", "stow-other")[0].read_bytes()
    body, content_type = multipart_related([p.read_bytes() for p in sources[:3]]
                                           + [not_dicom, other])
    response = httpx.post(f"{url}/{study}", content=body, timeout=60,
                          headers={"Content-Type": content_type,
                                   "Accept": "application/dicom+json"},
                          params={"outputs": "report_json"})
    assert response.status_code == 202, response.text
    assert response.headers["content-type"].startswith("application/dicom+json")
    answer = response.json()
    stored = [i["00081155"]["Value"][0] for i in answer["00081199"]["Value"]]
    assert stored == [pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID
                      for p in sources[:3]]
    reasons = sorted(i["00081197"]["Value"][0] for i in answer["00081198"]["Value"])
    assert reasons == [0xC000, 0xC409]
    (job_id,) = response.headers["x-sfpc-jobs"].split(",")
    assert job_view(gateway, job_id)["inputs"] == 3

    # Only refused instances: 409.
    seg_like = pydicom.dcmread(sources[0])
    seg_like.SOPClassUID = SOP["SEG"]
    seg_like.file_meta.MediaStorageSOPClassUID = SOP["SEG"]
    body, content_type = multipart_related([to_bytes(seg_like)])
    response = httpx.post(url, content=body, headers={"Content-Type": content_type},
                          timeout=60)
    assert response.status_code == 409
    (failed,) = response.json()["00081198"]["Value"]
    assert failed["00081197"]["Value"] == [0x0122]
    assert response.headers["x-sfpc-jobs"] == ""

    # Not multipart/related: 415 with the gateway's error body.
    response = httpx.post(url, content=sources[0].read_bytes(), timeout=60,
                          headers={"Content-Type": "application/dicom"})
    assert response.status_code == 415
    assert response.json()["error"]["code"] == "unsupported_media_type"
