"""Export a trained checkpoint to ONNX: the plain segmentation graph and the multi-sample
uncertainty graph, plus the metadata file that serving reads.

Only encoder + segmentation decoder go out (no reconstruction decoder, no baseline heads). The
uncertainty graph applies FLPM M times on the fixed eps grid, with the running dMu/dSigma
buffers, and returns the mean probabilities and the mean per-sample entropy.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import numpy as np
import torch

import sfpc
from sfpc.model.metadata import METADATA_FILE, ModelMetadata, sha256_file
from sfpc.model.networks import NetConfig, SFPCNet, UncertaintyHead
from sfpc.model.perturbation import eps_grid

SEG_FILE = "seg.onnx"
UNCERTAINTY_FILE = "seg_uncertainty.onnx"
INPUT_NAME = "image"
SEG_OUTPUTS = ("logits",)
UNCERTAINTY_OUTPUTS = ("mean_probs", "mean_entropy")
OPSET = 17


def load_checkpoint(path: str | Path, map_location: str = "cpu") -> tuple[SFPCNet, ModelMetadata]:
    """Rebuild the network from a trainer checkpoint and return it (eval mode) with its metadata."""
    ck = torch.load(path, map_location=map_location, weights_only=False)
    net = SFPCNet(NetConfig.from_dict(ck["net_config"]))
    net.load_state_dict(ck["model"])
    net.eval()
    return net, ModelMetadata.from_dict(ck["metadata"])


def _export(module: torch.nn.Module, example: torch.Tensor, path: Path,
            outputs: tuple[str, ...], dynamic_spatial: bool) -> None:
    axes = {0: "batch"}
    if dynamic_spatial:
        axes.update({i: f"dim{i - 2}" for i in range(2, example.dim())})
    dynamic = {name: dict(axes) for name in (INPUT_NAME, *outputs)}
    module.eval()
    with warnings.catch_warnings():
        # The TorchScript exporter warns about its own deprecation; the dynamo exporter needs
        # onnxscript and does not yet handle our data-dependent reshapes as cleanly.
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (example,), str(path), dynamo=False, input_names=[INPUT_NAME],
                          output_names=list(outputs), dynamic_axes=dynamic, opset_version=OPSET,
                          do_constant_folding=True)
    module.eval()  # the exporter restores the module's previous mode; keep eval


def export_model(
    net: SFPCNet,
    meta: ModelMetadata,
    out_dir: str | Path,
    *,
    m: int | None = None,
    dynamic_spatial: bool = True,
    name: str | None = None,
    version: str | None = None,
) -> ModelMetadata:
    """Write seg.onnx, seg_uncertainty.onnx (when the net has FLPM) and sfpc_model.json."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    net = net.cpu().eval()
    example = torch.zeros(1, meta.in_channels, *meta.patch_size)
    meta = ModelMetadata.from_dict(meta.to_dict())  # never mutate the caller's copy
    if name:
        meta.name = name
    if version:
        meta.version = version
    meta.dynamic_spatial = dynamic_spatial
    meta.graphs = {}
    _export(net, example, out / SEG_FILE, SEG_OUTPUTS, dynamic_spatial)
    meta.graphs["seg"] = {"file": SEG_FILE, "sha256": sha256_file(out / SEG_FILE)}
    if net.flpm() is not None:
        m = int(m or meta.perturbation.get("M") or 4)
        tau = float(net.flpm().tau)
        _export(UncertaintyHead(net, m), example, out / UNCERTAINTY_FILE, UNCERTAINTY_OUTPUTS,
                dynamic_spatial)
        meta.graphs["uncertainty"] = {"file": UNCERTAINTY_FILE,
                                      "sha256": sha256_file(out / UNCERTAINTY_FILE)}
        meta.perturbation = {"kind": "flpm", "M": m, "tau": tau, "eps_grid": eps_grid(m, tau),
                             "running_dmu_mean": float(net.flpm().running_dmu.mean()),
                             "running_dsigma_mean": float(net.flpm().running_dsigma.mean())}
    else:
        meta.perturbation = {"kind": None, "M": 0, "tau": 0.0, "eps_grid": []}
    meta.sfpc_version = sfpc.__version__
    meta.created = meta.created or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    meta.save(out / METADATA_FILE)
    return meta


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, **kwargs) -> ModelMetadata:
    net, meta = load_checkpoint(checkpoint)
    return export_model(net, meta, out_dir, **kwargs)


def parity(
    net: SFPCNet, export_dir: str | Path, batch: np.ndarray
) -> dict[str, float]:
    """Max absolute difference between ONNX Runtime and PyTorch eval outputs on `batch`."""
    import onnxruntime as ort

    out = Path(export_dir)
    meta = ModelMetadata.load(out)
    net = net.cpu().eval()
    x = torch.from_numpy(batch)
    diffs: dict[str, float] = {}
    with torch.no_grad():
        ref = {"logits": net(x).numpy()}
        if meta.has_uncertainty:
            mp, me = UncertaintyHead(net, meta.perturbation["M"]).eval()(x)
            ref.update(mean_probs=mp.numpy(), mean_entropy=me.numpy())
    for key, graph in meta.graphs.items():
        sess = ort.InferenceSession(str(out / graph["file"]), providers=["CPUExecutionProvider"])
        names = [o.name for o in sess.get_outputs()]
        for nm, val in zip(names, sess.run(None, {INPUT_NAME: batch}), strict=True):
            diffs[f"{key}.{nm}"] = float(np.abs(val - ref[nm]).max())
    return diffs
