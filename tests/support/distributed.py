"""Support for the distributed-jobs tests: ``sfpc worker`` child processes and a real HTTP
receiver for job webhooks (PostgreSQL itself: tests.support.postgres)."""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from tests.support.server import stop_process


class WorkerProcess:
    """``python -m sfpc.cli worker`` with SFPC_* settings from ``env``; JSON log in a file."""

    def __init__(self, model_dir: Path, log_path: Path, env: dict[str, str]) -> None:
        self.model_dir = model_dir
        self.log_path = log_path
        self.env = env
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 90.0) -> WorkerProcess:
        env = {**os.environ, "SFPC_LOG_JSON": "true", "OMP_NUM_THREADS": "1", **self.env}
        env.pop("SFPC_CONFIG_FILE", None)
        log = open(self.log_path, "ab")
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "sfpc.cli", "worker", "--model", str(self.model_dir)],
                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(self.log_path.parent))
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"worker exited with {self.process.returncode}:\n"
                                   f"{self.log_text()[-4000:]}")
            if any(r.get("message") == "worker started" for r in self.records()):
                return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"worker not started within {timeout} s:\n{self.log_text()[-4000:]}")

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def records(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by SIGKILL, or a library printing plain text
        return out

    def stop(self, timeout: float = 30.0) -> None:
        stop_process(self.process, timeout)


class WebhookReceiver:
    """A threaded HTTP server on 127.0.0.1 recording every POST (headers and body)."""

    def __init__(self) -> None:
        self.calls: list[tuple[dict[str, str], bytes]] = []
        lock = threading.Lock()
        calls = self.calls

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the http.server API
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with lock:
                    # Header names are case-insensitive: kept lower-cased.
                    calls.append(({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def __enter__(self) -> WebhookReceiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
