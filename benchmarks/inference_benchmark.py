"""Deployment benchmark: PyTorch eager vs ONNX Runtime vs Triton (gRPC), plain vs uncertainty mode
vs M full passes, with time and peak memory, on two full-size synthetic volumes.

Cases (synthetic phantoms: timing and memory do not depend on image content or weights):

- ``3d``: a BraTS-sized FLAIR-like MR volume, 240 x 240 x 155 int16 at 1 mm (LPS affine, as the
  BraTS NIfTIs), brain z-scored over non-zero voxels; the paper's 3D net (channels 16..256,
  InstanceNorm, FLPM), 2 classes (whole tumour), sliding window of 112^3 (``--patch`` lowers it).
- ``2d``: an abdominal CT volume, 512 x 512 x 100 int16 HU at 0.7 x 0.7 x 2.5 mm (LPS affine, as
  DICOM-derived NIfTIs); the paper's 2D net (BatchNorm, FLPM), 4 classes (the organ task's), axial
  slices resampled in-plane to 1.5 mm (``input_mode`` "spacing": what CT models use, so that an
  organ has the same size in voxels whatever the scanner's field of view; "resize" would scale
  each slice by its FOV) and tiled with 256 x 256 windows, CT window [-250, 350] HU.

Configurations, each measured in a fresh child process (so ``ru_maxrss`` is its own):

- ``torch:plain``: PyTorch eager, eval mode under ``torch.no_grad``, through the same sliding window
  (``Engine.infer_model_grid`` -> ``predict_model_grid``) after the engine's preprocessing;
- ``onnxruntime:{plain,uncertainty,m_passes}``: ``Engine.segment`` with ``OnnxRuntimeBackend``;
- ``triton:{plain,uncertainty,m_passes}``: ``Engine.segment`` with ``TritonBackend`` over gRPC to a
  real tritonserver (the nvidia-pytriton wheel in .venv-triton) that this script starts on free
  loopback ports and stops by pid, serving the Python-backend repository built from the
  production repository by ``sfpc.model.triton_python_backend.python_backend_repository``;
- ``m_passes`` runs the plain graph M times per batch (M from the metadata) and averages softmax
  and entropy, i.e. what MC dropout would cost, through the same uncertainty post-processing.

Untrained networks with FLPM's running spreads moved off zero. Medians over ``--repeats`` runs,
configurations interleaved (rotated each repeat) so that drift hits all of them; ratios are taken
of the medians. A warm-up batch runs before each timed segmentation (a served model is warm).

    .venv/bin/python benchmarks/inference_benchmark.py                # full size (long)
    .venv/bin/python benchmarks/inference_benchmark.py --quick        # small volumes, minutes
    .venv/bin/python benchmarks/inference_benchmark.py --cases 3d --patch 96 --skip-triton

Prints a Markdown report on stdout (progress on stderr); ``--json PATH`` keeps every run. Exit
status: 0 all targets met, 3 a target not met, 1 a configuration failed, 2 no tritonserver.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
CHANNELS = (16, 32, 64, 128, 256)
DIVISOR = 2 ** (len(CHANNELS) - 1)  # four poolings: window sides must divide by 16
CHECKPOINT = "checkpoint.pt"
UNCERTAINTY_TARGET = 1.3

BACKENDS = ("torch", "onnxruntime", "triton")
MODES = ("plain", "uncertainty", "m_passes")
DEFAULT_CONFIGS = (
    "torch:plain",
    "onnxruntime:plain", "onnxruntime:uncertainty", "onnxruntime:m_passes",
    "triton:plain", "triton:uncertainty", "triton:m_passes",
)
ALL_CONFIGS = tuple(f"{b}:{m}" for b in BACKENDS for m in MODES)


# ----------------------------------------------------------------------------------------------
# The two cases
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    key: str
    title: str
    modality: str  # "mr" | "ct": which phantom
    shape: tuple[int, int, int]
    voxel: tuple[float, float, float]  # mm; the affine is LPS: diag(-vx, -vy, vz)
    spatial_dims: int
    patch: tuple[int, ...]
    class_names: tuple[str, ...]
    spacing: tuple[float | None, ...]
    input_mode: str
    normalisation: dict

    @property
    def affine(self) -> np.ndarray:
        return np.diag([-self.voxel[0], -self.voxel[1], self.voxel[2], 1.0])


def make_cases(args: argparse.Namespace) -> list[Case]:
    """The full-size cases, or the --quick ones (same networks, small volumes and windows)."""
    patch3d = args.patch or (32 if args.quick else 112)
    patch2d = 64 if args.quick else 256
    cases = {
        "3d": Case(
            key="3d", title="BraTS-sized MR, 3D net", modality="mr",
            shape=(64, 64, 48) if args.quick else (240, 240, 155), voxel=(1.0, 1.0, 1.0),
            spatial_dims=3, patch=(patch3d,) * 3, class_names=("background", "whole_tumour"),
            spacing=(1.0, 1.0, 1.0), input_mode="spacing",
            normalisation={"kind": "zscore", "foreground": "nonzero"},
        ),
        "2d": Case(
            key="2d", title="CT, 2D net (axial slices)", modality="ct",
            shape=(128, 128, 12) if args.quick else (512, 512, 100), voxel=(0.7, 0.7, 2.5),
            spatial_dims=2, patch=(patch2d, patch2d),
            class_names=("background", "spleen", "liver", "stomach"),
            spacing=(1.5, 1.5, None), input_mode="spacing",
            normalisation={"kind": "ct_window", "window": [-250.0, 350.0]},
        ),
    }
    return [cases[key] for key in args.cases]


def mr_volume(shape: Sequence[int], seed: int = 0) -> np.ndarray:
    """FLAIR-like int16 brain: zero background (skull-stripped, as BraTS), white and grey
    matter, dark ventricles, a hyperintense lesion, Rician-free Gaussian noise. Built slice by
    slice so that generation never outweighs the measured process's working set."""
    nx, ny, nz = (int(n) for n in shape)
    rng = np.random.default_rng(seed)
    x, y = np.meshgrid(np.linspace(-1, 1, nx), np.linspace(-1, 1, ny), indexing="ij")
    vol = np.zeros((nx, ny, nz), dtype=np.int16)
    for k in range(nz):
        z = 2.0 * k / max(nz - 1, 1) - 1.0
        r2 = (x / 0.75) ** 2 + (y / 0.85) ** 2 + (z / 0.9) ** 2
        brain = r2 < 1
        if not brain.any():
            continue
        value = np.where(r2 < 0.55, 430.0, 520.0)
        value[(x / 0.12) ** 2 + (y / 0.3) ** 2 + (z / 0.4) ** 2 < 1] = 180.0
        value[(x - 0.35) ** 2 + (y + 0.2) ** 2 + (z - 0.1) ** 2 < 0.2**2] = 900.0
        value += rng.normal(0.0, 25.0, size=value.shape)
        vol[:, :, k] = np.where(brain, np.clip(value, 1, 4000), 0).astype(np.int16)
    return vol


