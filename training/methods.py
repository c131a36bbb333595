"""Every training method behind one interface: build the network, compute one step's losses.

`--method` picks one. The SFPC ablation rows of the paper's Table II are switch combinations of
the same method; the baselines (supervised-only, URPC, UAMT, MC-Net) share the trainer, the data
and the schedule so that every comparison is side by side.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn

from sfpc.model.networks import NetConfig, SFPCNet
from sfpc.training.losses import (
    entropy,
    fpc_loss,
    lambda1,
    mcnet_loss,
    reconstruction_loss,
    sigmoid_rampup,
    supervised_loss,
    uamt_loss,
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
METHODS = tuple(SFPC_VARIANTS) + BASELINES


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
    cfg.deep_supervision = method == "urpc"
    cfg.aux_decoder = method == "mcnet"
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
        elif self.name == "urpc":
            heads = [out["logits"], *out["pyramid"]]
            ls = sum(supervised_loss(h[:nl], yl) for h in heads) / len(heads)
            lu = urpc_loss([torch.softmax(h[nl:], dim=1) for h in heads])
            loss = ls + w1 * lu
            logs.update(ls=ls.item(), lu=lu.item())
        elif self.name == "mcnet":
            ls = 0.5 * (ls + supervised_loss(out["aux_logits"][:nl], yl))
            lu = mcnet_loss(torch.softmax(out["logits"], 1), torch.softmax(out["aux_logits"], 1),
                            self.lc.mcnet_temperature)
            loss = ls + w1 * lu
            logs.update(ls=ls.item(), lu=lu.item())
        elif self.name == "uamt":
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
        k = student_logits.shape[1]
        threshold = (0.75 + 0.25 * sigmoid_rampup(t, t_max)) * math.log(k)
        return uamt_loss(torch.softmax(student_logits, dim=1), target, unc, threshold)


class TrainStep(nn.Module):
    """Routes DDP's forward() to forward_train and returns a dict of tensors it can traverse."""

    def __init__(self, net: SFPCNet):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, n_unlabelled: int, m: int) -> dict:
        o = self.net.forward_train(x, n_unlabelled, m)
        out = {"logits": o.logits, "pyramid": o.pyramid}
        for k in ("perturbed", "recon", "aux_logits"):
            v = getattr(o, k)
            if v is not None:
                out[k] = v
        return out
