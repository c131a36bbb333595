"""Losses of SFPC (paper eq. 4-6, METHOD.md) and of the baselines trained beside it."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def one_hot(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B, *sp) int64 -> (B, K, *sp) float, channel-first like the logits."""
    return F.one_hot(y, num_classes).movedim(-1, 1).float()


def soft_dice_loss(probs: torch.Tensor, target: torch.Tensor, smooth: float = 1e-5) -> torch.Tensor:
    """1 - soft Dice per class over the whole batch, averaged over classes (SSL4MIS DiceLoss)."""
    dims = (0, *range(2, probs.dim()))
    inter = (probs * target).sum(dims)
    denom = (probs * probs).sum(dims) + (target * target).sum(dims)
    return (1 - (2 * inter + smooth) / (denom + smooth)).mean()


def supervised_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Ls = 0.5 * (cross-entropy + soft Dice) on the clean G1 output."""
    probs = torch.softmax(logits, dim=1)
    return 0.5 * (F.cross_entropy(logits, y) + soft_dice_loss(probs, one_hot(y, logits.shape[1])))


def entropy(p: torch.Tensor, dim: int, keepdim: bool = False) -> torch.Tensor:
    """Natural-log entropy over `dim`."""
    return -(p * torch.log(p.clamp_min(1e-12))).sum(dim=dim, keepdim=keepdim)


def fpc_loss(
    probs: torch.Tensor,
    norm: str = "l2",
    weighted: bool = True,
    detach_mean: bool = False,
) -> torch.Tensor:
    """Feature-perturbed consistency, eq. 4-5.

    probs: (M, B, K, *sp) softmax outputs of the M perturbations.
    g = (1/M) * sum_m(w_m * ||p_m - p_bar||) / sum_m(w_m), w_m = exp(-H(p_m)); Lu = mean of g.
    weighted=False sets every w_m = 1 (the "Seg+FLPM" ablation row, plain consistency).
    """
    m = probs.shape[0]
    p_bar = probs.mean(dim=0, keepdim=True)
    if detach_mean:
        p_bar = p_bar.detach()
    diff = probs - p_bar
    if norm == "l2":
        d = torch.sqrt((diff * diff).sum(dim=2) + 1e-12)
    elif norm == "l1":
        d = diff.abs().sum(dim=2)
    else:
        raise ValueError(f"norm must be 'l1' or 'l2', not {norm!r}")
    w = torch.exp(-entropy(probs, dim=2)) if weighted else torch.ones_like(d)
    g = (w * d).sum(dim=0) / w.sum(dim=0) / m
    return g.mean()


def reconstruction_loss(recon: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(recon, x)


def lambda1(t: float, t_max: float, w_max: float = 0.1) -> float:
    """Gaussian ramp-up over the real iteration count: w_max * exp(-5 (1 - t/t_max)^2)."""
    if t_max <= 0:
        return w_max
    r = min(max(t / t_max, 0.0), 1.0)
    return w_max * math.exp(-5.0 * (1.0 - r) ** 2)


def sigmoid_rampup(t: float, length: float) -> float:
    """The ramp of the mean-teacher family (Laine & Aila), used for UAMT's threshold."""
    if length == 0:
        return 1.0
    r = 1.0 - min(max(t, 0.0), length) / length
    return float(math.exp(-5.0 * r * r))


# -- baselines ---------------------------------------------------------------------------------


def urpc_loss(pyramid_probs: list[torch.Tensor]) -> torch.Tensor:
    """Uncertainty rectified pyramid consistency (Luo et al. 2022, SSL4MIS formulation).

    Each scale's prediction is pulled to the pyramid mean, weighted by exp(-KL) so that
    uncertain voxels count less; the mean KL is added to keep the scales from spreading.
    """
    p_avg = torch.stack(pyramid_probs).mean(dim=0)
    total = probs_sum = 0.0
    for p in pyramid_probs:
        # KL(p_avg || p_s), as SSL4MIS's KLDivLoss(log p_s, p_avg).
        kl = (p_avg * torch.log(p_avg.clamp_min(1e-8) / p.clamp_min(1e-8))).sum(dim=1, keepdim=True)
        w = torch.exp(-kl)
        dist = (p - p_avg) ** 2
        total = total + (dist * w).mean() / (w.mean() + 1e-8) + kl.mean()
        probs_sum += 1
    return total / probs_sum


def uamt_loss(
    student_probs: torch.Tensor, teacher_probs: torch.Tensor, uncertainty: torch.Tensor,
    threshold: float,
) -> torch.Tensor:
    """UAMT consistency (Yu et al. 2019): MSE to the teacher where its uncertainty is low."""
    mask = (uncertainty < threshold).float()
    mse = (student_probs - teacher_probs) ** 2
    return (mask * mse).sum() / (2 * mask.sum() + 1e-16)


def sharpen(p: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    q = p ** (1.0 / temperature)
    return q / q.sum(dim=1, keepdim=True)


def mcnet_loss(
    probs_a: torch.Tensor, probs_b: torch.Tensor, temperature: float = 0.1
) -> torch.Tensor:
    """MC-Net mutual consistency: each decoder matches the other's sharpened, detached output."""
    pa, pb = sharpen(probs_a, temperature).detach(), sharpen(probs_b, temperature).detach()
    return 0.5 * (F.mse_loss(probs_a, pb) + F.mse_loss(probs_b, pa))