def ct_volume(shape: Sequence[int], seed: int = 0) -> np.ndarray:
    """int16 HU abdomen/chest: air, an elliptic body of soft tissue with fat, liver, lungs in the
    upper slices, a spine, noise; slice by slice (see mr_volume)."""
    nx, ny, nz = (int(n) for n in shape)
    rng = np.random.default_rng(seed)
    x, y = np.meshgrid(np.linspace(-1, 1, nx), np.linspace(-1, 1, ny), indexing="ij")
    vol = np.empty((nx, ny, nz), dtype=np.int16)
    for k in range(nz):
        t = k / max(nz - 1, 1)
        body = (x / 0.85) ** 2 + (y / (0.6 + 0.1 * t)) ** 2 < 1
        inner = (x / 0.75) ** 2 + (y / (0.5 + 0.1 * t)) ** 2 < 1
        hu = np.full((nx, ny), -1000.0)
        hu[body] = -100.0  # subcutaneous fat
        hu[inner] = 40.0
        hu[inner & (((x + 0.3) / 0.35) ** 2 + ((y - 0.1) / 0.3) ** 2 < 1)] = 60.0  # liver
        if t > 0.6:
            lungs = (((x - 0.4) / 0.25) ** 2 + (y / 0.35) ** 2 < 1) | (
                ((x + 0.4) / 0.25) ** 2 + (y / 0.35) ** 2 < 1)
            hu[inner & lungs] = -850.0
        hu[(x / 0.08) ** 2 + ((y + 0.4) / 0.08) ** 2 < 1] = 700.0  # vertebra
        hu += rng.normal(0.0, 20.0, size=(nx, ny))
        vol[:, :, k] = np.clip(hu, -1024, 3071).astype(np.int16)
    return vol


