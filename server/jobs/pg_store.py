"""The job table in PostgreSQL, for the distributed mode (``SFPC_JOBS_BACKEND=postgres``).

It holds what the SQLite store holds (see :mod:`.store`) plus what only the distributed mode
offers: a priority, an idempotency key (unique: the same key is the same job) and the record of
the completion webhook. The queue itself is procrastinate's (:mod:`.distributed`); this table is
the job as the API shows it. As in SQLite, every transition's ``WHERE`` names the state and owner
it expects, so a late or presumed-dead worker's update matches no row.
"""

from __future__ import annotations

import builtins
import contextlib
import dataclasses
import json
from collections.abc import Iterable, Iterator
from dataclasses import asdict
from typing import Any, cast

from sfpc.server.jobs.models import InputFile, JobRecord, JobStatus, ResultBody
from sfpc.server.jobs.store import QueueFull, _record

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sfpc_jobs (
    seq              BIGSERIAL PRIMARY KEY,
    id               TEXT NOT NULL UNIQUE,
    status           TEXT NOT NULL,
    options          TEXT NOT NULL,
    inputs           TEXT NOT NULL,
    results          TEXT NOT NULL DEFAULT '[]',
    result_body      TEXT,
    report           TEXT,
    error_code       TEXT,
    error_message    TEXT,
    attempts         INTEGER NOT NULL DEFAULT 0,
    owner            TEXT,
    heartbeat_at     DOUBLE PRECISION,
    created_at       DOUBLE PRECISION NOT NULL,
    updated_at       DOUBLE PRECISION NOT NULL,
    started_at       DOUBLE PRECISION,
    finished_at      DOUBLE PRECISION,
    expires_at       DOUBLE PRECISION,
    priority         INTEGER NOT NULL DEFAULT 0,
    idempotency_key  TEXT UNIQUE,
    queue_job_id     BIGINT,
    webhook_url      TEXT,
    webhook_status   TEXT,
    webhook_attempts INTEGER NOT NULL DEFAULT 0,
    webhook_error    TEXT
);
CREATE INDEX IF NOT EXISTS sfpc_jobs_status_seq ON sfpc_jobs (status, seq);
CREATE INDEX IF NOT EXISTS sfpc_jobs_expires ON sfpc_jobs (expires_at)
    WHERE expires_at IS NOT NULL;
