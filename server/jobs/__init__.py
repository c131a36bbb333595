"""Asynchronous segmentation jobs: persisted in SQLite plus files, run by a bounded worker pool,
recovered after a crash, expired after a retention period.

- :mod:`.store` - the SQLite job table and its atomic state transitions;
- :mod:`.files` - job folders (uploads, results) written durably;
- :mod:`.runner` - worker threads, crash recovery, heartbeats, retention sweep;
- :mod:`.manager` - :class:`JobManager`, which binds them to the segmentation service;
- :mod:`.models` - job states and the JSON bodies of ``/v1/jobs``.
- :mod:`.pg_store`, :mod:`.distributed` - the distributed mode (``SFPC_JOBS_BACKEND=postgres``):
  the job table in PostgreSQL, procrastinate's queue, ``sfpc worker``.

The HTTP endpoints are in :mod:`sfpc.server.routers.jobs`.
"""

from sfpc.errors import JobError
from sfpc.server.jobs.manager import JobManager, JobsConfig
from sfpc.server.jobs.models import JobRecord, JobStatus
from sfpc.server.jobs.store import JobStore, QueueFull

__all__ = ["JobError", "JobManager", "JobRecord", "JobStatus", "JobStore", "JobsConfig",
           "QueueFull"]
