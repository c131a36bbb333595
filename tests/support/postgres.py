"""A real PostgreSQL server for the distributed-jobs tests (Debian's ``postgresql`` package).

``initdb`` refuses to run as root, so the cluster is made and run as the ``postgres`` user
(``runuser``) when the tests run as root. It listens on 127.0.0.1 on a free port, keeps its data
in a temporary folder, and is stopped by the postmaster's pid (SIGINT: fast shutdown).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest


def _bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for version in sorted(Path("/usr/lib/postgresql").glob("*"), reverse=True):
        candidate = version / "bin" / name
        if candidate.is_file():
            return str(candidate)
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PostgresServer:
    """``postgres`` on 127.0.0.1:``port``; :attr:`url` is a libpq URL of database ``sfpc``."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="sfpc-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self.pid: int | None = None
        self._as: list[str] = []
        if os.geteuid() == 0:
            self._as = ["runuser", "-u", "postgres", "--"]
            shutil.chown(self.root, "postgres", "postgres")

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/sfpc"

    def start(self, timeout: float = 60.0) -> PostgresServer:
        initdb, postgres = _bin("initdb"), _bin("postgres")
        if initdb is None or postgres is None:
            pytest.skip("PostgreSQL server binaries are not installed (make test installs "
                        "Debian's postgresql)")
        subprocess.run([*self._as, initdb, "-D", str(self.data), "-A", "trust", "-U",
                        "postgres", "-E", "UTF8", "--no-sync"], check=True,
                       capture_output=True, timeout=120)
        log = open(self.root / "postgres.log", "ab")
        try:
            # fsync off: a test cluster is thrown away; durability is PostgreSQL's, not ours.
            subprocess.Popen([*self._as, postgres, "-D", str(self.data), "-p", str(self.port),
                              "-h", "127.0.0.1", "-k", str(self.root), "-c", "fsync=off",
                              "-c", "max_connections=200"],
                             stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        pid_file = self.data / "postmaster.pid"
        while time.monotonic() < deadline:
            if pid_file.exists() and self.pid is None:
                text = pid_file.read_text().splitlines()
                if text:
                    self.pid = int(text[0])
            if self.pid is not None and self._ready():
                import psycopg

                with psycopg.connect(f"postgresql://postgres@127.0.0.1:{self.port}/postgres",
                                     autocommit=True) as conn:
                    conn.execute("CREATE DATABASE sfpc")
                return self
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"postgres not ready: {(self.root / 'postgres.log').read_text()}")

    def _ready(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True
        except OSError:
            return False

    def stop(self) -> None:
        if self.pid is not None:
            try:
                os.kill(self.pid, signal.SIGINT)
                for _ in range(150):
                    os.kill(self.pid, 0)
                    time.sleep(0.1)
            except ProcessLookupError:
                pass
            self.pid = None
        shutil.rmtree(self.root, ignore_errors=True)
