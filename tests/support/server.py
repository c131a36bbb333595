"""Test support for the gateway: small real models and a real uvicorn process.

1. :func:`export_tiny_model` trains a narrow SFPCNet for a few steps on smooth random volumes
   (labels: intensity bands, so masks follow the image) and exports it with the project's
   exporter: seg.onnx, seg_uncertainty.onnx, sfpc_model.json. A coarse model grid (5 mm for 3D,
   windows overlapping by a quarter) keeps inference on full-size real CTs to about a second.
2. :class:`GatewayServer` runs ``python -m sfpc.cli serve`` on 127.0.0.1, port 0 (the port the
   kernel gave is read from the server's log, so two test sessions never race for a port), waits
   for /healthz with a bounded wait, and stops the process by its pid.
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

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("SFPC_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
NIFTI_IMAGES = sorted(DATA.glob("*/*_image*.nii.gz")) if DATA.is_dir() else []
DICOM_SERIES = DATA / "dicom" / "mr_pd_series"
TRANSFER_SYNTAXES = DATA / "dicom" / "transfer_syntaxes"
DATA_MISSING = f"shared data folder {DATA} is absent (set SFPC_SHARED_DATA)"
_RUNNING = re.compile(r"running on https?://127\.0\.0\.1:(\d+)")


# --- 1. models ---------------------------------------------------------------------------------
def _smooth_batch(rng: np.random.Generator, count: int, patch: tuple[int, ...]) -> np.ndarray:
    from scipy import ndimage

    noise = rng.normal(size=(count, 1, *patch)).astype(np.float32)
    sigma = (0, 0) + (max(1.0, patch[0] / 8),) * len(patch)
    blobs = ndimage.gaussian_filter(noise, sigma=sigma)
    return (blobs - blobs.mean()) / blobs.std()


def export_tiny_model(out_dir: Path, spatial_dims: int, *, name: str, num_classes: int,
                      steps: int = 8, seed: int = 0) -> Path:
    """Train a tiny SFPCNet briefly and export it to ``out_dir``; returns ``out_dir``."""
    import torch

    from sfpc.inference.contract import ModelMetadata
    from sfpc.model.export import export_model
    from sfpc.model.networks import NetConfig, SFPCNet

    torch.manual_seed(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        patch = (32, 32, 32) if spatial_dims == 3 else (64, 64)
        cfg = NetConfig(spatial_dims=spatial_dims, num_classes=num_classes,
                        channels=(4, 8, 16, 32, 64), encoder_dropout=(0.0,) * 5)
        net = SFPCNet(cfg)
        opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
        rng = np.random.default_rng(seed)
        net.train()
        for _ in range(steps):
            x = _smooth_batch(rng, 4, patch)
            edges = np.quantile(x[:, 0], np.linspace(0, 1, num_classes + 1)[1:-1])
            y = torch.from_numpy(np.digitize(x[:, 0], edges))
            out = net.forward_train(torch.from_numpy(x), n_unlabelled=2, m=4)
            loss = (torch.nn.functional.cross_entropy(out.logits, y) + out.perturbed.var()
                    + out.recon.square().mean())
            opt.zero_grad()
            loss.backward()
            opt.step()
        # A few steps leave BatchNorm's running statistics near their init; re-estimate them.
        norms = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        for m in norms:
            m.reset_running_stats()
            m.momentum = None
        with torch.no_grad():
            for _ in range(3):
                net(torch.from_numpy(_smooth_batch(rng, 4, patch)))
            # Spreads of a trained model (a few steps on noise leave them near 1e-3, where the
            # M perturbed predictions agree to 1e-7 and the uncertainty maps are flat).
            flpm = net.flpm()
            flpm.running_dmu.uniform_(0.2, 0.5)
            flpm.running_dsigma.uniform_(0.2, 0.5)
        net.eval()
        classes = ["background"] + [f"structure{i}" for i in range(1, num_classes)]
        meta = ModelMetadata(
            name=name, version="0.0.1", task="gateway tests", spatial_dims=spatial_dims,
            num_classes=num_classes, class_names=classes, patch_size=list(patch),
            spacing=[5.0, 5.0, 5.0] if spatial_dims == 3 else None,
            input_mode="spacing" if spatial_dims == 3 else "resize",
            normalisation={"kind": "zscore", "foreground": "all"},
            inference={"overlap": 0.25, "mode": "gaussian", "sigma_scale": 0.125,
                       "sw_batch_size": 8},
        )
        export_model(net, meta, out_dir)
    finally:
        torch.set_num_threads(threads)
    return out_dir


_EXPORTED: dict[Path, dict[str, Path]] = {}


def tiny_models(base: Path) -> dict[str, Path]:
    """The two test models, exported once per test session (``base``: the session's temporary
    root) and shared by every server test module: "tiny3d" (2 classes) and "tiny2d" (3)."""
    if base not in _EXPORTED:
        root = base / "gateway-models"
        root.mkdir(parents=True, exist_ok=True)
        _EXPORTED[base] = {
            "tiny3d": export_tiny_model(root / "m3d", 3, name="tiny3d", num_classes=2),
            "tiny2d": export_tiny_model(root / "m2d", 2, name="tiny2d", num_classes=3, seed=1),
        }
    return _EXPORTED[base]


# --- 2. the server ------------------------------------------------------------------------------
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
