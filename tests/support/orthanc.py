"""A real Orthanc PACS for the DICOMweb tests.

:class:`OrthancServer` writes its own configuration into a temporary folder (HTTP on a free
port, reachable from this machine only; the DICOM listener off unless asked for, AE title
ORTHANC; storage and index in the folder; a test user; the DICOMweb plugin that the Debian
package ``orthanc-dicomweb`` installs, found with ``dpkg -L``), starts ``Orthanc config.json``
as a child process, waits a bounded time for ``/system`` and stops the process by its pid.
Instances are loaded through Orthanc's own REST API (``POST /instances``), not through the
DICOMweb code under test.

Install: ``apt-get install -y orthanc orthanc-dicomweb`` (the tests skip, saying so, without).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tests.support.server import stop_process

PLUGIN_NAME = "libOrthancDicomWeb.so"
_PLUGIN_FALLBACKS = ("/usr/share/orthanc/plugins", "/usr/lib/orthanc")
USER, PASSWORD = "sfpc-test", "not-a-real-secret"


def orthanc_binary() -> str | None:
    return shutil.which("Orthanc") or next(
        (p for p in ("/usr/sbin/Orthanc", "/usr/bin/Orthanc") if os.access(p, os.X_OK)), None)


def dicomweb_plugin() -> Path | None:
    """The DICOMweb plugin's shared library, as the Debian package lists it."""
    candidates: list[Path] = []
    try:
        listing = subprocess.run(["dpkg", "-L", "orthanc-dicomweb"], capture_output=True,
                                 text=True, timeout=30, check=False)
        candidates += [Path(line) for line in listing.stdout.splitlines()
                       if Path(line).name.startswith(PLUGIN_NAME)]
    except (OSError, subprocess.SubprocessError):
        pass
    for folder in _PLUGIN_FALLBACKS:
        candidates += sorted(Path(folder).glob(f"{PLUGIN_NAME}*"))
    # The unversioned name (a symlink in the plugins folder) first, then any real file.
    candidates.sort(key=lambda p: (p.name != PLUGIN_NAME, str(p)))
    return next((p for p in candidates if p.exists()), None)


def missing_reason() -> str | None:
    """Why the Orthanc tests cannot run here, or None."""
    if orthanc_binary() is None:
        return "Orthanc is not installed (apt-get install -y orthanc orthanc-dicomweb)"
    if dicomweb_plugin() is None:
        return "Orthanc's DICOMweb plugin is not installed (apt-get install -y orthanc-dicomweb)"
    return None


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


class OrthancServer:
    """Orthanc in a child process on 127.0.0.1, all its state under ``workdir``."""

    def __init__(self, workdir: Path, *, user: str = USER, password: str = PASSWORD,
                 dicom: bool = False, extra: dict[str, Any] | None = None) -> None:
        self.workdir = Path(workdir)
        self.user = user
        self.password = password
        self.http_port, self.dicom_port = _free_ports(2)
        self.dicom = dicom  # the DICOM listener (C-STORE SCP) on dicom_port, AE title ORTHANC
        self.extra = dict(extra or {})  # more configuration (modalities, Lua scripts...)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    @property
    def log_path(self) -> Path:
        return self.workdir / "orthanc.log"

    def config(self) -> dict[str, Any]:
        return {
            "Name": "SFPC-TEST",
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomServerEnabled": self.dicom,
            "DicomAet": "ORTHANC",
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": True,
            "RegisteredUsers": {self.user: self.password},
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "index"),
            "Plugins": [str(dicomweb_plugin())],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False},
            "HttpCompressionEnabled": False,
            "ConcurrentJobs": 1,
            **self.extra,
        }

    def start(self, timeout: float = 30.0) -> OrthancServer:
        binary = orthanc_binary()
        if binary is None or dicomweb_plugin() is None:
            raise RuntimeError(missing_reason())
        self.workdir.mkdir(parents=True, exist_ok=True)
        config_path = self.workdir / "config.json"
        config_path.write_text(json.dumps(self.config(), indent=1))
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen([binary, str(config_path)], stdout=log,
                                            stderr=subprocess.STDOUT, cwd=str(self.workdir))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self.process.returncode}:\n"
                                   f"{self.log_text()[-3000:]}")
            try:
                system = self.get("/system", timeout=1.0)
                plugins = self.get("/plugins", timeout=1.0)
                if system and "dicom-web" in plugins:
                    return self
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"Orthanc did not answer within {timeout} s:\n"
                           f"{self.log_text()[-3000:]}")

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def _request(self, path: str, data: bytes | None = None, method: str | None = None,
                 content_type: str | None = None, timeout: float = 30.0) -> Any:
        token = base64.b64encode(f"{self.user}:{self.password}".encode()).decode()
        request = urllib.request.Request(f"{self.url}{path}", data=data, method=method,
                                         headers={"Authorization": f"Basic {token}"})
        if content_type:
            request.add_header("Content-Type", content_type)
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read() or b"null")

    def get(self, path: str, timeout: float = 30.0) -> Any:
        """GET on Orthanc's native REST API (JSON)."""
        return self._request(path, timeout=timeout)

    def post(self, path: str, body: Any, method: str = "POST") -> Any:
        """POST (or PUT) JSON on Orthanc's native REST API."""
        return self._request(path, data=json.dumps(body).encode(), method=method,
                             content_type="application/json")

    def upload(self, paths: list[Path]) -> list[dict[str, Any]]:
        """Store DICOM files with ``POST /instances``; returns Orthanc's answers."""
        return [self._request("/instances", data=Path(p).read_bytes(), method="POST",
                              content_type="application/dicom") for p in paths]

    def series_tags(self) -> list[dict[str, Any]]:
        """Every stored series with its main DICOM tags and parent study's UID (native API)."""
        out = []
        for series_id in self.get("/series"):
            series = self.get(f"/series/{series_id}")
            study = self.get(f"/studies/{series['ParentStudy']}")
            out.append({"id": series_id, "instances": series["Instances"],
                        "study_uid": study["MainDicomTags"]["StudyInstanceUID"],
                        **series["MainDicomTags"]})
        return out

    def instance_file(self, instance_id: str) -> bytes:
        token = base64.b64encode(f"{self.user}:{self.password}".encode()).decode()
        request = urllib.request.Request(f"{self.url}/instances/{instance_id}/file",
                                         headers={"Authorization": f"Basic {token}"})
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.read()

    def stop(self, timeout: float = 15.0) -> None:
        stop_process(self.process, timeout)

    def __enter__(self) -> OrthancServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
