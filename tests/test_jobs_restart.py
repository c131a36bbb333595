"""Jobs survive the death of the server process.

Real ``sfpc serve`` processes on one data dir: the first is killed with SIGKILL while a job runs
(no shutdown code of it runs), a second one is started on the same data dir and must finish every
job - none lost, none run twice to completion, the interrupted one retried - with results equal
to the synchronous endpoint's for the same uploads.

The poison job: a worker that dies on an upload is played by SIGKILLing the server each time that
job is running, which is what a segfault or the kernel's OOM killer does to it. The job must be
failed after ``job_max_attempts`` starts instead of crash-looping the server, and the job queued
behind it must still run.
"""

from __future__ import annotations

import json
import time

import httpx
import numpy as np
import pytest

from tests.support.jobs import (
    WAIT_S,
    db_rows,
    kill9,
    nifti_from,
    start_gateway,
    submit,
    volume_upload,
    wait_status,
)
from tests.support.models import session_model

pytest.importorskip("torch")  # the tiny model is trained and exported with torch
# Real gateway processes, killed and restarted: not in `make test-fast`.
pytestmark = pytest.mark.integration

SIZES = (80, 64, 64, 48)  # the first runs about a second, long enough to be killed mid-run


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return session_model(tmp_path_factory)


def _records(server, name: str) -> list[dict]:
    return [r for r in server.log_records() if r.get("message") == name]


def test_jobs_survive_kill_9_and_resume(model_dir, tmp_path) -> None:
    data_dir = tmp_path / "data"
    uploads = [volume_upload(size, seed=i) for i, size in enumerate(SIZES)]
    first = start_gateway(model_dir, data_dir, tmp_path / "first.log", job_workers=1,
                          job_max_queued=10)
    try:
        with httpx.Client(base_url=first.url, timeout=WAIT_S) as client:
            ids = []
            for payload in uploads:
                response = submit(client, payload)
                assert response.status_code == 202, response.text
                ids.append(response.json()["id"])
            wait_status(client, ids[0], ("running",))
            time.sleep(0.2)  # into the sliding window
            kill9(first)
    finally:
        first.stop()

    # What the dead process left: one job running (its owner is gone), the rest queued, and
    # every upload on disk.
    rows = db_rows(data_dir)
    assert rows[ids[0]]["status"] == "running" and rows[ids[0]]["attempts"] == 1
    assert [rows[j]["status"] for j in ids[1:]] == ["queued"] * 3
    for job_id in ids:
        stored = json.loads(rows[job_id]["inputs"])
        path = data_dir / "jobs" / job_id / "input" / stored[0]["path"]
        assert path.read_bytes() == uploads[ids.index(job_id)]

    second = start_gateway(model_dir, data_dir, tmp_path / "second.log", job_workers=1,
                           job_max_queued=10)
    try:
        with httpx.Client(base_url=second.url, timeout=WAIT_S) as client:
            finals = [wait_status(client, job_id) for job_id in ids]
            assert [f["status"] for f in finals] == ["succeeded"] * 4
            assert [f["attempts"] for f in finals] == [2, 1, 1, 1]  # the killed one retried
            listing = client.get("/v1/jobs", params={"limit": 500}).json()
            assert listing["total"] == 4 and {i["id"] for i in listing["items"]} == set(ids)
            for job_id, payload, final in zip(ids, uploads, finals, strict=True):
                assert final["results"] == ["mask.nii.gz"]
                job_mask = nifti_from(client.get(final["results_url"]).content)
                sync = client.post("/v1/segment", files={"file": ("volume.nii.gz", payload)})
                assert sync.status_code == 200
                np.testing.assert_array_equal(np.asanyarray(job_mask.dataobj),
                                              np.asanyarray(nifti_from(sync.content).dataobj))
                # One published result set, no half-written attempt, no upload left behind.
                job_dir = data_dir / "jobs" / job_id
                assert sorted(p.name for p in job_dir.iterdir()) == ["results"]
                assert sorted(p.name for p in (job_dir / "results").iterdir()) == [
                    "artefacts.json", "mask.nii.gz"]
        recovered = _records(second, "job recovered from a dead worker")
        assert [(r["job_id"], r["outcome"]) for r in recovered] == [(ids[0], "queued")]
        started = [r["job_id"] for r in _records(second, "job started")]
        assert sorted(started) == sorted(ids)  # each job run to completion once here
    finally:
        second.stop()


def test_poison_job_is_failed_after_max_attempts(model_dir, tmp_path) -> None:
    data_dir = tmp_path / "data"
    max_attempts = 2
    settings = {"job_workers": 1, "job_max_attempts": max_attempts}
    server = start_gateway(model_dir, data_dir, tmp_path / "run0.log", **settings)
    with httpx.Client(base_url=server.url, timeout=WAIT_S) as client:
        poison = submit(client, volume_upload(80, seed=7)).json()["id"]
        behind = submit(client, volume_upload(32, seed=8)).json()["id"]
    for run in range(1, max_attempts + 1):
        with httpx.Client(base_url=server.url, timeout=WAIT_S) as client:
            wait_status(client, poison, ("running",))
        kill9(server)
        assert db_rows(data_dir)[poison]["attempts"] == run
        server = start_gateway(model_dir, data_dir, tmp_path / f"run{run}.log", **settings)
    try:
        with httpx.Client(base_url=server.url, timeout=WAIT_S) as client:
            status = wait_status(client, poison)
            assert status["status"] == "failed"
            assert status["attempts"] == max_attempts
            assert status["error"]["code"] == "worker_lost"
            assert wait_status(client, behind)["status"] == "succeeded"
            response = client.get(f"/v1/jobs/{poison}/results")
            assert response.status_code == 409
            assert response.json()["error"]["code"] == "job_failed"
            assert server.alive()
        assert not (data_dir / "jobs" / poison / "input").exists()
        recovered = _records(server, "job recovered from a dead worker")
        assert [(r["job_id"], r["outcome"]) for r in recovered] == [(poison, "failed")]
    finally:
        server.stop()


def test_graceful_stop_requeues_the_running_job_uncounted(model_dir, tmp_path) -> None:
    data_dir = tmp_path / "data"
    first = start_gateway(model_dir, data_dir, tmp_path / "first.log", job_workers=1)
    with httpx.Client(base_url=first.url, timeout=WAIT_S) as client:
        job_id = submit(client, volume_upload(80, seed=9)).json()["id"]
        wait_status(client, job_id, ("running",))
    first.stop()  # SIGTERM: uvicorn's shutdown runs the app's lifespan exit
    assert [r["job_id"] for r in _records(first, "job released at shutdown")] == [job_id]
    assert _records(first, "Application shutdown complete.")
    row = db_rows(data_dir)[job_id]
    assert (row["status"], row["attempts"], row["owner"]) == ("queued", 0, None)

    second = start_gateway(model_dir, data_dir, tmp_path / "second.log", job_workers=1)
    try:
        with httpx.Client(base_url=second.url, timeout=WAIT_S) as client:
            final = wait_status(client, job_id)
            assert (final["status"], final["attempts"]) == ("succeeded", 1)
        assert _records(second, "job recovered from a dead worker") == []
    finally:
        second.stop()
