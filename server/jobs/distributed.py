"""The distributed job mode: procrastinate (PostgreSQL) dispatches, ``sfpc worker`` runs.

Why procrastinate and a shared file system: docs/deploy.md ("Batch jobs on several hosts").

- Gateways (``sfpc serve`` with ``SFPC_JOBS_BACKEND=postgres``) write the upload under the shared
  ``SFPC_DATA_DIR``, insert the job row (:mod:`.pg_store`) and defer one procrastinate job per
  row (``queueing_lock`` = our id, so a job is queued at most once). They run no job.
- Workers (``sfpc worker``) run procrastinate's worker. The task claims our row (attempts + 1,
  owner = this run), runs exactly what the gateway's own pool runs (``JobManager._execute``),
  publishes results first-finisher-wins, and records the outcome only if the row still names it.
- A worker that dies stops its procrastinate heartbeat; every worker's maintenance loop retries
  the ``doing`` jobs of workers silent for ``stalled_s``; the next worker takes the row over.
- Cancel: the gateway marks the row cancelled (and aborts the queue job); the running task's
  heartbeat on the row then fails and it sets the engine's cancel event.
- Webhooks: a second task, deferred once by the attempt whose outcome was recorded, retried by
  procrastinate with exponential backoff; each attempt's outcome is written to the row.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
import socket
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from prometheus_client.core import REGISTRY, GaugeMetricFamily

from sfpc.errors import JobError
from sfpc.server.jobs.files import JobFiles, is_job_id, new_job_id, write_durable
from sfpc.server.jobs.manager import (
    DELIVERY_FILE,
    JOBS_DIR,
    PRIORITIES,
    JobManager,
    JobsConfig,
    Upload,
    _options_json,
)
from sfpc.server.jobs.models import JobRecord, JobStatus
from sfpc.server.jobs.pg_store import PgJobStore
from sfpc.server.jobs.runner import JobCancelled, JobFailure
from sfpc.server.jobs.store import QueueFull

log = logging.getLogger("sfpc.server.jobs")

QUEUE = "sfpc-jobs"
RUN_TASK = "sfpc.run_job"
WEBHOOK_TASK = "sfpc.webhook"
WEBHOOK_RETRIES = 5  # after the first call: 2, 4, 8, 16, 32 s later
WEBHOOK_TIMEOUT_S = 10.0
SIGNATURE_HEADER = "X-SFPC-Signature"
UNQUEUED_AFTER_S = 30.0  # a row with no queue job this old lost its gateway before the defer
_SCHEMA_LOCK = 7212003


def sign(secret: str, body: bytes) -> str:
    """The ``X-SFPC-Signature`` value of ``body``: ``sha256=<hex HMAC-SHA256>``."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def build_app(database_url: str, *, sync: bool = False, webhook_retries: int = WEBHOOK_RETRIES,
              webhook_backoff_s: int = 2) -> Any:
    """The procrastinate app with the two tasks; they run in the process's worker manager.

    ``sync``: an app for synchronous defers and cancels (gateway requests, worker threads);
    tasks defer through the app they are registered on, hence one app per connector kind."""
    import procrastinate

    connector = (procrastinate.SyncPsycopgConnector(conninfo=database_url) if sync
                 else procrastinate.PsycopgConnector(conninfo=database_url))
    app = procrastinate.App(connector=connector)

    @app.task(name=RUN_TASK, queue=QUEUE, pass_context=True)
    def run_job(context: Any, job_id: str) -> None:
        _current().run_one(job_id, queue_job_id=context.job.id)

    @app.task(name=WEBHOOK_TASK, queue=QUEUE, pass_context=True,
              retry=procrastinate.RetryStrategy(max_attempts=webhook_retries,
                                                exponential_wait=webhook_backoff_s))
    def webhook(context: Any, job_id: str) -> None:
        _current().send_webhook(job_id, attempt=int(context.job.attempts) + 1)

    return app


_WORKER: DistributedJobManager | None = None


def _current() -> DistributedJobManager:
    if _WORKER is None:
        raise RuntimeError("no worker manager in this process (run tasks through sfpc worker)")
    return _WORKER