def make_volume(case: Case) -> np.ndarray:
    return mr_volume(case.shape) if case.modality == "mr" else ct_volume(case.shape)


# ----------------------------------------------------------------------------------------------
# Child process 1: export (torch)
# ----------------------------------------------------------------------------------------------


def export_case(case: Case, out_dir: Path) -> None:
    """Export an untrained paper net for `case` and save its checkpoint for the torch runs."""
    import torch

    from sfpc.inference.contract import ModelMetadata
    from sfpc.model.export import export_model
    from sfpc.model.networks import NetConfig, SFPCNet

    torch.manual_seed(0)
    config = NetConfig(spatial_dims=case.spatial_dims, in_channels=1,
                       num_classes=len(case.class_names), channels=CHANNELS)
    net = SFPCNet(config).eval()
    with torch.no_grad():  # zero spreads (untrained) would make the M predictions identical
        net.flpm().running_dmu.uniform_(0.2, 0.6)
        net.flpm().running_dsigma.uniform_(0.2, 0.6)
    meta = ModelMetadata(
        name=f"bench{case.key}", version="0.0.1", task=case.title,
        spatial_dims=case.spatial_dims, in_channels=1, num_classes=len(case.class_names),
        class_names=list(case.class_names), plane="axial", spacing=list(case.spacing),
        input_mode=case.input_mode, patch_size=list(case.patch),
        normalisation=dict(case.normalisation),
    )
    exported = export_model(net, meta, out_dir)
    # The trainer's checkpoint layout, so that the torch runs rebuild the net with load_checkpoint.
    torch.save({"net_config": config.to_dict(), "model": net.state_dict(),
                "metadata": exported.to_dict()}, out_dir / CHECKPOINT)


# ----------------------------------------------------------------------------------------------
# Child process 2: one measured configuration
# ----------------------------------------------------------------------------------------------


class TorchBackend:
    """The eager network behind the engine's Backend protocol (eval mode, no_grad)."""

    def __init__(self, checkpoint: Path, m: int, threads: int) -> None:
        import torch

        from sfpc.model.export import load_checkpoint
        from sfpc.model.networks import UncertaintyHead

        torch.set_num_threads(threads)
        self._torch = torch
        self.net, _ = load_checkpoint(checkpoint)
        self.head = UncertaintyHead(self.net, m).eval()
        self.seconds = 0.0  # inside infer, the engine's "backend" time of the other runtimes

    def infer(self, batch: np.ndarray, *, uncertainty: bool = False) -> dict[str, np.ndarray]:
        t0 = time.perf_counter()
        x = self._torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))
        with self._torch.no_grad():
            if uncertainty:
                mean_probs, mean_entropy = self.head(x)
                out = {"mean_probs": mean_probs.numpy(), "mean_entropy": mean_entropy.numpy()}
            else:
                out = {"logits": self.net(x).numpy()}
        self.seconds += time.perf_counter() - t0
        return out

    def ready(self) -> bool:
        return True

    def describe(self) -> dict[str, Any]:
        return {"backend": "torch", "version": self._torch.__version__,
                "intra_op_threads": self._torch.get_num_threads()}

    def close(self) -> None:
        pass