"""

_ACTIVE = (JobStatus.QUEUED.value, JobStatus.RUNNING.value)


def _pg_record(row: dict[str, Any]) -> JobRecord:
    webhook = None
    if row.get("webhook_url"):
        webhook = {"url": row["webhook_url"], "status": row["webhook_status"] or "pending",
                   "attempts": int(row["webhook_attempts"] or 0), "error": row["webhook_error"]}
    # A dict row reads like the sqlite3.Row _record expects.
    return dataclasses.replace(_record(row),  # type: ignore[arg-type]
                               priority=int(row["priority"]),
                               idempotency_key=row["idempotency_key"], webhook=webhook,
                               queue_job_id=row["queue_job_id"])


class PgJobStore:
    """``sfpc_jobs`` in the database at ``url`` (a libpq connection string or URL)."""

    def __init__(self, url: str, *, max_size: int = 8, connect_timeout_s: float = 15.0) -> None:
        from psycopg.conninfo import conninfo_to_dict
        from psycopg.rows import dict_row
        from psycopg_pool import ConnectionPool, PoolTimeout

        self.url = url
        self._pool = ConnectionPool(url, min_size=1, max_size=max_size, open=True,
                                    kwargs={"autocommit": True, "row_factory": dict_row})
        try:
            self._pool.wait(timeout=connect_timeout_s)
        except PoolTimeout:
            self._pool.close()
            # Named without the password: the URL may carry one.
            where = conninfo_to_dict(url)
            raise ConnectionError(
                f"cannot connect to PostgreSQL at {where.get('host', 'localhost')}:"
                f"{where.get('port', 5432)} (database {where.get('dbname', '?')!r}, user "
                f"{where.get('user', '?')!r}) within {connect_timeout_s:g} s; check "
                "SFPC_DATABASE_URL and that the server is up") from None
        with self._tx() as conn:
            # Two processes creating the table at once would collide on the catalog: serialise.
            conn.execute("SELECT pg_advisory_xact_lock(7212001)")
            conn.execute(_SCHEMA)

    def close(self) -> None:
        self._pool.close()

    @contextlib.contextmanager
    def _tx(self) -> Iterator[Any]:
        """A connection in one transaction (rows are dicts: typed Any here)."""
        with self._pool.connection() as conn, conn.transaction():
            yield conn

    def _one(self, sql: str, args: tuple[Any, ...] = ()) -> dict[str, Any] | None:
        with self._pool.connection() as conn:
            return cast(dict[str, Any] | None, conn.execute(sql, args).fetchone())

    def _all(self, sql: str, args: tuple[Any, ...] = ()) -> builtins.list[dict[str, Any]]:
        with self._pool.connection() as conn:
            return cast(builtins.list[dict[str, Any]], conn.execute(sql, args).fetchall())

    def _rowcount(self, sql: str, args: tuple[Any, ...] = ()) -> int:
        with self._pool.connection() as conn:
            return conn.execute(sql, args).rowcount

    # -- reads ----------------------------------------------------------------------------------
    def get(self, job_id: str) -> JobRecord | None:
        row = self._one("SELECT * FROM sfpc_jobs WHERE id = %s", (job_id,))
        return _pg_record(row) if row is not None else None

    def by_idempotency_key(self, key: str) -> JobRecord | None:
        row = self._one("SELECT * FROM sfpc_jobs WHERE idempotency_key = %s", (key,))
        return _pg_record(row) if row is not None else None

    def list(self, status: JobStatus | None = None, *, limit: int = 50,
             offset: int = 0) -> tuple[builtins.list[JobRecord], int]:
        where, args = ("WHERE status = %s", (status.value,)) if status else ("", ())
        total = self._one(f"SELECT count(*) AS n FROM sfpc_jobs {where}", args)
        rows = self._all(f"SELECT * FROM sfpc_jobs {where} ORDER BY seq DESC LIMIT %s OFFSET %s",
                         (*args, limit, offset))
        return [_pg_record(r) for r in rows], int(total["n"] if total else 0)

    def count(self, status: JobStatus) -> int:
        row = self._one("SELECT count(*) AS n FROM sfpc_jobs WHERE status = %s", (status.value,))
        return int(row["n"]) if row else 0

    def counts(self) -> dict[str, int]:
        """Jobs by state, every state present (0 when none)."""
        rows = self._all("SELECT status, count(*) AS n FROM sfpc_jobs GROUP BY status")
        found = {r["status"]: int(r["n"]) for r in rows}
        return {s.value: found.get(s.value, 0) for s in JobStatus}

    def recent_run_seconds(self, n: int = 20) -> builtins.list[float]:
        rows = self._all(
            "SELECT finished_at - started_at AS s FROM sfpc_jobs WHERE status = %s AND "
            "started_at IS NOT NULL ORDER BY seq DESC LIMIT %s", (JobStatus.SUCCEEDED.value, n))
        return [float(r["s"]) for r in rows if r["s"] is not None and r["s"] >= 0]

    def due_for_expiry(self, now: float) -> builtins.list[JobRecord]:
        rows = self._all("SELECT * FROM sfpc_jobs WHERE expires_at IS NOT NULL AND "
                         "expires_at <= %s AND status != %s ORDER BY seq",
                         (now, JobStatus.EXPIRED.value))
        return [_pg_record(r) for r in rows]

    def unqueued(self, before: float) -> builtins.list[JobRecord]:
        """Queued jobs that never reached the queue (their gateway died between the row and the
        defer), created before ``before``."""
        rows = self._all("SELECT * FROM sfpc_jobs WHERE status = %s AND queue_job_id IS NULL "
                         "AND created_at < %s ORDER BY seq", (JobStatus.QUEUED.value, before))
        return [_pg_record(r) for r in rows]

    # -- transitions ------------------------------------------------------------------------------
    def insert(self, job_id: str, *, options: dict[str, Any], inputs: Iterable[InputFile],
               now: float, max_queued: int, priority: int = 0,
               idempotency_key: str | None = None,
               webhook_url: str | None = None) -> tuple[JobRecord, bool]:
        """Queue a new job; returns (the job, True) or, when ``idempotency_key`` is already
        taken, (that earlier job, False). :class:`QueueFull` when ``max_queued`` wait."""
        inputs_json = json.dumps([asdict(f) for f in inputs])
        with self._tx() as conn:
            # One submitter at a time checks the capacity and inserts (like BEGIN IMMEDIATE).
            conn.execute("SELECT pg_advisory_xact_lock(7212002)")
            if idempotency_key is not None:
                row = conn.execute("SELECT * FROM sfpc_jobs WHERE idempotency_key = %s",
                                   (idempotency_key,)).fetchone()
                if row is not None:
                    return _pg_record(row), False
            queued = conn.execute("SELECT count(*) AS n FROM sfpc_jobs WHERE status = %s",
                                  (JobStatus.QUEUED.value,)).fetchone()
            if queued is not None and int(queued["n"]) >= max_queued:
                raise QueueFull(int(queued["n"]))
            row = conn.execute(
                "INSERT INTO sfpc_jobs (id, status, options, inputs, created_at, updated_at, "
                "priority, idempotency_key, webhook_url, webhook_status) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING *",
                (job_id, JobStatus.QUEUED.value, json.dumps(options, sort_keys=True),
                 inputs_json, now, now, priority, idempotency_key, webhook_url,
                 "pending" if webhook_url else None)).fetchone()
        assert row is not None
        return _pg_record(row), True

    def set_queue_job(self, job_id: str, queue_job_id: int) -> None:
        self._rowcount("UPDATE sfpc_jobs SET queue_job_id = %s WHERE id = %s",
                       (queue_job_id, job_id))

    def delete(self, job_id: str) -> None:
        self._rowcount("DELETE FROM sfpc_jobs WHERE id = %s", (job_id,))

    def claim(self, job_id: str, owner: str, *, now: float, max_attempts: int,
              expires_at: float) -> tuple[JobStatus, JobRecord] | None:
        """Start ``job_id`` for ``owner`` (attempts + 1): the queue handed it to this worker.

        A job still marked running belongs to a worker the queue presumed dead: it is taken over,
        unless it has used ``max_attempts`` starts, then it is failed (``worker_lost``) so that an
        upload that kills its worker cannot crash-loop the fleet. None when the job ended
        (cancelled, finished by an earlier attempt, expired)."""
        with self._tx() as conn:
            row = conn.execute("SELECT status, attempts FROM sfpc_jobs WHERE id = %s FOR UPDATE",
                               (job_id,)).fetchone()
            if row is None or row["status"] not in _ACTIVE:
                return None
            attempts = int(row["attempts"])
            if row["status"] == JobStatus.RUNNING.value and attempts >= max_attempts:
                out = conn.execute(
                    "UPDATE sfpc_jobs SET status = %s, finished_at = %s, updated_at = %s, "
                    "expires_at = %s, error_code = 'worker_lost', error_message = %s, "
                    "owner = NULL WHERE id = %s RETURNING *",
                    (JobStatus.FAILED.value, now, now, expires_at,
                     f"the worker running this job died on each of its {attempts} attempts; "
                     "it is not retried again", job_id)).fetchone()
                return JobStatus.FAILED, _pg_record(out)
            out = conn.execute(
                "UPDATE sfpc_jobs SET status = %s, owner = %s, started_at = %s, "
                "heartbeat_at = %s, updated_at = %s, attempts = attempts + 1 WHERE id = %s "
                "RETURNING *", (JobStatus.RUNNING.value, owner, now, now, now, job_id)).fetchone()
            return JobStatus.RUNNING, _pg_record(out)

    def touch(self, job_id: str, owner: str, now: float) -> bool:
        """Heartbeat of a running job; False when ``owner`` no longer holds it (cancelled,
        taken over): the worker then stops."""
        return self._rowcount("UPDATE sfpc_jobs SET heartbeat_at = %s WHERE id = %s AND "
                              "status = %s AND owner = %s",
                              (now, job_id, JobStatus.RUNNING.value, owner)) == 1

    def is_running_for(self, job_id: str, owner: str) -> bool:
        return self._one("SELECT 1 AS one FROM sfpc_jobs WHERE id = %s AND status = %s AND "
                         "owner = %s", (job_id, JobStatus.RUNNING.value, owner)) is not None

    def succeed(self, job_id: str, owner: str, *, now: float, expires_at: float,
                results: builtins.list[str], result_body: ResultBody,
                report: dict[str, Any] | None) -> bool:
        return self._rowcount(
            "UPDATE sfpc_jobs SET status = %s, finished_at = %s, updated_at = %s, "
            "expires_at = %s, results = %s, result_body = %s, report = %s, owner = NULL "
            "WHERE id = %s AND status = %s AND owner = %s",
            (JobStatus.SUCCEEDED.value, now, now, expires_at, json.dumps(results),
             json.dumps(asdict(result_body)),
             json.dumps(report) if report is not None else None,
             job_id, JobStatus.RUNNING.value, owner)) == 1

    def fail(self, job_id: str, owner: str, *, now: float, expires_at: float, code: str,
             message: str) -> bool:
        return self._rowcount(
            "UPDATE sfpc_jobs SET status = %s, finished_at = %s, updated_at = %s, "
            "expires_at = %s, error_code = %s, error_message = %s, owner = NULL "
            "WHERE id = %s AND status = %s AND owner = %s",
            (JobStatus.FAILED.value, now, now, expires_at, code, message, job_id,
             JobStatus.RUNNING.value, owner)) == 1

    def cancel(self, job_id: str, *, now: float, expires_at: float) -> JobStatus | None:
        with self._tx() as conn:
            row = conn.execute("SELECT status FROM sfpc_jobs WHERE id = %s FOR UPDATE",
                               (job_id,)).fetchone()
            if row is None:
                return None
            before = JobStatus(row["status"])
            if before.value in _ACTIVE:
                conn.execute(
                    "UPDATE sfpc_jobs SET status = %s, finished_at = %s, updated_at = %s, "
                    "expires_at = %s, error_code = 'cancelled', "
                    "error_message = 'cancelled by request', owner = NULL WHERE id = %s",
                    (JobStatus.CANCELLED.value, now, now, expires_at, job_id))
            return before

    def record_webhook(self, job_id: str, *, status: str, attempts: int,
                       error: str | None) -> None:
        self._rowcount("UPDATE sfpc_jobs SET webhook_status = %s, webhook_attempts = %s, "
                       "webhook_error = %s WHERE id = %s", (status, attempts, error, job_id))

    def mark_expired(self, job_id: str, *, now: float) -> bool:
        return self._rowcount(
            "UPDATE sfpc_jobs SET status = %s, updated_at = %s, results = '[]', "
            "result_body = NULL WHERE id = %s AND status IN (%s, %s, %s)",
            (JobStatus.EXPIRED.value, now, job_id, JobStatus.SUCCEEDED.value,
             JobStatus.FAILED.value, JobStatus.CANCELLED.value)) == 1

    def purge_expired(self, before: float) -> int:
        return self._rowcount("DELETE FROM sfpc_jobs WHERE status = %s AND expires_at < %s",
                              (JobStatus.EXPIRED.value, before))

    def workers(self, alive_within_s: float) -> dict[str, int]:
        """procrastinate's worker rows: alive (heartbeat within ``alive_within_s``) and stale."""
        try:
            row = self._one(
                "SELECT count(*) FILTER (WHERE last_heartbeat >= NOW() - make_interval("
                "secs => %s)) AS alive, count(*) FILTER (WHERE last_heartbeat < NOW() - "
                "make_interval(secs => %s)) AS stale FROM procrastinate_workers",
                (alive_within_s, alive_within_s))
        except Exception:  # the queue schema is not applied yet: no worker has started
            return {"alive": 0, "stale": 0}
        return {"alive": int(row["alive"]), "stale": int(row["stale"])} if row else {
            "alive": 0, "stale": 0}