class _QueueCollector:
    """Prometheus gauges read from the database at scrape time, so that every gateway reports
    the same totals and they add up across processes without multiprocess files."""

    def __init__(self, manager: DistributedJobManager) -> None:
        self.manager = manager

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            stats = self.manager.stats()
        except Exception:  # the database is down: /metrics still answers the local metrics
            log.exception("reading job statistics failed")
            return
        jobs = GaugeMetricFamily("sfpc_jobs", "Jobs in the shared database by state.",
                                 labels=["status"])
        for status, n in stats["jobs"].items():
            jobs.add_metric([status], n)
        yield jobs
        workers = GaugeMetricFamily("sfpc_job_workers", "sfpc worker processes by heartbeat.",
                                    labels=["state"])
        for state, n in stats["workers"].items():
            workers.add_metric([state], n)
        yield workers


class DistributedJobManager(JobManager):
    """Jobs in PostgreSQL + shared files; ``role`` "gateway" submits/answers, "worker" runs."""

    distributed = True

    def __init__(self, config: JobsConfig, service: Any, *, database_url: str,
                 webhook_secret: str | None = None, role: str = "gateway",
                 stalled_s: float = 30.0, heartbeat_s: float = 10.0,
                 webhook_retries: int = WEBHOOK_RETRIES, webhook_backoff_s: int = 2,
                 clock: Any = time.time) -> None:
        self.config = config
        self.service = service
        self.clock = clock
        self.role = role
        self.webhook_secret = webhook_secret
        self.stalled_s = stalled_s
        self.heartbeat_s = heartbeat_s
        self.database_url = database_url
        data_dir = Path(config.data_dir)
        data_dir.mkdir(parents=True, exist_ok=True)
        self.pg = PgJobStore(database_url)
        self.store = self.pg  # type: ignore[assignment]  # the same reads and transitions
        self.files = JobFiles(data_dir / JOBS_DIR, first_wins=True)
        self.destinations: dict[str, Any] = {}
        self.webhook_retries = webhook_retries
        self.app = build_app(database_url, webhook_retries=webhook_retries,
                             webhook_backoff_s=webhook_backoff_s)
        # Synchronous defers and cancels (gateway requests, worker threads) use their own pool.
        self.sync_app = build_app(database_url, sync=True, webhook_retries=webhook_retries,
                                  webhook_backoff_s=webhook_backoff_s)
        self._started = False
        self._collector: _QueueCollector | None = None
        self.host = socket.gethostname()

    @classmethod
    def from_settings(cls, settings: Any, service: Any, **kwargs: Any) -> DistributedJobManager:
        if not settings.database_url:
            raise ValueError("SFPC_JOBS_BACKEND=postgres needs SFPC_DATABASE_URL "
                             "(postgresql://user:password@host:5432/db)")
        config = JobsConfig(
            data_dir=Path(settings.data_dir), workers=int(settings.job_workers),
            max_queued=int(settings.job_max_queued),
            retention_s=float(settings.job_retention_s),
            max_attempts=int(settings.job_max_attempts),
            max_upload_bytes=int(getattr(settings, "max_upload_bytes", 1 << 30)),
            poll_s=float(settings.worker_poll_s))
        secret = settings.webhook_secret.get_secret_value() if settings.webhook_secret else None
        manager = cls(config, service, database_url=settings.database_url,
                      webhook_secret=secret, stalled_s=float(settings.worker_stalled_s),
                      heartbeat_s=float(settings.worker_heartbeat_s),
                      webhook_retries=int(settings.webhook_retries),
                      webhook_backoff_s=int(settings.webhook_backoff_s), **kwargs)
        manager.destinations = dict(getattr(settings, "destinations", {}) or {})
        return manager

    # -- life cycle -----------------------------------------------------------------------------
    def start(self) -> None:
        if self._started:
            return
        self.ensure_queue_schema()
        self.sync_app.open()
        if self.role == "gateway":
            self._collector = _QueueCollector(self)
            REGISTRY.register(self._collector)
        self._started = True

    def stop(self, timeout: float = 10.0) -> None:
        if self._collector is not None:
            REGISTRY.unregister(self._collector)
            self._collector = None
        if self._started:
            self.sync_app.close()
            self._started = False
        self.store.close()

    def ensure_queue_schema(self) -> None:
        """Apply procrastinate's schema once (the first process to start; others wait)."""
        import psycopg

        with psycopg.connect(self.database_url, autocommit=True) as conn:
            conn.execute("SELECT pg_advisory_lock(%s)", (_SCHEMA_LOCK,))
            try:
                row = conn.execute("SELECT to_regclass('procrastinate_jobs')").fetchone()
                if row is None or row[0] is None:
                    log.info("applying the procrastinate schema")
                    with self.sync_app.open():
                        self.sync_app.schema_manager.apply_schema()
            finally:
                conn.execute("SELECT pg_advisory_unlock(%s)", (_SCHEMA_LOCK,))

    # -- gateway side -----------------------------------------------------------------------------
    def submit(self, uploads: Sequence[Upload], options: Any, *,
               delivery: dict[str, Any] | None = None, priority: str | None = None,
               idempotency_key: str | None = None,
               webhook_url: str | None = None) -> JobRecord:
        if not uploads:
            raise JobError(422, "no_files", "the request has no file; send the volume as a "
                           "multipart field named 'file' (or several 'files')")
        rank = PRIORITIES.get(priority or "routine")
        if rank is None:
            raise JobError(422, "invalid_priority", f"priority must be one of "
                           f"{', '.join(PRIORITIES)}, got {priority!r}")
        if idempotency_key is not None and not 1 <= len(idempotency_key) <= 200:
            raise JobError(400, "invalid_idempotency_key", "Idempotency-Key must be 1 to 200 "
                           "characters")
        if webhook_url is not None:
            if not webhook_url.startswith(("http://", "https://")):
                raise JobError(422, "invalid_webhook_url", f"webhook_url must be an http(s) URL, "
                               f"got {webhook_url[:100]!r}")
            if not self.webhook_secret:
                raise JobError(400, "webhook_unavailable", "this server has no "
                               "SFPC_WEBHOOK_SECRET to sign webhooks with")
        if idempotency_key is not None:
            earlier = self.pg.by_idempotency_key(idempotency_key)
            if earlier is not None:
                return earlier
        if self.store.count(JobStatus.QUEUED) >= self.config.max_queued:
            raise self._queue_full()
        job_id = new_job_id()
        inputs = self._store_inputs(job_id, uploads)
        try:
            if delivery:
                write_durable(self.files.job_dir(job_id) / DELIVERY_FILE,
                              json.dumps(delivery).encode())
            record, created = self.pg.insert(
                job_id, options=_options_json(options), inputs=inputs, now=self.clock(),
                max_queued=self.config.max_queued, priority=rank,
                idempotency_key=idempotency_key, webhook_url=webhook_url)
        except QueueFull:
            self.files.remove(job_id)
            raise self._queue_full() from None
        except BaseException:
            self.files.remove(job_id)
            raise
        if not created:  # the same key raced in from another gateway and won
            self.files.remove(job_id)
            return record
        try:
            self.enqueue(record)
        except Exception as exc:
            # The row stays queued: a worker's maintenance loop enqueues rows left unqueued.
            log.warning(f"deferring a job failed ({exc}); a worker will enqueue it",
                        extra={"job_id": job_id, "error": str(exc)})
        log.info("job queued", extra={"job_id": job_id, "files": len(inputs),
                                      "priority": priority or "routine"})
        return record

    def enqueue(self, record: JobRecord) -> None:
        """Defer the queue job that runs ``record`` (at most one queued: the queueing lock)."""
        from procrastinate.exceptions import AlreadyEnqueued

        try:
            queue_id = self.sync_app.configure_task(
                RUN_TASK, queue=QUEUE, priority=record.priority,
                queueing_lock=record.id).defer(job_id=record.id)
        except AlreadyEnqueued:
            return
        self.pg.set_queue_job(record.id, queue_id)

    def cancel(self, job_id: str) -> JobRecord:
        record = self.get(job_id)
        now = self.clock()
        before = self.store.cancel(record.id, now=now, expires_at=now + self.config.retention_s)
        if before not in (JobStatus.QUEUED, JobStatus.RUNNING):
            raise JobError(409, "job_finished", f"job {job_id} already ended "
                           f"({record.status.value}); nothing to cancel")
        if before is JobStatus.QUEUED:
            self.files.remove_inputs(record.id)
        if record.queue_job_id is not None:
            try:
                # A queued one never starts; a running one is also told by its row heartbeat.
                self.sync_app.job_manager.cancel_job_by_id(record.queue_job_id, abort=True)
            except Exception:
                log.exception("aborting the queue job failed", extra={"job_id": job_id})
        log.info("job cancelled", extra={"job_id": job_id, "was": before.value})
        return self.get(job_id)

    def stats(self) -> dict[str, Any]:
        store = self.pg
        return {"backend": "postgres", "jobs": store.counts(),
                "workers": store.workers(self.stalled_s)}

    def retry_after(self) -> int:
        return super().retry_after()

    # -- worker side ------------------------------------------------------------------------------
    def run_one(self, job_id: str, *, queue_job_id: int | None = None) -> None:
        """Run one job the queue handed to this worker (the procrastinate task's body)."""
        if not is_job_id(job_id):
            log.error("queue job with a malformed id", extra={"job_id": job_id})
            return
        owner = f"{self.host}|{os.getpid()}|{queue_job_id}|{uuid.uuid4().hex[:8]}"
        now = self.clock()
        store = self.pg
        claimed = store.claim(job_id, owner, now=now, max_attempts=self.config.max_attempts,
                              expires_at=now + self.config.retention_s)
        if claimed is None:
            log.info("queue job for an ended job skipped", extra={"job_id": job_id})
            return
        state, job = claimed
        if state is JobStatus.FAILED:
            log.warning("job failed: its worker died on every attempt",
                        extra={"job_id": job_id, "attempts": job.attempts})
            self.files.remove_inputs(job_id)
            self._after_outcome(job_id)
            return
        log.info("job started", extra={"job_id": job_id, "attempt": job.attempts,
                                       "owner": owner})
        cancel = threading.Event()
        done = threading.Event()

        def beat() -> None:
            # The row's heartbeat doubles as the cancel check: it fails once the row is no
            # longer this attempt's (cancelled from any gateway, or taken over).
            while not done.wait(min(self.config.poll_s, self.heartbeat_s)):
                try:
                    if not store.touch(job_id, owner, self.clock()):
                        cancel.set()
                        return
                except Exception:
                    log.exception("job heartbeat failed", extra={"job_id": job_id})

        beater = threading.Thread(target=beat, name=f"sfpc-beat-{job_id[:8]}", daemon=True)
        beater.start()
        try:
            outcome = self._execute(job, cancel)
        except JobCancelled:
            self._lost(job_id)
            return
        except JobFailure as exc:
            self._record_failure(job_id, owner, exc.code, exc.message)
            return
        except MemoryError:
            self._record_failure(job_id, owner, "out_of_memory", "the job ran out of memory")
            return
        except Exception as exc:
            log.exception("job crashed", extra={"job_id": job_id})
            self._record_failure(job_id, owner, "internal_error", f"the job failed unexpectedly "
                                 f"({type(exc).__name__}); see the worker log")
            return
        finally:
            done.set()
            beater.join()
        now = self.clock()
        if store.succeed(job_id, owner, now=now, expires_at=now + self.config.retention_s,
                         results=outcome.results, result_body=outcome.result_body,
                         report=outcome.report):
            log.info("job succeeded", extra={"job_id": job_id, "attempt": job.attempts})
            # A killed attempt's half-written .results-* folder is garbage once the job ended
            # (a presumed-dead attempt still writing then fails its publish and stands down).
            self.files.discard_partial(job_id)
            self.files.remove_inputs(job_id)
            self._after_outcome(job_id)
        else:
            self._lost(job_id)

    def _record_failure(self, job_id: str, owner: str, code: str, message: str) -> None:
        now = self.clock()
        if self.store.fail(job_id, owner, now=now, expires_at=now + self.config.retention_s,
                           code=code, message=message):
            log.info("job failed", extra={"job_id": job_id, "code": code})
            self.files.discard_partial(job_id)
            self.files.remove_inputs(job_id)
            self._after_outcome(job_id)
        else:
            self._lost(job_id)

    def _lost(self, job_id: str) -> None:
        """This attempt no longer holds the job: cancelled (drop every result) or taken over /
        finished by another attempt (its results stay: first published wins)."""
        current = self.store.get(job_id)
        if current is None or current.status in (JobStatus.CANCELLED, JobStatus.EXPIRED):
            self.files.discard_results(job_id)
            self.files.remove_inputs(job_id)
            log.info("job cancelled, results discarded", extra={"job_id": job_id})
        else:
            log.info("job finished elsewhere; this attempt's outcome discarded",
                     extra={"job_id": job_id, "status": current.status.value})

    def _after_outcome(self, job_id: str) -> None:
        record = self.store.get(job_id)
        if record is None or record.webhook is None:
            return
        try:
            self.sync_app.configure_task(WEBHOOK_TASK, queue=QUEUE,
                                         queueing_lock=f"webhook-{job_id}").defer(job_id=job_id)
        except Exception as exc:
            self.pg.record_webhook(job_id, status="failed", attempts=0,
                                      error=f"could not queue the webhook: {exc}")

    def webhook_body(self, record: JobRecord) -> bytes:
        error = ({"code": record.error_code, "message": record.error_message}
                 if record.error_code else None)
        return json.dumps({"id": record.id, "status": record.status.value, "error": error,
                           "results": record.results, "attempts": record.attempts,
                           "finished_at": record.finished_at, "sent_at": self.clock()},
                          sort_keys=True).encode()

    def send_webhook(self, job_id: str, *, attempt: int) -> None:
        """POST the job's outcome, signed; raises (so the queue retries) until the last try."""
        record = self.store.get(job_id)
        if record is None or record.webhook is None or record.webhook["status"] == "delivered":
            # Delivered already: a retry of a task whose worker died after recording it. (One
            # that died between the POST and the record re-sends: receivers dedupe by job id.)
            return
        if not self.webhook_secret:
            self.pg.record_webhook(job_id, status="failed", attempts=attempt,
                                      error="the worker has no SFPC_WEBHOOK_SECRET")
            return
        body = self.webhook_body(record)
        request = urllib.request.Request(
            record.webhook["url"], data=body, method="POST",
            headers={"Content-Type": "application/json", "X-SFPC-Job-Id": job_id,
                     SIGNATURE_HEADER: sign(self.webhook_secret, body)})
        try:
            with urllib.request.urlopen(request, timeout=WEBHOOK_TIMEOUT_S) as response:
                code = response.status
            error = None if 200 <= code < 300 else f"HTTP {code}"
        except urllib.error.HTTPError as exc:
            error = f"HTTP {exc.code}"
        except (urllib.error.URLError, OSError) as exc:
            error = f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}"
        store = self.pg
        if error is None:
            store.record_webhook(job_id, status="delivered", attempts=attempt, error=None)
            log.info("webhook delivered", extra={"job_id": job_id, "attempt": attempt})
            return
        final = attempt > self.webhook_retries
        store.record_webhook(job_id, status="failed" if final else "retrying",
                             attempts=attempt, error=error)
        log.warning("webhook failed", extra={"job_id": job_id, "attempt": attempt,
                                             "error": error, "final": final})
        if not final:
            raise RuntimeError(f"webhook to {record.webhook['url']} failed: {error}")

    def maintain(self) -> None:
        """Files and rows: enqueue rows a dead gateway left unqueued, expire old jobs."""
        store = self.pg
        now = self.clock()
        for record in store.unqueued(now - UNQUEUED_AFTER_S):
            self.enqueue(record)
        for record in store.due_for_expiry(now):
            self.files.remove(record.id)
            if store.mark_expired(record.id, now=now):
                log.info("job expired", extra={"job_id": record.id})
        store.purge_expired(now - 7 * 24 * 3600.0)

    async def _maintenance_loop(self) -> None:
        while True:
            await asyncio.sleep(min(self.config.poll_s, self.stalled_s / 4))
            try:
                stalled = await self.app.job_manager.get_stalled_jobs(
                    seconds_since_heartbeat=self.stalled_s)
                for job in stalled:
                    try:
                        await self.app.job_manager.retry_job(job)
                        log.warning("queue job of a dead worker retried",
                                    extra={"queue_job_id": job.id, "task": job.task_name,
                                           "job_id": job.task_kwargs.get("job_id")})
                    except Exception:  # another worker retried it first
                        pass
                await asyncio.to_thread(self.maintain)
            except Exception:
                log.exception("job maintenance failed")

    async def _run_worker(self, concurrency: int, name: str) -> None:
        maintenance = asyncio.create_task(self._maintenance_loop())
        try:
            async with self.app.open_async():
                await self.app.run_worker_async(
                    queues=[QUEUE], concurrency=concurrency, name=name,
                    update_heartbeat_interval=self.heartbeat_s,
                    stalled_worker_timeout=self.stalled_s, install_signal_handlers=True,
                    fetch_job_polling_interval=self.config.poll_s,
                    abort_job_polling_interval=self.config.poll_s)
        finally:
            maintenance.cancel()

    def run_worker(self, concurrency: int | None = None) -> None:
        """Run jobs until SIGTERM/SIGINT (running jobs finish first; a second signal aborts)."""
        global _WORKER
        self.start()
        _WORKER = self
        name = f"{self.host}-{os.getpid()}"
        log.info("worker started", extra={"concurrency": concurrency or self.config.workers,
                                          "worker": name})
        try:
            asyncio.run(self._run_worker(concurrency or self.config.workers, name))
        finally:
            _WORKER = None
            self.stop()
