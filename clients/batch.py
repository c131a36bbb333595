"""Segment many inputs through the gateway, resumably.

:class:`BatchRunner` takes :class:`~sfpc.clients.discover.WorkItem` s, runs at most
``concurrency`` of them at once (as jobs, or as synchronous requests), writes each one's
artefacts under ``out_dir/<item.output>/`` and records every step in a
:class:`~sfpc.clients.manifest.Manifest`. A rerun on the same manifest:

- skips an input whose last record is ``done`` for the same input fingerprint and options and
  whose files are all still there;
- re-attaches to the server job of an input that was ``submitted`` (the previous run was
  killed) or failed after its job was made (the gateway lost while waiting, a download or a
  delivery that failed), instead of submitting it again, while the server still has the job;
- tries failed inputs again (unless ``retry_failed`` is off).

Where inputs come from and where results go beyond the output folder is a :class:`ItemHooks`
(the PACS pipeline fetches series with WADO-RS and stores results with STOW-RS).
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from sfpc.clients.discover import WorkItem
from sfpc.clients.http import AsyncSFPCClient, Upload
from sfpc.clients.manifest import DONE, FAILED, SUBMITTED, Manifest
from sfpc.clients.models import (
    APIError,
    JobFailed,
    JobStatus,
    RequestTimeout,
    SFPCError,
    TransportError,
    WaitTimeout,
    safe_name,
)
from sfpc.errors import OptionError
from sfpc.inference.options import DICOM_OUTPUTS, OUTPUTS, SegmentOptions, parse_options
from sfpc.io.files import remove_partials, write_atomic

log = logging.getLogger("sfpc.clients.batch")


@dataclass(frozen=True)
class BatchOptions:
    """What every input of a batch is segmented with, and how the batch runs.

    The segmentation options are checked against :class:`SegmentOptions` (ValueError) and
    resolved per input by :meth:`SegmentOptions.resolve_outputs`, as the gateway resolves them.
    ``outputs`` None: the gateway's default for the input (DICOM SEG for a series, NIfTI
    otherwise; the uncertainty maps when ``uncertainty``) and ``report_json``. ``seg_dicom`` is
    only asked for DICOM inputs: a NIfTI input has no series for it to reference, and gets
    ``mask_nifti`` instead.
    """

    model: str | None = None
    outputs: tuple[str, ...] | None = None
    uncertainty: bool = False
    flip: bool = False
    mode: Literal["jobs", "sync"] = "jobs"
    concurrency: int = 2
    retry_failed: bool = True
    job_timeout_s: float | None = None

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        if self.mode not in ("jobs", "sync"):
            raise ValueError(f"mode must be 'jobs' or 'sync', not {self.mode!r}")
        try:
            self.segment_options()
        except OptionError as exc:
            raise ValueError(exc.message) from None

    def segment_options(self, outputs: list[str] | None = None) -> SegmentOptions:
        """The options as the gateway reads them (``outputs`` instead of the batch's)."""
        if outputs is None and self.outputs:
            outputs = list(self.outputs)
        return parse_options({"model": self.model, "outputs": outputs,
                              "uncertainty": self.uncertainty, "flip": self.flip})

    def outputs_for(self, item: WorkItem) -> list[str]:
        """The artefacts asked for ``item``, in the gateway's order."""
        outputs = list(self.outputs) if self.outputs else None
        if outputs is not None and item.kind != "dicom":
            # DICOM objects reference a source series: a NIfTI input gets the mask instead.
            outputs = list(dict.fromkeys("mask_nifti" if o in DICOM_OUTPUTS else o
                                         for o in outputs))
        chosen = self.segment_options(outputs).resolve_outputs(item.kind)
        if outputs is None:
            chosen.append("report_json")  # a batch keeps every input's report by default
        return [name for name in OUTPUTS if name in chosen]

    def request(self, item: WorkItem) -> dict[str, Any]:
        """The segmentation options sent for ``item``."""
        return {"model": self.model, "outputs": self.outputs_for(item),
                "uncertainty": self.uncertainty or None, "flip": self.flip or None,
                "series_uid": item.series_uid}

    def signature(self, item: WorkItem) -> dict[str, Any]:
        """What makes an earlier result of ``item`` still the right one."""
        sig = {"model": self.model, "outputs": self.outputs_for(item),
               "uncertainty": self.uncertainty}
        if self.flip:  # only when set: manifests written before the option still match
            sig["flip"] = True
        return sig


class ItemHooks:
    """Where an item's upload comes from and where its results go besides the output folder.

    The default reads the item's files and delivers nothing more. Hooks run in a worker thread
    (they may block)."""

    def fetch(self, item: WorkItem) -> list[Upload]:
        """The files to upload for ``item``."""
        return list(item.paths)

    def deliver(self, item: WorkItem, folder: Path, files: Sequence[str],
                uploads: list[Upload] | None) -> dict[str, Any]:
        """Called once the artefacts ``files`` are in ``folder``; returns facts for the
        manifest record. ``uploads`` is None when the input was not fetched in this run
        (re-attached to an earlier job)."""
        return {}

    def release(self, item: WorkItem, uploads: list[Upload] | None) -> None:
        """Free what ``fetch`` made (temporary files)."""


@dataclass
class BatchSummary:
    total: int = 0
    done: int = 0
    skipped: int = 0
    failed: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)  # (label, error)
    run_id: str = ""

    @property
    def exit_code(self) -> int:
        """0 when every input is done (now or before), 1 when any failed."""
        return 1 if self.failed else 0

    def line(self) -> str:
        return (f"{self.total} inputs: {self.done} done, {self.skipped} already done, "
                f"{self.failed} failed")


