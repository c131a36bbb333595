"""Support for the asynchronous-jobs tests: real gateway processes on a shared data dir (their
model: tests.support.models.session_model), workloads, and an independent look at the job
database.

The gateway runs as ``python -m sfpc.cli serve`` (tests.support.server.GatewayServer); jobs
settings reach it as ``SFPC_*`` environment variables. The workloads are smooth synthetic volumes
whose size sets how long a job runs (the tiny model's grid is 4 mm, 32^3 windows): they make jobs
slow or fast on purpose, while the results are checked against the synchronous endpoint and
nibabel, never against the job code itself.
"""

from __future__ import annotations

import gzip
import os
import signal
import sqlite3
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from tests.support.server import GatewayServer

TERMINAL = ("succeeded", "failed", "cancelled", "expired")
WAIT_S = 90.0  # generous: the machine may be shared with a long benchmark


def volume_upload(size: int, seed: int = 0, spacing: float = 4.0) -> bytes:
    """A smooth int16 volume of ``size``^3 voxels as a gzipped NIfTI (RAS, ``spacing`` mm).

    At 4 mm the model grid equals the voxel grid, so the job's run time grows with the number of
    32^3 windows: size 32 is one window (tens of ms), 80 is 64 windows (about a second).
    """
    import nibabel as nib
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    noise = rng.normal(size=(size, size, size)).astype(np.float32)
    smooth = ndimage.gaussian_filter(noise, sigma=3.0)
    data = (smooth / smooth.std() * 300 + 100).astype(np.int16)
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = -spacing * size / 2
    return gzip.compress(nib.Nifti1Image(data, affine).to_bytes(), compresslevel=1, mtime=0)


def start_gateway(model_dir: Path, data_dir: Path, log_path: Path, **settings: Any
                  ) -> GatewayServer:
    """A gateway process on ``data_dir``; ``settings`` become SFPC_<NAME> variables."""
    env = {"SFPC_DATA_DIR": str(data_dir), "SFPC_ONNX_INTRA_OP_THREADS": "1",
           "SFPC_LOG_LEVEL": "INFO"}
    env.update({f"SFPC_{k.upper()}": str(v) for k, v in settings.items()})
    return GatewayServer([model_dir], log_path, env=env).start(timeout=WAIT_S)


def kill9(server: GatewayServer) -> None:
    """SIGKILL the gateway process: no shutdown code of it runs."""
    assert server.process is not None
    os.kill(server.process.pid, signal.SIGKILL)
    server.process.wait(timeout=30)
    assert server.process.returncode == -signal.SIGKILL


def submit(client: httpx.Client, payload: bytes, name: str = "volume.nii.gz",
           **params: Any) -> httpx.Response:
    return client.post("/v1/jobs", params=params, files={"file": (name, payload)})


def wait_status(client: httpx.Client, job_id: str, statuses: tuple[str, ...] = TERMINAL,
                timeout: float = WAIT_S, interval: float = 0.02) -> dict[str, Any]:
    """Poll the job until its status is one of ``statuses``; returns the status body."""
    deadline = time.monotonic() + timeout
    body: dict[str, Any] = {}
    while time.monotonic() < deadline:
        response = client.get(f"/v1/jobs/{job_id}")
        if response.status_code == 200:
            body = response.json()
            if body["status"] in statuses:
                return body
        time.sleep(interval)
    raise AssertionError(f"job {job_id} not in {statuses} within {timeout} s: {body}")


def db_rows(data_dir: Path) -> dict[str, dict[str, Any]]:
    """The job table read straight from SQLite (read-only), keyed by job id."""
    uri = f"file:{data_dir / 'jobs.sqlite3'}?mode=ro"
    conn = sqlite3.connect(uri, uri=True, timeout=30)
    try:
        conn.row_factory = sqlite3.Row
        return {row["id"]: dict(row) for row in conn.execute("SELECT * FROM jobs")}
    finally:
        conn.close()


def nifti_from(content: bytes) -> Any:
    """A NIfTI image from (gzipped) response bytes."""
    import nibabel as nib

    raw = gzip.decompress(content) if content[:2] == b"\x1f\x8b" else content
    return nib.Nifti1Image.from_bytes(raw)


def claim_all(db_path: str, owner: str, out_path: str, start: Any) -> None:
    """Claim jobs from the store at ``db_path`` until none is left; write their ids as JSON.

    Runs in a spawned process (this module imports no torch, so the child starts fast); waits
    at the ``start`` barrier so that all claimers race from the same moment."""
    import json

    from sfpc.server.jobs.store import JobStore

    store = JobStore(db_path)
    claimed = []
    start.wait(60)
    while (job := store.claim(owner, time.time())) is not None:
        claimed.append(job.id)
        # A worker runs its job before claiming the next; without a pause the lock holder
        # re-takes SQLite's write lock before the waiting processes' busy handlers wake.
        time.sleep(0.005)
    store.close()
    with open(out_path, "w") as fh:
        json.dump(claimed, fh)