class RepeatedPasses:
    """Answers uncertainty requests with M plain passes of the wrapped backend: mean softmax and
    mean per-pass entropy, the outputs of the uncertainty graph, at the cost of MC dropout."""

    def __init__(self, backend: Any, m: int) -> None:
        self.backend = backend
        self.m = int(m)

    def infer(self, batch: np.ndarray, *, uncertainty: bool = False) -> dict[str, np.ndarray]:
        from sfpc.inference.engine import softmax
        from sfpc.inference.uncertainty import entropy

        if not uncertainty:
            return self.backend.infer(batch)
        mean_probs = mean_entropy = None
        for _ in range(self.m):
            probs = softmax(self.backend.infer(batch)["logits"], axis=1)
            h = entropy(probs, axis=1)[:, None]
            if mean_probs is None:
                mean_probs, mean_entropy = probs, h
            else:
                mean_probs += probs
                mean_entropy += h
        return {"mean_probs": mean_probs / self.m, "mean_entropy": mean_entropy / self.m}

    def ready(self) -> bool:
        return self.backend.ready()

    def describe(self) -> dict[str, Any]:
        return {**self.backend.describe(), "passes": self.m}

    def close(self) -> None:
        self.backend.close()


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Segment the case's volume once with one configuration; time and memory of this process."""
    from sfpc.inference.contract import ModelMetadata
    from sfpc.inference.engine import Engine

    case = Case(**{**spec["case"], "shape": tuple(spec["case"]["shape"])})
    backend_kind, mode = spec["backend"], spec["mode"]
    export_dir, threads = Path(spec["export_dir"]), int(spec["threads"])
    meta = ModelMetadata.load(export_dir)
    m = int(meta.perturbation["M"])

    volume = make_volume(case)
    eager = TorchBackend(export_dir / CHECKPOINT, m, threads) if backend_kind == "torch" else None
    if eager is not None:
        backend: Any = eager
    elif backend_kind == "onnxruntime":
        from sfpc.inference.backends import OnnxRuntimeBackend

        backend = OnnxRuntimeBackend(export_dir, providers=["CPUExecutionProvider"],
                                     intra_op_threads=threads)
    else:
        from sfpc.inference.backends import TritonBackend

        backend = TritonBackend(spec["url"], "grpc", meta.name, timeout_s=600)
    if mode == "m_passes":
        backend = RepeatedPasses(backend, m)
    engine = Engine(backend, meta)
    uncertainty = mode != "plain"

    # One full batch of windows through the graph this mode uses: sessions, arenas, oneDNN
    # primitives and the server's stub are warm, as in a serving process.
    warm = np.zeros((engine.sw_batch_size, 1, *meta.patch_size), dtype=np.float32)
    backend.infer(warm, uncertainty=mode == "uncertainty")
    described = backend.describe()
    if eager is not None:
        eager.seconds = 0.0
    rss_before = rss_mib()

    t0 = time.perf_counter()
    if eager is not None:
        # The same preprocessing and sliding window (predict_model_grid) as the engine, with the
        # eager net as predictor; no restore to the input grid.
        model_image, _ = engine.preprocess(volume, case.affine)
        t1 = time.perf_counter()
        maps = engine.infer_model_grid(model_image, uncertainty=uncertainty)
        inference = time.perf_counter() - t1
        timings = {"preprocess": t1 - t0, "inference": inference, "backend": eager.seconds}
        n_windows = class_voxels = None
        del maps
    else:
        result = engine.segment(volume, case.affine, uncertainty=uncertainty)
        timings = dict(result.timings)
        n_windows = result.n_windows
        class_voxels = {k: v["voxels"] for k, v in result.statistics["classes"].items()}
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    backend.close()
    return {
        "case": case.key, "backend": backend_kind, "mode": mode, "wall_s": wall,
        "end_to_end_s": None if backend_kind == "torch" else timings["total"],
        "inference_s": timings["inference"], "runtime_s": timings.get("backend"),
        "timings": timings, "n_windows": n_windows, "sw_batch_size": engine.sw_batch_size,
        "peak_rss_mib": peak, "rss_before_mib": rss_before, "input_mib": volume.nbytes / 2**20,
        "class_voxels": class_voxels, "torch_imported": "torch" in sys.modules,
        "backend_described": described,
    }


# ----------------------------------------------------------------------------------------------
# Parent: Triton server, orchestration, report
# ----------------------------------------------------------------------------------------------


