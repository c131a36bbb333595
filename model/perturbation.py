"""Feature-level perturbation modules placed before G1's classifier.

Every module maps features f of shape (B, C, *spatial) to M perturbed copies stacked as
(M*B, C, *spatial), sample-major, so that the classifier runs once on the stack (METHOD.md: the
efficiency claim of section III-F).

FLPM is the paper's module (equations 1-3). F-Noise, F-Drop (Ouali et al., CCT) and spatial
dropout are the alternatives compared in the paper's Figure 9.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

STD_EPS = 1e-6


def eps_grid(m: int, tau: float) -> list[float]:
    """The fixed, evenly spaced eps grid used for serving (M=4: -tau, -tau/3, tau/3, tau)."""
    if m < 1:
        raise ValueError("M must be >= 1")
    if m == 1:
        return [0.0]
    return [(-tau + 2 * tau * i / (m - 1)) for i in range(m)]


def instance_stats(f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image and channel mean and std (sqrt(var + 1e-6)) over the spatial dims, detached."""
    f = f.detach()
    dims = tuple(range(2, f.dim()))
    m = f.mean(dim=dims)
    s = torch.sqrt(f.var(dim=dims, unbiased=False) + STD_EPS)
    return m, s


def _expand(t: torch.Tensor, ndim: int) -> torch.Tensor:
    return t.reshape(t.shape + (1,) * (ndim - t.dim()))


class Perturbation(nn.Module):
    """Base: `forward(f, m, eps=None)` returns (m*B, C, *spatial)."""

    name = "none"

    def forward(self, f: torch.Tensor, m: int, eps: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError


class FLPM(Perturbation):
    """Feature-Level Perturbation Module (paper eq. 1-3).

    f' = (s + eps * dSigma_c) * (f - m) / s + (m + eps * dMu_c), with m, s the per-image,
    per-channel mean and std, and dMu_c, dSigma_c the spread over the (unlabelled) mini-batch of
    m and s. Running estimates of the spreads are buffers, so a single image at inference can
    still be perturbed by the amount learnt in training.
    """

    name = "flpm"

    def __init__(self, channels: int, tau: float = 0.1, momentum: float = 0.1):
        super().__init__()
        self.tau = float(tau)
        self.momentum = float(momentum)
        self.register_buffer("running_dmu", torch.zeros(channels))
        self.register_buffer("running_dsigma", torch.zeros(channels))
        self.register_buffer("num_batches_tracked", torch.zeros((), dtype=torch.long))

    def batch_spreads(self, m: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Spreads over the batch; updates the running buffers in training mode.

        With fewer than two images there is no spread to measure, so the running values are used.
        """
        if not self.training or m.shape[0] < 2:
            return self.running_dmu, self.running_dsigma
        dmu, dsigma = m.std(dim=0), s.std(dim=0)
        with torch.no_grad():
            if int(self.num_batches_tracked) == 0:
                self.running_dmu.copy_(dmu)
                self.running_dsigma.copy_(dsigma)
            else:
                self.running_dmu.lerp_(dmu, self.momentum)
                self.running_dsigma.lerp_(dsigma, self.momentum)
            self.num_batches_tracked += 1
        return dmu, dsigma

    def sample_eps(self, m: int, b: int, like: torch.Tensor) -> torch.Tensor:
        if self.training:
            return (torch.rand(m, b, device=like.device, dtype=like.dtype) * 2 - 1) * self.tau
        grid = torch.tensor(eps_grid(m, self.tau), device=like.device, dtype=like.dtype)
        return grid[:, None].expand(m, b)

    def forward(self, f: torch.Tensor, m: int, eps: torch.Tensor | None = None) -> torch.Tensor:
        b, c = f.shape[:2]
        mean, std = instance_stats(f)
        dmu, dsigma = self.batch_spreads(mean, std)
        if eps is None:
            eps = self.sample_eps(m, b, f)
        eps = eps.reshape(m, b, 1)  # the same eps for every channel of an image
        gamma = std[None] + eps * dsigma  # (M, B, C)
        mu = mean[None] + eps * dmu
        nd = f.dim() + 1
        fhat = (f - _expand(mean, f.dim())) / _expand(std, f.dim())
        out = _expand(gamma, nd) * fhat[None] + _expand(mu, nd)
        return out.reshape(m * b, c, *f.shape[2:])

    def extra_repr(self) -> str:
        return f"tau={self.tau}, momentum={self.momentum}"


class FeatureNoise(Perturbation):
    """F-Noise (CCT): f + f * n, n ~ U(-r, r) per position, shared across channels."""

    name = "fnoise"

    def __init__(self, uniform_range: float = 0.3):
        super().__init__()
        self.r = float(uniform_range)

    def forward(self, f: torch.Tensor, m: int, eps: torch.Tensor | None = None) -> torch.Tensor:
        stack = f.unsqueeze(0).expand(m, *f.shape)
        noise_shape = (m, f.shape[0], 1, *f.shape[2:])
        noise = (torch.rand(noise_shape, device=f.device, dtype=f.dtype) * 2 - 1) * self.r
        return (stack + stack * noise).reshape(m * f.shape[0], *f.shape[1:])


class FeatureDrop(Perturbation):
    """F-Drop (CCT): drop the most activated regions, threshold = max attention * U(0.7, 0.9)."""

    name = "fdrop"

    def forward(self, f: torch.Tensor, m: int, eps: torch.Tensor | None = None) -> torch.Tensor:
        stack = f.unsqueeze(0).expand(m, *f.shape).reshape(m * f.shape[0], *f.shape[1:])
        attention = stack.mean(dim=1, keepdim=True)
        flat_max = attention.flatten(1).max(dim=1).values
        thr = flat_max * torch.empty_like(flat_max).uniform_(0.7, 0.9)
        mask = (attention < _expand(thr, attention.dim())).to(f.dtype)
        return stack * mask


class SpatialDropout(Perturbation):
    """Channel-wise (spatial) dropout, Tompson et al.; active whenever samples are asked for."""

    name = "sdrop"

    def __init__(self, p: float = 0.5):
        super().__init__()
        self.p = float(p)

    def forward(self, f: torch.Tensor, m: int, eps: torch.Tensor | None = None) -> torch.Tensor:
        stack = f.unsqueeze(0).expand(m, *f.shape).reshape(m * f.shape[0], *f.shape[1:])
        drop = F.dropout2d if f.dim() == 4 else F.dropout3d
        return drop(stack, p=self.p, training=True)


PERTURBATIONS = {
    "flpm": FLPM, "fnoise": FeatureNoise, "fdrop": FeatureDrop, "sdrop": SpatialDropout,
}


def make_perturbation(name: str, channels: int, tau: float = 0.1) -> Perturbation:
    if name == "flpm":
        return FLPM(channels, tau=tau)
    if name in PERTURBATIONS:
        return PERTURBATIONS[name]()
    raise ValueError(f"unknown perturbation {name!r}; choose from {sorted(PERTURBATIONS)}")
