"""The gateway as a real process, and NIfTI uploads.

:class:`GatewayServer` runs ``python -m sfpc.cli serve`` on 127.0.0.1, port 0 (the port the
kernel gave is read from the server's log, so two test sessions never race for a port), waits for
/healthz with a bounded wait, and stops the process by its pid. The models it serves come from
tests.support.models.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

_RUNNING = re.compile(r"running on https?://127\.0\.0\.1:(\d+)")


# --- the server ---------------------------------------------------------------------------------
def stop_process(process: subprocess.Popen | None, timeout: float = 15.0) -> None:
    """SIGTERM a child server by pid, SIGKILL it if it has not exited within ``timeout``."""
    if process is None or process.poll() is not None:
        return
    os.kill(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=timeout)


class GatewayServer:
    """``sfpc serve`` in a child process on 127.0.0.1; settings via SFPC_* variables."""

    def __init__(self, model_dirs: list[Path], log_path: Path, *,
                 env: dict[str, str] | None = None, args: list[str] | None = None) -> None:
        self.model_dirs = [Path(d) for d in model_dirs]
        self.log_path = Path(log_path)
        self.env = dict(env or {})
        self.args = list(args or [])
        self.process: subprocess.Popen[bytes] | None = None
        self.port: int | None = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("server not started")
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> GatewayServer:
        env = {**os.environ, "SFPC_LOG_JSON": "true", "SFPC_HOST": "127.0.0.1",
               "OMP_NUM_THREADS": "1", **self.env}
        env.pop("SFPC_CONFIG_FILE", None)
        command = [sys.executable, "-m", "sfpc.cli", "serve", "--port", "0"]
        for d in self.model_dirs:
            command += ["--model", str(d)]
        command += self.args
        log = open(self.log_path, "ab")
        try:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                            env=env, cwd=str(self.log_path.parent))
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"gateway exited with {self.process.returncode}:\n"
                                   f"{self.log_text()[-4000:]}")
            if self.port is None:
                found = _RUNNING.search(self.log_text())
                if found:
                    self.port = int(found.group(1))
            if self.port is not None and self.healthy(timeout=1.0):
                return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"gateway not healthy within {timeout} s:\n{self.log_text()[-4000:]}")

    def healthy(self, timeout: float = 2.0) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/healthz", timeout=timeout) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None and self.healthy()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_records(self) -> list[dict[str, Any]]:
        """Every log line as parsed JSON (a line that is not JSON fails the caller's test)."""
        records = []
        for line in self.log_text().splitlines():
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                raise AssertionError(f"log line is not JSON: {line[:300]!r}") from None
        return records

    def stop(self, timeout: float = 15.0) -> None:
        stop_process(self.process, timeout)

    def __enter__(self) -> GatewayServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def nifti_upload(array: np.ndarray, affine: np.ndarray, *, nifti2: bool = False) -> bytes:
    """A gzipped NIfTI of ``array`` as a client would send it."""
    import gzip

    import nibabel as nib

    cls = nib.Nifti2Image if nifti2 else nib.Nifti1Image
    return gzip.compress(cls(array, affine).to_bytes(), mtime=0)
