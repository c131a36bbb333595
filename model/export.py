"""Export a trained checkpoint to ONNX: the plain segmentation graph and the multi-sample
uncertainty graph, plus the metadata file that serving reads.

Only encoder + segmentation decoder go out (no reconstruction decoder, no baseline heads). The
uncertainty graph applies FLPM M times on the fixed eps grid, with the running dMu/dSigma
buffers, divides each sample's logits by its `temperature` input ([B, 1], batch-dimensioned so
that Triton can batch requests) and returns the mean probabilities and the mean per-sample
entropy. It is the "folded" graph by default (FLPM folded into the classifier weights) or the
"stacked" one (the perturbed feature stack as written in the equations); see UncertaintyHead.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import numpy as np
import torch

import sfpc
from sfpc.inference.contract import (
    INPUT_NAME,
    METADATA_FILE,
    PLAIN_OUTPUTS,
    SEG_GRAPH,
    TEMPERATURE_NAME,
    UNCERTAINTY_GRAPH,
    UNCERTAINTY_METHODS,
    UNCERTAINTY_OUTPUTS,
    ModelMetadata,
    load_metadata,
    sha256_file,
)
from sfpc.model.networks import UNCERTAINTY_GRAPHS, NetConfig, SFPCNet, UncertaintyHead
from sfpc.model.perturbation import eps_grid
from sfpc.model.shared_weights import WEIGHTS_FILE, share_weights
from sfpc.model.uncertainty_heads import (
    EnsembleHead,
    EnsembleNet,
    MCDropoutHead,
    Spreads,
    StageFLPMHead,
    dropout_rates,
    spreads_from_json,
    spreads_to_json,
)

# File names are recorded in the metadata ('graphs'), so readers never assume them.
SEG_FILE = "seg.onnx"
UNCERTAINTY_FILE = "seg_uncertainty.onnx"
OPSET = 17


def load_checkpoint(path: str | Path, map_location: str = "cpu") -> tuple[SFPCNet, ModelMetadata]:
    """Rebuild the network from a trainer checkpoint and return it (eval mode) with its metadata."""
    ck = torch.load(path, map_location=map_location, weights_only=False)
    net = SFPCNet(NetConfig.from_dict(ck["net_config"]))
    net.load_state_dict(ck["model"])
    net.eval()
    return net, ModelMetadata.from_dict(ck["metadata"])


def _export(module: torch.nn.Module, example: tuple[torch.Tensor, ...], path: Path,
            inputs: tuple[str, ...], outputs: tuple[str, ...], dynamic_spatial: bool) -> None:
    spatial = {0: "batch"}
    if dynamic_spatial:
        spatial.update({i: f"dim{i - 2}" for i in range(2, example[0].dim())})
    # The image and every output carry the spatial axes; further inputs ([B, 1] temperature)
    # share only the batch axis, under the same name so that runtimes know they agree.
    dynamic = {name: dict(spatial) for name in (inputs[0], *outputs)}
    dynamic.update({name: {0: "batch"} for name in inputs[1:]})
    module.eval()
    with warnings.catch_warnings():
        # The TorchScript exporter warns about its own deprecation; the dynamo exporter needs
        # onnxscript and does not yet handle our data-dependent reshapes as cleanly.
        warnings.simplefilter("ignore")
        torch.onnx.export(module, example, str(path), dynamo=False, input_names=list(inputs),
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
    uncertainty_graph: str = "folded",
    serving_tau: float | None = None,
    inline_weights: bool = False,
    uncertainty_method: str = "flpm",
    stage_spreads: Spreads | None = None,
) -> ModelMetadata:
    """Write seg.onnx, seg_uncertainty.onnx (when the net has FLPM), weights.bin and
    sfpc_model.json.

    ``uncertainty_graph`` is "folded" (default) or "stacked" (UncertaintyHead); both compute
    the same outputs and take the same inputs, and the choice is recorded in the metadata.
    ``serving_tau`` sets the FLPM range of the uncertainty graph only (the segmentation graph
    has no perturbation); unset, the training tau is kept. The metadata records both.
    The graphs' weights are stored once, in weights.bin, which both graphs reference as ONNX
    external data (sfpc.model.shared_weights); ``inline_weights`` keeps them inside each graph
    instead (single-file graphs, the weights twice).
    ``uncertainty_method`` picks what the uncertainty graph samples (contract
    UNCERTAINTY_METHODS, sfpc.model.uncertainty_heads): "flpm" (default), "flpm_stages" (FLPM
    at the decoder depths of ``stage_spreads``, which :func:`stage_spreads` measures; depth 0
    is the trained module), "mc_dropout" (M encoder-dropout samples). Ensembles:
    :func:`export_ensemble`.
    """
    if uncertainty_method not in UNCERTAINTY_METHODS or uncertainty_method == "ensemble":
        choices = [m for m in UNCERTAINTY_METHODS if m != "ensemble"]
        raise ValueError(f"uncertainty_method must be one of {choices} (ensembles: "
                         f"export_ensemble), not {uncertainty_method!r}")
    if uncertainty_method == "flpm_stages" and not stage_spreads:
        raise ValueError("flpm_stages needs the spreads of its decoder depths (stage_spreads)")
    if uncertainty_graph not in UNCERTAINTY_GRAPHS:
        raise ValueError(f"uncertainty_graph must be one of {UNCERTAINTY_GRAPHS}, "
                         f"not {uncertainty_graph!r}")
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
    _export(net, (example,), out / SEG_FILE, (INPUT_NAME,), PLAIN_OUTPUTS, dynamic_spatial)
    meta.graphs[SEG_GRAPH] = {"file": SEG_FILE}
    m = int(m or meta.perturbation.get("M") or 4)
    if uncertainty_method == "mc_dropout":
        head: torch.nn.Module | None = MCDropoutHead(net, m)
        meta.uncertainty_graph = "stacked"
        meta.perturbation = {"kind": "mc_dropout", "M": m, "tau": None, "eps_grid": [],
                             "dropout": dropout_rates(net),
                             "training_tau": meta.perturbation.get("training_tau")
                             or meta.perturbation.get("tau")}
    elif net.flpm() is not None:
        flpm = net.flpm()
        training_tau = float(meta.perturbation.get("training_tau") or flpm.tau)
        tau = float(flpm.tau if serving_tau is None else serving_tau)
        if tau <= 0:
            raise ValueError(f"serving_tau must be > 0, got {tau}")
        meta.perturbation = {"kind": "flpm", "M": m, "tau": tau, "eps_grid": eps_grid(m, tau),
                             "training_tau": training_tau,
                             "running_dmu_mean": float(flpm.running_dmu.mean()),
                             "running_dsigma_mean": float(flpm.running_dsigma.mean())}
        if uncertainty_method == "flpm_stages":
            head = StageFLPMHead(net, m, stage_spreads or {}, tau)
            meta.uncertainty_graph = "stacked"
            meta.perturbation["depths"] = head.depths
            meta.perturbation["stage_spreads"] = spreads_to_json(head.spreads())
        else:
            head = UncertaintyHead(net, m, uncertainty_graph)
            meta.uncertainty_graph = uncertainty_graph
    else:
        if uncertainty_method != "flpm":
            raise ValueError(f"{uncertainty_method} needs a network trained with FLPM")
        head = None
    if head is not None:
        _export_uncertainty(head, net, example, out, dynamic_spatial,
                            tau=meta.perturbation.get("tau"))
        meta.uncertainty_method = uncertainty_method
        meta.graphs[UNCERTAINTY_GRAPH] = {"file": UNCERTAINTY_FILE}
    else:
        meta.perturbation = {"kind": None, "M": 0, "tau": 0.0, "eps_grid": []}
        meta.uncertainty_graph = ""
        meta.uncertainty_method = ""
    return _finish(meta, out, inline_weights)


def _export_uncertainty(head: torch.nn.Module, net: SFPCNet, example: torch.Tensor, out: Path,
                        dynamic_spatial: bool, tau: float | None) -> None:
    flpm = net.flpm()
    kept = flpm.tau if flpm is not None else None
    if flpm is not None and tau is not None:
        flpm.tau = float(tau)  # the folded and stacked heads read tau while they are traced
    try:
        _export(head, (example, torch.ones(1, 1)), out / UNCERTAINTY_FILE,
                (INPUT_NAME, TEMPERATURE_NAME), UNCERTAINTY_OUTPUTS, dynamic_spatial)
    finally:
        if flpm is not None:
            flpm.tau = kept


def _finish(meta: ModelMetadata, out: Path, inline_weights: bool) -> ModelMetadata:
    files = [entry["file"] for entry in meta.graphs.values()]
    if inline_weights:
        (out / WEIGHTS_FILE).unlink(missing_ok=True)  # a shared export's, written before
        meta.weights = {}
    else:
        meta.weights = share_weights(out, files)
    for entry in meta.graphs.values():  # the graphs as they are now
        entry["sha256"] = sha256_file(out / entry["file"])
    meta.sfpc_version = sfpc.__version__
    meta.created = meta.created or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    meta.save(out / METADATA_FILE)
    return meta


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, **kwargs) -> ModelMetadata:
    net, meta = load_checkpoint(checkpoint)
    return export_model(net, meta, out_dir, **kwargs)


def export_ensemble(
    checkpoints: list[str | Path],
    out_dir: str | Path,
    *,
    dynamic_spatial: bool = True,
    name: str | None = None,
    version: str | None = None,
    inline_weights: bool = False,
) -> ModelMetadata:
    """A deep ensemble of ``checkpoints`` as one export: the segmentation graph returns the log
    of the members' mean probabilities, the uncertainty graph their mean and mean entropy (one
    sample per member). The members must share the serving contract (grid, window, classes)."""
    if len(checkpoints) < 2:
        raise ValueError("an ensemble needs at least two checkpoints")
    loaded = [load_checkpoint(c) for c in checkpoints]
    first = loaded[0][1].to_dict()
    keys = ("spatial_dims", "in_channels", "context_slices", "num_classes", "class_names",
            "orientation", "plane", "spacing", "input_mode", "resampling", "patch_size",
            "normalisation")
    for path, (_, meta) in zip(checkpoints[1:], loaded[1:], strict=True):
        member = meta.to_dict()
        differ = [k for k in keys if member[k] != first[k]]
        if differ:
            raise ValueError(f"{path} serves differently from {checkpoints[0]}: {differ}")
    nets = [net.cpu().eval() for net, _ in loaded]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = ModelMetadata.from_dict(first)
    meta.name, meta.version = name or meta.name, version or meta.version
    meta.dynamic_spatial = dynamic_spatial
    example = torch.zeros(1, meta.in_channels, *meta.patch_size)
    _export(EnsembleNet(nets), (example,), out / SEG_FILE, (INPUT_NAME,), PLAIN_OUTPUTS,
            dynamic_spatial)
    _export(EnsembleHead(nets), (example, torch.ones(1, 1)), out / UNCERTAINTY_FILE,
            (INPUT_NAME, TEMPERATURE_NAME), UNCERTAINTY_OUTPUTS, dynamic_spatial)
    meta.graphs = {SEG_GRAPH: {"file": SEG_FILE}, UNCERTAINTY_GRAPH: {"file": UNCERTAINTY_FILE}}
    meta.uncertainty_method, meta.uncertainty_graph = "ensemble", "stacked"
    meta.perturbation = {"kind": "ensemble", "M": len(nets), "tau": None, "eps_grid": []}
    meta.net = {"ensemble": [m.net for _, m in loaded]}
    meta.training = {"ensemble": [{"checkpoint": str(c), **m.training}
                                  for c, (_, m) in zip(checkpoints, loaded, strict=True)]}
    meta.metrics, meta.quality, meta.temperature, meta.created = {}, {}, 1.0, ""
    return _finish(meta, out, inline_weights)


def reference_head(net: SFPCNet, meta: ModelMetadata) -> torch.nn.Module:
    """The torch module an export's uncertainty graph was traced from (FLPM: the "stacked"
    equations as written, whichever graph was exported)."""
    p, method = meta.perturbation, meta.uncertainty_method or "flpm"
    if method == "mc_dropout":
        return MCDropoutHead(net, p["M"])
    if method == "flpm_stages":
        return StageFLPMHead(net, p["M"], spreads_from_json(p.get("stage_spreads", {})),
                             p["tau"])
    if method != "flpm":
        raise ValueError(f"no single-network reference for {method!r}")
    return UncertaintyHead(net, p["M"], "stacked")


def parity(
    net: SFPCNet, export_dir: str | Path, batch: np.ndarray, temperature: float = 1.0
) -> dict[str, float]:
    """Max absolute difference between ONNX Runtime and PyTorch eval outputs on `batch`.

    The reference for the uncertainty graph is the "stacked" UncertaintyHead, FLPM's equations
    as written, whichever graph was exported: a folded export is checked against them too.
    `temperature` is fed to graphs that take it (exports from before it existed do not).
    """
    import onnxruntime as ort

    out = Path(export_dir)
    meta = load_metadata(out)
    net = net.cpu().eval()
    x = torch.from_numpy(batch)
    t = np.full((batch.shape[0], 1), temperature, dtype=np.float32)
    diffs: dict[str, float] = {}
    with torch.no_grad():
        ref = {PLAIN_OUTPUTS[0]: net(x).numpy()}
        if meta.has_uncertainty:
            head = reference_head(net, meta).eval()
            mp, me = head(x, torch.from_numpy(t))
            ref.update(zip(UNCERTAINTY_OUTPUTS, (mp.numpy(), me.numpy()), strict=True))
    for key, graph in meta.graphs.items():
        sess = ort.InferenceSession(str(out / graph["file"]), providers=["CPUExecutionProvider"])
        feeds = {INPUT_NAME: batch}
        if TEMPERATURE_NAME in {i.name for i in sess.get_inputs()}:
            feeds[TEMPERATURE_NAME] = t
        names = [o.name for o in sess.get_outputs()]
        for nm, val in zip(names, sess.run(None, feeds), strict=True):
            diffs[f"{key}.{nm}"] = float(np.abs(val - ref[nm]).max())
    return diffs
