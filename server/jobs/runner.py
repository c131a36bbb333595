"""The worker pool: a fixed number of threads that claim queued jobs from the store and run them,
plus one sweeper thread for recovery, heartbeats and retention.

Restart safety rests on three rules:

- a job is claimed by one atomic ``UPDATE`` that also counts the attempt, so attempts count the
  starts of a job whatever happens to the process afterwards;
- every claim names its owner (host, pid, process start time, pool token). A running job whose
  owner is a dead process on this host - or, for other hosts, whose heartbeat is older than
  :data:`LEASE_S` - is recovered: queued again, or failed once it has used ``max_attempts``
  starts, so an upload that kills its worker (segfault, OOM killer) cannot crash-loop the server;
- every finishing update names the state and owner it expects, so a cancelled or recovered job
  is never overwritten by a worker that is late.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psutil

from sfpc.server.jobs.files import JobFiles
from sfpc.server.jobs.models import JobRecord, JobStatus, ResultBody
from sfpc.server.jobs.store import JobStore

log = logging.getLogger("sfpc.server.jobs")

# A job of another host whose owner has not refreshed its heartbeat for this long is presumed
# dead. Heartbeats come every sweep (at most 5 s apart), so this is many missed beats.
LEASE_S = 120.0
MAX_SWEEP_S = 5.0
MIN_SWEEP_S = 0.05
# Job folders with no database row (a crash between writing an upload and committing its row)
# are removed once this old; younger ones may belong to a submission in progress.
STRAY_AGE_S = 600.0
STRAY_SCAN_EVERY_S = 60.0
# Expired rows stay as tombstones (410 instead of 404) for this long after expiry.
TOMBSTONE_S = 7 * 24 * 3600.0


class JobFailure(Exception):
    """A job that cannot succeed (bad upload, bad option): recorded as failed, not retried."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class JobCancelled(Exception):
    """The job's cancel event was set while it ran."""


@dataclass
class JobOutcome:
    """What a successful run produced (files are already published in the job folder)."""

    results: list[str]
    result_body: ResultBody
    report: dict[str, Any] | None = None


# execute(job, cancel) runs one job; it raises JobFailure / JobCancelled or returns the outcome.
Execute = Callable[[JobRecord, threading.Event], JobOutcome]


# ----------------------------------------------------------------------------------------------
# Owners
# ----------------------------------------------------------------------------------------------


def process_owner() -> str:
    """An owner tag for this process: host, pid and start time (pid reuse cannot fool it)."""
    pid = os.getpid()
    started = psutil.Process(pid).create_time()
    return f"{socket.gethostname()}|{pid}|{started:.3f}|{uuid.uuid4().hex[:8]}"


def owner_alive(owner: str | None) -> bool | None:
    """True/False for an owner on this host; None when it cannot be told from here."""
    if not owner:
        return False
    parts = owner.split("|")
    if len(parts) != 4:
        return False
    host, pid_text, started_text, _ = parts
    if host != socket.gethostname():
        return None
    try:
        pid, started = int(pid_text), float(started_text)
    except ValueError:
        return False
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return abs(proc.create_time() - started) < 0.01
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        # AccessDenied cannot happen for create_time on Linux; treat it as gone, like a missing
        # pid, rather than keep a job stuck forever.
        return False


# ----------------------------------------------------------------------------------------------
# The pool
# ----------------------------------------------------------------------------------------------


@dataclass
class PoolConfig:
    workers: int = 1
    max_attempts: int = 3
    retention_s: float = 24 * 3600.0
    poll_s: float = 1.0  # how often idle workers look for jobs other processes queued
    sweep_s: float | None = None  # None: from the retention (see sweep_interval)
    lease_s: float = LEASE_S
    tombstone_s: float = TOMBSTONE_S

    def sweep_interval(self) -> float:
        if self.sweep_s is not None:
            return self.sweep_s
        # A tenth of the retention keeps expiry within 10 % of it, bounded for heartbeats.
        return min(MAX_SWEEP_S, max(MIN_SWEEP_S, self.retention_s / 10))


@dataclass
class _Active:
    job: JobRecord
    cancel: threading.Event = field(default_factory=threading.Event)


