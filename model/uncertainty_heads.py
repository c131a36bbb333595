"""Uncertainty graphs other than FLPM at the classifier (issue 18): candidates compared under
shift by ``benchmarks/uncertainty_shift.py``, each exportable as the uncertainty graph.

Every head has the served graph's signature: ``(image [B, C, *sp], temperature [B, 1])`` ->
``(mean probabilities [B, K, *sp], mean per-sample entropy [B, 1, *sp])``, so the engine, the
Triton repository writer and the calibration read them as they read FLPM's, and the export's
``uncertainty_method`` says which one produced the maps.

- :class:`MCDropoutHead`: Monte Carlo dropout (Gal & Ghahramani 2016) with the encoder's own
  dropout rates, M samples as one batch of M*B. The masks come from a counter-based hash of
  each element's position, sample and layer, computed inside the graph: the same request gives
  the same maps (ONNX's Dropout would draw new masks on every call), and the graph keeps its
  dynamic spatial axes.
- :class:`StageFLPMHead`: FLPM at more than one decoder depth. Depth 0 is the trained module
  before the classifier; deeper stages use spreads measured on training batches
  (:func:`stage_spreads`), since training kept running spreads only at depth 0. Every sample
  shares its eps across depths; the decoder below the coarsest perturbed stage runs M times.
- :class:`EnsembleHead`: a deep ensemble (Lakshminarayanan et al. 2017) of K networks in one
  graph; :class:`EnsembleNet` is its segmentation graph (log of the mean probabilities).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from sfpc.model.networks import SFPCNet, sample_moments
from sfpc.model.perturbation import FLPM, eps_grid, instance_stats

# Classic shader hash constants; the salt keeps layers and samples apart.
_HASH_STEPS = (12.9898, 78.233, 37.719, 4.581, 93.989)
_HASH_SCALE = 43758.5453


def hash_uniform(x: torch.Tensor, salt: float) -> torch.Tensor:
    """A uniform [0, 1) number per element of ``x`` from its index alone (no RNG state).

    The indices come from cumulative sums of ones along each axis, which export with dynamic
    shapes; a sum of broadcast 1D index vectors keeps the cost to a few elementwise ops. The
    hash runs in float64: its sin is amplified 4e4 times, and float32 sin differs between
    runtimes by enough to flip masks (ONNX Runtime against torch: 0.07 in the mean
    probabilities), float64 sin by 1e-11."""
    v = None
    for axis in range(x.dim()):
        index = [slice(0, 1)] * x.dim()
        index[axis] = slice(None)
        ones = torch.ones_like(x[tuple(index)], dtype=torch.float64)
        ramp = ones.cumsum(axis) * _HASH_STEPS[axis % len(_HASH_STEPS)]
        v = ramp if v is None else v + ramp
    assert v is not None
    s = torch.sin(v + salt) * _HASH_SCALE
    return (s - torch.floor(s)).to(x.dtype)


class HashDropout(nn.Module):
    """Element-wise dropout whose mask is :func:`hash_uniform` of the position: deterministic."""

    def __init__(self, p: float, salt: float):
        super().__init__()
        self.p, self.salt = float(p), float(salt)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keep = (hash_uniform(x, self.salt) >= self.p).to(x.dtype)
        return x * keep / (1.0 - self.p)


def dropout_rates(net: SFPCNet) -> list[float]:
    return [p for _, _, p in _dropouts(net.encoder)]


class MCDropoutHead(nn.Module):
    """M Monte Carlo dropout samples of E + G1 in one batch of M*B."""

    def __init__(self, net: SFPCNet, m: int):
        super().__init__()
        import copy

        if not dropout_rates(net):
            raise ValueError("MC dropout needs a network with encoder dropout (encoder_dropout)")
        self.m = int(m)
        self.net = copy.deepcopy(net).eval()
        for i, (parent, name, p) in enumerate(_dropouts(self.net.encoder)):
            setattr(parent, name, HashDropout(p, salt=1.0 + 7.0 * i))

    def forward(self, x: torch.Tensor, temperature: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.net(torch.cat([x] * self.m, dim=0))
        return sample_moments(logits.reshape(self.m, x.shape[0], *logits.shape[1:]), temperature)


def _dropouts(module: nn.Module) -> list[tuple[nn.Module, str, float]]:
    found = []
    for parent in module.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.Dropout):
                found.append((parent, name, float(child.p)))
    return found


Spreads = dict[int, tuple[torch.Tensor, torch.Tensor]]


class StageFLPMHead(nn.Module):
    """FLPM at several decoder depths (0 = before the classifier, d = the d-th stage above it),
    one eps per sample shared by every depth, on the fixed serving grid of ``tau``. Depth 0 is
    the network's trained module; each deeper depth is an FLPM module holding the measured
    spreads as its running buffers, so every depth perturbs by the same code (eval mode)."""

    def __init__(self, net: SFPCNet, m: int, spreads: Spreads, tau: float):
        super().__init__()
        if net.flpm() is None:
            raise ValueError("FLPM at several depths needs a network trained with FLPM")
        n = len(net.seg_decoder.ups)
        for depth in spreads:
            if not 0 <= depth < n:
                raise ValueError(f"decoder depth {depth} out of range 0..{n - 1}")
        self.net, self.m = net, int(m)
        self.depths = sorted({0, *spreads})
        self.register_buffer("eps", torch.tensor(eps_grid(self.m, tau)))
        self.stages = nn.ModuleDict()
        for depth, (dmu, dsigma) in spreads.items():
            if depth == 0:
                continue  # the trained module's own spreads
            module = FLPM(len(dmu), tau=tau).eval()
            module.running_dmu.copy_(torch.as_tensor(dmu, dtype=torch.float32))
            module.running_dsigma.copy_(torch.as_tensor(dsigma, dtype=torch.float32))
            self.stages[str(depth)] = module

    def spreads(self) -> Spreads:
        """The measured spreads of the depths below 0 (what the export records)."""
        return {int(d): (f.running_dmu, f.running_dsigma) for d, f in self.stages.items()}

    def forward(self, x: torch.Tensor, temperature: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.net.encoder(x)
        ups = self.net.seg_decoder.ups
        n, b, stacked = len(ups), x.shape[0], False
        eps = self.eps[:, None].expand(self.m, b)  # (M, B): sample-major, as FLPM stacks
        h = feats[-1]
        for i, up in enumerate(ups):
            skip = feats[-2 - i]
            h = up(h, torch.cat([skip] * self.m, dim=0) if stacked else skip)
            depth = n - 1 - i
            if depth in self.depths:
                flpm = self.net.flpm() if depth == 0 else self.stages[str(depth)]
                # Once stacked, the M*B rows are one "sample" each with their own eps.
                h = flpm(h, 1, eps.reshape(1, -1)) if stacked else flpm(h, self.m, eps)
                stacked = True
        logits = self.net.classifier(h)
        return sample_moments(logits.reshape(self.m, b, *logits.shape[1:]), temperature)


def spreads_to_json(spreads: Spreads) -> dict[str, dict[str, list[float]]]:
    """{depth: (dMu, dSigma)} as ``sfpc stage-spreads`` writes it and the export records it."""
    return {str(d): {"dmu": [float(v) for v in dmu], "dsigma": [float(v) for v in dsigma]}
            for d, (dmu, dsigma) in spreads.items()}


def spreads_from_json(depths: dict[str, dict[str, list[float]]]) -> Spreads:
    """The inverse of :func:`spreads_to_json`."""
    return {int(d): (torch.tensor(v["dmu"]), torch.tensor(v["dsigma"])) for d, v in depths.items()}


@torch.no_grad()
def stage_spreads(net: SFPCNet, batches: Iterable[torch.Tensor], depths: Sequence[int]
                  ) -> Spreads:
    """FLPM's dMu / dSigma at decoder ``depths``: the standard deviation over each batch of the
    per-image channel means and stds (as FLPM measures them on an unlabelled batch in
    training), averaged over the batches."""
    net = net.eval()
    n = len(net.seg_decoder.ups)
    sums: dict[int, list[torch.Tensor]] = {}
    count = 0
    for batch in batches:
        if batch.shape[0] < 2:
            continue
        outs = net.seg_decoder(net.encoder(batch))
        for depth in depths:
            mean, std = instance_stats(outs[n - 1 - depth])
            dmu, dsigma = mean.std(dim=0), std.std(dim=0)
            if depth in sums:
                sums[depth][0] += dmu
                sums[depth][1] += dsigma
            else:
                sums[depth] = [dmu.clone(), dsigma.clone()]
        count += 1
    if not count:
        raise ValueError("stage_spreads needs at least one batch of two or more images")
    return {d: (s[0] / count, s[1] / count) for d, s in sums.items()}


class EnsembleNet(nn.Module):
    """The ensemble's segmentation graph: log of the members' mean probabilities, so that the
    engine's softmax(logits) is that mean."""

    def __init__(self, members: Sequence[SFPCNet]):
        super().__init__()
        if len(members) < 2:
            raise ValueError("an ensemble needs at least two members")
        self.members = nn.ModuleList(m.eval() for m in members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = torch.stack([torch.softmax(m(x), dim=1) for m in self.members]).mean(dim=0)
        return torch.log(probs.clamp_min(1e-12))


class EnsembleHead(nn.Module):
    """K members' softmax(logits / T): their mean and mean entropy, one graph."""

    def __init__(self, members: Sequence[SFPCNet]):
        super().__init__()
        self.members = nn.ModuleList(m.eval() for m in members)

    def forward(self, x: torch.Tensor, temperature: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        return sample_moments(torch.stack([m(x) for m in self.members]), temperature)
