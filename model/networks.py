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

from sfpc.model.perturbation import FLPM, make_perturbation
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


class UncertaintyHead(nn.Module):
    """E + G1 with FLPM applied M times on the fixed eps grid, in one pass.

    Returns per patch the mean probabilities (B, K, *sp) and the mean per-sample entropy
    (B, 1, *sp), natural log: enough for the engine to stitch windows and compute predictive
    entropy and mutual information without moving M copies of the probabilities.
    """

    def __init__(self, net: SFPCNet, m: int):
        super().__init__()
        if net.flpm() is None:
            raise ValueError("the uncertainty graph needs a network trained with FLPM")
        self.net = net
        self.m = int(m)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = self.net.sample_probs(x, self.m)  # (M, B, K, *sp)
        entropy = -(probs * torch.log(probs.clamp_min(1e-12))).sum(dim=2, keepdim=True)
        return probs.mean(dim=0), entropy.mean(dim=0)
