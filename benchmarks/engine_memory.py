"""Peak memory and wall time of the inference engine on a full-size CT volume.

Segments a synthetic 512 x 512 x 400 CT-like volume (int16 HU, 0.7 x 0.7 x 1.25 mm) with a 2D
SFPC model exported from an untrained network, in plain and uncertainty mode. The weights do not
matter here: the figures of interest are memory (the engine streams slabs so that nothing of size
K x voxels is ever held) and, secondarily, time.

Each mode runs in its own child process, which never imports torch (the export happens in a
third one), so that ``ru_maxrss`` is the engine's own high-water mark. Reported per mode:
peak RSS of the process, RSS before ``segment`` (input volume, ONNX Runtime session), the peak of
numpy/Python allocations during ``segment`` (tracemalloc), and wall time per stage.

    .venv/bin/python benchmarks/engine_memory.py                 # paper's 2D recipe (resize)
    .venv/bin/python benchmarks/engine_memory.py --input-mode spacing --spacing 1.0 1.0
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def build_net(args: argparse.Namespace):
    """The benchmark's 2D SFPCNet (seeded, untrained) and its metadata: the same weights in the
    export's child process and in the MONAI comparison's."""
    import torch

    from sfpc.inference.contract import ModelMetadata
    from sfpc.model.networks import NetConfig, SFPCNet

    torch.manual_seed(0)
    cfg = NetConfig(spatial_dims=2, in_channels=1, num_classes=args.classes,
                    channels=tuple(args.channels))
    net = SFPCNet(cfg).eval()
    with torch.no_grad():  # untrained spreads are 0, which would make every map 0
        net.flpm().running_dmu.fill_(0.3)
        net.flpm().running_dsigma.fill_(0.3)
    meta = ModelMetadata(
        name="bench2d", spatial_dims=2, in_channels=1, num_classes=args.classes,
        class_names=["background"] + [f"organ{i}" for i in range(1, args.classes)],
        patch_size=list(args.patch), input_mode=args.input_mode,
        spacing=list(args.spacing) if args.spacing else None,
        normalisation={"kind": "ct_window", "window": [-1000.0, 1000.0]},
    )
    return net, meta


def export(out_dir: Path, args: argparse.Namespace) -> None:
    """Export the benchmark network with the project's exporter (runs in a child process)."""
    from sfpc.model.export import export_model

    net, meta = build_net(args)
    export_model(net, meta, out_dir)


