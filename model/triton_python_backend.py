"""Serve an SFPC Triton repository with the tritonserver of the nvidia-pytriton wheel.

That tritonserver (pip-installable, no Docker, no GPU) has the Python backend only, no ONNX
Runtime backend. It serves the repository `write_triton_repository` writes once
:func:`python_backend_repository` has copied it with every model switched to the Python backend:
names, tensors, dims, max_batch_size, dynamic batching and parameters stay as written, and a
`model.py` (triton_python_model.py beside this module) runs the very same model.onnx with
onnxruntime inside the backend's stub. :class:`TritonServer` starts such a server from the venv
that scripts/setup_triton_env.sh creates (pytriton pins numpy<2, so it lives apart from the
project's venv) on free loopback ports and stops it by pid.

The tests of the Triton backend and benchmarks/inference_benchmark.py serve through this; a
production deployment runs the NGC container's ONNX Runtime backend instead (docs/triton.md).
No torch here.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

PYTHON_MODEL_SOURCE = Path(__file__).resolve().with_name("triton_python_model.py")
# Read by triton_python_model.py (which is copied alone and keeps its own copy of the key).
THREADS_PARAMETER = "onnxruntime_intra_op_threads"
TRITON_VENV_ENV = "SFPC_TRITON_VENV"
SETUP_SCRIPT = "scripts/setup_triton_env.sh"


# --- the Python-backend repository ---------------------------------------------------------------
def python_backend_repository(production_repo: str | Path, target_repo: str | Path, *,
                              intra_op_threads: int = 1) -> list[str]:
    """Copy `production_repo` to `target_repo`, switching every model to the Python backend.

    Only the execution changes: platform -> backend "python", GPU instances -> CPU, no TensorRT
    accelerator, and the served ONNX Runtime's intra-op thread count (`intra_op_threads`) as
    the model-config parameter `onnxruntime_intra_op_threads`. Returns the model names.
    """
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    if intra_op_threads < 1:
        raise ValueError(f"intra_op_threads must be >= 1, not {intra_op_threads}")
    production_repo, target_repo = Path(production_repo), Path(target_repo)
    configs = sorted(production_repo.glob("*/config.pbtxt"))
    if not configs:
        raise FileNotFoundError(f"{production_repo} holds no <model>/config.pbtxt")
    names = []
    for config_path in configs:
        model_dir = config_path.parent
        config = text_format.Parse(config_path.read_text(), model_config_pb2.ModelConfig())
        config.ClearField("platform")
        config.backend = "python"
        config.ClearField("optimization")
        for group in config.instance_group:
            group.kind = model_config_pb2.ModelInstanceGroup.KIND_CPU
        config.parameters[THREADS_PARAMETER].string_value = str(int(intra_op_threads))
        target = target_repo / model_dir.name
        shutil.copytree(model_dir, target, dirs_exist_ok=True)
        (target / "config.pbtxt").write_text(text_format.MessageToString(config))
        for version_dir in target.iterdir():
            if version_dir.is_dir() and version_dir.name.isdigit():
                shutil.copyfile(PYTHON_MODEL_SOURCE, version_dir / "model.py")
        names.append(config.name)
    return names


# --- the tritonserver install --------------------------------------------------------------------
def triton_venv(default: str | Path = ".venv-triton") -> Path:
    """The venv holding nvidia-pytriton: $SFPC_TRITON_VENV, else `default`."""
    return Path(os.environ.get(TRITON_VENV_ENV) or default)


def missing_triton_message(venv: Path, reason: str) -> str:
    return (f"no usable tritonserver in {venv} ({reason}): run `bash {SETUP_SCRIPT}` "
            f"(or set ${TRITON_VENV_ENV} to a venv it created)")


@dataclass(frozen=True)
class TritonInstall:
    """The pieces of the nvidia-pytriton wheel needed to run tritonserver by hand."""

    python: Path
    server: Path
    python_backend: Path
    stub: Path
    wheel_libs: Path
    python_libdir: Path
    onnxruntime_version: str


class TritonUnavailable(RuntimeError):
    """The triton venv is missing or incomplete; the message says what was not found."""


def find_triton_install(venv: Path) -> TritonInstall:
    """Locate tritonserver and the Python-backend stub matching the venv's interpreter."""
    python = venv / "bin" / "python"
    if not python.exists():
        raise TritonUnavailable(f"{python} does not exist")
    probe = subprocess.run(
        [
            str(python),
            "-c",
            "import sys, sysconfig, pytriton, pathlib, onnxruntime;"
            "print(f'{sys.version_info[0]}.{sys.version_info[1]}');"
            "print(sysconfig.get_config_var('LIBDIR'));"
            "print(pathlib.Path(pytriton.__file__).parent);"
            "print(onnxruntime.__version__)",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if probe.returncode != 0:
        raise TritonUnavailable(f"{python} cannot import pytriton/onnxruntime:\n{probe.stderr}")
    version, libdir, package, ort_version = probe.stdout.split("\n")[:4]
    root = Path(package) / "tritonserver"
    install = TritonInstall(
        python=python,
        server=root / "bin" / "tritonserver",
        python_backend=root / "backends" / "python",
        stub=root / "python_backend_stubs" / version / "triton_python_backend_stub",
        wheel_libs=Path(package).parent / "nvidia_pytriton.libs",
        python_libdir=Path(libdir),
        onnxruntime_version=ort_version,
    )
    needed = (install.server, install.python_backend, install.stub, install.wheel_libs)
    missing = [str(path) for path in needed if not path.exists()]
    if missing:
        raise TritonUnavailable(f"the nvidia-pytriton install lacks {missing}")
    return install


def free_ports(count: int) -> list[int]:
    """`count` distinct TCP ports on 127.0.0.1 that nothing listens on right now."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in sockets:  # held open together, so the kernel cannot hand out one twice
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


# --- the server ----------------------------------------------------------------------------------
@dataclass
class TritonServer:
    """A tritonserver process on 127.0.0.1 serving `repository` with the Python backend."""

    install: TritonInstall
    repository: Path
    workdir: Path
    http_port: int = 0  # 0: pick free ports
    grpc_port: int = 0
    metrics_port: int = 0
    process: subprocess.Popen | None = None

    def __post_init__(self) -> None:
        ports = iter(free_ports(3))
        self.http_port = self.http_port or next(ports)
        self.grpc_port = self.grpc_port or next(ports)
        self.metrics_port = self.metrics_port or next(ports)

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "tritonserver.log"

    def _backend_directory(self) -> Path:
        # tritonserver looks for the stub beside libtriton_python.so; the wheel keeps one stub
        # per Python version elsewhere, so assemble a backend folder with the right one.
        backends = self.workdir / "backends"
        python_dir = backends / "python"
        python_dir.mkdir(parents=True, exist_ok=True)
        for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
            shutil.copy2(self.install.python_backend / name, python_dir / name)
        shutil.copy2(self.install.stub, python_dir / "triton_python_backend_stub")
        return backends

    def _environment(self) -> dict[str, str]:
        env = dict(os.environ)
        # The stub links libpython dynamically (else: "'_thread.RLock' object has no attribute
        # '_recursion_count'") and the wheel's bundled libraries; it finds its interpreter's
        # packages through `python3` on PATH, not PYTHONPATH.
        libs = [str(self.install.python_libdir), str(self.install.wheel_libs)]
        if env.get("LD_LIBRARY_PATH"):
            libs.append(env["LD_LIBRARY_PATH"])
        env["LD_LIBRARY_PATH"] = ":".join(libs)
        env["PATH"] = f"{self.install.python.parent}:{env.get('PATH', '')}"
        env.pop("PYTHONPATH", None)
        env.pop("PYTHONHOME", None)
        return env

    def start(self, timeout_s: float = 45.0) -> None:
        """Start the server and wait until /v2/health/ready answers, or raise with the log."""
        command = [
            str(self.install.server),
            f"--model-repository={self.repository}",
            f"--backend-directory={self._backend_directory()}",
            "--http-address=127.0.0.1",
            f"--http-port={self.http_port}",
            "--grpc-address=127.0.0.1",
            f"--grpc-port={self.grpc_port}",
            "--metrics-address=127.0.0.1",
            f"--metrics-port={self.metrics_port}",
            "--allow-metrics=false",
            "--strict-readiness=true",
            "--exit-on-error=true",
            "--exit-timeout-secs=5",
            # A unique shared-memory prefix keeps concurrent servers apart in /dev/shm.
            f"--backend-config=python,shm-region-prefix-name=sfpc{os.getpid()}_{self.http_port}_",
        ]
        log = open(self.log_path, "wb")  # noqa: SIM115 - the child keeps writing after start()
        self.process = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self._environment(),
            cwd=self.workdir,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"tritonserver exited with code {self.process.returncode} during start-up:\n"
                    + self.log_tail()
                )
            if self.is_ready():
                return
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"tritonserver not ready after {timeout_s:.0f} s:\n" + self.log_tail())

    def is_ready(self) -> bool:
        url = f"http://{self.http_url}/v2/health/ready"
        try:
            with urllib.request.urlopen(url, timeout=1.0) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def log_tail(self, lines: int = 40) -> str:
        if not self.log_path.exists():
            return "(no log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM the server (it unloads models and ends its stubs), SIGKILL its group if stuck."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            # The server leads its own session (start_new_session), so its group id is its pid:
            # this reaches the stubs it started and nothing else.
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=5)
