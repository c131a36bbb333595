"""Small SFPC networks exported with the project's exporter, for every test that needs a model.

- :func:`train_tiny_net` trains a narrow SFPCNet a few steps on smooth random volumes (labels:
  intensity bands, so masks follow the image), re-estimates BatchNorm's running statistics and
  moves FLPM's spreads to a trained model's range (a few steps on noise leave them near 1e-3,
  where the M perturbed predictions agree to 1e-7 and the uncertainty maps are flat).
- :func:`export_tiny_model` exports such a net for the gateway tests: a coarse model grid (5 mm
  for 3D, windows overlapping by a quarter) keeps inference on full-size real CTs to a second;
  :func:`tiny_models` exports the two shared gateway models once per pytest session and
  :func:`session_model` the jobs tests' model.
- :func:`export_fixture_model` exports a randomly initialised two-level net (fast graphs) with
  its torch network, the oracle the graphs must match; :func:`pre_temperature_export` rewrites
  its uncertainty graph as exported before the graph took a temperature input.

Tests compare these models' outputs with an oracle run on the same machine (the torch network,
the engine's own public calls), never with numbers recorded elsewhere: a few training steps give
floats that differ in their last bits between CPUs. torch is imported inside the functions, so
that the jobs tests' spawned children (which import tests.support.jobs) start without it.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

GATEWAY_CHANNELS = (4, 8, 16, 32, 64)


def smooth_batch(rng: np.random.Generator, count: int, patch: Sequence[int],
                 in_channels: int = 1) -> np.ndarray:
    """``count`` z-scored smooth random volumes, (count, in_channels, *patch) float32."""
    from scipy import ndimage

    noise = rng.normal(size=(count, in_channels, *patch)).astype(np.float32)
    sigma = (0, 0) + (max(1.0, patch[0] / 8),) * len(patch)
    blobs = ndimage.gaussian_filter(noise, sigma=sigma)
    return (blobs - blobs.mean()) / blobs.std()


def train_tiny_net(spatial_dims: int, num_classes: int, patch: Sequence[int], *,
                   in_channels: int = 1, channels: Sequence[int] = GATEWAY_CHANNELS,
                   steps: int = 8, seed: int = 0,
                   encoder_dropout: Sequence[float] | None = None) -> Any:
    """A narrow SFPCNet trained ``steps`` SGD steps at one torch thread; eval mode. No encoder
    dropout unless ``encoder_dropout`` gives its rates."""
    import torch

    from sfpc.model.networks import NetConfig, SFPCNet

    torch.manual_seed(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = NetConfig(spatial_dims=spatial_dims, in_channels=in_channels,
                        num_classes=num_classes, channels=tuple(channels),
                        encoder_dropout=tuple(encoder_dropout or (0.0,) * len(channels)))
        net = SFPCNet(cfg)
        opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
        rng = np.random.default_rng(seed)
        net.train()
        for _ in range(steps):
            x = smooth_batch(rng, 4, patch, in_channels)
            edges = np.quantile(x[:, 0], np.linspace(0, 1, num_classes + 1)[1:-1])
            y = torch.from_numpy(np.digitize(x[:, 0], edges))
            out = net.forward_train(torch.from_numpy(x), n_unlabelled=2, m=4)
            loss = (torch.nn.functional.cross_entropy(out.logits, y) + out.perturbed.var()
                    + out.recon.square().mean())
            opt.zero_grad()
            loss.backward()
            opt.step()
        # A few steps leave BatchNorm's running statistics near their init, and eval outputs
        # collapse to one class; re-estimate them as a plain average over a few batches.
        norms = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        for m in norms:
            m.reset_running_stats()
            m.momentum = None
        with torch.no_grad():
            for _ in range(3):
                net(torch.from_numpy(smooth_batch(rng, 4, patch, in_channels)))
            for m in norms:
                m.momentum = 0.1
            flpm = net.flpm()
            flpm.running_dmu.uniform_(0.2, 0.5)
            flpm.running_dsigma.uniform_(0.2, 0.5)
    finally:
        torch.set_num_threads(threads)
    return net.eval()


def export_tiny_model(out_dir: Path, spatial_dims: int, *, name: str, num_classes: int,
                      steps: int = 8, seed: int = 0) -> Path:
    """Train a tiny SFPCNet briefly and export it for the gateway to ``out_dir``; returns it."""
    import torch

    from sfpc.inference.contract import ModelMetadata
    from sfpc.model.export import export_model

    patch = (32, 32, 32) if spatial_dims == 3 else (64, 64)
    net = train_tiny_net(spatial_dims, num_classes, patch, steps=steps, seed=seed)
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
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        export_model(net, meta, out_dir)
    finally:
        torch.set_num_threads(threads)
    return out_dir


_EXPORTED: dict[Path, dict[str, Path]] = {}


def tiny_models(base: Path) -> dict[str, Path]:
    """The two gateway test models, exported once per test session (``base``: the session's
    temporary root) and shared by every server test module: "tiny3d" (2 classes) and "tiny2d"
    (3)."""
    if base not in _EXPORTED:
        root = base / "gateway-models"
        root.mkdir(parents=True, exist_ok=True)
        _EXPORTED[base] = {
            "tiny3d": export_tiny_model(root / "m3d", 3, name="tiny3d", num_classes=2),
            "tiny2d": export_tiny_model(root / "m2d", 2, name="tiny2d", num_classes=3, seed=1),
        }
    return _EXPORTED[base]


def session_model(tmp_path_factory: Any) -> Path:
    """The jobs tests' tiny 3D model (3 classes), exported once per pytest session."""
    out = tmp_path_factory.getbasetemp() / "jobs-model-3d"
    if not (out / "sfpc_model.json").is_file():
        out.mkdir(parents=True, exist_ok=True)
        export_tiny_model(out, 3, name="jobs3d", num_classes=3, steps=4)
    return out


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
    import torch

    from sfpc.inference.contract import (
        INPUT_NAME,
        METADATA_FILE,
        UNCERTAINTY_OUTPUTS,
        sha256_file,
    )
    from sfpc.model.export import _export
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