def run_monai(args: argparse.Namespace) -> dict:
    """The anchor a MONAI user would pick: MONAI's own transforms (orientation, in-plane
    spacing, intensity window), ``SliceInferer`` (MONAI's sliding window over 2D slices: same
    window, overlap 0.5, Gaussian weighting, batch) on the eager PyTorch network, softmax,
    linear resampling back to the input grid and argmax; same volume, same threads."""
    import resource

    import numpy as np
    import torch
    from monai.data import MetaTensor
    from monai.inferers import SliceInferer
    from monai.transforms import Orientation, Resize, ScaleIntensityRange, Spacing

    if args.input_mode != "spacing" or not args.spacing:
        raise SystemExit("the MONAI comparison needs --input-mode spacing --spacing SX SY")
    torch.set_num_threads(args.threads or torch.get_num_threads())
    device = torch.device(args.torch_device)
    net, meta = build_net(args)
    net = net.to(device)

    def sync() -> None:  # CUDA runs asynchronously: a stage ends when the device is done
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    volume = ct_volume(tuple(args.shape))
    affine = np.diag([*args.voxel, 1.0])
    sw = args.sw_batch_size or int(meta.inference.get("sw_batch_size", 4))
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    with torch.inference_mode():
        image = MetaTensor(torch.from_numpy(volume.astype(np.float32))[None],
                           affine=torch.from_numpy(affine)).to(device)
        image = Orientation(axcodes="RAS")(image)
        image = Spacing(pixdim=(*args.spacing, args.voxel[2]), mode="bilinear")(image)
        image = ScaleIntensityRange(-1000.0, 1000.0, 0.0, 1.0, clip=True)(image)
        sync()
        timings["preprocess"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        inferer = SliceInferer(roi_size=tuple(args.patch), sw_batch_size=sw, overlap=0.5,
                               mode="gaussian", sigma_scale=0.125, spatial_dim=2,
                               padding_mode="constant", progress=False)
        logits = inferer(image.as_tensor()[None], net)
        sync()
        timings["inference"] = time.perf_counter() - t1
        t2 = time.perf_counter()
        probs = torch.softmax(logits, dim=1)[0]
        probs = Resize(spatial_size=tuple(args.shape), mode="trilinear")(probs)
        mask = torch.argmax(torch.as_tensor(probs), dim=0).to(torch.uint8).cpu().numpy()
        timings["postprocess"] = time.perf_counter() - t2
    wall = time.perf_counter() - t0
    return {"mode": "monai", "wall_s": wall, "timings": timings,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "mask_shape": list(mask.shape), "torch_threads": torch.get_num_threads(),
            "torch_device": str(device)}


def ct_volume(shape: tuple[int, int, int], seed: int = 0):
    """int16 HU: air, an elliptic body of soft tissue with two lungs, a spine and noise; built
    slice by slice so that no float copy of the whole volume is ever made."""
    import numpy as np

    nx, ny, nz = shape
    rng = np.random.default_rng(seed)
    x, y = np.meshgrid(np.linspace(-1, 1, nx), np.linspace(-1, 1, ny), indexing="ij")
    vol = np.empty(shape, dtype=np.int16)
    for z in range(nz):
        t = z / max(nz - 1, 1)
        body = (x / 0.85) ** 2 + (y / (0.6 + 0.1 * t)) ** 2 < 1
        lungs = (((x - 0.4) / 0.25) ** 2 + (y / 0.35) ** 2 < 1) | (
            ((x + 0.4) / 0.25) ** 2 + (y / 0.35) ** 2 < 1)
        spine = (x / 0.08) ** 2 + ((y + 0.4) / 0.08) ** 2 < 1
        hu = np.full((nx, ny), -1000.0)
        hu[body] = 40.0
        hu[body & lungs & (t > 0.3)] = -850.0
        hu[spine] = 700.0
        hu += rng.normal(0.0, 25.0, size=(nx, ny))
        vol[:, :, z] = np.clip(hu, -1024, 3071).astype(np.int16)
    return vol


def rss_mib() -> float:
    """Current resident set size (Linux /proc)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_mode(export_dir: Path, mode: str, args: argparse.Namespace) -> dict:
    """Segment once and measure (runs in a child process that never imports torch). ``mode``:
    plain or uncertainty, with "_serial" restoring slabs after the network instead of beside
    it (``Engine(concurrent_restore=False)``)."""
    import resource
    import tracemalloc

    import numpy as np

    from sfpc.inference.backends import OnnxRuntimeBackend
    from sfpc.inference.contract import ModelMetadata
    from sfpc.inference.engine import Engine

    uncertainty = mode.startswith("uncertainty")
    volume = ct_volume(tuple(args.shape))
    affine = np.diag([*args.voxel, 1.0])
    backend = OnnxRuntimeBackend(export_dir, providers=args.providers.split(","),
                                 intra_op_threads=args.threads, trt_fp16=args.trt_fp16,
                                 trt_cache_dir=args.trt_cache)
    if args.warmup:  # TensorRT builds its engines on the first batch of each shape
        Engine(backend, ModelMetadata.load(export_dir), sw_batch_size=args.sw_batch_size
               ).segment(ct_volume((args.shape[0], args.shape[1], 4)),
                         np.diag([*args.voxel, 1.0]), uncertainty=uncertainty)
    engine = Engine(backend, ModelMetadata.load(export_dir), sw_batch_size=args.sw_batch_size,
                    concurrent_restore=not mode.endswith("_serial"))
    before = rss_mib()
    tracemalloc.start()
    t0 = time.perf_counter()
    result = engine.segment(volume, affine, uncertainty=uncertainty)
    wall = time.perf_counter() - t0
    _, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert "torch" not in sys.modules
    counts = {k: v["voxels"] for k, v in result.statistics["classes"].items()}
    return {
        "mode": mode,
        "wall_s": wall,
        "timings": result.timings,
        "n_windows": result.n_windows,
        "sw_batch_size": engine.sw_batch_size,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_before_segment_mib": before,
        "tracemalloc_peak_mib": traced_peak / 2**20,
        "input_mib": volume.nbytes / 2**20,
        "outputs_mib": sum(a.nbytes for a in (result.mask, result.entropy_levels,
                                              result.mi_levels) if a is not None) / 2**20,
        "model_shape": result.geometry["model_shape"],
        "class_voxels": counts,
        "providers": backend.describe()["providers"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", type=int, nargs=3, default=[512, 512, 400])
    parser.add_argument("--voxel", type=float, nargs=3, default=[0.7, 0.7, 1.25],
                        help="input voxel size in mm (RAS affine)")
    parser.add_argument("--patch", type=int, nargs=2, default=[256, 256])
    parser.add_argument("--input-mode", choices=["resize", "spacing"], default="resize")
    parser.add_argument("--spacing", type=float, nargs=2, default=None,
                        help="model in-plane spacing (mm) for --input-mode spacing")
    parser.add_argument("--channels", type=int, nargs="+", default=[16, 32, 64, 128, 256])
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op")
    parser.add_argument("--sw-batch-size", type=int, default=None,
                        help="windows per backend call (default: the metadata's, >= 16 in 2D)")
    parser.add_argument("--modes", nargs="+", choices=["plain", "uncertainty", "plain_serial",
                                                       "uncertainty_serial", "monai"],
                        default=["plain", "uncertainty"],
                        help="*_serial: slabs restored after the network, not beside it; "
                             "monai: MONAI's transforms + SliceInferer + eager PyTorch on the "
                             "same network and volume (needs --input-mode spacing)")
    parser.add_argument("--providers", default="CPUExecutionProvider",
                        help="ONNX Runtime execution providers, comma-separated, in order "
                             "(e.g. TensorrtExecutionProvider,CUDAExecutionProvider,"
                             "CPUExecutionProvider with onnxruntime-gpu)")
    parser.add_argument("--trt-fp16", action="store_true", help="TensorRT in FP16")
    parser.add_argument("--trt-cache", default=None, help="TensorRT engine cache folder")
    parser.add_argument("--warmup", action="store_true",
                        help="segment a 4-slice volume first (TensorRT engine builds, CUDA "
                             "context), so that the timed run is the steady state")
    parser.add_argument("--torch-device", default="cpu",
                        help="device of the MONAI + eager PyTorch mode (cpu, cuda)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--_export", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--_run", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args._export:
        export(args._export, args)
        return
    if args._run:
        mode, export_dir = args._run
        result = (run_monai(args) if mode == "monai"
                  else run_mode(Path(export_dir), mode, args))
        print(json.dumps(result))
        return

    passthrough = list(sys.argv[1:])
    with tempfile.TemporaryDirectory() as tmp:
        export_dir = Path(tmp) / "export"
        subprocess.run([sys.executable, __file__, *passthrough, "--_export", str(export_dir)],
                       check=True)
        print(f"volume {args.shape} int16, voxel {args.voxel} mm; 2D model K={args.classes}, "
              f"patch {args.patch}, input_mode {args.input_mode}, channels {args.channels}")
        results = {}
        for mode in args.modes:
            done = subprocess.run(
                [sys.executable, __file__, *passthrough, "--_run", mode, str(export_dir)],
                capture_output=True, text=True)
            if done.returncode != 0:  # the child's own error, not only its exit status
                sys.exit(f"mode {mode} failed:\n{done.stderr.strip()[-3000:]}")
            r = json.loads(done.stdout.strip().splitlines()[-1])
            results[mode] = r
            t = r["timings"]
            if mode == "monai":
                print(f"{'monai':>11}: peak RSS {r['peak_rss_mib']:.0f} MiB; wall "
                      f"{r['wall_s']:.1f} s (preprocess {t['preprocess']:.1f}, inference "
                      f"{t['inference']:.1f}, postprocess {t['postprocess']:.1f}); torch threads "
                      f"{r['torch_threads']}")
                continue
            print(
                f"{r['mode']:>11}: peak RSS {r['peak_rss_mib']:.0f} MiB (before segment "
                f"{r['rss_before_segment_mib']:.0f} MiB: input {r['input_mib']:.0f} MiB + "
                f"runtime), numpy/Python peak during segment {r['tracemalloc_peak_mib']:.0f} "
                f"MiB (outputs {r['outputs_mib']:.0f} MiB); wall {r['wall_s']:.1f} s "
                f"(preprocess {t['preprocess']:.1f}, inference {t['inference']:.1f}, "
                f"postprocess {t['postprocess']:.1f}); {r['n_windows']} windows in batches of "
                f"{r['sw_batch_size']}, model grid "
                f"{r['model_shape']}"
            )
        if "monai" in results and "plain" in results:
            ratio = results["monai"]["wall_s"] / results["plain"]["wall_s"]
            print(f"MONAI SliceInferer + eager PyTorch / engine (plain): {ratio:.2f}x "
                  f"(goal >= 1.5x)")
        if args.json:
            args.json.write_text(json.dumps({"command": " ".join(sys.argv), "results": results},
                                            indent=1) + "\n")


if __name__ == "__main__":
    main()