class _Progress:
    """tqdm when it is installed (and the output is a terminal), else a plain counter."""

    def __init__(self, total: int, initial: int, enabled: bool | None) -> None:
        self._bar = None
        self._count = initial
        self._total = total
        self._enabled = sys.stderr.isatty() if enabled is None else enabled
        if not self._enabled:
            return
        try:
            from tqdm import tqdm
        except ImportError:
            return
        self._bar = tqdm(total=total, initial=initial, unit="input", desc="segmenting",
                         dynamic_ncols=True, file=sys.stderr)

    def advance(self, failed: int) -> None:
        self._count += 1
        if self._bar is not None:
            self._bar.set_postfix(failed=failed, refresh=False)
            self._bar.update(1)
        elif self._enabled:
            width = 30
            filled = int(width * self._count / max(1, self._total))
            sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {self._count}/"
                             f"{self._total} failed={failed}")
            sys.stderr.flush()

    def write(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text, file=sys.stderr)
        else:
            sys.stderr.write(("\n" if self._enabled else "") + text + "\n")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self._enabled:
            sys.stderr.write("\n")


class BatchRunner:
    """Runs a batch; see the module docstring. ``echo`` receives one line per failure."""

    def __init__(self, client: AsyncSFPCClient, out_dir: str | Path, manifest: Manifest,
                 options: BatchOptions, *, hooks: ItemHooks | None = None,
                 progress: bool | None = None,
                 echo: Callable[[str], None] | None = None) -> None:
        self.client = client
        self.out_dir = Path(out_dir)
        self.manifest = manifest
        self.options = options
        self.hooks = hooks or ItemHooks()
        self.progress = progress
        self.echo = echo
        self.run_id = uuid.uuid4().hex[:12]

    # -- planning ---------------------------------------------------------------------------
    def is_done(self, item: WorkItem) -> bool:
        last = self.manifest.latest(item.key)
        return bool(
            last and last.get("status") == DONE and self._same_input(item, last)
            and all((self.out_dir / p).is_file() for p in last.get("outputs") or ())
            and last.get("outputs"))

    def _same_input(self, item: WorkItem, record: dict[str, Any]) -> bool:
        return (record.get("fingerprint") == item.fingerprint
                and record.get("options") == self.options.signature(item))

    def _attachable_job(self, item: WorkItem) -> str | None:
        last = self.manifest.latest(item.key)
        if not last or not last.get("job_id") or not self._same_input(item, last):
            return None
        if last.get("status") == SUBMITTED:
            return str(last["job_id"])
        # A failure after the job itself went well (the gateway unreachable while waiting, a
        # download or a PACS store that failed, an interrupt): its results are still usable.
        if last.get("status") == FAILED and "job_status" not in (last.get("error") or {}):
            return str(last["job_id"])
        return None

    def plan(self, items: Sequence[WorkItem]) -> tuple[list[WorkItem], list[WorkItem]]:
        """(to run, to skip) for ``items``."""
        run, skip = [], []
        for item in items:
            last = self.manifest.latest(item.key)
            if self.is_done(item):
                skip.append(item)
            elif (not self.options.retry_failed and last and last.get("status") == FAILED
                  and self._same_input(item, last)):
                skip.append(item)
            else:
                run.append(item)
        return run, skip

    # -- running ----------------------------------------------------------------------------
    async def run(self, items: Sequence[WorkItem]) -> BatchSummary:
        todo, skipped = self.plan(items)
        summary = BatchSummary(total=len(items), skipped=len(skipped), run_id=self.run_id)
        bar = _Progress(len(items), len(skipped), self.progress)
        queue: asyncio.Queue[WorkItem] = asyncio.Queue()
        for item in todo:
            queue.put_nowait(item)

        async def worker() -> None:
            while True:
                try:
                    item = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                error = await self._one(item)
                if error is None:
                    summary.done += 1
                else:
                    summary.failed += 1
                    summary.failures.append((item.label, error))
                    line = f"failed: {item.label}: {error}"
                    bar.write(line)
                    if self.echo:
                        self.echo(line)
                bar.advance(summary.failed)

        try:
            await asyncio.gather(*(worker() for _ in range(min(self.options.concurrency,
                                                                max(1, len(todo))))))
        finally:
            bar.close()
        return summary

    def _record(self, item: WorkItem, status: str, **fields: Any) -> dict[str, Any]:
        return self.manifest.append({
            "key": item.key, "status": status, "run": self.run_id, "input": item.label,
            "kind": item.kind, "series_uid": item.series_uid, "study_uid": item.study_uid,
            "output": item.output, "fingerprint": item.fingerprint,
            "options": self.options.signature(item), **fields})

    async def _one(self, item: WorkItem) -> str | None:
        """Run one item to ``done`` or ``failed``; returns the error text or None."""
        started = time.monotonic()
        folder = self.out_dir / item.output
        timings: dict[str, Any] = {}
        uploads: list[Upload] | None = None
        job_id: str | None = None
        try:
            remove_partials(folder)
            if self.options.mode == "jobs":
                job_id = await self._reattach(item)
                if job_id is None:
                    uploads = await asyncio.to_thread(self.hooks.fetch, item)
                    timings["fetch_s"] = round(time.monotonic() - started, 3)
                    t0 = time.monotonic()
                    submitted = await self.client.submit_job(uploads, **self.options.request(item))
                    timings["upload_s"] = round(time.monotonic() - t0, 3)
                    job_id = submitted.id
                    self._record(item, SUBMITTED, job_id=job_id, timings=dict(timings))
                names = await self._job_files(item, job_id, folder, timings)
            else:
                uploads = await asyncio.to_thread(self.hooks.fetch, item)
                timings["fetch_s"] = round(time.monotonic() - started, 3)
                t0 = time.monotonic()
                result = await self.client.segment(uploads, format="zip",
                                                   **self.options.request(item))
                timings["request_s"] = round(time.monotonic() - t0, 3)
                await asyncio.to_thread(result.save, folder)
                names = list(result.files)
            t0 = time.monotonic()
            extra = await asyncio.to_thread(self.hooks.deliver, item, folder, names, uploads)
            if extra:
                timings["deliver_s"] = round(time.monotonic() - t0, 3)
            timings["total_s"] = round(time.monotonic() - started, 3)
            outputs = [f"{item.output}/{name}".removeprefix("./") for name in names]
            self._record(item, DONE, job_id=job_id, outputs=outputs, timings=timings,
                         **({"delivered": extra} if extra else {}))
            return None
        except asyncio.CancelledError:
            if job_id is not None:
                self._record(item, FAILED, job_id=job_id, timings=timings,
                             error={"code": "interrupted", "message": "the batch was stopped"})
            raise
        except Exception as exc:  # one bad input never stops the batch
            error = describe_error(exc)
            if not isinstance(exc, SFPCError | OSError | ValueError):
                log.exception("unexpected error on a batch input")
            timings["total_s"] = round(time.monotonic() - started, 3)
            self._record(item, FAILED, job_id=job_id, timings=timings, error=error)
            return f"{error['code']}: {error['message']}"
        finally:
            if uploads is not None:
                await asyncio.to_thread(self.hooks.release, item, uploads)

    async def _reattach(self, item: WorkItem) -> str | None:
        """The earlier run's job for ``item`` when it is still usable (queued, running or
        succeeded on the server); None to submit anew."""
        job_id = self._attachable_job(item)
        if job_id is None:
            return None
        try:
            job = await self.client.job(job_id)
        except APIError as exc:
            if exc.status in (404, 410):
                return None
            raise
        if job.status in (JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.SUCCEEDED):
            log.info("%s: re-attached to job %s of an earlier run", item.label, job_id)
            return job_id
        return None

    async def _job_files(self, item: WorkItem, job_id: str, folder: Path,
                         timings: dict[str, Any]) -> list[str]:
        job = await self.client.wait_job(job_id, timeout=self.options.job_timeout_s)
        if job.status is not JobStatus.SUCCEEDED:
            raise JobFailed(job)
        timings["queued_s"] = job.timings.queued_s
        timings["run_s"] = job.timings.run_s
        timings["stages"] = job.timings.stages
        t0 = time.monotonic()
        names = []
        for name in job.results:
            content = await self.client.job_result_file(job_id, name)
            await asyncio.to_thread(write_atomic, folder / safe_name(name), content)
            names.append(safe_name(name))
        timings["download_s"] = round(time.monotonic() - t0, 3)
        return names


