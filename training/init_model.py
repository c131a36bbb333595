"""Start training from trained weights (``sfpc train --init``): a checkpoint of ``sfpc train``, or
an export folder such as the shipped default model, which has ONNX graphs and no torch checkpoint.

From an export the segmentation path (encoder, segmentation decoder, classifier) is read back
from ``seg.onnx``. The exporter folded each 2D BatchNorm into the convolution before it, so a
folded pair comes back as the fused convolution and a BatchNorm whose statistics are measured on
the first training batches: running mean mu and variance sigma^2 - eps of the fused convolution's
output, weight sigma and bias mu. In eval mode that BatchNorm is the identity, so the model
reproduces the export exactly (checked against ONNX Runtime on those batches); in train mode it
normalises with batch statistics close to mu and sigma, so training starts from the exported
model's behaviour. FLPM's running spreads come from the uncertainty graph; the reconstruction
decoder (training-only, never exported) starts fresh.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from sfpc.model.networks import SFPCNet

_CONV = (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_NORM = (nn.BatchNorm2d, nn.BatchNorm3d, nn.InstanceNorm2d, nn.InstanceNorm3d)
_ONNX_CONV = {"Conv": (nn.Conv2d, nn.Conv3d), "ConvTranspose": (nn.ConvTranspose2d,
                                                                nn.ConvTranspose3d)}


def load_initial_weights(net: SFPCNet, source: str | Path,
                         batches: Sequence[torch.Tensor],
                         context_slices: int | None = None) -> list[str]:
    """Load ``source`` (checkpoint file or export folder) into ``net``; ``batches`` are input
    batches (N, C, *spatial) on the model grid, used by an export's folded BatchNorms. Returns
    lines saying what was loaded and what starts fresh. ``context_slices``: the run's (its
    network's channels are neighbour slices of a 2.5D model); a source trained with another
    number is refused, naming the flag (None: not checked)."""
    path = Path(source)
    if path.is_dir():
        return _from_export(net, path, batches, context_slices)
    return _from_checkpoint(net, path, context_slices)


def _check_context(path: Path, theirs: int, ours: int | None) -> None:
    """Stacked neighbour slices are the first convolution's input channels: weights trained on
    another stack would load (a checkpoint's first layer kept fresh, or fail on its shape) with
    a message about classes or channels, not about the flag to change."""
    if ours is None or int(theirs) == int(ours):
        return
    raise ValueError(f"--init {path} was trained with {theirs} neighbouring slice(s) on each "
                     f"side as channels (context_slices {theirs}) and this run has "
                     f"{ours}: its weights expect --context-slices {theirs} (with its slice "
                     "spacing, --spacing); `sfpc train` takes both from --init unless told "
                     "otherwise or run with --no-plan")


def _fresh(names: Sequence[str]) -> str:
    """Module prefixes of parameters that start fresh, e.g. recon_decoder, recon_head."""
    heads = sorted({n.split(".")[0] for n in names})
    return ", ".join(heads) if heads else "nothing"


def _from_checkpoint(net: SFPCNet, path: Path, context_slices: int | None = None) -> list[str]:
    ck = torch.load(path, map_location="cpu", weights_only=False)
    state = ck.get("model", ck) if isinstance(ck, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"--init {path}: not a checkpoint of sfpc train (no 'model' weights)")
    meta = ck.get("metadata") or {}
    if meta:  # checkpoints before the field hold plain 2D or 3D models
        _check_context(path, int(meta.get("context_slices") or 0), context_slices)
    own = net.state_dict()
    take = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    differ = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if not take:
        raise ValueError(f"--init {path}: none of its weights fit this network (other channels "
                         "or dimensions?)")
    net.load_state_dict(take, strict=False)
    fresh = [k for k in own if k not in take]
    lines = [f"init: {len(take)} of {len(own)} tensors from {path}; fresh: {_fresh(fresh)}"]
    if differ:
        lines.append(f"init: shapes differ, kept fresh: {', '.join(differ[:6])} (another number "
                     "of classes?)")
    return lines


def _call_order(net: SFPCNet, example: torch.Tensor) -> list[nn.Module]:
    """Convolutions and norms of the exported path, in the order a forward pass runs them."""
    order: list[nn.Module] = []
    hooks = [m.register_forward_hook(lambda mod, i, o: order.append(mod))
             for m in net.modules() if isinstance(m, _CONV + _NORM)]
    try:
        with torch.no_grad():
            net(example)
    finally:
        for h in hooks:
            h.remove()
    return order


def _from_export(net: SFPCNet, folder: Path, batches: Sequence[torch.Tensor],
                 context_slices: int | None = None) -> list[str]:
    import onnx
    from onnx import numpy_helper

    from sfpc.inference.contract import INPUT_NAME, SEG_GRAPH, ModelMetadata

    meta = ModelMetadata.load(folder)
    _check_context(folder, meta.context_slices, context_slices)
    graph_file = folder / meta.graphs[SEG_GRAPH]["file"]
    model = onnx.load(str(graph_file))
    weights = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    nodes = [n for n in model.graph.node
             if n.op_type in ("Conv", "ConvTranspose", "BatchNormalization",
                              "InstanceNormalization")]
    if not batches:
        raise ValueError("--init from an export needs a batch of training images")
    was_training = net.training
    net.eval()
    order = _call_order(net, batches[0][:1])
    folded: list[nn.Module] = []
    loaded = set()
    pos = 0

    def take(name: str, module: nn.Module, attr: str) -> None:
        value = torch.from_numpy(np.array(weights[name]))
        target = getattr(module, attr)
        if tuple(value.shape) != tuple(target.shape):
            raise ValueError(f"--init {folder}: {graph_file.name} has {name} of shape "
                             f"{tuple(value.shape)} where this network has {tuple(target.shape)}"
                             " (other classes, channels or dimensions?)")
        with torch.no_grad():
            target.copy_(value)
        loaded.add(id(target))

    for module in order:
        node = nodes[pos] if pos < len(nodes) else None
        if isinstance(module, _CONV):
            if node is None or not isinstance(module, _ONNX_CONV.get(node.op_type, ())):
                raise ValueError(f"--init {folder}: {graph_file.name} does not match this "
                                 "network's layers (was it exported from another network?)")
            take(node.input[1], module, "weight")
            if len(node.input) > 2 and node.input[2]:
                if module.bias is None:
                    raise ValueError(f"--init {folder}: the graph has a bias this network lacks")
                take(node.input[2], module, "bias")
            elif module.bias is not None:
                with torch.no_grad():
                    module.bias.zero_()
            pos += 1
        elif node is not None and node.op_type in ("BatchNormalization", "InstanceNormalization"):
            take(node.input[1], module, "weight")
            take(node.input[2], module, "bias")
            if node.op_type == "BatchNormalization":
                take(node.input[3], module, "running_mean")
                take(node.input[4], module, "running_var")
            pos += 1
        elif isinstance(module, (nn.BatchNorm2d, nn.BatchNorm3d)):
            folded.append(module)  # folded into the convolution just loaded
            with torch.no_grad():
                module.weight.fill_(1.0)
                module.bias.zero_()
                module.running_mean.zero_()
                module.running_var.fill_(1.0 - module.eps)  # exactly the identity in eval
        else:
            raise ValueError(f"--init {folder}: a {type(module).__name__} of this network has "
                             f"no counterpart in {graph_file.name}")
    if pos != len(nodes):
        raise ValueError(f"--init {folder}: {graph_file.name} has {len(nodes) - pos} layers more "
                         "than this network")
    _measure_folded(net, folded, batches)
    _check_against_onnx(net, graph_file, INPUT_NAME, batches[0])
    spreads = _load_flpm_spreads(net, folder, meta)
    net.train(was_training)
    exported = {id(p) for m in order for p in m.parameters(recurse=False)}
    fresh = [n for n, p in net.named_parameters() if id(p) not in exported]
    return [f"init: the segmentation path of {meta.name} from {graph_file} ({len(order)} "
            f"layers, {len(folded)} folded BatchNorms re-expanded on "
            f"{sum(len(b) for b in batches)} training images, checked against ONNX Runtime)"
            + (", FLPM's running spreads from the uncertainty graph" if spreads else "")
            + f"; fresh: {_fresh(fresh)}"]


def _load_flpm_spreads(net: SFPCNet, folder: Path, meta: object) -> bool:
    """FLPM's running spreads live in the uncertainty graph: taking them keeps the served
    uncertainty of a model fine-tuned without FLPM (e.g. --method supervised) as it was."""
    import onnx
    from onnx import numpy_helper

    from sfpc.inference.contract import UNCERTAINTY_GRAPH

    flpm = net.flpm()
    graphs = getattr(meta, "graphs", {})
    if flpm is None or UNCERTAINTY_GRAPH not in graphs:
        return False
    graph = onnx.load(str(folder / graphs[UNCERTAINTY_GRAPH]["file"])).graph
    found = {i.name.rsplit(".", 1)[-1]: numpy_helper.to_array(i) for i in graph.initializer
             if i.name.endswith(("perturbation.running_dmu", "perturbation.running_dsigma"))}
    if set(found) != {"running_dmu", "running_dsigma"} or (
            found["running_dmu"].shape != tuple(flpm.running_dmu.shape)):
        return False
    with torch.no_grad():
        flpm.running_dmu.copy_(torch.from_numpy(np.array(found["running_dmu"])))
        flpm.running_dsigma.copy_(torch.from_numpy(np.array(found["running_dsigma"])))
        flpm.num_batches_tracked.fill_(1)  # training continues the average, not a restart
    return True


def _measure_folded(net: SFPCNet, folded: list[nn.Module], batches: Sequence[torch.Tensor]
                    ) -> None:
    """Per folded BatchNorm, the mean and variance of its input over the batches (eval mode,
    where it is the identity), then the affine that keeps it the identity in eval mode."""
    if not folded:
        return
    sums = {id(m): [0.0, 0.0, 0] for m in folded}

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], _out: torch.Tensor) -> None:
        x = inputs[0].detach().double()
        dims = [0, *range(2, x.dim())]
        acc = sums[id(module)]
        acc[0] = acc[0] + x.sum(dim=dims)
        acc[1] = acc[1] + (x * x).sum(dim=dims)
        acc[2] += x.numel() // x.shape[1]

    hooks = [m.register_forward_hook(hook) for m in folded]
    try:
        with torch.no_grad():
            for batch in batches:
                net(batch)
    finally:
        for h in hooks:
            h.remove()
    with torch.no_grad():
        for m in folded:
            total, squares, n = sums[id(m)]
            mean = total / n
            var = (squares / n - mean * mean).clamp_min(2 * m.eps)
            m.running_mean.copy_(mean.float())
            m.running_var.copy_((var - m.eps).float())
            m.weight.copy_(var.sqrt().float())
            m.bias.copy_(mean.float())


def _check_against_onnx(net: SFPCNet, graph_file: Path, input_name: str,
                        batch: torch.Tensor) -> None:
    import onnxruntime as ort

    x = batch[: min(4, len(batch))].float()
    session = ort.InferenceSession(str(graph_file), providers=["CPUExecutionProvider"])
    expected = session.run(None, {input_name: x.cpu().numpy()})[0]
    with torch.no_grad():
        got = net(x).cpu().numpy()
    scale = float(np.abs(expected).max()) or 1.0
    error = float(np.abs(got - expected).max()) / scale
    if not error < 1e-3:
        raise RuntimeError(f"weights read back from {graph_file} do not reproduce it (relative "
                           f"error {error:.2e}); the export and this network differ")
