"""The Python clients (sync and asyncio) against a real gateway process.

Oracles: the raw HTTP answers of the same endpoints (httpx without the client), nibabel (the
mask's grid is the upload's), pydicom (the SEG references the uploaded series), the server's own
Prometheus counters (how many 503s it sent while the client retried), and hand-worked backoff
delays.
"""

from __future__ import annotations

import asyncio
import gzip
import io
import re
import socket
import threading
import time
from pathlib import Path

import httpx
import nibabel as nib
import numpy as np
import pytest

from sfpc.clients.http import NO_RETRY, AsyncSFPCClient, RetryPolicy, SFPCClient  # noqa: E402
from sfpc.clients.models import (  # noqa: E402
    APIError,
    Health,
    Job,
    JobFailed,
    JobStatus,
    ModelInfo,
    RequestTimeout,
    TransportError,
)
from tests.support.jobs import volume_upload
from tests.support.models import tiny_models
from tests.support.paths import DATA, DATA_MISSING, DICOM_SERIES
from tests.support.server import GatewayServer

pytest.importorskip("torch")  # the tiny models are trained and exported with torch
# Real gateway processes (uvicorn via `sfpc serve`): not in `make test-fast`.
pytestmark = pytest.mark.integration
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=DATA_MISSING)
KEY = "client-test-key"
FAST = RetryPolicy(attempts=3, backoff_s=0.05, max_backoff_s=0.2, jitter=False)
SMALL_NIFTI = DATA / "lesions" / "breast1_image.nii.gz"


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    return tiny_models(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def server(models, tmp_path_factory):
    # One job at a time and at most two queued, so that a burst of submissions meets 503s.
    env = {"SFPC_API_KEYS": f'["{KEY}"]', "SFPC_DATA_DIR": str(tmp_path_factory.mktemp("data")),
           "SFPC_JOB_WORKERS": "1", "SFPC_JOB_MAX_QUEUED": "2",
           "SFPC_ONNX_INTRA_OP_THREADS": "1"}
    log = tmp_path_factory.mktemp("log") / "gateway.log"
    with GatewayServer([models["tiny3d"], models["tiny2d"]], log, env=env) as srv:
        yield srv


@pytest.fixture
def client(server):
    with SFPCClient(server.url, api_key=KEY, retry=FAST, timeout=60) as c:
        yield c


def raw(server, method: str, path: str, **kwargs) -> httpx.Response:
    return httpx.request(method, f"{server.url}{path}", headers={"X-API-Key": KEY},
                         timeout=60, **kwargs)


def nifti(data: bytes) -> nib.Nifti1Image:
    return nib.Nifti1Image.from_bytes(gzip.decompress(data))


def errors_sent(server, code: str) -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    match = re.search(rf'^sfpc_errors_total\{{code="{code}",status="\d+"\}} (\S+)$', text, re.M)
    return float(match.group(1)) if match else 0.0


# ----------------------------------------------------------------------------------------------


def test_backoff_delays_are_exponential_capped_and_honour_retry_after():
    policy = RetryPolicy(attempts=6, backoff_s=0.5, max_backoff_s=3.0, jitter=False)
    assert [policy.delay(n) for n in range(1, 6)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert policy.delay(1, retry_after=10) == 3.0  # a server's wish, capped
    assert policy.delay(4, retry_after=0.25) == 0.25
    jittered = RetryPolicy(backoff_s=1.0, jitter=True)
    assert all(0.5 <= jittered.delay(1) <= 1.0 for _ in range(50))
    with pytest.raises(ValueError):
        RetryPolicy(attempts=0)


def test_operations_and_models_are_typed(server, client):
    assert client.health() == Health(status="ok")
    ready = client.ready()
    assert ready.ready and ready.models == {"tiny3d": True, "tiny2d": True}
    assert "sfpc_http_requests_total" in client.metrics()
    listing = client.models()
    oracle = raw(server, "GET", "/v1/models").json()
    assert listing.default == oracle["default"] == "tiny3d"
    assert [m.name for m in listing.models] == [m["name"] for m in oracle["models"]]
    one = client.model("tiny2d")
    assert isinstance(one, ModelInfo)
    expected = raw(server, "GET", "/v1/models/tiny2d").json()
    assert one.model_dump(mode="json") == expected
    assert one.spatial_dims == 2 and one.class_names == expected["class_names"]
    assert listing.get("tiny2d") == one and listing.get().name == "tiny3d"


def test_model_info_declares_what_the_gateway_sends_with_its_defaults(server, client):
    """Every field of the gateway's /v1/models is a declared field of the client's ModelInfo
    (none left to ``extra``), and where the gateway's schema declares a default, the client's
    is the same (flip: allowed unless the model was trained without flips)."""
    for sent in raw(server, "GET", "/v1/models").json()["models"]:
        parsed = ModelInfo.model_validate(sent)
        assert parsed.model_extra == {}, sorted(parsed.model_extra or {})
        assert parsed.quality == sent["quality"] and parsed.flip is sent["flip"]
    declared = raw(server, "GET", "/openapi.json").json()["components"]["schemas"]["ModelInfo"]
    assert set(declared["properties"]) <= set(ModelInfo.model_fields)
    defaults = {name: prop["default"] for name, prop in declared["properties"].items()
                if "default" in prop}
    assert "flip" in defaults and "quality" in declared["properties"]
    for name, default in defaults.items():
        assert ModelInfo.model_fields[name].get_default(call_default_factory=True) == default, \
            name


def test_unknown_option_names_fail_before_sending(client):
    with pytest.raises(TypeError, match="colour"):
        client.segment(("a.nii", b"x"), colour="red")


@needs_data
def test_segment_nifti_gives_the_raw_endpoints_artefacts(server, client):
    result = client.segment(SMALL_NIFTI, outputs=["mask_nifti", "report_json"])
    assert sorted(result.files) == ["mask.nii.gz", "report.json"]
    assert result.model == "tiny3d" and result.request_id
    source = nib.load(SMALL_NIFTI)
    mask = nifti(result.files["mask.nii.gz"])
    assert mask.shape == source.shape
    np.testing.assert_allclose(mask.affine, source.affine, atol=1e-5)
    assert result.report["input"]["shape"] == list(source.shape)
    with open(SMALL_NIFTI, "rb") as fh:
        oracle = raw(server, "POST", "/v1/segment", files={"file": (SMALL_NIFTI.name, fh)})
    np.testing.assert_array_equal(np.asanyarray(mask.dataobj),
                                  np.asanyarray(nifti(oracle.content).dataobj))
    # Bytes in memory work as well as paths.
    again = client.segment((SMALL_NIFTI.name, SMALL_NIFTI.read_bytes()))
    assert list(again.files) == ["mask.nii.gz"]
    # flip reaches the gateway: the report says so and counts twice the windows
    flipped = client.segment(SMALL_NIFTI, outputs=["report_json"], flip=True)
    assert flipped.report["model"]["flip"] is True
    assert flipped.report["n_windows"] == 2 * result.report["n_windows"]


@needs_data
def test_a_dicom_folder_goes_up_as_one_series_and_gives_a_seg(client):
    import pydicom

    sources = [pydicom.dcmread(p, stop_before_pixels=True) for p in DICOM_SERIES.iterdir()]
    result = client.segment(DICOM_SERIES)
    assert list(result.files) == ["segmentation.dcm"]
    assert result.series_uid == sources[0].SeriesInstanceUID
    seg = pydicom.dcmread(io.BytesIO(result.files["segmentation.dcm"]))
    referenced = seg.ReferencedSeriesSequence[0]
    assert referenced.SeriesInstanceUID == sources[0].SeriesInstanceUID
    assert {i.ReferencedSOPInstanceUID for i in referenced.ReferencedInstanceSequence} == {
        ds.SOPInstanceUID for ds in sources}


def test_errors_carry_status_code_and_request_id(server, client, tmp_path):
    upload = volume_upload(16, spacing=5.0)
    with pytest.raises(APIError) as caught:
        client.segment(("v.nii.gz", upload), model="no-such-model")
    assert caught.value.status == 404 and caught.value.code == "model_not_found"
    assert caught.value.request_id
    with pytest.raises(APIError) as caught:
        client.segment(("v.nii.gz", upload), outputs="seg_dicom")
    assert caught.value.status == 422 and caught.value.code == "seg_needs_dicom"
    with SFPCClient(server.url, retry=FAST) as anonymous, pytest.raises(APIError) as caught:
        anonymous.models()
    assert caught.value.status == 401 and caught.value.code == "missing_api_key"
    with pytest.raises(FileNotFoundError):
        client.segment(tmp_path / "absent.nii.gz")


def test_job_lifecycle(server, client, tmp_path):
    upload = ("v.nii.gz", volume_upload(32, spacing=5.0, seed=3))
    submitted = client.submit_job(upload, outputs="mask_nifti,report_json")
    job = client.wait_job(submitted.id, timeout=60, poll_s=0.05)
    assert isinstance(job, Job) and job.status is JobStatus.SUCCEEDED
    assert sorted(job.results) == ["mask.nii.gz", "report.json"]
    assert job.timings.run_s is not None and job.timings.run_s >= 0
    oracle = raw(server, "GET", f"/v1/jobs/{job.id}").json()
    assert job.model_dump(mode="json", include={"id", "status", "results", "attempts"}) == {
        k: oracle[k] for k in ("id", "status", "results", "attempts")}

    results = client.job_results(job.id)
    sync = client.segment(upload, outputs="mask_nifti,report_json")
    np.testing.assert_array_equal(np.asanyarray(nifti(results.files["mask.nii.gz"]).dataobj),
                                  np.asanyarray(nifti(sync.files["mask.nii.gz"]).dataobj))
    assert client.job_result_file(job.id, "mask.nii.gz") == results.files["mask.nii.gz"]
    written = client.download_job(job.id, tmp_path / "out")
    assert sorted(p.name for p in written) == ["mask.nii.gz", "report.json"]
    assert (tmp_path / "out" / "mask.nii.gz").read_bytes() == results.files["mask.nii.gz"]

    page = client.jobs(limit=1)
    assert page.limit == 1 and len(page.items) == 1 and page.total >= 1
    listed = [j.id for j in client.iter_jobs(page_size=1)]
    assert job.id in listed and len(listed) == page.total == len(set(listed))
    assert [j.id for j in client.iter_jobs(JobStatus.SUCCEEDED)].count(job.id) == 1
    with pytest.raises(APIError) as caught:
        client.cancel_job(job.id)
    assert caught.value.status == 409
    with pytest.raises(APIError) as caught:
        client.job("no-such-job")
    assert caught.value.status == 404


def test_cancelled_job_is_reported_as_such(client):
    slow = client.submit_job(("slow.nii.gz", volume_upload(96, spacing=5.0, seed=4)))
    queued = client.submit_job(("queued.nii.gz", volume_upload(32, spacing=5.0, seed=5)))
    cancelled = client.cancel_job(queued.id)
    assert cancelled.status is JobStatus.CANCELLED
    final = client.wait_job(queued.id, timeout=30)
    assert final.status is JobStatus.CANCELLED
    with pytest.raises(JobFailed) as caught:
        client.download_job(queued.id, "/nonexistent")
    assert caught.value.job.id == queued.id
    assert client.wait_job(slow.id, timeout=60).status is JobStatus.SUCCEEDED


def test_async_client_answers_like_the_sync_one(server, client):
    upload = ("v.nii.gz", volume_upload(24, spacing=5.0, seed=6))
    sync_mask = client.segment(upload).files["mask.nii.gz"]

    async def main() -> dict:
        async with AsyncSFPCClient(server.url, api_key=KEY, retry=FAST, timeout=60) as ac:
            out = {"health": await ac.health(), "ready": await ac.ready(),
                   "metrics": await ac.metrics(), "models": await ac.models(),
                   "model": await ac.model("tiny3d")}
            segmented = await asyncio.gather(*(ac.segment(upload) for _ in range(2)))
            out["masks"] = [r.files["mask.nii.gz"] for r in segmented]
            run = await ac.run_job(upload, timeout=60)
            out["job_mask"] = run.files["mask.nii.gz"]
            out["page"] = await ac.jobs(limit=2)
            out["all"] = [j.id async for j in ac.iter_jobs(page_size=2)]
            job_id = out["page"].items[0].id
            out["file"] = await ac.job_result_file(job_id, "mask.nii.gz")
            out["job"] = await ac.wait_job(job_id, timeout=30)
            try:
                await ac.cancel_job(job_id)
            except APIError as exc:
                out["cancel_status"] = exc.status
            return out

    out = asyncio.run(main())
    assert out["health"].status == "ok" and out["ready"].ready
    assert "sfpc_segmentations_total" in out["metrics"]
    assert out["models"] == client.models() and out["model"] == client.model("tiny3d")
    for mask in [*out["masks"], out["job_mask"], out["file"]]:
        np.testing.assert_array_equal(np.asanyarray(nifti(mask).dataobj),
                                      np.asanyarray(nifti(sync_mask).dataobj))
    assert len(out["all"]) == out["page"].total
    assert out["job"].status is JobStatus.SUCCEEDED and out["cancel_status"] == 409


def test_full_queue_503_is_retried_until_accepted(server, client):
    uploads = [("v.nii.gz", volume_upload(64, spacing=5.0, seed=10 + i)) for i in range(5)]
    before = errors_sent(server, "queue_full")
    # Without retries, a burst meets the 503 (one running + two queued fill the server).
    with SFPCClient(server.url, api_key=KEY, retry=NO_RETRY) as impatient:
        accepted, refused = [], None
        for upload in uploads:
            try:
                accepted.append(impatient.submit_job(upload).id)
            except APIError as exc:
                refused = exc
                break
    assert refused is not None and refused.status == 503 and refused.code == "queue_full"
    assert refused.retry_after is not None and refused.retry_after >= 1
    for job_id in accepted:
        client.wait_job(job_id, timeout=60)

    patient = RetryPolicy(attempts=100, backoff_s=0.05, max_backoff_s=0.2, jitter=False)
    with SFPCClient(server.url, api_key=KEY, retry=patient) as persistent:
        ids = [persistent.submit_job(upload).id for upload in uploads]
        finals = [persistent.wait_job(job_id, timeout=90) for job_id in ids]
    assert [f.status for f in finals] == [JobStatus.SUCCEEDED] * len(uploads)
    # The server refused at least once more while the patient client kept going.
    assert errors_sent(server, "queue_full") >= before + 2


def test_refused_connection_is_retried_until_the_gateway_is_up(models, tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    # Nothing listens: three tries with 0.2 s then 0.4 s between them, then TransportError.
    started = time.monotonic()
    policy = RetryPolicy(attempts=3, backoff_s=0.2, max_backoff_s=1.0, jitter=False)
    with SFPCClient(url, retry=policy) as down, pytest.raises(TransportError) as caught:
        down.health()
    assert time.monotonic() - started >= 0.6 and "after 3 attempts" in str(caught.value)

    outcome: dict[str, object] = {}

    def call() -> None:
        patient = RetryPolicy(attempts=200, backoff_s=0.05, max_backoff_s=0.2, jitter=False)
        with SFPCClient(url, retry=patient) as c:
            outcome["health"] = c.health()
            outcome["at"] = time.monotonic()

    waiter = threading.Thread(target=call)
    waiter.start()
    time.sleep(0.5)  # the client is already retrying when the gateway starts
    launched = time.monotonic()
    with GatewayServer([models["tiny3d"]], tmp_path / "late.log",
                       env={"SFPC_DATA_DIR": str(tmp_path / "data")},
                       args=["--port", str(port)]) as late:
        assert late.port == port
        waiter.join(timeout=60)
    assert outcome.get("health") == Health(status="ok")
    assert outcome["at"] > launched


def test_client_timeout_is_not_retried(client, server):
    upload = ("big.nii.gz", volume_upload(128, spacing=5.0, seed=20))
    patient_but_slow = RetryPolicy(attempts=3, backoff_s=5.0, jitter=False)
    with SFPCClient(server.url, api_key=KEY, retry=patient_but_slow) as c:
        started = time.monotonic()
        with pytest.raises(RequestTimeout):
            c.segment(upload, timeout=0.2)
        assert time.monotonic() - started < 4.0  # a retry would have slept 5 s first
    assert client.health().status == "ok"  # the gateway shrugs the abandoned request off
