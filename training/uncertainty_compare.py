"""Uncertainty methods side by side on one torch model and the same cases, with their cost.

- ``softmax``: one plain pass; the map is the normalised entropy of softmax(logits / T).
- ``flpm``: one pass through E + G1, FLPM applied M times on the fixed eps grid before the
  classifier, through the module the exported uncertainty graph is traced from
  (:class:`~sfpc.model.networks.UncertaintyHead`, its default graph), with the temperature.
- ``mc_dropout``: M plain passes with the dropout layers in training mode (everything else,
  BatchNorm included, in eval mode), for a network trained with dropout (the encoder dropout of
  the SSL4MIS UNet, ``NetConfig.encoder_dropout``).
- ``tta_flip``: M plain passes on flipped inputs (identity, then single axes, pairs, ...), each
  prediction flipped back.
- ``flpm_flip`` (not in the default list): the FLPM pass on the input and on its flip along the
  first spatial axis, flipped back: 2 passes, 2 M samples. Whether half of TTA's passes with
  FLPM's samples in each can match TTA's error detection.

Every method returns the mean probabilities p_bar and mean per-sample entropy of its M softmax
outputs (M = 1 for softmax), stitched by the serving engine's model-grid inference; maps are the
normalised predictive entropy and, for M > 1, mutual information (sfpc/inference/uncertainty.py).
Each method is scored against the errors of its own argmax(p_bar), with the scorer of
training/uncertainty_eval.py. Cost: wall time of the whole model-grid inference and the time
inside the network calls, per method, after one untimed warm-up run of every method.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from sfpc.inference.contract import PLANE_CODES, ModelMetadata
from sfpc.inference.contract import plane_axis as contract_plane_axis
from sfpc.inference.engine import model_grid_settings, predict_model_grid
from sfpc.inference.uncertainty import DEFAULT_BAND, region_statistics, uncertainty_maps
from sfpc.model.networks import SFPCNet, UncertaintyHead
from sfpc.training.uncertainty_eval import UncertaintyScorer, foreground_dice
from sfpc.training.uncertainty_metrics import DEFAULT_BINS, paired_auroc_difference

METHODS = ("softmax", "flpm", "mc_dropout", "tta_flip")
EXTRA_METHODS = ("flpm_flip",)
PASSES = {"softmax": 1, "flpm": 1, "flpm_flip": 2}  # others: M
_DROPOUT_TYPES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
                  nn.FeatureAlphaDropout)


def flip_combos(spatial_dims: int, m: int) -> list[tuple[int, ...]]:
    """The first ``m`` sets of spatial axes to flip: (), (0,), (1,), ..., (0, 1), ..."""
    combos = [c for r in range(spatial_dims + 1)
              for c in itertools.combinations(range(spatial_dims), r)]
    if not 1 <= m <= len(combos):
        raise ValueError(f"flip TTA has 1..{len(combos)} distinct passes in {spatial_dims}D, "
                         f"asked for {m}")
    return combos[:m]


def dropout_layers(net: nn.Module) -> list[nn.Module]:
    """The dropout layers of ``net`` that drop something (p > 0)."""
    return [mod for mod in net.modules() if isinstance(mod, _DROPOUT_TYPES) and mod.p > 0]


@contextlib.contextmanager
def mc_dropout_mode(net: nn.Module) -> Iterator[None]:
    """``net`` in eval mode except its dropout layers; the previous modes are restored after."""
    layers = dropout_layers(net)
    if not layers:
        raise ValueError("MC dropout needs a network trained with dropout; this one has no "
                         "dropout layer with p > 0 (NetConfig.encoder_dropout)")
    was_training = net.training
    net.eval()
    for layer in layers:
        layer.train()
    try:
        yield
    finally:
        net.train(was_training)


def _moments(probs: torch.Tensor) -> dict[str, np.ndarray]:
    """(M, B, K, *sp) softmax samples -> numpy mean probs and mean entropy (as the graph)."""
    entropy = -(probs * torch.log(probs.clamp_min(1e-12))).sum(dim=2, keepdim=True)
    return {"mean_probs": probs.mean(dim=0).float().cpu().numpy(),
            "mean_entropy": entropy.mean(dim=0).float().cpu().numpy()}


class Timer:
    """Seconds spent inside network calls."""

    def __init__(self) -> None:
        self.seconds = 0.0

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds += time.perf_counter() - t0


def method_predictor(net: SFPCNet, method: str, *, m: int = 4, temperature: float = 1.0,
                     device: torch.device | None = None,
                     timer: Timer | None = None) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
    """The sliding-window ``predict(batch)`` of one method (see the module docstring)."""
    if method not in METHODS + EXTRA_METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS + EXTRA_METHODS}")
    if method in ("flpm", "flpm_flip") and net.flpm() is None:
        raise ValueError("FLPM uncertainty needs a network with an FLPM module")
    device = device or next(net.parameters()).device
    timer = timer or Timer()
    t = float(temperature)
    spatial = net.cfg.spatial_dims
    flips = {"tta_flip": flip_combos(spatial, m),
             "flpm_flip": flip_combos(spatial, 2)}.get(method, [])
    head = UncertaintyHead(net, m) if method in ("flpm", "flpm_flip") else None

    @torch.no_grad()
    def predict(batch: np.ndarray) -> dict[str, np.ndarray]:
        x = torch.from_numpy(np.ascontiguousarray(batch)).to(device)
        with timer():
            if method == "softmax":
                probs = torch.softmax(net(x) / t, dim=1)[None]
            elif method in ("flpm", "flpm_flip"):
                temp = torch.full((x.shape[0], 1), t, device=device, dtype=x.dtype)
                outs = []
                for axes in flips or [()]:
                    dims = [a + 2 for a in axes]
                    mean_probs, mean_entropy = head(torch.flip(x, dims) if dims else x, temp)
                    if dims:
                        mean_probs, mean_entropy = (torch.flip(mean_probs, dims),
                                                    torch.flip(mean_entropy, dims))
                    outs.append((mean_probs, mean_entropy))
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                # equal sample counts per pass: the mean of the pass means is the mean of all
                return {"mean_probs": torch.stack([o[0] for o in outs]).mean(0).float().cpu()
                        .numpy(),
                        "mean_entropy": torch.stack([o[1] for o in outs]).mean(0).float().cpu()
                        .numpy()}
            elif method == "mc_dropout":
                probs = torch.stack([torch.softmax(net(x) / t, dim=1) for _ in range(m)])
            else:
                samples = []
                for axes in flips:
                    dims = [a + 2 for a in axes]
                    xf = torch.flip(x, dims) if dims else x
                    logits = net(xf)
                    samples.append(torch.softmax((torch.flip(logits, dims) if dims else logits)
                                                 / t, dim=1))
                probs = torch.stack(samples)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        return _moments(probs)

    return predict


def _crop(array: np.ndarray, slices: Sequence[int] | None, axis: int) -> np.ndarray:
    if slices is None:
        return array
    index = [slice(None)] * array.ndim
    index[axis] = slice(int(slices[0]), int(slices[1]))
    return array[tuple(index)]


def _plain_metadata(net: SFPCNet, volumes: Sequence[Mapping[str, Any]],
                    patch_size: Sequence[int] | None, plane_axis: int,
                    input_mode: str) -> ModelMetadata:
    """The geometry compare_methods' arguments give, as metadata of a network without context
    slices (the engine's defaults for the inference settings)."""
    if patch_size is None:
        raise ValueError("compare_methods needs the network's metadata or its patch_size")
    channels = {int(np.shape(v["image"])[0]) for v in volumes}
    if net.cfg.spatial_dims == 2 and any(net.cfg.in_channels > c for c in channels):
        # A 2.5D network: which of its channels are neighbour slices only its metadata says.
        raise ValueError(f"the network takes {net.cfg.in_channels} channels and the volumes "
                         f"have {sorted(channels)}: a 2.5D network (context_slices); pass "
                         "metadata= (load_checkpoint's) so that its neighbour slices are stacked")
    planes = {contract_plane_axis(name): name for name in PLANE_CODES}
    return ModelMetadata(spatial_dims=net.cfg.spatial_dims, in_channels=net.cfg.in_channels,
                         patch_size=[int(p) for p in patch_size], plane=planes[plane_axis],
                         input_mode=input_mode)


def compare_methods(
    net: SFPCNet,
    volumes: Sequence[Mapping[str, Any]],
    *,
    class_names: Sequence[str],
    patch_size: Sequence[int] | None = None,
    methods: Sequence[str] = METHODS,
    m: int = 4,
    temperature: float = 1.0,
    plane_axis: int = 2,
    input_mode: str = "spacing",
    overlap: float | None = None,
    sw_batch_size: int | None = None,
    band: int = DEFAULT_BAND,
    n_bins: int = DEFAULT_BINS,
    seed: int = 0,
    device: torch.device | None = None,
    warmup: bool = True,
    progress: Callable[[str], None] | None = None,
    metadata: ModelMetadata | None = None,
) -> dict[str, Any]:
    """Score ``methods`` on preprocessed ``volumes`` (dicts with image, label, spacing, id and
    optional slices, as ``Volume.to_dict()``; labels on the model grid).

    ``metadata``: the network's (``load_checkpoint``'s); the windows then follow its grid
    settings as the serving engine's do (:func:`~sfpc.inference.engine.model_grid_settings`:
    patch, plane, input mode, a 2.5D model's ``context_slices``, overlap and batch from its
    ``inference`` unless given), and ``patch_size``, ``plane_axis`` and ``input_mode`` are
    ignored. Without it those arguments describe a plain 2D or 3D network (a network taking
    more channels than the volumes have, a 2.5D one, is refused: pass its metadata).

    Returns {"methods": {name: scorer summary + "seconds", "network_seconds",
    "relative_cost", "relative_network_cost", "passes"}, "settings": {...}}.
    """
    spatial_dims = net.cfg.spatial_dims
    meta = metadata if metadata is not None else _plain_metadata(
        net, volumes, patch_size, plane_axis, input_mode)
    if sw_batch_size is not None and spatial_dims == 2:
        sw_batch_size = max(sw_batch_size, 16)
    settings = model_grid_settings(meta, overlap=overlap, sw_batch_size=sw_batch_size)
    device = device or next(net.parameters()).device
    names = [str(c) for c in class_names]
    was_training = net.training
    net.eval()
    scorers: dict[str, UncertaintyScorer] = {}
    timers: dict[str, Timer] = {}
    wall: dict[str, float] = {}
    for method in methods:
        maps = ["entropy"] if method == "softmax" or m == 1 else ["entropy", "mutual_information"]
        # per-volume histograms kept for the paired case bootstrap of AUROC
        scorers[method] = UncertaintyScorer(names, maps, n_bins, keep_volume_histograms=True)
        timers[method], wall[method] = Timer(), 0.0

    def run(method: str, image: np.ndarray, timer: Timer) -> dict[str, np.ndarray]:
        predict = method_predictor(net, method, m=m, temperature=temperature, device=device,
                                   timer=timer)
        torch.manual_seed(seed)  # the same dropout masks for a case, whatever ran before
        mode = mc_dropout_mode(net) if method == "mc_dropout" else contextlib.nullcontext()
        with mode:
            return predict_model_grid(predict, image, **settings)

    try:
        if warmup and volumes:
            for method in methods:
                run(method, volumes[0]["image"], Timer())
        for vol in volumes:
            if progress is not None:
                progress(str(vol["id"]))
            label = _crop(np.asarray(vol["label"]), vol.get("slices"), plane_axis)
            voxel_ml = float(np.prod(vol["spacing"])) / 1000.0
            for method in methods:
                t0 = time.perf_counter()
                out = run(method, vol["image"], timers[method])
                wall[method] += time.perf_counter() - t0
                mean_probs = _crop(out["mean_probs"], vol.get("slices"), plane_axis + 1)
                mean_entropy = _crop(out["mean_entropy"], vol.get("slices"), plane_axis + 1)
                scorer = scorers[method]
                maps = {k: v for k, v in uncertainty_maps(mean_probs, mean_entropy).items()
                        if k in scorer.map_names}
                pred = scorer.add_volume(mean_probs, maps, label)
                stats = region_statistics(pred, maps, names, voxel_ml, band=band)
                scorer.add_case(str(vol["id"]), foreground_dice(pred, label, names),
                                {k: stats["case"][f"boundary_mean_{k}"] for k in maps})
    finally:
        net.train(was_training)

    base = "softmax" if "softmax" in methods else methods[0]
    results = {}
    for method in methods:
        s = scorers[method].summary()
        s.update({"passes": PASSES.get(method, m),
                  "seconds": wall[method], "network_seconds": timers[method].seconds,
                  "relative_cost": wall[method] / wall[base] if wall[base] else None,
                  "relative_network_cost": (timers[method].seconds / timers[base].seconds
                                            if timers[base].seconds else None)})
        results[method] = s
    paired = {}
    if len(volumes) > 1:
        for mine in ("flpm", "flpm_flip"):
            for other in methods if mine in methods else ():
                if other not in (mine, "flpm"):
                    paired[f"{mine}-{other}"] = paired_auroc_difference(
                        scorers[mine].volume_histograms["entropy"],
                        scorers[other].volume_histograms["entropy"], seed=seed)
    return {"methods": results, "paired_auroc": paired,
            "settings": {**settings, "m": m, "temperature": temperature, "band": band,
                         "bins": n_bins, "seed": seed, "cost_baseline": base,
                         "cases": len(volumes), "device": str(device),
                         "threads": torch.get_num_threads()}}


def comparison_table(result: Mapping[str, Any]) -> str:
    """One row per method: entropy-map AUROC / AP / captures (overall), ECE, Dice, case
    correlation and cost relative to the plain pass."""
    head = (f"{'method':<12}{'passes':>7}{'AUROC':>8}{'AP':>8}{'top5%':>8}{'top10%':>8}"
            f"{'MI AUROC':>10}{'ECE':>8}{'fg ECE':>8}{'Dice':>8}{'r(u,Dice)':>10}"
            f"{'cost':>8}{'net cost':>10}")
    rows = [head, "-" * len(head)]

    def f(v: Any, d: int = 4) -> str:
        return "-" if v is None else f"{v:.{d}f}"

    def times(v: Any) -> str:
        return "-" if v is None else f"{v:.2f}x"

    for method, s in result["methods"].items():
        ent = s["error_detection"]["entropy"]["overall"]
        mi = s["error_detection"].get("mutual_information", {}).get("overall", {})
        corr = s["case_correlation"].get("entropy", {})
        rows.append(
            f"{method:<12}{s['passes']:>7}{f(ent['auroc']):>8}{f(ent['ap']):>8}"
            f"{f(ent['top5']):>8}{f(ent['top10']):>8}{f(mi.get('auroc')):>10}"
            f"{f(s['calibration']['ece']):>8}{f(s['calibration']['foreground_region']['ece']):>8}"
            f"{f(s['mean_dice']):>8}{f(corr.get('pearson'), 3):>10}"
            f"{times(s['relative_cost']):>8}{times(s['relative_network_cost']):>10}")
    for name, d in result.get("paired_auroc", {}).items():
        if d["difference"] is None:
            continue
        lo, hi = d["ci"]
        rows.append(f"AUROC {name}: {d['difference']:+.4f} (95% case-bootstrap interval "
                    f"[{lo:+.4f}, {hi:+.4f}], {d['cases']} cases; first >= second in "
                    f"{100 * d['share_a_ge_b']:.0f}% of replicates)")
    return "\n".join(rows)
