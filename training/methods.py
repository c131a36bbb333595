"""Every training method behind one interface: build the network, compute one step's losses.

`--method` picks one. The SFPC ablation rows of the paper's Table II are switch combinations of
the same method; the baselines (supervised-only, URPC, UAMT, MC-Net+) share the trainer, the data
and the optimiser schedule so that every comparison is side by side. The baselines follow their
reference code (SSL4MIS for URPC and UAMT, ycwu1997/MC-Net for MC-Net+); docs/method-notes.md
lists what still differs and why. The "-legacy" / "-lnk" variants are the project's earlier
baselines, kept so that the benchmark tables trained with them can be reproduced.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from sfpc.model.networks import NetConfig, SFPCNet
from sfpc.training.losses import (
    entropy,
    fpc_loss,
    lambda1,
    mcnet_consistency_weight,
    mcnet_loss,
    mcnet_pairwise_loss,
    mcnet_supervised_loss,
    reconstruction_loss,
    supervised_loss,
    uamt_loss,
    uamt_threshold,
    urpc_loss,
)


@dataclass(frozen=True)
class Switches:
    rec: bool = False
    flpm: bool = False
    fpc: bool = False


# Table II rows. "seg+flpm" is consistency over the perturbed predictions with all w_m = 1.
SFPC_VARIANTS: dict[str, Switches] = {
    "supervised": Switches(),
    "seg+rec": Switches(rec=True),
    "seg+flpm": Switches(flpm=True),
    "seg+rec+flpm": Switches(rec=True, flpm=True),
    "seg+flpm+fpc": Switches(flpm=True, fpc=True),
    "sfpc": Switches(rec=True, flpm=True, fpc=True),
}
BASELINES = ("urpc", "uamt", "mcnet")
# The project's earlier baselines: URPC without SSL4MIS's decoder perturbations (1x1 heads,
# bilinear up-sampling), UAMT with a ln K threshold, MC-Net with two decoders and its own loss.
LEGACY_BASELINES = ("urpc-legacy", "uamt-lnk", "mcnet-legacy")
METHODS = tuple(SFPC_VARIANTS) + BASELINES + LEGACY_BASELINES
URPC_METHODS = ("urpc", "urpc-legacy")
UAMT_METHODS = ("uamt", "uamt-lnk")


@dataclass
class LossConfig:
    m: int = 4
    tau: float = 0.1
    norm: str = "l2"
    detach_mean: bool = False
    w_max: float = 0.1  # lambda1's final weight
    lambda2: float = 0.5
    perturbation: str = "flpm"
    uamt_t: int = 8
    ema_decay: float = 0.99
    mcnet_temperature: float = 0.1


def net_config_for(method: str, base: NetConfig, lc: LossConfig) -> NetConfig:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    cfg = copy.deepcopy(base)
    cfg.tau = lc.tau
    sw = SFPC_VARIANTS.get(method)
    cfg.reconstruction = bool(sw and sw.rec)
    # Every SFPC variant keeps an FLPM (its buffers cost nothing) so any model can export the
    # uncertainty graph; only variants with the switch on train through it.
    cfg.perturbation = lc.perturbation if sw is not None else None
    cfg.deep_supervision = method in URPC_METHODS
    cfg.pyramid_style = "reference" if method == "urpc" else "plain"
    cfg.seg_up_mode, cfg.aux_decoders, cfg.head_dropout = "transpose", (), 0.0
    if method == "mcnet":
        # MC-Net+ (MCNet2d_v2 / MCNet3d_v2): transposed, (bi/tri)linear and nearest decoders.
        # G1 is the decoder the reference evaluates and the one exported: its decoder1, bilinear
        # in 2D, transposed in 3D.
        if cfg.spatial_dims == 2:
            cfg.seg_up_mode, cfg.aux_decoders = "linear-aligned", ("transpose", "nearest")
        else:
            cfg.aux_decoders, cfg.head_dropout = ("linear-aligned", "nearest"), 0.5
    elif method == "mcnet-legacy":
        cfg.aux_decoders = ("linear",)
    return cfg


class Method:
    """Computes the loss of one two-stream step. `t` is the iteration, `t_max` the total."""

    def __init__(self, name: str, net: nn.Module, lc: LossConfig):
        self.name, self.lc = name, lc
        self.net = net  # possibly DDP-wrapped; exposes forward_train through TrainStep
        self.teacher: SFPCNet | None = None

    @property
    def uses_unlabelled(self) -> bool:
        return self.name != "supervised"

    @property
    def uses_teacher(self) -> bool:
        return self.name in UAMT_METHODS

    def m_samples(self) -> int:
        sw = SFPC_VARIANTS.get(self.name)
        return self.lc.m if sw and sw.flpm else 0

    def step(self, xl: torch.Tensor, yl: torch.Tensor, xu: torch.Tensor, t: int, t_max: int
             ) -> tuple[torch.Tensor, dict[str, float]]:
        nl = xl.shape[0]
        x = torch.cat([xl, xu]) if self.uses_unlabelled else xl
        nu = x.shape[0] - nl
        w1 = lambda1(t, t_max, self.lc.w_max)
        out = self.net(x, nu, self.m_samples())
        ls = supervised_loss(out["logits"][:nl], yl)
        logs = {"ls": ls.item(), "lambda1": w1}
        loss = ls
        sw = SFPC_VARIANTS.get(self.name)
        if sw is not None:
            if sw.rec:
                lr = reconstruction_loss(out["recon"], x)
                loss = loss + self.lc.lambda2 * lr
                logs["lrec"] = lr.item()
            if sw.flpm:
                probs = torch.softmax(out["perturbed"], dim=2)
                lu = fpc_loss(probs, self.lc.norm, weighted=sw.fpc, detach_mean=self.lc.detach_mean)
                loss = loss + w1 * lu
                logs["lu"] = lu.item()
        elif self.name in URPC_METHODS:
            heads = [out["logits"], *out["pyramid"]]
            ls = sum(supervised_loss(h[:nl], yl) for h in heads) / len(heads)
            lu = urpc_loss([torch.softmax(h[nl:], dim=1) for h in heads])
            loss = ls + w1 * lu
            logs.update(ls=ls.item(), lu=lu.item())
        elif self.name == "mcnet":
            # MC-Net+: Dice-only supervision summed over the decoders, mutual consistency over
            # every ordered pair on the whole batch, the reference's own weight schedule (t + 1:
            # the reference counts the iteration before reading the weight).
            probs = [torch.softmax(h, dim=1) for h in (out["logits"], *out["aux_logits"])]
            ls = mcnet_supervised_loss([p[:nl] for p in probs], yl)
            lu = mcnet_pairwise_loss(probs, self.lc.mcnet_temperature)
            w = mcnet_consistency_weight(t + 1, t_max, probs[0].dim() - 2)
            loss = ls + w * lu
            logs.update(ls=ls.item(), lu=lu.item(), lambda1=w)
        elif self.name == "mcnet-legacy":
            aux = out["aux_logits"][0]
            ls = 0.5 * (ls + supervised_loss(aux[:nl], yl))
            lu = mcnet_loss(torch.softmax(out["logits"], 1), torch.softmax(aux, 1),
                            self.lc.mcnet_temperature)
            loss = ls + w1 * lu
            logs.update(ls=ls.item(), lu=lu.item())
        elif self.name in UAMT_METHODS:
            lu = self._uamt(out["logits"][nl:], xu, t, t_max)
            loss = ls + w1 * lu
            logs["lu"] = lu.item()
        logs["loss"] = loss.item()
        return loss, logs

    # -- UAMT ------------------------------------------------------------------------------------
    def init_teacher(self, student: SFPCNet) -> None:
        self.teacher = copy.deepcopy(student)
        for p in self.teacher.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update_teacher(self, student: SFPCNet, t: int) -> None:
        if self.teacher is None:
            return
        alpha = min(1 - 1 / (t + 1), self.lc.ema_decay)
        for pt, ps in zip(self.teacher.parameters(), student.parameters(), strict=True):
            pt.mul_(alpha).add_(ps.detach(), alpha=1 - alpha)
        for bt, bs in zip(self.teacher.buffers(), student.buffers(), strict=True):
            bt.copy_(bs)

    @staticmethod
    def _noise(x: torch.Tensor) -> torch.Tensor:
        return x + torch.clamp(torch.randn_like(x) * 0.1, -0.2, 0.2)

    def _uamt(self, student_logits: torch.Tensor, xu: torch.Tensor, t: int, t_max: int
              ) -> torch.Tensor:
        assert self.teacher is not None, "init_teacher() first"
        self.teacher.train()  # dropout on: T stochastic passes estimate the teacher's uncertainty
        with torch.no_grad():
            target = torch.softmax(self.teacher(self._noise(xu)), dim=1)
            reps = self.lc.uamt_t
            stack = torch.cat([self._noise(xu) for _ in range(reps)])
            preds = torch.softmax(self.teacher(stack), dim=1)
            preds = preds.reshape(reps, xu.shape[0], *preds.shape[1:]).mean(dim=0)
            unc = entropy(preds, dim=1, keepdim=True)
        threshold = uamt_threshold(t, t_max, student_logits.shape[1],
                                   log_k=self.name == "uamt-lnk")
        return uamt_loss(torch.softmax(student_logits, dim=1), target, unc, threshold)


class TrainStep(nn.Module):
    """Routes DDP's forward() to forward_train and returns a dict of tensors it can traverse."""

    def __init__(self, net: SFPCNet):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, n_unlabelled: int, m: int) -> dict:
        o = self.net.forward_train(x, n_unlabelled, m)
        out = {"logits": o.logits, "pyramid": o.pyramid}
        for k in ("perturbed", "recon"):
            v = getattr(o, k)
            if v is not None:
                out[k] = v
        if o.aux_logits:
            out["aux_logits"] = o.aux_logits
        return out
