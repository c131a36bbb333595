"""The SFPC network: shared encoder E, segmentation decoder G1 (with the perturbation module before
its classifier) and the training-only reconstruction decoder G2.

The same class carries the extra heads the baselines need, so that every method is trained and
exported through one code path: deep-supervision heads for URPC, a second decoder with linear
up-sampling for MC-Net. Inference and export only ever use E + G1 (+ the perturbation buffers).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from sfpc.model.perturbation import FLPM, instance_stats, make_perturbation
from sfpc.model.unet import DEFAULT_CHANNELS, DEFAULT_ENCODER_DROPOUT, Decoder, Encoder, conv_nd


@dataclass
class NetConfig:
    spatial_dims: int = 2
    in_channels: int = 1
    num_classes: int = 2
    channels: tuple[int, ...] = DEFAULT_CHANNELS
    encoder_dropout: tuple[float, ...] = DEFAULT_ENCODER_DROPOUT
    perturbation: str | None = "flpm"  # flpm | fnoise | fdrop | sdrop | None
    tau: float = 0.1
    reconstruction: bool = True
    deep_supervision: bool = False  # URPC pyramid heads
    aux_decoder: bool = False  # MC-Net: a second decoder with linear up-sampling
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["channels"] = list(self.channels)
        d["encoder_dropout"] = list(self.encoder_dropout)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> NetConfig:
        d = dict(d)
        d["channels"] = tuple(d.get("channels", DEFAULT_CHANNELS))
        d["encoder_dropout"] = tuple(d.get("encoder_dropout", DEFAULT_ENCODER_DROPOUT))
        return cls(**d)


@dataclass
class TrainOutputs:
    logits: torch.Tensor  # clean G1 output for the whole batch (B, K, *sp)
    perturbed: torch.Tensor | None = None  # (M, B_u, K, *sp) for the last B_u images
    recon: torch.Tensor | None = None  # G2 output (B, C_in, *sp)
    pyramid: list[torch.Tensor] = field(default_factory=list)  # URPC heads at full resolution
    aux_logits: torch.Tensor | None = None  # MC-Net second decoder


class SFPCNet(nn.Module):
    def __init__(self, cfg: NetConfig):
        super().__init__()
        self.cfg = cfg
        d, ch = cfg.spatial_dims, cfg.channels
        conv = conv_nd(d)
        self.encoder = Encoder(d, cfg.in_channels, ch, cfg.encoder_dropout)
        self.seg_decoder = Decoder(d, ch, up_mode="transpose")
        self.classifier = conv(ch[0], cfg.num_classes, 1)
        self.perturbation = (
            make_perturbation(cfg.perturbation, ch[0], cfg.tau) if cfg.perturbation else None
        )
        if cfg.reconstruction:
            self.recon_decoder = Decoder(d, ch, up_mode="transpose")
            self.recon_head = conv(ch[0], cfg.in_channels, 1)
        if cfg.deep_supervision:
            # One head per coarser decoder stage (coarse to fine), as URPC's pyramid.
            self.pyramid_heads = nn.ModuleList(conv(c, cfg.num_classes, 1) for c in ch[1:-1][::-1])
        if cfg.aux_decoder:
            self.aux_decoder = Decoder(d, ch, up_mode="linear")
            self.aux_classifier = conv(ch[0], cfg.num_classes, 1)

    # -- inference paths (exported) ------------------------------------------------------------
    def seg_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.seg_decoder(self.encoder(x))[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Clean segmentation logits: E + G1, no perturbation."""
        return self.classifier(self.seg_features(x))

    def perturbed_logits(self, f: torch.Tensor, m: int) -> torch.Tensor:
        """M perturbed predictions of features f in one classifier call: (M, B, K, *sp)."""
        if self.perturbation is None:
            raise RuntimeError("this network was built without a perturbation module")
        stacked = self.perturbation(f, m)
        logits = self.classifier(stacked)
        return logits.reshape(m, f.shape[0], *logits.shape[1:])

    def sample_probs(self, x: torch.Tensor, m: int) -> torch.Tensor:
        """Softmax of M perturbed predictions (eval mode: FLPM's fixed eps grid): (M, B, K, *sp)."""
        return torch.softmax(self.perturbed_logits(self.seg_features(x), m), dim=2)

    # -- training path -------------------------------------------------------------------------
    def forward_train(self, x: torch.Tensor, n_unlabelled: int = 0, m: int = 0) -> TrainOutputs:
        """One pass for a two-stream batch whose last `n_unlabelled` images are unlabelled.

        FLPM's batch spreads are measured over the unlabelled images only (paper, sec. II-B).
        """
        feats = self.encoder(x)
        dec = self.seg_decoder(feats)
        f = dec[-1]
        out = TrainOutputs(logits=self.classifier(f))
        if m > 0 and n_unlabelled > 0:
            out.perturbed = self.perturbed_logits(f[-n_unlabelled:], m)
        if self.cfg.reconstruction:
            out.recon = self.recon_head(self.recon_decoder(feats)[-1])
        if self.cfg.deep_supervision:
            size = x.shape[2:]
            mode = "bilinear" if self.cfg.spatial_dims == 2 else "trilinear"
            for head, stage in zip(self.pyramid_heads, dec[:-1], strict=True):
                out.pyramid.append(F.interpolate(head(stage), size=size, mode=mode))
        if self.cfg.aux_decoder:
            out.aux_logits = self.aux_classifier(self.aux_decoder(feats)[-1])
        return out

    def flpm(self) -> FLPM | None:
        return self.perturbation if isinstance(self.perturbation, FLPM) else None


