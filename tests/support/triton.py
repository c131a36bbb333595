"""Test fixtures for the Triton and backend tests.

1. `export_fixture_model`: a narrow SFPC network exported by `sfpc.model.export.export_model`
   (seg.onnx, seg_uncertainty.onnx, sfpc_model.json), small enough to keep the tests fast;
   `pre_temperature_export`: the same export with an uncertainty graph of the kind written before
   the graph took a temperature input.
2. `python_backend_repository`: turns a production repository (ONNX Runtime platform) into one the
   pip-installed tritonserver can run. The nvidia-pytriton wheel ships tritonserver with the
   Python backend only, so each model keeps its name, tensors, dims and batching, and a model.py
   runs the very same model.onnx with onnxruntime inside the Python-backend stub.
3. `TritonServer`: starts that tritonserver from the separate triton venv on free loopback ports
   and stops it by pid.
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
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
SETUP_SCRIPT = "scripts/setup_triton_env.sh"
PYTHON_MODEL_SOURCE = Path(__file__).resolve().parent / "triton_python_model.py"
TRITON_VENV_ENV = "SFPC_TRITON_VENV"


# --- 1. the export fixture -------------------------------------------------------------------
def export_fixture_model(
    out_dir: Path,
    *,
    spatial_dims: int = 3,
    in_channels: int = 1,
    num_classes: int = 3,
    patch_size: tuple[int, ...] = (8, 8, 8),
    dynamic_spatial: bool = True,
    seed: int = 0,
) -> tuple[Path, Any]:
    """Export a narrow, randomly initialised SFPC network with the project's exporter.

    Two UNet levels of 4 and 8 channels keep the graphs small and fast; spatial sizes fed to a
    dynamic-spatial export must be even. FLPM's running spreads are set to non-zero values so
    the uncertainty graph really perturbs (they start at zero before training). Returns the
    export directory and the torch network (eval mode), the reference the graphs must match.
    """
    import torch

    from sfpc.inference.contract import ModelMetadata
    from sfpc.model.export import export_model
    from sfpc.model.networks import NetConfig, SFPCNet

    torch.manual_seed(seed)
    config = NetConfig(
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        num_classes=num_classes,
        channels=(4, 8),
        encoder_dropout=(0.0, 0.0),
    )
    net = SFPCNet(config).eval()
    flpm = net.flpm()
    with torch.no_grad():
        flpm.running_dmu.uniform_(0.2, 0.6)
        flpm.running_dsigma.uniform_(0.2, 0.6)
    metadata = ModelMetadata(
        name="fixture",
        version="0.0.1",
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        num_classes=num_classes,
        class_names=["background"] + [f"class{i}" for i in range(1, num_classes)],
        patch_size=list(patch_size),
    )
    export_model(net, metadata, out_dir, dynamic_spatial=dynamic_spatial)
    return out_dir, net


def pre_temperature_export(export_dir: Path, net: Any, out_dir: Path) -> Path:
    """A copy of `export_dir` whose uncertainty graph is what sfpc exported before the graph took
    a temperature: the stacked UncertaintyHead traced with the image as its only input.

    The checksum in the copied metadata is updated, as the exporter of the time wrote it, so that
    the backends load the graph and only its missing input differs.
    """
    import json

    import torch

    from sfpc.inference.contract import METADATA_FILE, sha256_file
    from sfpc.model.export import INPUT_NAME, UNCERTAINTY_OUTPUTS, _export
    from sfpc.model.networks import UncertaintyHead

    out_dir.mkdir(parents=True, exist_ok=True)
    for item in export_dir.iterdir():
        shutil.copyfile(item, out_dir / item.name)
    metadata = json.loads((out_dir / METADATA_FILE).read_text())
    graph = out_dir / metadata["graphs"]["uncertainty"]["file"]
    head = UncertaintyHead(net, metadata["perturbation"]["M"], "stacked")
    example = torch.zeros(1, metadata["in_channels"], *metadata["patch_size"])
    _export(head, (example,), graph, (INPUT_NAME,), UNCERTAINTY_OUTPUTS,
            metadata["dynamic_spatial"])
    metadata["graphs"]["uncertainty"]["sha256"] = sha256_file(graph)
    metadata["uncertainty_graph"] = "stacked"
    (out_dir / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
    return out_dir


# --- 2. the Python-backend test repository ------------------------------------------------------
def python_backend_repository(production_repo: Path, test_repo: Path) -> list[str]:
    """Copy `production_repo` to `test_repo`, switching every model to the Python backend.

    Names, tensors, dims, max_batch_size, dynamic batching and parameters are kept exactly as
    written by write_triton_repository; only the execution changes (platform -> backend "python",
    GPU instances -> CPU, no TensorRT accelerator). Returns the model names.
    """
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    names = []
    for config_path in sorted(production_repo.glob("*/config.pbtxt")):
        model_dir = config_path.parent
        config = text_format.Parse(config_path.read_text(), model_config_pb2.ModelConfig())
        config.ClearField("platform")
        config.backend = "python"
        config.ClearField("optimization")
        for group in config.instance_group:
            group.kind = model_config_pb2.ModelInstanceGroup.KIND_CPU
        target = test_repo / model_dir.name
        shutil.copytree(model_dir, target, dirs_exist_ok=True)
        (target / "config.pbtxt").write_text(text_format.MessageToString(config))
        for version_dir in target.iterdir():
            if version_dir.is_dir() and version_dir.name.isdigit():
                shutil.copyfile(PYTHON_MODEL_SOURCE, version_dir / "model.py")
        names.append(config.name)
    return names


# --- 3. the server ------------------------------------------------------------------------------
def triton_venv() -> Path:
    """Where scripts/setup_triton_env.sh put the triton venv (override: $SFPC_TRITON_VENV)."""
    return Path(os.environ.get(TRITON_VENV_ENV, REPO_ROOT / ".venv-triton"))


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


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    return free_ports(1)[0]


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
            # A unique shared-memory prefix keeps concurrent test runs apart in /dev/shm.
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


def missing_triton_message(reason: str) -> str:
    return (
        f"no usable tritonserver in {triton_venv()} ({reason}): run `bash {SETUP_SCRIPT}` "
        f"(or set ${TRITON_VENV_ENV} to a venv it created)"
    )


def require_module(name: str) -> Any:
    """Import `name`, or skip the calling test module (fail it under CI, where all must run)."""
    import importlib

    import pytest

    try:
        return importlib.import_module(name)
    except ImportError as exc:
        message = f"{name} is not importable ({exc}); install the dev extras"
        if running_in_ci():
            pytest.fail(message, pytrace=False)
        pytest.skip(message, allow_module_level=True)


def running_in_ci() -> bool:
    """CI systems (this project's .ci/run included) set CI=true."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")
