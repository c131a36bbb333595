"""Asynchronous jobs over real HTTP between processes (``sfpc serve`` under uvicorn).

Oracles: a job's results are compared with what the synchronous endpoint returns for the same
upload and options, and with nibabel's reading of the upload (shape, affine); the job database is
read directly with sqlite3 and the data dir with the file system, independently of the job code.
"""

from __future__ import annotations

import io
import json
import math
import time
import uuid
import zipfile

import httpx
import numpy as np
import pytest

from tests.support.jobs import (
    WAIT_S,
    claim_all,
    db_rows,
    nifti_from,
    start_gateway,
    submit,
    volume_upload,
    wait_status,
)
from tests.support.models import session_model
from tests.support.paths import DATA, DICOM_SERIES

pytest.importorskip("torch")  # the tiny model is trained and exported with torch
# Real gateway processes and claimers in spawned processes: not in `make test-fast`.
pytestmark = pytest.mark.integration

SLOW = 80  # 64 windows: about a second on one core
FAST = 32  # one window

REAL_NIFTI = DATA / "lesions" / "breast1_image.nii.gz"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return session_model(tmp_path_factory)


@pytest.fixture(scope="module")
def gateway(model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("jobs-main")
    server = start_gateway(model_dir, root / "data", root / "gateway.log", job_workers=1,
                           job_max_queued=3)
    yield server, root / "data"
    server.stop()


@pytest.fixture(scope="module")
def client(gateway):
    with httpx.Client(base_url=gateway[0].url, timeout=WAIT_S) as c:
        yield c


@pytest.fixture(scope="module")
def short_gateway(model_dir, tmp_path_factory):
    """A small queue and a three-second retention."""
    root = tmp_path_factory.mktemp("jobs-short")
    server = start_gateway(model_dir, root / "data", root / "gateway.log", job_workers=1,
                           job_max_queued=2, job_retention_s=3)
    with httpx.Client(base_url=server.url, timeout=WAIT_S) as c:
        yield server, root / "data", c
    server.stop()


def _error(response: httpx.Response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert error["code"] == code, error
    assert error["message"]
    return error


def _upload_case(case: str) -> tuple[list[tuple[str, bytes]], dict[str, str]]:
    if case == "synthetic":
        return [("volume.nii.gz", volume_upload(48, seed=3))], {}
    if not DATA.is_dir():
        pytest.skip(f"shared data folder {DATA} is absent")
    if case == "nifti":
        return [(REAL_NIFTI.name, REAL_NIFTI.read_bytes())], {}
    files = sorted(p for p in DICOM_SERIES.iterdir() if p.is_file())
    return [(p.name, p.read_bytes()) for p in files], {"outputs": "mask_nifti"}


@pytest.mark.parametrize("case", ["synthetic", "nifti", "dicom"])
def test_job_results_equal_the_synchronous_mask(client, gateway, case) -> None:
    uploads, params = _upload_case(case)
    multipart = [("file", (name, data)) for name, data in uploads]
    response = client.post("/v1/jobs", params=params, files=multipart)
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["status"] == "queued"
    assert response.headers["location"] == body["status_url"]
    assert body["status_url"].endswith(f"/v1/jobs/{body['id']}")
    assert body["results_url"] == body["status_url"] + "/results"

    status = wait_status(client, body["id"])
    assert status["status"] == "succeeded", status
    assert status["attempts"] == 1 and status["error"] is None
    assert status["inputs"] == len(uploads)
    assert status["input_bytes"] == sum(len(d) for _, d in uploads)
    assert status["results"] == ["mask.nii.gz"]
    assert status["timings"]["run_s"] > 0 and "inference" in status["timings"]["stages"]

    job_result = client.get(body["results_url"])
    assert job_result.status_code == 200
    assert job_result.headers["content-type"] == "application/gzip"
    sync = client.post("/v1/segment", params=params, files=multipart)
    assert sync.status_code == 200, sync.text
    job_mask, sync_mask = nifti_from(job_result.content), nifti_from(sync.content)
    np.testing.assert_array_equal(np.asanyarray(job_mask.dataobj),
                                  np.asanyarray(sync_mask.dataobj))
    np.testing.assert_array_equal(job_mask.affine, sync_mask.affine)
    if case != "dicom":
        source = nifti_from(uploads[0][1])
        assert job_mask.shape == source.shape
        np.testing.assert_allclose(job_mask.affine, source.affine, atol=1e-5)
    by_name = client.get(f"{body['results_url']}/mask.nii.gz")
    assert by_name.status_code == 200 and by_name.content == job_result.content

    # On disk: the upload (patient data) is gone once the job ended, the results stay.
    job_dir = gateway[1] / "jobs" / body["id"]
    assert not (job_dir / "input").exists()
    assert sorted(p.name for p in (job_dir / "results").iterdir()) == ["artefacts.json",
                                                                       "mask.nii.gz"]


def test_zip_job_with_uncertainty_matches_sync(client) -> None:
    payload = volume_upload(40, seed=5)
    params = {"outputs": "mask_nifti,entropy_nifti,report_json", "format": "zip"}
    response = submit(client, payload, **params)
    assert response.status_code == 202, response.text
    status = wait_status(client, response.json()["id"])
    assert status["status"] == "succeeded", status
    assert status["options"]["format"] == "zip" and status["options"]["uncertainty"] is False
    assert status["results"] == ["mask.nii.gz", "entropy.nii.gz", "report.json"]

    job_zip = client.get(status["results_url"])
    assert job_zip.headers["content-type"] == "application/zip"
    sync_zip = client.post("/v1/segment", params=params,
                           files={"file": ("volume.nii.gz", payload)})
    assert sync_zip.status_code == 200
    job_members = zipfile.ZipFile(io.BytesIO(job_zip.content))
    sync_members = zipfile.ZipFile(io.BytesIO(sync_zip.content))
    assert job_members.namelist() == sync_members.namelist() == status["results"]
    for name in ("mask.nii.gz", "entropy.nii.gz"):
        job_img = nifti_from(job_members.read(name))
        sync_img = nifti_from(sync_members.read(name))
        np.testing.assert_array_equal(np.asanyarray(job_img.dataobj),
                                      np.asanyarray(sync_img.dataobj))
        assert client.get(f"{status['results_url']}/{name}").content == job_members.read(name)
    job_report = json.loads(job_members.read("report.json"))
    sync_report = json.loads(sync_members.read("report.json"))
    assert job_report["classes"] == sync_report["classes"]  # volumes in mL, uncertainty


def test_list_filters_and_pages(client) -> None:
    ids = []
    for seed in range(3):
        response = submit(client, volume_upload(FAST, seed=seed))
        assert response.status_code == 202, response.text
        ids.append(response.json()["id"])
    for job_id in ids:
        assert wait_status(client, job_id)["status"] == "succeeded"

    everything = client.get("/v1/jobs", params={"limit": 500}).json()
    assert everything["total"] == len(everything["items"]) >= 3
    listed = [item["id"] for item in everything["items"]]
    assert listed[:3] == ids[::-1]  # newest first
    assert everything["next_offset"] is None

    first = client.get("/v1/jobs", params={"limit": 2}).json()
    second = client.get("/v1/jobs", params={"limit": 2, "offset": 2}).json()
    assert [i["id"] for i in first["items"]] == listed[:2]
    assert first["next_offset"] == 2
    assert [i["id"] for i in second["items"]] == listed[2:4]

    succeeded = client.get("/v1/jobs", params={"status": "succeeded", "limit": 500}).json()
    assert set(ids) <= {i["id"] for i in succeeded["items"]}
    assert all(i["status"] == "succeeded" for i in succeeded["items"])
    assert client.get("/v1/jobs", params={"status": "queued"}).json()["total"] == 0

    _error(client.get("/v1/jobs", params={"status": "finished"}), 422, "invalid_request")
    _error(client.get("/v1/jobs", params={"limit": 0}), 422, "invalid_request")


def test_cancel_queued_and_running_jobs(client, gateway) -> None:
    data_dir = gateway[1]
    slow = submit(client, volume_upload(SLOW, seed=11)).json()["id"]
    wait_status(client, slow, ("running",))
    queued = submit(client, volume_upload(FAST, seed=12)).json()["id"]
    assert client.get(f"/v1/jobs/{queued}").json()["status"] == "queued"
    _error(client.get(f"/v1/jobs/{slow}/results"), 409, "results_not_ready")
    _error(client.get(f"/v1/jobs/{queued}/results"), 409, "results_not_ready")

    cancelled = client.delete(f"/v1/jobs/{queued}")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    assert not (data_dir / "jobs" / queued).exists() or \
        not (data_dir / "jobs" / queued / "input").exists()
    running = client.delete(f"/v1/jobs/{slow}")
    assert running.status_code == 200 and running.json()["status"] == "cancelled"
    assert running.json()["error"]["code"] == "cancelled"

    # The single worker is free again: a new job runs, and only after the cancelled run ended.
    after = submit(client, volume_upload(FAST, seed=13)).json()["id"]
    assert wait_status(client, after)["status"] == "succeeded"
    rows = db_rows(data_dir)
    assert rows[slow]["status"] == "cancelled" and rows[queued]["status"] == "cancelled"
    assert rows[queued]["attempts"] == 0 and rows[slow]["attempts"] == 1
    assert json.loads(rows[slow]["results"]) == []
    assert not (data_dir / "jobs" / slow / "results").exists()
    assert not (data_dir / "jobs" / slow / "input").exists()
    _error(client.get(f"/v1/jobs/{slow}/results"), 409, "job_cancelled")
    _error(client.delete(f"/v1/jobs/{slow}"), 409, "job_finished")


def test_unknown_jobs_and_bad_requests(client) -> None:
    unknown = uuid.uuid4().hex
    _error(client.get(f"/v1/jobs/{unknown}"), 404, "job_not_found")
    _error(client.get(f"/v1/jobs/{unknown}/results"), 404, "job_not_found")
    _error(client.delete(f"/v1/jobs/{unknown}"), 404, "job_not_found")
    _error(client.get("/v1/jobs/..jobs.sqlite3"), 404, "job_not_found")
    before = client.get("/v1/jobs").json()["total"]

    payload = volume_upload(FAST, seed=21)
    _error(submit(client, payload, format="tiff"), 422, "invalid_option")
    _error(submit(client, payload, model="no-such-model"), 404, "model_not_found")
    _error(client.post("/v1/jobs", content=payload,
                       headers={"content-type": "application/octet-stream"}),
           415, "unsupported_media_type")
    _error(client.post("/v1/jobs", data={"colour": "red"},
                       files={"file": ("volume.nii.gz", payload)}), 422, "unknown_field")
    _error(client.post("/v1/jobs", files={"format": (None, "zip")}), 400, "missing_file")
    assert client.get("/v1/jobs").json()["total"] == before  # nothing was queued

    done = submit(client, payload).json()["id"]
    wait_status(client, done)
    _error(client.get(f"/v1/jobs/{done}/results/artefacts.json"), 404, "result_not_found")
    _error(client.get(f"/v1/jobs/{done}/results/..input"), 404, "result_not_found")

    # A job whose upload cannot be decoded fails with the decoder's code, and is not retried.
    bad = submit(client, b"not an image at all", name="scan.nii.gz").json()["id"]
    status = wait_status(client, bad)
    assert status["status"] == "failed" and status["attempts"] == 1
    assert status["error"]["code"] and status["error"]["message"]
    _error(client.get(f"/v1/jobs/{bad}/results"), 409, "job_failed")


def _queue_depth(client: httpx.Client) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith('sfpc_queue_depth{queue="jobs"}'):
            return float(line.split()[-1])
    raise AssertionError("no jobs queue depth gauge")


def test_full_queue_answers_503_with_retry_after(short_gateway) -> None:
    _, data_dir, client = short_gateway
    accepted, refused = [], None
    fast = [volume_upload(FAST, seed=seed) for seed in range(32, 38)]
    first = submit(client, volume_upload(SLOW, seed=31))
    accepted.append(first.json()["id"])
    wait_status(client, accepted[0], ("running",))
    for payload in fast:
        response = submit(client, payload)
        if response.status_code == 503:
            refused = response
            break
        assert response.status_code == 202, response.text
        accepted.append(response.json()["id"])
    assert refused is not None, "the queue never filled"
    assert len(accepted) == 3  # one running + job_max_queued=2 waiting
    _error(refused, 503, "queue_full")
    retry_after = refused.headers["retry-after"]
    assert retry_after.isdigit() and int(retry_after) >= 1
    assert _queue_depth(client) == 2

    # Nothing accepted is lost: every job ends succeeded (or already expired, retention 3 s).
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        rows = db_rows(data_dir)
        if all(rows[j]["status"] in ("succeeded", "expired") for j in accepted):
            break
        time.sleep(0.05)
    rows = db_rows(data_dir)
    assert [rows[j]["status"] in ("succeeded", "expired") for j in accepted] == [True] * 3
    assert all(rows[j]["error_code"] is None and rows[j]["attempts"] == 1 for j in accepted)
    assert len(rows) == 3  # the refused upload left no row
    assert sorted(p.name for p in (data_dir / "jobs").iterdir()) <= sorted(accepted)
    assert submit(client, volume_upload(FAST, seed=40)).status_code == 202


def test_expired_results_answer_410(short_gateway) -> None:
    _, data_dir, client = short_gateway
    job_id = submit(client, volume_upload(FAST, seed=50)).json()["id"]
    status = wait_status(client, job_id)
    assert status["status"] == "succeeded"
    assert client.get(status["results_url"]).status_code == 200
    finished = _epoch(status["finished_at"])
    expires = _epoch(status["expires_at"])
    assert math.isclose(expires - finished, 3.0, abs_tol=1e-3)

    time.sleep(max(0.0, expires - time.time()) + 0.05)
    _error(client.get(f"/v1/jobs/{job_id}"), 410, "job_expired")
    _error(client.get(status["results_url"]), 410, "job_expired")
    _error(client.get(f"{status['results_url']}/mask.nii.gz"), 410, "job_expired")
    _error(client.delete(f"/v1/jobs/{job_id}"), 410, "job_expired")

    # The sweep (a tenth of the retention) deletes the files and marks the row.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if db_rows(data_dir)[job_id]["status"] == "expired" and \
                not (data_dir / "jobs" / job_id).exists():
            break
        time.sleep(0.05)
    assert db_rows(data_dir)[job_id]["status"] == "expired"
    assert not (data_dir / "jobs" / job_id).exists()
    expired = client.get("/v1/jobs", params={"status": "expired", "limit": 500}).json()
    assert job_id in {i["id"] for i in expired["items"]}


def _epoch(text: str) -> float:
    """Unix seconds of the API's ISO 8601 UTC timestamps."""
    from datetime import datetime

    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def test_jobs_need_the_api_key(model_dir, tmp_path) -> None:
    server = start_gateway(model_dir, tmp_path / "data", tmp_path / "gateway.log",
                           api_keys='["job-test-key"]')
    try:
        with httpx.Client(base_url=server.url, timeout=WAIT_S) as c:
            _error(c.get("/v1/jobs"), 401, "missing_api_key")
            _error(submit(c, volume_upload(FAST)), 401, "missing_api_key")
            ok = c.get("/v1/jobs", headers={"X-API-Key": "job-test-key"})
            assert ok.status_code == 200 and ok.json()["total"] == 0
    finally:
        server.stop()
    assert not list((tmp_path / "data" / "jobs").iterdir())



# ----------------------------------------------------------------------------------------------
# The store and the recovery rules, without a server
# ----------------------------------------------------------------------------------------------


def test_processes_claiming_one_queue_never_share_a_job(tmp_path) -> None:
    import multiprocessing

    from sfpc.server.jobs.store import JobStore

    store = JobStore(tmp_path / "jobs.sqlite3")
    ids = [uuid.uuid4().hex for _ in range(100)]
    for job_id in ids:
        store.insert(job_id, options={}, inputs=[], now=time.time(), max_queued=1000)
    store.close()
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Barrier(4)
    procs = [ctx.Process(target=claim_all, args=(str(tmp_path / "jobs.sqlite3"), f"p{i}",
                                                 str(tmp_path / f"claimed{i}.json"), start))
             for i in range(3)]
    for proc in procs:
        proc.start()
    start.wait(60)
    for proc in procs:
        proc.join(60)
        assert proc.exitcode == 0
    claimed = [json.loads((tmp_path / f"claimed{i}.json").read_text()) for i in range(3)]
    flat = [job_id for part in claimed for job_id in part]
    assert sorted(flat) == sorted(ids)  # every job once, none twice
    assert sum(1 for part in claimed if part) >= 2  # they really raced
    rows = db_rows(tmp_path)
    assert {r["status"] for r in rows.values()} == {"running"}
    assert {r["attempts"] for r in rows.values()} == {1}
    for i, part in enumerate(claimed):
        assert all(rows[j]["owner"] == f"p{i}" for j in part)


def test_recovery_trusts_live_owners_and_heartbeats(tmp_path) -> None:
    import os
    import socket
    import subprocess
    import sys

    import psutil

    from sfpc.server.jobs import JobManager, JobsConfig

    manager = JobManager(JobsConfig(tmp_path, max_attempts=2), service=None)
    store, now = manager.store, time.time()
    host = socket.gethostname()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        alive_owner = f"{host}|{sleeper.pid}|{psutil.Process(sleeper.pid).create_time():.3f}|a"
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True, check=True)
        owners = {
            "live-local": alive_owner,
            "dead-local": f"{host}|{int(dead.stdout)}|{now - 50:.3f}|b",
            "reused-pid": f"{host}|{os.getpid()}|{now - 1e6:.3f}|c",  # same pid, other process
            "remote-fresh": "elsewhere|1|1.000|d",
            "remote-stale": "elsewhere|2|1.000|e",
        }
        ids = {}
        for name, owner in owners.items():
            ids[name] = uuid.uuid4().hex
            store.insert(ids[name], options={}, inputs=[], now=now, max_queued=100)
            assert store.claim(owner, now).id == ids[name]
        conn = store._conn()
        conn.execute("UPDATE jobs SET heartbeat_at = ? WHERE id = ?",
                     (now - 1000, ids["remote-stale"]))
        # A job already started max_attempts times by a dead owner is failed, not retried.
        poison = uuid.uuid4().hex
        store.insert(poison, options={}, inputs=[], now=now, max_queued=100)
        conn.execute("UPDATE jobs SET status = 'running', attempts = 2, owner = ? WHERE id = ?",
                     (owners["dead-local"], poison))

        counts = manager.pool.recover()
        rows = db_rows(tmp_path)
        assert counts == {"queued": 3, "failed": 1}
        assert rows[ids["live-local"]]["status"] == "running"
        assert rows[ids["remote-fresh"]]["status"] == "running"
        for name in ("dead-local", "reused-pid", "remote-stale"):
            assert (rows[ids[name]]["status"], rows[ids[name]]["owner"]) == ("queued", None)
            assert rows[ids[name]]["attempts"] == 1  # counted at the start, not again here
        assert (rows[poison]["status"], rows[poison]["error_code"]) == ("failed", "worker_lost")
    finally:
        sleeper.kill()
        sleeper.wait()
        manager.stop()
