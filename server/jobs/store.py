"""The job database: one SQLite file (WAL mode) that several threads and processes share.

Every state change is one statement or one ``BEGIN IMMEDIATE`` transaction whose ``WHERE`` names
the state it expects, so two workers (threads or uvicorn processes on the same data dir) can
never both claim a job, and a worker whose job was cancelled, released or recovered meanwhile
cannot overwrite that: its update simply matches no row. ``synchronous=FULL`` makes a commit
durable before it returns, which is what lets the gateway answer 202 only once a job is on disk.
"""

from __future__ import annotations

import builtins
import json
import sqlite3
import threading
from collections.abc import Callable, Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from sfpc.server.jobs.models import InputFile, JobRecord, JobStatus, ResultBody

SCHEMA_VERSION = 1
BUSY_TIMEOUT_MS = 30_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq            INTEGER PRIMARY KEY AUTOINCREMENT,
    id             TEXT    NOT NULL UNIQUE,
    status         TEXT    NOT NULL,
    options        TEXT    NOT NULL,
    inputs         TEXT    NOT NULL,
    results        TEXT    NOT NULL DEFAULT '[]',
    result_body    TEXT,
    report         TEXT,
    error_code     TEXT,
    error_message  TEXT,
    attempts       INTEGER NOT NULL DEFAULT 0,
    owner          TEXT,
    heartbeat_at   REAL,
    created_at     REAL    NOT NULL,
    updated_at     REAL    NOT NULL,
    started_at     REAL,
    finished_at    REAL,
    expires_at     REAL
);
CREATE INDEX IF NOT EXISTS jobs_status_seq ON jobs (status, seq);
CREATE INDEX IF NOT EXISTS jobs_expires ON jobs (expires_at) WHERE expires_at IS NOT NULL;
"""


class QueueFull(RuntimeError):
    """The queue already holds ``max_queued`` jobs."""

    def __init__(self, queued: int) -> None:
        super().__init__(f"{queued} jobs are already queued")
        self.queued = queued


class JobStore:
    """Job rows in ``path`` (created with its folder on first use).

    Each thread gets its own connection (sqlite3 connections must not be shared across threads
    mid-transaction); all of them are closed by :meth:`close`.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._closed = False
        conn = self._conn()
        # journal_mode=WAL persists in the file; setting it needs no other connection open in
        # rollback mode, which holds at start-up.
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise RuntimeError(f"{self.path}: SQLite refused WAL mode (got {mode!r})")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise RuntimeError(f"{self.path} was written by a newer gateway (schema {version})")
        conn.executescript(_SCHEMA)
        conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    # ------------------------------------------------------------------------------------------
    # connections
    # ------------------------------------------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            return conn
        if self._closed:
            raise RuntimeError("the job store is closed")
        conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                               check_same_thread=False)
        conn.row_factory = sqlite3.Row
        conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
        self._local.conn = conn
        with self._lock:
            self._all.append(conn)
        return conn

    def close(self) -> None:
        """Close every thread's connection; later calls raise."""
        with self._lock:
            self._closed = True
            conns, self._all = self._all, []
        for conn in conns:
            try:
                conn.close()
            except sqlite3.ProgrammingError:
                # Closing from another thread than the creator is refused on some builds; the
                # connection is then released with its thread.
                pass
        self._local = threading.local()

    def _transaction(self, body: Callable[[sqlite3.Connection], Any]) -> Any:
        conn = self._conn()
        # IMMEDIATE takes the write lock up front, so a read-then-write (capacity check, then
        # insert) cannot interleave with another process's.
        conn.execute("BEGIN IMMEDIATE")
        try:
            result = body(conn)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        return result

    # ------------------------------------------------------------------------------------------
    # reads
    # ------------------------------------------------------------------------------------------

    def get(self, job_id: str) -> JobRecord | None:
        """The job, or None when no such id exists."""
        row = self._conn().execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _record(row) if row is not None else None

    def list(self, status: JobStatus | None = None, *, limit: int = 50,
             offset: int = 0) -> tuple[list[JobRecord], int]:
        """One page of jobs, newest first, and the count of all matching jobs."""
        where, args = ("WHERE status = ?", (status.value,)) if status else ("", ())
        conn = self._conn()
        total = conn.execute(f"SELECT count(*) FROM jobs {where}", args).fetchone()[0]
        rows = conn.execute(f"SELECT * FROM jobs {where} ORDER BY seq DESC LIMIT ? OFFSET ?",
                            (*args, limit, offset)).fetchall()
        return [_record(r) for r in rows], int(total)

    def count(self, status: JobStatus) -> int:
        """How many jobs are in ``status``."""
        row = self._conn().execute("SELECT count(*) FROM jobs WHERE status = ?",
                                   (status.value,)).fetchone()
        return int(row[0])

    def exists(self, job_id: str) -> bool:
        """Whether a row (in any state) has this id."""
        return self._conn().execute("SELECT 1 FROM jobs WHERE id = ?",
                                    (job_id,)).fetchone() is not None

    # Below the method `list`, the bare name means it in this class: annotations spell the
    # type builtins.list.
    def running(self) -> builtins.list[JobRecord]:
        """Every job some worker (here or in another process) has claimed."""
        rows = self._conn().execute("SELECT * FROM jobs WHERE status = ? ORDER BY seq",
                                    (JobStatus.RUNNING.value,)).fetchall()
        return [_record(r) for r in rows]

    def recent_run_seconds(self, n: int = 20) -> builtins.list[float]:
        """Run times of the last ``n`` succeeded jobs (to estimate Retry-After)."""
        rows = self._conn().execute(
            "SELECT finished_at - started_at FROM jobs WHERE status = ? AND started_at IS NOT "
            "NULL ORDER BY seq DESC LIMIT ?", (JobStatus.SUCCEEDED.value, n)).fetchall()
        return [float(r[0]) for r in rows if r[0] is not None and r[0] >= 0]

    def due_for_expiry(self, now: float) -> builtins.list[JobRecord]:
        """Ended jobs whose retention has run out (expired ones excluded)."""
        rows = self._conn().execute(
            "SELECT * FROM jobs WHERE expires_at IS NOT NULL AND expires_at <= ? AND status "
            "!= ? ORDER BY seq", (now, JobStatus.EXPIRED.value)).fetchall()
        return [_record(r) for r in rows]

    # ------------------------------------------------------------------------------------------
    # transitions
    # ------------------------------------------------------------------------------------------

    def insert(self, job_id: str, *, options: dict[str, Any], inputs: Iterable[InputFile],
               now: float, max_queued: int) -> JobRecord:
        """Queue a new job; :class:`QueueFull` when ``max_queued`` jobs already wait."""
        inputs_json = json.dumps([asdict(f) for f in inputs])
        options_json = json.dumps(options, sort_keys=True)

        def body(conn: sqlite3.Connection) -> None:
            queued = conn.execute("SELECT count(*) FROM jobs WHERE status = ?",
                                  (JobStatus.QUEUED.value,)).fetchone()[0]
            if queued >= max_queued:
                raise QueueFull(int(queued))
            conn.execute(
                "INSERT INTO jobs (id, status, options, inputs, created_at, updated_at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (job_id, JobStatus.QUEUED.value, options_json, inputs_json, now, now))

        self._transaction(body)
        record = self.get(job_id)
        assert record is not None
        return record

    def claim(self, owner: str, now: float) -> JobRecord | None:
        """Atomically start the oldest queued job for ``owner`` (attempts + 1), or None."""
        row = self._conn().execute(
            "UPDATE jobs SET status = ?, owner = ?, started_at = ?, heartbeat_at = ?, "
            "updated_at = ?, attempts = attempts + 1 WHERE seq = (SELECT seq FROM jobs "
            "WHERE status = ? ORDER BY seq LIMIT 1) RETURNING *",
            (JobStatus.RUNNING.value, owner, now, now, now, JobStatus.QUEUED.value)).fetchone()
        return _record(row) if row is not None else None

    def succeed(self, job_id: str, owner: str, *, now: float, expires_at: float,
                results: builtins.list[str], result_body: ResultBody,
                report: dict[str, Any] | None) -> bool:
        """Record the results; False when the job is no longer this owner's running job."""
        cur = self._conn().execute(
            "UPDATE jobs SET status = ?, finished_at = ?, updated_at = ?, expires_at = ?, "
            "results = ?, result_body = ?, report = ?, owner = NULL "
            "WHERE id = ? AND status = ? AND owner = ?",
            (JobStatus.SUCCEEDED.value, now, now, expires_at, json.dumps(results),
             json.dumps(asdict(result_body)), json.dumps(report) if report is not None else None,
             job_id, JobStatus.RUNNING.value, owner))
        return cur.rowcount == 1

    def fail(self, job_id: str, owner: str, *, now: float, expires_at: float, code: str,
             message: str) -> bool:
        """Record a failure; False when the job is no longer this owner's running job."""
        cur = self._conn().execute(
            "UPDATE jobs SET status = ?, finished_at = ?, updated_at = ?, expires_at = ?, "
            "error_code = ?, error_message = ?, owner = NULL "
            "WHERE id = ? AND status = ? AND owner = ?",
            (JobStatus.FAILED.value, now, now, expires_at, code, message, job_id,
             JobStatus.RUNNING.value, owner))
        return cur.rowcount == 1

    def cancel(self, job_id: str, *, now: float, expires_at: float) -> JobStatus | None:
        """Cancel a queued or running job; returns the state it was in (None: no such job).

        A running job's worker learns of it at its next check or when its own final update
        matches no row, and discards what it computed.
        """
        def body(conn: sqlite3.Connection) -> JobStatus | None:
            row = conn.execute("SELECT status FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                return None
            before = JobStatus(row[0])
            if before in (JobStatus.QUEUED, JobStatus.RUNNING):
                conn.execute(
                    "UPDATE jobs SET status = ?, finished_at = ?, updated_at = ?, "
                    "expires_at = ?, error_code = 'cancelled', "
                    "error_message = 'cancelled by request', owner = NULL WHERE id = ?",
                    (JobStatus.CANCELLED.value, now, now, expires_at, job_id))
            return before

        return self._transaction(body)

    def is_running_for(self, job_id: str, owner: str) -> bool:
        """Whether ``owner`` still holds the job (it was not cancelled, released or recovered)."""
        row = self._conn().execute(
            "SELECT 1 FROM jobs WHERE id = ? AND status = ? AND owner = ?",
            (job_id, JobStatus.RUNNING.value, owner)).fetchone()
        return row is not None

    def release(self, job_id: str, owner: str, *, now: float) -> bool:
        """Put a job this owner could not finish (shutdown) back in the queue, uncounted."""
        cur = self._conn().execute(
            "UPDATE jobs SET status = ?, owner = NULL, started_at = NULL, heartbeat_at = NULL, "
            "updated_at = ?, attempts = max(attempts - 1, 0) "
            "WHERE id = ? AND status = ? AND owner = ?",
            (JobStatus.QUEUED.value, now, job_id, JobStatus.RUNNING.value, owner))
        return cur.rowcount == 1

    def heartbeat(self, owner: str, now: float) -> int:
        """Mark this owner's running jobs alive; returns how many it holds."""
        cur = self._conn().execute(
            "UPDATE jobs SET heartbeat_at = ? WHERE status = ? AND owner = ?",
            (now, JobStatus.RUNNING.value, owner))
        return cur.rowcount

    def recover(self, job_id: str, owner: str | None, *, now: float, max_attempts: int,
                expires_at: float) -> JobStatus | None:
        """A running job whose worker died: queue it again, or fail it after ``max_attempts``.

        The update names the dead owner, so a job that was meanwhile finished or recovered by
        someone else is left alone (returns None).
        """
        def body(conn: sqlite3.Connection) -> JobStatus | None:
            row = conn.execute("SELECT attempts FROM jobs WHERE id = ? AND status = ? AND "
                               "owner IS ?", (job_id, JobStatus.RUNNING.value, owner)).fetchone()
            if row is None:
                return None
            attempts = int(row[0])
            if attempts >= max_attempts:
                conn.execute(
                    "UPDATE jobs SET status = ?, finished_at = ?, updated_at = ?, "
                    "expires_at = ?, error_code = 'worker_lost', error_message = ?, "
                    "owner = NULL WHERE id = ?",
                    (JobStatus.FAILED.value, now, now, expires_at,
                     f"the worker running this job died on each of its {attempts} attempts; "
                     "it is not retried again", job_id))
                return JobStatus.FAILED
            conn.execute(
                "UPDATE jobs SET status = ?, owner = NULL, started_at = NULL, "
                "heartbeat_at = NULL, updated_at = ? WHERE id = ?",
                (JobStatus.QUEUED.value, now, job_id))
            return JobStatus.QUEUED

        return self._transaction(body)

    def mark_expired(self, job_id: str, *, now: float) -> bool:
        """Mark an ended job expired once its files are gone (result names are cleared)."""
        cur = self._conn().execute(
            "UPDATE jobs SET status = ?, updated_at = ?, results = '[]', result_body = NULL "
            "WHERE id = ? AND status IN (?, ?, ?)",
            (JobStatus.EXPIRED.value, now, job_id, JobStatus.SUCCEEDED.value,
             JobStatus.FAILED.value, JobStatus.CANCELLED.value))
        return cur.rowcount == 1

    def purge_expired(self, before: float) -> int:
        """Delete expired rows whose expiry is older than ``before`` (404 from then on)."""
        cur = self._conn().execute("DELETE FROM jobs WHERE status = ? AND expires_at < ?",
                                   (JobStatus.EXPIRED.value, before))
        return cur.rowcount


def _record(row: sqlite3.Row) -> JobRecord:
    body = json.loads(row["result_body"]) if row["result_body"] else None
    return JobRecord(
        id=row["id"],
        seq=int(row["seq"]),
        status=JobStatus(row["status"]),
        options=json.loads(row["options"]),
        inputs=[InputFile(**f) for f in json.loads(row["inputs"])],
        created_at=float(row["created_at"]),
        updated_at=float(row["updated_at"]),
        attempts=int(row["attempts"]),
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        expires_at=row["expires_at"],
        error_code=row["error_code"],
        error_message=row["error_message"],
        results=list(json.loads(row["results"] or "[]")),
        result_body=ResultBody(**body) if body else None,
        report=json.loads(row["report"]) if row["report"] else None,
        owner=row["owner"],
        heartbeat_at=row["heartbeat_at"],
    )