UNCERTAINTY_GRAPHS = ("folded", "stacked")


class UncertaintyHead(nn.Module):
    """E + G1 with FLPM applied M times on the fixed eps grid, in one pass.

    Returns per patch the mean probabilities (B, K, *sp) and the mean per-sample entropy
    (B, 1, *sp), natural log: enough for the engine to stitch windows and compute predictive
    entropy and mutual information without moving M copies of the probabilities. Each sample's
    probabilities are softmax(logits_m / T), with ``temperature`` T of shape (B, 1) (1 when
    omitted), the same calibration the engine applies to plain logits.

    ``graph`` picks how the M predictions are computed; both give the same numbers:

    - "stacked": FLPM builds the (M*B, C, *sp) stack of perturbed features and the classifier
      runs on it (equations 1-3 as written).
    - "folded": FLPM is an affine map per image and channel, f' = a_m * f + b_m with
      a_m = (s + eps_m dSigma) / s and b_m = (m + eps_m dMu) - m * a_m, and the classifier is a
      1x1 conv W f + bias, so each sample's logits are (W a_m) f + (W b_m + bias). The M x K
      per-image weights go into one batched matmul against the clean features; the M perturbed
      feature maps never exist. About half the cost of "stacked" in 2D, where they dominate.
    """

    def __init__(self, net: SFPCNet, m: int, graph: str = "folded"):
        super().__init__()
        if net.flpm() is None:
            raise ValueError("the uncertainty graph needs a network trained with FLPM")
        if graph not in UNCERTAINTY_GRAPHS:
            raise ValueError(f"graph must be one of {UNCERTAINTY_GRAPHS}, not {graph!r}")
        self.net = net
        self.m = int(m)
        self.graph = graph

    def forward(
        self, x: torch.Tensor, temperature: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.net.seg_features(x)
        if self.graph == "folded":
            return self._folded(f, temperature)
        logits = self.net.perturbed_logits(f, self.m)  # (M, B, K, *sp)
        if temperature is not None:
            logits = logits / temperature.reshape(1, -1, *([1] * (logits.dim() - 2)))
        probs = torch.softmax(logits, dim=2)
        entropy = -(probs * torch.log(probs.clamp_min(1e-12))).sum(dim=2, keepdim=True)
        return probs.mean(dim=0), entropy.mean(dim=0)

    def _folded(
        self, f: torch.Tensor, temperature: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        flpm, classifier = self.net.flpm(), self.net.classifier
        b, c = f.shape[:2]
        # The module's own statistics, spreads and eps (grid + running buffers in eval mode), so
        # both graphs perturb identically.
        mean, std = instance_stats(f)
        dmu, dsigma = flpm.batch_spreads(mean, std)
        eps = flpm.sample_eps(self.m, b, f)[..., None]  # (M, B, 1): one eps for all channels
        scale = (std + eps * dsigma) / std  # a_m, (M, B, C)
        shift = (mean + eps * dmu) - mean * scale  # b_m, (M, B, C)
        w = classifier.weight.reshape(classifier.weight.shape[0], c)  # (K, C)
        k = w.shape[0]
        weights = (scale[:, :, None, :] * w).transpose(0, 1)  # (B, M, K, C)
        bias = shift @ w.t()  # (M, B, K)
        if classifier.bias is not None:
            bias = bias + classifier.bias
        bias = bias.transpose(0, 1)  # (B, M, K)
        if temperature is not None:
            # Dividing the M x K x C weights costs nothing next to dividing M x K logit maps.
            inv_t = 1.0 / temperature.reshape(b, 1, 1)
            weights = weights * inv_t[..., None]
            bias = bias * inv_t
        z = torch.matmul(weights.reshape(b, self.m * k, c), f.reshape(b, c, -1))
        z = z.reshape(b, self.m, k, -1) + bias[..., None]  # (B, M, K, N) logits / T
        # Softmax over K written out: log p = z - log(sum exp z) gives each sample's entropy as
        # log(sum) - sum_k p_k z_k without a Log over the M x K maps.
        z = z - z.amax(dim=2, keepdim=True)
        e = torch.exp(z)
        total = e.sum(dim=2, keepdim=True)
        p = e / total
        entropy = torch.log(total) - (p * z).sum(dim=2, keepdim=True)  # (B, M, 1, N)
        spatial = f.shape[2:]
        return (p.mean(dim=1).reshape(b, k, *spatial),
                entropy.mean(dim=1).reshape(b, 1, *spatial))
