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


def uamt_threshold(t: float, t_max: float, num_classes: int = 2, log_k: bool = False) -> float:
    """UAMT's uncertainty threshold, (0.75 + 0.25 * sigmoid_rampup(t, t_max)) * ln 2 as SSL4MIS
    has it (train_uncertainty_aware_mean_teacher_2D/3D.py) whatever the number of classes.
    `log_k` scales by ln K instead (the project's earlier variant, method "uamt-lnk"), under
    which a K = 4 task keeps almost every pixel late in training."""
    scale = math.log(num_classes) if log_k else math.log(2)
    return (0.75 + 0.25 * sigmoid_rampup(t, t_max)) * scale


def uamt_loss(
    student_probs: torch.Tensor, teacher_probs: torch.Tensor, uncertainty: torch.Tensor,
    threshold: float,
) -> torch.Tensor:
    """UAMT consistency (Yu et al. 2019): MSE to the teacher where its uncertainty is low."""
    mask = (uncertainty < threshold).float()
    mse = (student_probs - teacher_probs) ** 2
    return (mask * mse).sum() / (2 * mask.sum() + 1e-16)


# -- MC-Net+ (Wu et al. 2022; ycwu1997/MC-Net code/train_mcnet_2d.py, train_mcnet_3d.py) ------


def sharpen_per_class(p: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """MC-Net+'s sharpening: p^(1/T) / (p^(1/T) + (1 - p)^(1/T)) for every class on its own,
    not renormalised over the classes (the 'sharpening' function of the reference)."""
    a = p ** (1.0 / temperature)
    return a / (a + (1 - p) ** (1.0 / temperature))


def mcnet_pairwise_loss(probs: list[torch.Tensor], temperature: float = 0.1) -> torch.Tensor:
    """Mutual consistency: sum over every ordered pair i != j of mean((p_i - sharpen(p_j))^2).

    The sharpened targets are not detached: in the reference they are copied into a tensor that
    autograd tracks (y_pseudo_label[idx] = sharpening(...)), so each decoder is also pulled
    towards making its sharpened output match the others'.
    """
    sharp = [sharpen_per_class(p, temperature) for p in probs]
    total = probs[0].new_zeros(())
    for i, p in enumerate(probs):
        for j, q in enumerate(sharp):
            if i != j:
                total = total + torch.mean((p - q) ** 2)
    return total


def mcnet_dice_loss_2d(probs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The 2D reference's DiceLoss (utils/losses.py), mean over classes of
    1 - sum(p t) / (sum p^2 + sum t^2 + 1e-10). It has no factor 2 in the numerator, so it is
    0.5 + 0.5 x the usual soft Dice loss (half the gradient); kept as the reference has it."""
    target = one_hot(y, probs.shape[1])
    losses = []
    for k in range(probs.shape[1]):
        p, t = probs[:, k], target[:, k]
        losses.append(1 - (p * t).sum() / ((p * p).sum() + (t * t).sum() + 1e-10))
    return torch.stack(losses).mean()


def binary_dice_loss(p: torch.Tensor, t: torch.Tensor, ep: float = 1e-8) -> torch.Tensor:
    """The 3D reference's Binary_dice_loss: 1 - (2 sum(p t) + ep) / (sum p + sum t + ep)."""
    return 1 - (2 * (p * t).sum() + ep) / (p.sum() + t.sum() + ep)


def mcnet_supervised_loss(probs: list[torch.Tensor], y: torch.Tensor) -> torch.Tensor:
    """Dice-only supervision summed over the decoders (the cross-entropy the reference computes
    is only logged there). 2D: lambda = 1 x the 2D DiceLoss. 3D: lambda = 0.5 x the binary Dice
    of the foreground channel; with more than two classes, the mean of each foreground class's
    binary Dice (the reference's 3D tasks are binary)."""
    if probs[0].dim() == 4:
        return sum((mcnet_dice_loss_2d(p, y) for p in probs), probs[0].new_zeros(()))
    total = probs[0].new_zeros(())
    for p in probs:
        fg = [binary_dice_loss(p[:, k], (y == k).to(p.dtype)) for k in range(1, p.shape[1])]
        total = total + torch.stack(fg).mean()
    return 0.5 * total


def mcnet_consistency_weight(t: int, t_max: int, spatial_dims: int) -> float:
    """The reference's weight at iteration t (1-based, as its iter_num when the weight is read):
    consistency * sigmoid_rampup(iter_num // 150, rampup) with 3D: 1.0, rampup 40 over 15000
    iterations (1.0 reached at 6000, 0.4 of the run); 2D: 0.1, rampup 200 over 30000 (0.1 reached
    at the end). 150 iterations are 1/100 (3D) or 1/200 (2D) of the reference's run, and the
    staircase is scaled to the run length t_max."""
    if spatial_dims == 3:
        weight, epochs, ramp = 1.0, 100, 40.0
    elif spatial_dims == 2:
        weight, epochs, ramp = 0.1, 200, 200.0
    else:
        raise ValueError(f"spatial_dims must be 2 or 3, not {spatial_dims}")
    if t_max <= 0:
        return weight
    return weight * sigmoid_rampup((int(t) * epochs) // int(t_max), ramp)


# -- the project's earlier MC-Net (method "mcnet-legacy", kept for the committed tables) -------


def sharpen(p: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Sharpening renormalised over the classes (the earlier project variant, not MC-Net's)."""
    q = p ** (1.0 / temperature)
    return q / q.sum(dim=1, keepdim=True)


def mcnet_loss(
    probs_a: torch.Tensor, probs_b: torch.Tensor, temperature: float = 0.1
) -> torch.Tensor:
    """Earlier project MC-Net: each decoder matches the other's sharpened, detached output."""
    pa, pb = sharpen(probs_a, temperature).detach(), sharpen(probs_b, temperature).detach()
    return 0.5 * (F.mse_loss(probs_a, pb) + F.mse_loss(probs_b, pa))