class WorkerPool:
    """``config.workers`` threads running jobs through ``execute``; see the module docstring.

    ``on_change(queued)`` is called with the queue depth after every claim and sweep (the
    Prometheus gauge).
    """

    def __init__(self, store: JobStore, files: JobFiles, execute: Execute, config: PoolConfig,
                 *, on_change: Callable[[int], None] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.files = files
        self.execute = execute
        self.config = config
        self.on_change = on_change
        self.clock = clock
        self.owner = process_owner()
        self._wake = threading.Condition()
        self._pending_wakes = 0
        self._stopping = threading.Event()
        self._active: dict[str, _Active] = {}
        self._active_lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._last_stray_scan = 0.0

    # -- life cycle -------------------------------------------------------------------------
    def start(self) -> None:
        """Recover jobs dead processes left running, then start the workers and the sweeper."""
        if self._threads:
            return
        self.recover()
        for index in range(self.config.workers):
            t = threading.Thread(target=self._work, name=f"sfpc-job-worker-{index}", daemon=True)
            t.start()
            self._threads.append(t)
        t = threading.Thread(target=self._sweep_loop, name="sfpc-job-sweeper", daemon=True)
        t.start()
        self._threads.append(t)
        self.publish()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop taking jobs; running ones are asked to stop and go back to the queue uncounted
        (a shutdown is not the job's fault). Jobs still running after ``timeout`` are released
        too; their worker's late update then matches nothing."""
        self._stopping.set()
        with self._active_lock:
            for active in self._active.values():
                active.cancel.set()
        with self._wake:
            self._wake.notify_all()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        with self._active_lock:
            left = list(self._active)
        for job_id in left:
            self.store.release(job_id, self.owner, now=self.clock())
        self._threads = []

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def wake(self) -> None:
        """A job was queued here: let an idle worker claim it now rather than at its next poll."""
        with self._wake:
            self._pending_wakes += 1
            self._wake.notify()

    def cancel_local(self, job_id: str) -> bool:
        """Set the cancel event of a job running in this pool; False when it is not here."""
        with self._active_lock:
            active = self._active.get(job_id)
        if active is None:
            return False
        active.cancel.set()
        return True

    # -- workers ----------------------------------------------------------------------------
    def _work(self) -> None:
        while not self._stopping.is_set():
            try:
                job = self.store.claim(self.owner, self.clock())
            except Exception:  # a locked or unwritable database must not kill the worker
                log.exception("claiming a job failed")
                job = None
            if job is None:
                with self._wake:
                    if self._pending_wakes == 0 and not self._stopping.is_set():
                        self._wake.wait(self.config.poll_s)
                    self._pending_wakes = max(0, self._pending_wakes - 1)
                continue
            self.publish()
            try:
                self._run(job)
            except Exception:
                # Recording the outcome failed (database locked or gone): keep the worker alive
                # and hand the job back rather than leave it marked running by a live owner.
                log.exception("finishing a job failed", extra={"job_id": job.id})
                try:
                    self.store.release(job.id, self.owner, now=self.clock())
                except Exception:
                    log.exception("releasing a job failed", extra={"job_id": job.id})

    def _run(self, job: JobRecord) -> None:
        active = _Active(job)
        with self._active_lock:
            self._active[job.id] = active
        if self._stopping.is_set():
            active.cancel.set()  # claimed just as stop() signalled the others
        log.info("job started", extra={"job_id": job.id, "attempt": job.attempts})
        try:
            self.files.discard_partial(job.id)
            outcome = self.execute(job, active.cancel)
        except JobCancelled:
            self._after_cancel(job)
        except JobFailure as exc:
            self._finish_failed(job, exc.code, exc.message)
        except MemoryError:
            self._finish_failed(job, "out_of_memory", "the job ran out of memory")
        except Exception as exc:
            log.exception("job crashed", extra={"job_id": job.id})
            self._finish_failed(job, "internal_error",
                                f"the job failed unexpectedly ({type(exc).__name__}); see the "
                                "server log")
        else:
            now = self.clock()
            ok = self.store.succeed(job.id, self.owner, now=now,
                                    expires_at=now + self.config.retention_s,
                                    results=outcome.results, result_body=outcome.result_body,
                                    report=outcome.report)
            if ok:
                log.info("job succeeded", extra={"job_id": job.id})
            else:
                self._after_cancel(job)
        finally:
            with self._active_lock:
                self._active.pop(job.id, None)
            self._drop_inputs_if_done(job.id)
            self.publish()

    def _finish_failed(self, job: JobRecord, code: str, message: str) -> None:
        now = self.clock()
        if self.store.fail(job.id, self.owner, now=now, expires_at=now + self.config.retention_s,
                           code=code, message=message):
            log.info("job failed", extra={"job_id": job.id, "code": code})
        else:
            self._after_cancel(job)

    def _after_cancel(self, job: JobRecord) -> None:
        """The job stopped or finished but is no longer ours: released on shutdown, cancelled
        by a user, or recovered by another process."""
        if self._stopping.is_set():
            self.store.release(job.id, self.owner, now=self.clock())
            self.files.discard_partial(job.id)
            log.info("job released at shutdown", extra={"job_id": job.id})
            return
        current = self.store.get(job.id)
        if current is not None and current.status is JobStatus.RUNNING \
                and current.owner == self.owner:
            # Cancel event set without a DB change (cannot happen through the API, but a
            # cancelled run must never be left marked running).
            self.store.release(job.id, self.owner, now=self.clock())
            return
        if current is None or current.status in (JobStatus.CANCELLED, JobStatus.EXPIRED):
            self.files.discard_results(job.id)
            log.info("job cancelled, results discarded", extra={"job_id": job.id})
        else:
            self.files.discard_partial(job.id)

    def _drop_inputs_if_done(self, job_id: str) -> None:
        current = self.store.get(job_id)
        if current is None or current.status.terminal:
            # The upload is patient data: once nothing will run the job again it is deleted,
            # not kept until the results expire.
            self.files.remove_inputs(job_id)

    # -- recovery, heartbeat, retention -------------------------------------------------------
    def recover(self) -> dict[str, int]:
        """Queue again (or fail) running jobs whose owner is gone; returns counts by outcome."""
        now = self.clock()
        counts = {"queued": 0, "failed": 0}
        for job in self.store.running():
            if job.owner == self.owner:
                continue
            alive = owner_alive(job.owner)
            if alive is None:
                beat = job.heartbeat_at
                alive = beat is not None and now - beat < self.config.lease_s
            if alive:
                continue
            outcome = self.store.recover(job.id, job.owner, now=now,
                                         max_attempts=self.config.max_attempts,
                                         expires_at=now + self.config.retention_s)
            if outcome is None:
                continue
            counts[outcome.value] += 1
            self.files.discard_partial(job.id)
            if outcome is JobStatus.FAILED:
                self.files.remove_inputs(job.id)
            log.warning("job recovered from a dead worker",
                        extra={"job_id": job.id, "outcome": outcome.value,
                               "attempts": job.attempts})
        if counts["queued"]:
            for _ in range(counts["queued"]):
                self.wake()
        return counts

    def sweep(self) -> None:
        """One round of the sweeper: heartbeat, cross-process cancels, recovery, expiry."""
        now = self.clock()
        self.store.heartbeat(self.owner, now)
        self._notice_remote_cancels()
        self.recover()
        self.expire(now)
        if now - self._last_stray_scan >= STRAY_SCAN_EVERY_S:
            self._last_stray_scan = now
            self._clean_strays(now)
        self.publish()

    def expire(self, now: float | None = None) -> int:
        """Delete the files of ended jobs past their retention and mark them expired."""
        now = self.clock() if now is None else now
        done = 0
        for job in self.store.due_for_expiry(now):
            self.files.remove(job.id)
            if self.store.mark_expired(job.id, now=now):
                done += 1
                log.info("job expired", extra={"job_id": job.id})
        self.store.purge_expired(now - self.config.tombstone_s)
        return done

    def _notice_remote_cancels(self) -> None:
        # A DELETE served by another process changes only the row; the worker holding the job
        # learns of it here and stops at its next check.
        with self._active_lock:
            active = list(self._active.values())
        for entry in active:
            if not self.store.is_running_for(entry.job.id, self.owner):
                entry.cancel.set()

    def _clean_strays(self, now: float) -> None:
        for job_id, mtime in list(self.files.job_ids()):
            record = self.store.get(job_id)
            if record is None:
                if now - mtime > STRAY_AGE_S:
                    self.files.remove(job_id)
            elif record.status is JobStatus.EXPIRED:
                self.files.remove(job_id)
            elif record.status.terminal:
                self.files.remove_inputs(job_id)

    def _sweep_loop(self) -> None:
        interval = self.config.sweep_interval()
        while not self._stopping.wait(interval):
            try:
                self.sweep()
            except Exception:  # the sweeper must outlive a transient database error
                log.exception("job sweep failed")

    def publish(self) -> None:
        """Report the queue depth to ``on_change``."""
        if self.on_change is None:
            return
        try:
            self.on_change(self.store.count(JobStatus.QUEUED))
        except Exception:
            log.exception("publishing the queue depth failed")
