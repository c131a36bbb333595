"""The batch manifest: an append-only JSON Lines file, one record per event of an input
(``submitted``, ``done``, ``failed``); the last record of a key is that input's state.

Append-only, one ``write`` per record and an fsync after each, so a run killed at any moment
leaves every earlier record intact; a torn last line (the kill landed inside a write) is ignored
when the file is read. A lock file keeps two runs (say, two overlapping cron invocations) off the
same manifest.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

DONE = "done"
FAILED = "failed"
SUBMITTED = "submitted"


class ManifestLocked(RuntimeError):
    """Another process holds the manifest (a batch on the same output is running)."""


class Manifest:
    """Read the records of ``path`` (if it exists) and append new ones."""

    def __init__(self, path: str | Path, *, lock: bool = True) -> None:
        self.path = Path(path)
        self._latest: dict[str, dict[str, Any]] = {}
        self._fd: int | None = None
        self._lock_fd: int | None = None
        self._needs_newline = False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if lock:
            self._lock()
        for record in self.records():
            self._latest[str(record["key"])] = record

    def _lock(self) -> None:
        import fcntl

        fd = os.open(f"{self.path}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ManifestLocked(f"{self.path} is in use by another run (lock file "
                                 f"{self.path}.lock); wait for it to finish") from None
        self._lock_fd = fd

    def records(self) -> Iterator[dict[str, Any]]:
        """Every complete record in file order."""
        if not self.path.exists():
            return
        raw = self.path.read_bytes()
        self._needs_newline = bool(raw) and not raw.endswith(b"\n")
        for line in raw.splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line torn by a kill
            if isinstance(record, dict) and "key" in record and "status" in record:
                yield record

    def latest(self, key: str) -> dict[str, Any] | None:
        return self._latest.get(key)

    @property
    def keys(self) -> list[str]:
        return list(self._latest)

    def append(self, record: dict[str, Any]) -> dict[str, Any]:
        """Write ``record`` (stamped with the time) durably; returns it."""
        record = {"time": datetime.now(timezone.utc).isoformat(timespec="milliseconds")
                  .replace("+00:00", "Z"), **record}
        data = (json.dumps(record, default=str) + "\n").encode()
        if self._fd is None:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        if self._needs_newline:
            data = b"\n" + data  # end the torn line, so this record is a line of its own
            self._needs_newline = False
        os.write(self._fd, data)
        os.fsync(self._fd)
        self._latest[str(record["key"])] = record
        return record

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing releases the flock
            self._lock_fd = None

    def __enter__(self) -> Manifest:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["DONE", "FAILED", "SUBMITTED", "Manifest", "ManifestLocked"]