def describe_error(exc: BaseException) -> dict[str, Any]:
    """A manifest ``error`` entry: a stable ``code`` and a message (plus the HTTP status and
    request id for gateway errors)."""
    if isinstance(exc, APIError):
        return {"code": exc.code, "message": exc.message, "status": exc.status,
                "request_id": exc.request_id}
    if isinstance(exc, JobFailed):
        job = exc.job
        return {"code": job.error.code if job.error else job.status.value,
                "message": job.error.message if job.error else f"job {job.status.value}",
                "job_status": job.status.value}
    if isinstance(exc, WaitTimeout):
        return {"code": "wait_timeout", "message": str(exc)}
    if isinstance(exc, RequestTimeout):
        return {"code": "timeout", "message": str(exc)}
    if isinstance(exc, TransportError):
        return {"code": "unreachable", "message": str(exc)}
    return {"code": type(exc).__name__, "message": str(exc) or type(exc).__name__}


def run_batch(client: AsyncSFPCClient, items: Sequence[WorkItem], out_dir: str | Path,
              options: BatchOptions, *, manifest_path: str | Path | None = None,
              hooks: ItemHooks | None = None, progress: bool | None = None) -> BatchSummary:
    """Blocking convenience: open the manifest (default ``out_dir/manifest.jsonl``), run, close.
    Call it outside a running event loop; ``client`` is closed at the end."""
    manifest = Manifest(manifest_path or Path(out_dir) / "manifest.jsonl")

    async def go() -> BatchSummary:
        async with client:
            return await BatchRunner(client, out_dir, manifest, options, hooks=hooks,
                                     progress=progress).run(items)

    try:
        return asyncio.run(go())
    finally:
        manifest.close()


__all__ = ["BatchOptions", "BatchRunner", "BatchSummary", "ItemHooks", "describe_error",
           "run_batch"]
