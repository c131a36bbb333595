"""Distributed jobs (SFPC_JOBS_BACKEND=postgres): real PostgreSQL, two gateways, two workers.

100 jobs submitted alternately to two ``sfpc serve`` processes are run by two ``sfpc worker``
processes; one worker is SIGKILLed while it runs a job and one gateway is restarted mid-run.
Every job must succeed exactly once (one "job succeeded" across the workers' logs, one result
set on disk), be answered by either gateway, and produce exactly one webhook call whose
HMAC-SHA256 signature the test recomputes with hashlib. Masks are compared with the synchronous
endpoint's for the same upload (the oracle), never with the job code's own output.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import json
import os
import signal
import threading
import time

import httpx
import numpy as np
import psycopg
import pytest

from tests.support.distributed import WebhookReceiver, WorkerProcess
from tests.support.jobs import WAIT_S, nifti_from, start_gateway, submit, volume_upload, wait_status
from tests.support.models import session_model
from tests.support.postgres import PostgresServer

pytest.importorskip("torch")  # the tiny model is trained and exported with torch
pytest.importorskip("procrastinate")
pytestmark = pytest.mark.integration  # about 30 s

SECRET = "test-webhook-secret"
STALLED_S = 4.0


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return session_model(tmp_path_factory)


@pytest.fixture(scope="module")
def postgres():
    server = PostgresServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def cluster(model_dir, postgres, tmp_path_factory):
    """Two gateways and two workers on one database and one data dir."""
    root = tmp_path_factory.mktemp("cluster")
    settings = {"jobs_backend": "postgres", "database_url": postgres.url,
                "webhook_secret": SECRET,
                "worker_stalled_s": STALLED_S, "worker_heartbeat_s": 1.0, "worker_poll_s": 0.5,
                "job_max_queued": 1000, "job_workers": 2, "job_max_attempts": 3,
                "webhook_retries": 2, "webhook_backoff_s": 1}
    env = {f"SFPC_{k.upper()}": str(v) for k, v in settings.items()}
    env["SFPC_DATA_DIR"] = str(root / "data")
    env.update({"SFPC_ONNX_INTRA_OP_THREADS": "1", "SFPC_LOG_LEVEL": "INFO",
                "SFPC_WORKER_METRICS_PORT": "0"})
    workers = [WorkerProcess(model_dir, root / f"worker{i}.log", env).start() for i in range(2)]
    gateways = [start_gateway(model_dir, root / "data", root / f"gateway{i}.log", **settings)
                for i in range(2)]
    state = {"root": root, "settings": settings, "env": env, "workers": workers,
             "gateways": gateways, "model_dir": model_dir}
    try:
        yield state
    finally:
        for process in state["gateways"] + state["workers"]:
            process.stop()


def _succeeded_counts(workers: list[WorkerProcess]) -> collections.Counter:
    return collections.Counter(r["job_id"] for w in workers for r in w.records()
                               if r.get("message") == "job succeeded")


def _kill_while_holding_a_job(victim: WorkerProcess, url: str, state: dict) -> None:
    """SIGKILL ``victim`` as soon as it holds a running job. It is frozen (SIGSTOP) while the
    table is read, so the jobs it holds cannot finish between the look and the kill; they are
    recorded in ``state["orphaned"]``."""
    deadline = time.monotonic() + WAIT_S
    with psycopg.connect(url, autocommit=True) as conn:
        while time.monotonic() < deadline:
            os.kill(victim.pid, signal.SIGSTOP)
            held = [r[0] for r in conn.execute(
                "SELECT id FROM sfpc_jobs WHERE status = 'running' AND owner LIKE %s",
                (f"%|{victim.pid}|%",)).fetchall()]
            if held:
                os.kill(victim.pid, signal.SIGKILL)
                victim.process.wait(timeout=30)
                state.update(orphaned=held, killed_at=time.time())
                return
            os.kill(victim.pid, signal.SIGCONT)
            time.sleep(0.005)


def test_hundred_jobs_worker_killed_gateway_restarted(cluster) -> None:
    gateways, workers = cluster["gateways"], cluster["workers"]
    small = {seed: volume_upload(32, seed=seed) for seed in range(4)}
    big = volume_upload(80, seed=9)  # about a second: long enough to be killed mid-run
    with WebhookReceiver() as hooks:
        clients = [httpx.Client(base_url=g.url, timeout=WAIT_S) for g in gateways]
        ids, payloads = [], {}
        victim = workers[0]
        state: dict = {}
        killer = threading.Thread(target=_kill_while_holding_a_job, daemon=True,
                                  args=(victim, cluster["settings"]["database_url"], state))
        killer.start()  # from the first submission on: the kill lands mid-run
        for i in range(100):
            payload = big if i % 10 == 0 else small[i % 4]
            response = clients[i % 2].post(
                "/v1/jobs", headers={"X-SFPC-Webhook-URL": hooks.url},
                files={"file": ("volume.nii.gz", payload)})
            assert response.status_code == 202, response.text
            ids.append(response.json()["id"])
            payloads[ids[-1]] = payload

        killer.join(WAIT_S)
        assert state.get("orphaned"), "the first worker never held a job"
        orphaned, killed_at = state["orphaned"], state["killed_at"]

        # Restart a gateway mid-run: it holds no job state, so nothing may be lost.
        gateways[0].stop()
        gateways[0] = start_gateway(cluster["model_dir"], cluster["root"] / "data",
                                    cluster["root"] / "gateway0b.log", **cluster["settings"])
        clients[0].close()
        clients[0] = httpx.Client(base_url=gateways[0].url, timeout=WAIT_S)

        finals = [wait_status(clients[i % 2], job_id, timeout=WAIT_S * 2)
                  for i, job_id in enumerate(ids)]
        assert [f["status"] for f in finals] == ["succeeded"] * 100, [
            (f["id"], f["status"], f["error"]) for f in finals if f["status"] != "succeeded"]
        # Taken over, within a bounded time: the stalled timeout + heartbeat + poll, plus the
        # run itself and slack for a shared machine.
        with psycopg.connect(cluster["settings"]["database_url"]) as conn:
            for job_id in orphaned:
                assert wait_status(clients[0], job_id)["attempts"] >= 2
                started, finished = conn.execute(
                    "SELECT started_at, finished_at FROM sfpc_jobs WHERE id = %s",
                    (job_id,)).fetchone()
                assert started - killed_at < STALLED_S + 1.0 + 0.5 + 10.0
                assert finished > started

        # Exactly once: one recorded success per job across the workers, one result set.
        counts = _succeeded_counts(workers)
        assert set(counts) == set(ids) and set(counts.values()) == {1}
        data = cluster["root"] / "data" / "jobs"
        for job_id in ids:
            assert sorted(p.name for p in (data / job_id).iterdir()) == ["results"]
            assert sorted(p.name for p in (data / job_id / "results").iterdir()) == [
                "artefacts.json", "mask.nii.gz"]

        # Status and results from either gateway, equal to the synchronous endpoint's mask.
        sync_masks = {}
        for job_id in ids[:12]:
            payload = payloads[job_id]
            if payload not in sync_masks:
                sync = clients[1].post("/v1/segment", files={"file": ("v.nii.gz", payload)})
                assert sync.status_code == 200
                sync_masks[payload] = np.asanyarray(nifti_from(sync.content).dataobj)
            for client in clients:
                body = client.get(f"/v1/jobs/{job_id}").json()
                assert body["status"] == "succeeded"
                got = client.get(f"/v1/jobs/{job_id}/results")
                assert got.status_code == 200
                np.testing.assert_array_equal(np.asanyarray(nifti_from(got.content).dataobj),
                                              sync_masks[payload])

        # One signed webhook call per job.
        deadline = time.monotonic() + 30
        while len(hooks.calls) < 100 and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1.0)  # a duplicate would arrive now
        bodies = []
        for headers, body in hooks.calls:
            expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
            assert hmac.compare_digest(headers["x-sfpc-signature"], expected)
            bodies.append(json.loads(body))
        # At least once each; a second call only for a webhook whose worker was killed while
        # sending it (retried from the dead worker: the POST may have gone out unrecorded).
        calls = collections.Counter(b["id"] for b in bodies)
        assert set(calls) == set(ids)
        resent = {r["job_id"] for w in workers for r in w.records()
                  if r.get("message") == "queue job of a dead worker retried"
                  and r.get("task") == "sfpc.webhook"}
        assert {j for j, n in calls.items() if n > 1} <= resent
        assert max(calls.values()) <= 2
        assert {b["status"] for b in bodies} == {"succeeded"}
        for client in clients:
            view = client.get(f"/v1/jobs/{ids[0]}").json()
            assert view["webhook"]["status"] == "delivered" and view["webhook"]["attempts"] == 1
            stats = client.get("/v1/jobs/stats").json()
            assert stats["backend"] == "postgres"
            assert stats["jobs"]["succeeded"] == 100 and stats["jobs"]["running"] == 0
        for client in clients:
            client.close()

    # The killed worker is replaced for the next tests.
    cluster["workers"][0] = WorkerProcess(cluster["model_dir"],
                                          cluster["root"] / "worker0b.log",
                                          cluster["env"]).start()


def test_cancel_reaches_a_running_job(cluster) -> None:
    first, second = cluster["gateways"]
    with httpx.Client(base_url=first.url, timeout=WAIT_S) as a, \
            httpx.Client(base_url=second.url, timeout=WAIT_S) as b:
        job_id = submit(a, volume_upload(112, seed=3)).json()["id"]
        wait_status(b, job_id, ("running",))
        response = b.delete(f"/v1/jobs/{job_id}")
        assert response.status_code == 200 and response.json()["status"] == "cancelled"
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            stopped = [r for w in cluster["workers"] for r in w.records()
                       if r.get("job_id") == job_id
                       and r.get("message") == "job cancelled, results discarded"]
            if stopped:
                break
            time.sleep(0.1)
        assert stopped, "the worker never stopped the cancelled job"
        assert a.get(f"/v1/jobs/{job_id}").json()["status"] == "cancelled"
        assert a.get(f"/v1/jobs/{job_id}/results").status_code == 409
        job_dir = cluster["root"] / "data" / "jobs" / job_id
        assert not (job_dir / "results").exists() and not (job_dir / "input").exists()
        # The worker is free again.
        after = submit(b, volume_upload(32, seed=1)).json()["id"]
        assert wait_status(a, after)["status"] == "succeeded"


def test_idempotency_key_gives_one_job(cluster) -> None:
    first, second = cluster["gateways"]
    payload = volume_upload(32, seed=5)
    with httpx.Client(base_url=first.url, timeout=WAIT_S) as a, \
            httpx.Client(base_url=second.url, timeout=WAIT_S) as b:
        total_before = a.get("/v1/jobs").json()["total"]
        headers = {"Idempotency-Key": "batch-7/study-42"}
        one = a.post("/v1/jobs", headers=headers, files={"file": ("v.nii.gz", payload)})
        two = b.post("/v1/jobs", headers=headers, files={"file": ("v.nii.gz", payload)})
        assert one.status_code == 202 and two.status_code == 202
        assert one.json()["id"] == two.json()["id"]
        assert a.get("/v1/jobs").json()["total"] == total_before + 1
        assert wait_status(b, one.json()["id"])["status"] == "succeeded"


def test_priority_reaches_the_queue(cluster) -> None:
    """An urgent job is queued with a higher procrastinate priority than a routine one (the
    engine fetches by priority, then age); read back from the queue table itself."""
    first, _ = cluster["gateways"]
    with httpx.Client(base_url=first.url, timeout=WAIT_S) as client:
        routine = submit(client, volume_upload(32, seed=2)).json()["id"]
        urgent = client.post("/v1/jobs", headers={"X-SFPC-Priority": "urgent"},
                             files={"file": ("v.nii.gz", volume_upload(32, seed=3))}).json()["id"]
        bad = client.post("/v1/jobs", headers={"X-SFPC-Priority": "asap"},
                          files={"file": ("v.nii.gz", volume_upload(32, seed=3))})
        assert bad.status_code == 422
        views = {j: wait_status(client, j) for j in (routine, urgent)}
    assert views[urgent]["priority"] == "urgent" and views[routine]["priority"] == "routine"
    with psycopg.connect(cluster["settings"]["database_url"]) as conn:
        rows = dict(conn.execute(
            "SELECT args->>'job_id', priority FROM procrastinate_jobs WHERE task_name = "
            "'sfpc.run_job' AND args->>'job_id' = ANY(%s)", ([routine, urgent],)).fetchall())
    assert rows[urgent] > rows[routine]


def test_webhook_failures_are_retried_and_visible(cluster) -> None:
    """A receiver that answers 500: the first call and each retry are recorded in the job, and
    after webhook_retries retries its webhook is failed with the last error (the job itself
    stays succeeded)."""
    import http.server

    hits: list[float] = []

    class Failing(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - the http.server API
            self.rfile.read(int(self.headers.get("Content-Length", "0")))
            hits.append(time.monotonic())
            self.send_response(500)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Failing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/hook"
        with httpx.Client(base_url=cluster["gateways"][1].url, timeout=WAIT_S) as client:
            job_id = client.post("/v1/jobs", headers={"X-SFPC-Webhook-URL": url},
                                 files={"file": ("v.nii.gz", volume_upload(32))}).json()["id"]
            assert wait_status(client, job_id)["status"] == "succeeded"
            deadline = time.monotonic() + 60
            view = client.get(f"/v1/jobs/{job_id}").json()
            while view["webhook"]["status"] != "failed" and time.monotonic() < deadline:
                time.sleep(0.2)
                view = client.get(f"/v1/jobs/{job_id}").json()
        assert view["status"] == "succeeded"
        assert view["webhook"] == {"url": url, "status": "failed", "attempts": 3,
                                   "error": "HTTP 500"}
        assert len(hits) == 3  # the call and webhook_retries=2 retries
        assert hits[2] - hits[1] >= 0.9  # backed off (1 s ** attempt with backoff 1)
    finally:
        server.shutdown()
        server.server_close()


def test_metrics_agree_across_gateways(cluster) -> None:
    """The job gauges come from the database: both gateways report the same numbers, equal to
    a count made straight from the table."""
    with psycopg.connect(cluster["settings"]["database_url"]) as conn:
        counted = dict(conn.execute("SELECT status, count(*) FROM sfpc_jobs GROUP BY status")
                       .fetchall())
    scraped = []
    for gateway in cluster["gateways"]:
        text = httpx.get(f"{gateway.url}/metrics", timeout=WAIT_S).text
        scraped.append(sorted(line for line in text.splitlines()
                              if line.startswith(("sfpc_jobs{", "sfpc_job_workers{"))))
    assert scraped[0] == scraped[1]
    assert f'sfpc_jobs{{status="succeeded"}} {float(counted["succeeded"])}' in scraped[0]
    assert 'sfpc_job_workers{state="alive"} 2.0' in scraped[0]
    # Each worker serves its own counters (Prometheus sums the instances): a worker's count of
    # successful segmentations equals the successes its log records.
    for worker in cluster["workers"]:
        port = next(r["port"] for r in worker.records() if r.get("message") == "worker metrics")
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=WAIT_S).text
        ok = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                 if line.startswith("sfpc_segmentations_total{") and 'outcome="ok"' in line)
        logged = sum(1 for r in worker.records() if r.get("message") == "job succeeded")
        assert ok == logged


class _Upload:
    def __init__(self, data: bytes) -> None:
        import io

        self.file = io.BytesIO(data)
        self.filename = "v.nii.gz"
        self.content_type = "application/gzip"


def test_maintenance_expires_and_enqueues_orphans(postgres, tmp_path) -> None:
    """A worker's maintenance pass: an ended job past its retention loses its files and answers
    410; a row whose gateway died before deferring it is put in the queue. Clock injected; the
    database is the real one (its own tables, so the cluster's workers do not take part)."""
    from sfpc.errors import JobError
    from sfpc.server.jobs.distributed import DistributedJobManager
    from sfpc.server.jobs.manager import JobsConfig

    with psycopg.connect(postgres.url.rsplit("/", 1)[0] + "/postgres", autocommit=True) as c:
        c.execute("CREATE DATABASE maint")
    url = postgres.url.rsplit("/", 1)[0] + "/maint"
    now = [1_000_000.0]
    manager = DistributedJobManager(JobsConfig(data_dir=tmp_path, retention_s=60.0), None,
                                    database_url=url, clock=lambda: now[0])
    manager.start()
    try:
        done = manager.submit([_Upload(b"x" * 10)], {}).id
        claimed = manager.pg.claim(done, "w", now=now[0], max_attempts=3,
                                   expires_at=now[0] + 60)
        assert claimed is not None
        from sfpc.server.jobs.models import ResultBody

        manager.files.write_results(done, [("mask.nii.gz", "application/gzip", b"m")], {})
        assert manager.pg.succeed(done, "w", now=now[0], expires_at=now[0] + 60,
                                  results=["mask.nii.gz"], report=None,
                                  result_body=ResultBody("mask.nii.gz", "application/gzip",
                                                         "mask.nii.gz"))
        # An orphan: the row exists, the queue job does not.
        orphan = manager.submit([_Upload(b"y" * 10)], {}).id
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("DELETE FROM procrastinate_jobs")
            conn.execute("UPDATE sfpc_jobs SET queue_job_id = NULL WHERE id = %s", (orphan,))
        now[0] += 61.0
        manager.maintain()
        assert not (tmp_path / "jobs" / done).exists()
        with pytest.raises(JobError) as gone:
            manager.get(done)
        assert gone.value.status == 410
        with psycopg.connect(url) as conn:
            queued = conn.execute("SELECT args->>'job_id' FROM procrastinate_jobs WHERE "
                                  "status = 'todo'").fetchall()
        assert queued == [(orphan,)]
        assert manager.get(orphan).queue_job_id is not None
    finally:
        manager.stop()


def test_a_job_that_kills_every_worker_is_failed_after_max_attempts(postgres, tmp_path) -> None:
    """The queue hands a job whose worker died to the next worker; after job_max_attempts
    starts (each owner presumed dead) the next hand-over fails it as worker_lost instead of
    running it again. Driven through the store's claim, the step each hand-over takes."""
    from sfpc.server.jobs.distributed import DistributedJobManager
    from sfpc.server.jobs.manager import JobsConfig
    from sfpc.server.jobs.models import JobStatus

    with psycopg.connect(postgres.url.rsplit("/", 1)[0] + "/postgres", autocommit=True) as c:
        c.execute("CREATE DATABASE poison")
    manager = DistributedJobManager(JobsConfig(data_dir=tmp_path, max_attempts=2), None,
                                    database_url=postgres.url.rsplit("/", 1)[0] + "/poison")
    manager.start()
    try:
        job_id = manager.submit([_Upload(b"z" * 10)], {}).id
        for attempt, owner in enumerate(("dead-1", "dead-2"), start=1):
            state, record = manager.pg.claim(job_id, owner, now=1.0, max_attempts=2,
                                             expires_at=100.0)
            assert state is JobStatus.RUNNING and record.attempts == attempt
        state, record = manager.pg.claim(job_id, "third", now=2.0, max_attempts=2,
                                         expires_at=100.0)
        assert state is JobStatus.FAILED and record.error_code == "worker_lost"
        assert manager.pg.claim(job_id, "fourth", now=3.0, max_attempts=2,
                                expires_at=100.0) is None
        from sfpc.server.jobs.models import ResultBody

        late = ResultBody("mask.nii.gz", "application/gzip", "mask.nii.gz")
        assert not manager.pg.succeed(job_id, "dead-2", now=3.0, expires_at=100.0, results=[],
                                      result_body=late, report=None)  # a late owner: no effect
        assert manager.pg.get(job_id).status is JobStatus.FAILED
    finally:
        manager.stop()


def test_sqlite_backend_refuses_what_it_cannot_honour(model_dir, tmp_path) -> None:
    """Without the distributed backend, urgent priority, idempotency keys and webhooks answer
    400 needs_distributed_jobs (routine, what its FIFO queue does, is accepted)."""
    server = start_gateway(model_dir, tmp_path / "data", tmp_path / "gw.log")
    try:
        with httpx.Client(base_url=server.url, timeout=WAIT_S) as client:
            for headers in ({"X-SFPC-Priority": "urgent"}, {"Idempotency-Key": "k"},
                            {"X-SFPC-Webhook-URL": "http://127.0.0.1:9/x"}):
                response = client.post("/v1/jobs", headers=headers,
                                       files={"file": ("v.nii.gz", volume_upload(32))})
                assert response.status_code == 400, response.text
                assert response.json()["error"]["code"] == "needs_distributed_jobs"
            routine = client.post("/v1/jobs", headers={"X-SFPC-Priority": "routine"},
                                  files={"file": ("v.nii.gz", volume_upload(32))})
            assert routine.status_code == 202
            assert wait_status(client, routine.json()["id"])["status"] == "succeeded"
    finally:
        server.stop()


def test_unreachable_database_is_named_without_its_password() -> None:
    from sfpc.server.jobs.pg_store import PgJobStore
    from tests.support.postgres import free_port

    port = free_port()  # nothing listens there
    with pytest.raises(ConnectionError) as info:
        PgJobStore(f"postgresql://bob:s3cret@127.0.0.1:{port}/jobs", connect_timeout_s=1.0)
    message = str(info.value)
    assert f"127.0.0.1:{port}" in message and "'jobs'" in message and "'bob'" in message
    assert "s3cret" not in message