def triton_repository(export_dir: Path, work: Path, name: str, max_batch: int,
                      model_threads: int) -> Path:
    """The production repository (write_triton_repository) switched to the Python backend, as
    the Triton tests serve it, with the served ONNX Runtime at `model_threads` intra-op threads
    (the tests' 1 thread would not compare with in-process ONNX Runtime on all cores)."""
    from sfpc.model.triton_python_backend import python_backend_repository
    from sfpc.model.triton_repo import write_triton_repository

    production, served = work / "production_repo", work / "python_backend_repo"
    write_triton_repository(export_dir, production, name, max_batch_size=max_batch)
    python_backend_repository(production, served, intra_op_threads=model_threads)
    return served


def session_pids(leader: int) -> list[int]:
    """The server and its Python-backend stubs: every process of the server's session (it was
    started with start_new_session, so the session id is the server's pid)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == leader:  # fields after "(comm)": state, ppid, pgrp, session
            pids.append(int(entry.name))
    return pids


def reset_peak_rss(pids: Sequence[int]) -> bool:
    """Reset each process's VmHWM to its current RSS (Linux >= 4.0, clear_refs value 5)."""
    try:
        for pid in pids:
            Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_rss_mib(pids: Sequence[int]) -> float:
    """Sum of the processes' VmHWM: an upper bound of their joint peak."""
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


def run_child(argv: list[str], timeout: float | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(Path(__file__).resolve()), *argv],
                          capture_output=True, text=True, timeout=timeout)


def run_config(case: Case, export_dir: Path, config: str, threads: int,
               url: str | None) -> dict[str, Any]:
    backend, mode = config.split(":")
    spec = {"case": asdict(case), "backend": backend, "mode": mode,
            "export_dir": str(export_dir), "threads": threads, "url": url}
    done = run_child(["--_measure", json.dumps(spec)])
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-15:])
        return {"case": case.key, "backend": backend, "mode": mode, "error": tail}
    return json.loads(done.stdout.strip().splitlines()[-1])


def machine_facts(threads: int, triton_ort: str | None) -> dict[str, Any]:
    def version(name: str) -> str:
        try:
            return importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            return "not installed"

    cpu = "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "cpu": cpu, "cpu_count": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0)),
        "memory_gib": round(memory, 1), "python": platform.python_version(),
        "torch": version("torch"), "onnxruntime": version("onnxruntime"),
        "numpy": version("numpy"), "tritonclient": version("tritonclient"),
        "triton_onnxruntime": triton_ort, "threads": threads,
        "loadavg_start": os.getloadavg(),
    }


