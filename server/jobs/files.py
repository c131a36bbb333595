"""The job folders under the data dir, written so that a crash leaves nothing half-visible.

Layout (``root`` = ``<data_dir>/jobs``)::

    <root>/<job id>/input/0000, 0001, ...   the uploaded files (client names kept in the DB)
    <root>/<job id>/results/                 artefacts + artefacts.json (the service's manifest)
    <root>/<job id>/.results-<token>/        results being written; renamed to results/ at the end

Uploads are fsynced (files and folders) before the job row is committed, so a 202 means the
bytes are on disk. Results appear by one ``rename`` of a complete, fsynced folder: a reader sees
all of them or none, and a run killed half-way leaves only a dot-folder that the next attempt or
the sweep removes.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from sfpc.io.files import fsync_dir

INPUT_DIR = "input"
RESULTS_DIR = "results"
MANIFEST_FILE = "artefacts.json"  # file names, media types and the report of a job's results
COPY_CHUNK = 1 << 20
_JOB_ID = re.compile(r"^[0-9a-f]{32}$")
# A result file name is one of the service's fixed names; anything else is refused before it
# touches the file system.
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class UploadTooLarge(ValueError):
    """The uploaded files together exceed the byte limit."""


def new_job_id() -> str:
    """A random 128-bit id: unguessable, since whoever knows it may read the results."""
    return uuid.uuid4().hex


def is_job_id(text: str) -> bool:
    """Whether ``text`` has the shape of a job id (checked before it becomes a path)."""
    return bool(_JOB_ID.match(text))


def is_safe_name(name: str) -> bool:
    """Whether ``name`` is a plain file name (no separators, no leading dot)."""
    return bool(_SAFE_NAME.match(name)) and ".." not in name


def write_durable(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` and fsync it (the caller fsyncs the folder)."""
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


class JobFiles:
    """The folders of all jobs under ``root``."""

    def __init__(self, root: str | Path, *, first_wins: bool = False) -> None:
        self.root = Path(root)
        # Distributed mode: two attempts of one job may both finish (a worker presumed dead was
        # alive); the first published results stay and later ones are discarded.
        self.first_wins = first_wins
        self.root.mkdir(parents=True, exist_ok=True)

    def job_dir(self, job_id: str) -> Path:
        if not is_job_id(job_id):
            raise ValueError(f"not a job id: {job_id!r}")
        return self.root / job_id

    def input_path(self, job_id: str, stored: str) -> Path:
        return self.job_dir(job_id) / INPUT_DIR / stored

    def results_dir(self, job_id: str) -> Path:
        return self.job_dir(job_id) / RESULTS_DIR

    # -- uploads ----------------------------------------------------------------------------
    def write_inputs(self, job_id: str, streams: Iterable[BinaryIO], *,
                     max_bytes: int) -> list[tuple[str, int]]:
        """Copy each stream to ``input/NNNN`` and fsync everything; returns (stored name, size).

        :class:`UploadTooLarge` when the streams together pass ``max_bytes`` (the partial folder
        is removed).
        """
        folder = self.job_dir(job_id) / INPUT_DIR
        folder.mkdir(parents=True)
        stored: list[tuple[str, int]] = []
        total = 0
        try:
            for index, stream in enumerate(streams):
                name = f"{index:04d}"
                size = 0
                with open(folder / name, "wb") as out:
                    while chunk := stream.read(COPY_CHUNK):
                        size += len(chunk)
                        total += len(chunk)
                        if total > max_bytes:
                            raise UploadTooLarge(
                                f"the uploaded files exceed {max_bytes} bytes together")
                        out.write(chunk)
                    out.flush()
                    os.fsync(out.fileno())
                stored.append((name, size))
            fsync_dir(folder)
            fsync_dir(folder.parent)
            fsync_dir(self.root)
        except BaseException:
            self.remove(job_id)
            raise
        return stored

    def remove_inputs(self, job_id: str) -> None:
        """Delete the uploaded files (patient data) once nothing will read them again."""
        shutil.rmtree(self.job_dir(job_id) / INPUT_DIR, ignore_errors=True)

    # -- results ----------------------------------------------------------------------------
    def write_results(self, job_id: str, artefacts: Iterable[tuple[str, str, bytes | Path]],
                      report: dict[str, Any], extra: Iterable[tuple[str, bytes]] = ()) -> Path:
        """Write ``(filename, media type, content)`` artefacts and their manifest, then publish
        them as ``results/`` in one rename (replacing an earlier attempt's)."""
        job_dir = self.job_dir(job_id)
        staging = job_dir / f".results-{uuid.uuid4().hex[:12]}"
        staging.mkdir(parents=True)
        try:
            entries = []
            for filename, media_type, content in artefacts:
                if not is_safe_name(filename):
                    raise ValueError(f"unsafe artefact name {filename!r}")
                data = content if isinstance(content, bytes) else Path(content).read_bytes()
                write_durable(staging / filename, data)
                entries.append({"filename": filename, "media_type": media_type})
            for filename, data in extra:
                write_durable(staging / filename, data)
            manifest = {"artefacts": entries, "report": report}
            write_durable(staging / MANIFEST_FILE,
                          json.dumps(manifest, indent=1, default=str).encode())
            fsync_dir(staging)
            final = job_dir / RESULTS_DIR
            if final.exists():
                if self.first_wins:
                    shutil.rmtree(staging, ignore_errors=True)
                    return final
                shutil.rmtree(final)
            try:
                os.rename(staging, final)
            except OSError as exc:
                # rename() onto a non-empty folder fails: another attempt published meanwhile.
                if not (self.first_wins and exc.errno in (errno.ENOTEMPTY, errno.EEXIST)):
                    raise
                shutil.rmtree(staging, ignore_errors=True)
                return final
            fsync_dir(job_dir)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return final

    def discard_partial(self, job_id: str) -> None:
        """Remove results folders an interrupted attempt left behind."""
        job_dir = self.job_dir(job_id)
        if not job_dir.is_dir():
            return
        for entry in job_dir.iterdir():
            if entry.name.startswith(".results-"):
                shutil.rmtree(entry, ignore_errors=True)

    def discard_results(self, job_id: str) -> None:
        """Remove any results (published or partial) of a job that was cancelled."""
        self.discard_partial(job_id)
        shutil.rmtree(self.results_dir(job_id), ignore_errors=True)

    # -- whole jobs -------------------------------------------------------------------------
    def remove(self, job_id: str) -> None:
        """Delete a job's folder (uploads and results)."""
        shutil.rmtree(self.job_dir(job_id), ignore_errors=True)

    def job_ids(self) -> Iterator[tuple[str, float]]:
        """Every job folder on disk with its modification time."""
        for entry in self.root.iterdir():
            if is_job_id(entry.name) and entry.is_dir():
                try:
                    yield entry.name, entry.stat().st_mtime
                except FileNotFoundError:
                    continue