def median(records: Sequence[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in records if r.get(key) is not None]
    return statistics.median(values) if values else None


def summarise(records: list[dict[str, Any]], cases: list[Case],
              configs: Sequence[str]) -> list[dict[str, Any]]:
    """One row per (case, configuration): medians, and ratios of medians to plain mode."""
    rows = []
    for case in cases:
        by_config: dict[str, dict[str, Any]] = {}
        for config in configs:
            backend, mode = config.split(":")
            runs = [r for r in records if (r["case"], r["backend"], r["mode"])
                    == (case.key, backend, mode)]
            ok = [r for r in runs if "error" not in r]
            row: dict[str, Any] = {"case": case.key, "backend": backend, "mode": mode,
                                   "n": len(ok), "errors": [r["error"] for r in runs
                                                            if "error" in r]}
            for key in ("end_to_end_s", "inference_s", "runtime_s", "peak_rss_mib",
                        "server_peak_rss_mib"):
                row[key] = median(ok, key)
            row["n_windows"] = ok[0]["n_windows"] if ok else None
            row["class_voxels"] = ok[0]["class_voxels"] if ok else None
            by_config[config] = row
            rows.append(row)
        for row in by_config.values():
            plain = by_config.get(f"{row['backend']}:plain")
            for key, out in (("end_to_end_s", "x_plain_end_to_end"),
                             ("inference_s", "x_plain_inference")):
                ok = plain and plain[key] and row[key] is not None
                row[out] = row[key] / plain[key] if ok else None
    return rows


def _fmt(value: float | None, spec: str = ".2f", suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def markdown_table(rows: list[dict[str, Any]], cases: list[Case]) -> str:
    titles = {c.key: c.title for c in cases}
    lines = [
        "| case | runtime | mode | end-to-end s | model-grid inference s | in runtime s "
        "| x plain (end-to-end) | x plain (inference) | peak RSS MiB | Triton server peak MiB "
        "| runs |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r["errors"] and not r["n"]:
            lines.append(f"| {titles[r['case']]} | {r['backend']} | {r['mode']} | failed: "
                         f"{r['errors'][0].splitlines()[-1][:80]} | | | | | | | 0 |")
            continue
        lines.append(
            f"| {titles[r['case']]} | {r['backend']} | {r['mode']} | {_fmt(r['end_to_end_s'])} "
            f"| {_fmt(r['inference_s'])} | {_fmt(r['runtime_s'])} "
            f"| {_fmt(r['x_plain_end_to_end'], '.2f', 'x')} "
            f"| {_fmt(r['x_plain_inference'], '.2f', 'x')} | {_fmt(r['peak_rss_mib'], '.0f')} "
            f"| {_fmt(r['server_peak_rss_mib'], '.0f')} | {r['n']} |"
        )
    return "\n".join(lines)


def target_lines(rows: list[dict[str, Any]], cases: list[Case]) -> tuple[list[str], bool]:
    """The two targets, judged per case on the medians; returns the lines and whether all met."""
    lines, all_met = [], True
    find = {(r["case"], r["backend"], r["mode"]): r for r in rows}
    for case in cases:
        for backend in ("onnxruntime", "triton"):
            row = find.get((case.key, backend, "uncertainty"))
            if row is None or row["x_plain_end_to_end"] is None:
                continue
            met = row["x_plain_end_to_end"] <= UNCERTAINTY_TARGET
            all_met &= met
            mp = find.get((case.key, backend, "m_passes"))
            extra = (f"; M full passes: {mp['x_plain_end_to_end']:.2f}x"
                     if mp and mp["x_plain_end_to_end"] is not None else "")
            lines.append(
                f"- {case.key} {backend}: uncertainty mode {row['x_plain_end_to_end']:.2f}x plain "
                f"end-to-end ({_fmt(row['x_plain_inference'])}x model-grid inference); target <= "
                f"{UNCERTAINTY_TARGET}x: {'MET' if met else 'NOT MET'}{extra}"
            )
        ort = find.get((case.key, "onnxruntime", "plain"))
        eager = find.get((case.key, "torch", "plain"))
        served = find.get((case.key, "triton", "plain"))
        if ort and served and ort["class_voxels"] and served["class_voxels"]:
            # The same graph on both sides: the masks may differ only by argmax ties flipped by
            # thread-dependent rounding.
            diff = max(abs(ort["class_voxels"][k] - served["class_voxels"].get(k, 0))
                       for k in ort["class_voxels"])
            lines.append(f"- {case.key}: Triton and in-process ONNX Runtime plain masks differ by "
                         f"at most {diff} voxels per class (check that both ran the same model)")
        if ort and eager and ort["inference_s"] and eager["inference_s"]:
            met = ort["inference_s"] <= eager["inference_s"]
            all_met &= met
            lines.append(
                f"- {case.key}: ONNX Runtime {ort['inference_s']:.2f} s vs PyTorch eager "
                f"{eager['inference_s']:.2f} s model-grid inference (same windows and blending), "
                f"ratio {ort['inference_s'] / eager['inference_s']:.2f}; target ORT not slower: "
                f"{'MET' if met else 'NOT MET'}"
            )
    return lines, all_met


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="small volumes and windows, 1 repeat: a check that runs in minutes")
    parser.add_argument("--repeats", type=int, default=None,
                        help="runs per configuration (default 3, 1 with --quick)")
    parser.add_argument("--threads", type=int, default=None,
                        help="intra-op threads of torch, ONNX Runtime and the served model "
                             "(default: the usable CPUs)")
    parser.add_argument("--triton-model-threads", type=int, default=None,
                        help="ONNX Runtime threads inside the Triton model (default --threads; "
                             "the Triton tests serve with 1)")
    parser.add_argument("--patch", type=int, default=None,
                        help="3D window side (default 112, 32 with --quick); a multiple of 16")
    parser.add_argument("--cases", nargs="+", choices=["3d", "2d"], default=["3d", "2d"])
    parser.add_argument("--configs", nargs="+", choices=ALL_CONFIGS, default=list(DEFAULT_CONFIGS),
                        help="backend:mode pairs to measure")
    parser.add_argument("--skip-triton", action="store_true", help="no tritonserver runs")
    parser.add_argument("--json", type=Path, default=None, help="also write every run here")
    parser.add_argument("--_export", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--_measure", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.patch is not None and (args.patch < DIVISOR or args.patch % DIVISOR):
        parser.error(f"--patch must be a positive multiple of {DIVISOR} (four poolings)")
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.threads = args.threads or len(os.sched_getaffinity(0))
    args.triton_model_threads = args.triton_model_threads or args.threads
    if args.skip_triton:
        args.configs = [c for c in args.configs if not c.startswith("triton:")]
    return args


def _terminate(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args._export:
        case_json, out_dir = args._export
        case = json.loads(case_json)
        export_case(Case(**{**case, "shape": tuple(case["shape"])}), Path(out_dir))
        return 0
    if args._measure:
        print(json.dumps(measure(json.loads(args._measure))))
        return 0

    # SIGTERM ends the run through the finally blocks, so tritonserver (its own session, out of
    # reach of signals sent to this process group) is stopped too.
    signal.signal(signal.SIGTERM, _terminate)
    command = shlex.join([sys.executable, *sys.argv])
    cases = make_cases(args)
    use_triton = any(c.startswith("triton:") for c in args.configs)
    install = None
    if use_triton:
        from sfpc.model.triton_python_backend import (
            TritonUnavailable,
            find_triton_install,
            missing_triton_message,
            triton_venv,
        )

        venv = triton_venv(REPO_ROOT / ".venv-triton")
        try:
            install = find_triton_install(venv)
        except TritonUnavailable as exc:
            log(missing_triton_message(venv, str(exc)) + "; use --skip-triton to run without")
            return 2
    facts = machine_facts(args.threads, install.onnxruntime_version if install else None)
    records: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="sfpc-inference-bench-") as tmp:
        for case in cases:
            work = Path(tmp) / case.key
            export_dir = work / "export"
            log(f"[{case.key}] exporting {case.title} (patch {case.patch}) ...")
            done = run_child(["--_export", json.dumps(asdict(case)), str(export_dir)])
            if done.returncode != 0:
                log(done.stderr)
                return 1
            records += run_case(case, export_dir, work, args, install)
    facts["loadavg_end"] = os.getloadavg()
    facts["total_minutes"] = round((time.perf_counter() - t_start) / 60, 1)

    rows = summarise(records, cases, args.configs)
    targets, met = target_lines(rows, cases)
    print(report(args, cases, rows, targets, facts, command))
    if args.json:
        args.json.write_text(json.dumps({"command": command, "machine": facts, "runs": records,
                                         "summary": rows}, indent=2, default=str) + "\n")
    failed = any(r["errors"] for r in rows)
    return 1 if failed else (0 if met else 3)


def run_case(case: Case, export_dir: Path, work: Path, args: argparse.Namespace,
             install: Any) -> list[dict[str, Any]]:
    """All repeats of all configurations of one case, interleaved, one tritonserver for them."""
    from sfpc.inference.contract import ModelMetadata
    from sfpc.model.triton_python_backend import TritonServer

    configs = [c for c in args.configs if c.split(":")[0] != "triton"]
    server = None
    if install is not None:
        configs = list(args.configs)
        meta = ModelMetadata.load(export_dir)
        # One request per engine batch: the served max_batch_size holds the engine's
        # sw_batch_size (the metadata's, at least 16 for 2D models, as Engine picks it).
        sw_batch = int(meta.inference.get("sw_batch_size", 4))
        if case.spatial_dims == 2:
            sw_batch = max(sw_batch, 16)
        max_batch = max(8, sw_batch)
        repo = triton_repository(export_dir, work, meta.name, max_batch,
                                 args.triton_model_threads)
        server = TritonServer(install, repo, work)
    records = []
    try:
        if server is not None:
            log(f"[{case.key}] starting tritonserver on gRPC {server.grpc_url} ...")
            server.start(timeout_s=180)
        for repeat in range(args.repeats):
            shift = repeat % len(configs)
            for config in configs[shift:] + configs[:shift]:
                url = server.grpc_url if server is not None else None
                pids = session_pids(server.process.pid) if config.startswith("triton:") else []
                tracked = reset_peak_rss(pids) if pids else False
                record = run_config(case, export_dir, config, args.threads, url)
                record["repeat"] = repeat
                record["server_peak_rss_mib"] = peak_rss_mib(pids) if tracked else None
                records.append(record)
                if "error" in record:
                    if config.startswith("triton:"):
                        record["error"] += "\n--- tritonserver log ---\n" + server.log_tail(15)
                    log(f"[{case.key} {repeat + 1}/{args.repeats}] {config}: FAILED\n"
                        f"{record['error']}")
                else:
                    log(f"[{case.key} {repeat + 1}/{args.repeats}] {config}: "
                        f"{record['wall_s']:.2f} s, peak RSS {record['peak_rss_mib']:.0f} MiB"
                        + (f", server {record['server_peak_rss_mib']:.0f} MiB"
                           if record["server_peak_rss_mib"] else ""))
    finally:
        if server is not None:
            server.stop()
    return records


def busy_warning(facts: dict[str, Any]) -> list[str]:
    """A line when other work competed for the CPUs: intra-op thread pools then wait on
    descheduled threads, and times (PyTorch's most of all) are not representative."""
    load = max(facts["loadavg_start"][0], facts["loadavg_end"][0])
    if load <= 0.5 * facts["cpus_usable"]:
        return []
    return [f"WARNING: 1-minute load average reached {load:.1f} on {facts['cpus_usable']} usable "
            "CPUs: other processes competed with this benchmark; rerun on an idle machine."]


def report(args: argparse.Namespace, cases: list[Case], rows: list[dict[str, Any]],
           targets: list[str], facts: dict[str, Any], command: str) -> str:
    out = [f"# SFPC inference benchmark{' (--quick)' if args.quick else ''}", "",
           f"Command: `{command}`", ""]
    for case in cases:
        row = next((r for r in rows if r["case"] == case.key and r["n_windows"]), None)
        out.append(
            f"- {case.key}: {case.title}; volume {'x'.join(map(str, case.shape))} int16 at "
            f"{'x'.join(f'{v:g}' for v in case.voxel)} mm; model grid spacing "
            f"{list(case.spacing)}, input_mode {case.input_mode}; window "
            f"{'x'.join(map(str, case.patch))}; channels {list(CHANNELS)}; "
            f"{len(case.class_names)} classes"
            + (f"; {row['n_windows']} windows" if row else "")
        )
    out += ["", markdown_table(rows, cases), "",
            f"Medians of {args.repeats} run(s) per configuration, configurations interleaved; "
            "ratios are of the medians. End-to-end = Engine.segment (validate, preprocess, "
            "sliding window, restore to the input grid, masks, uncertainty maps, statistics); "
            "model-grid inference = the sliding window with blending; in runtime = time inside "
            "the backend's infer calls. PyTorch eager is timed on the model-grid inference only. "
            "Peak RSS = ru_maxrss of the measuring process (input volume, runtime and "
            "everything); for Triton the client process, the server's own peak (tritonserver + "
            "Python-backend stubs, sum of VmHWM, reset before each run) in its own column. "
            "m_passes = M plain passes per batch (M from the metadata), the cost of MC dropout.",
            "", "Targets:", *targets, "",
            "Machine: " + ", ".join(f"{k} {v}" for k, v in facts.items()),
            *busy_warning(facts),
            f"Threads: torch and in-process ONNX Runtime intra-op {args.threads}; ONNX Runtime "
            f"inside the Triton Python-backend model {args.triton_model_threads}; execution "
            "provider CPU everywhere."]
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
