"""The SFPC network: shared encoder E, segmentation decoder G1 (with the perturbation module before
its classifier) and the training-only reconstruction decoder G2.

The same class carries the extra heads the baselines need, so that every method is trained and
exported through one code path: deep-supervision heads (and SSL4MIS's decoder perturbations) for
URPC, extra decoders that differ only in their up-sampling for MC-Net+. Inference and export only
ever use E + G1 (+ the perturbation buffers); every baseline perturbation is off in eval().
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from sfpc.model.perturbation import FLPM, instance_stats, make_perturbation
from sfpc.model.unet import (
    DEFAULT_CHANNELS,
    DEFAULT_ENCODER_DROPOUT,
    UP_MODES,
    Decoder,
    Encoder,
    conv_nd,
)

PYRAMID_STYLES = ("plain", "reference")
# SSL4MIS unet_3D_dv_semi: Dropout3d after the decoder stages, coarsest first.
URPC_3D_STAGE_DROPOUT = (0.5, 0.3, 0.2, 0.1)


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
    # "reference": SSL4MIS's URPC (2D: 3x3 heads after dropout / feature dropout / feature noise,
    # nearest up-sampling; 3D: Dropout3d on the decoder stages, 1x1 heads, trilinear).
    # "plain": 1x1 heads, (bi/tri)linear up-sampling, no perturbation (the earlier project URPC).
    pyramid_style: str = "plain"
    seg_up_mode: str = "transpose"  # G1's up-sampling (MC-Net+ 2D evaluates its bilinear decoder)
    aux_decoders: tuple[str, ...] = ()  # MC-Net: the up-sampling of each extra decoder
    # MC-Net+ 3D (the reference V-Net's has_dropout): channel dropout on every decoder's last
    # features before its classifier, in forward_train only.
    head_dropout: float = 0.0
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.pyramid_style not in PYRAMID_STYLES:
            raise ValueError(f"pyramid_style must be one of {PYRAMID_STYLES}, "
                             f"not {self.pyramid_style!r}")
        for mode in (self.seg_up_mode, *self.aux_decoders):
            if mode not in UP_MODES:
                raise ValueError(f"unknown up-sampling {mode!r}; choose from {UP_MODES}")
        self.aux_decoders = tuple(self.aux_decoders)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["channels"] = list(self.channels)
        d["encoder_dropout"] = list(self.encoder_dropout)
        d["aux_decoders"] = list(self.aux_decoders)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> NetConfig:
        d = dict(d)
        d["channels"] = tuple(d.get("channels", DEFAULT_CHANNELS))
        d["encoder_dropout"] = tuple(d.get("encoder_dropout", DEFAULT_ENCODER_DROPOUT))
        # Checkpoints of the earlier MC-Net carry `aux_decoder: true` (one linear decoder).
        if d.pop("aux_decoder", False) and not d.get("aux_decoders"):
            d["aux_decoders"] = ("linear",)
        d["aux_decoders"] = tuple(d.get("aux_decoders", ()))
        return cls(**d)


# -- URPC's decoder perturbations (SSL4MIS networks/unet.py), identity in eval() ---------------


class URPCDropout(nn.Module):
    """SSL4MIS `Dropout(x, p=0.5)`: element-wise dropout before the coarsest auxiliary head."""

    def __init__(self, p: float = 0.5):
        super().__init__()
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x, self.p, training=self.training)


class URPCFeatureDropout(nn.Module):
    """SSL4MIS `FeatureDropout`: zero the positions whose channel-mean attention reaches
    max(attention) * u, with one u ~ U(0.7, 0.9) for the whole batch (np.random.uniform there;
    torch's generator here, so that the trainer's seed covers it)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        attention = x.mean(dim=1, keepdim=True)
        max_val = attention.flatten(1).max(dim=1).values
        u = torch.empty((), device=x.device, dtype=x.dtype).uniform_(0.7, 0.9)
        threshold = (max_val * u).reshape(-1, *([1] * (x.dim() - 1)))
        return x * (attention < threshold).to(x.dtype)


class URPCFeatureNoise(nn.Module):
    """SSL4MIS `FeatureNoise`: x + x * n with n ~ U(-0.3, 0.3) of shape (C, *spatial), one draw
    shared by the batch."""

    def __init__(self, uniform_range: float = 0.3):
        super().__init__()
        self.r = float(uniform_range)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        noise = (torch.rand(x.shape[1:], device=x.device, dtype=x.dtype) * 2 - 1) * self.r
        return x + x * noise.unsqueeze(0)


def urpc_head_perturbations(n: int) -> list[nn.Module]:
    """The 2D perturbations of the n auxiliary heads, coarsest first. SSL4MIS has three: dropout
    0.5 on the 1/8 stage, feature dropout on 1/4, feature noise on 1/2; further coarser heads
    (deeper networks) get dropout."""
    finest = [URPCDropout(0.5), URPCFeatureDropout(), URPCFeatureNoise()]
    return [URPCDropout(0.5) for _ in range(max(0, n - 3))] + finest[max(0, 3 - n):]


def urpc_stage_dropout(n: int) -> tuple[float, ...]:
    """3D: the Dropout3d rates of n decoder stages, coarsest first (0.5 for extra coarse ones)."""
    rates = URPC_3D_STAGE_DROPOUT
    return (0.5,) * max(0, n - len(rates)) + rates[max(0, len(rates) - n):]


@dataclass
class TrainOutputs:
    logits: torch.Tensor  # clean G1 output for the whole batch (B, K, *sp)
    perturbed: torch.Tensor | None = None  # (M, B_u, K, *sp) for the last B_u images
    recon: torch.Tensor | None = None  # G2 output (B, C_in, *sp)
    pyramid: list[torch.Tensor] = field(default_factory=list)  # URPC heads at full resolution
    aux_logits: list[torch.Tensor] = field(default_factory=list)  # MC-Net's extra decoders


class SFPCNet(nn.Module):
    def __init__(self, cfg: NetConfig):
        super().__init__()
        self.cfg = cfg
        d, ch = cfg.spatial_dims, cfg.channels
        conv = conv_nd(d)
        self.encoder = Encoder(d, cfg.in_channels, ch, cfg.encoder_dropout)
        reference_urpc = cfg.deep_supervision and cfg.pyramid_style == "reference"
        stage_dropout = urpc_stage_dropout(len(ch) - 1) if reference_urpc and d == 3 else ()
        self.seg_decoder = Decoder(d, ch, up_mode=cfg.seg_up_mode, stage_dropout=stage_dropout)
        self.classifier = conv(ch[0], cfg.num_classes, 1)
        self.perturbation = (
            make_perturbation(cfg.perturbation, ch[0], cfg.tau) if cfg.perturbation else None
        )
        if cfg.reconstruction:
            self.recon_decoder = Decoder(d, ch, up_mode="transpose")
            self.recon_head = conv(ch[0], cfg.in_channels, 1)
        if cfg.deep_supervision:
            # One head per coarser decoder stage (coarse to fine), as URPC's pyramid. SSL4MIS's 2D
            # heads are 3x3 convolutions, its 3D ones (UnetDsv3) 1x1.
            k = 3 if reference_urpc and d == 2 else 1
            self.pyramid_heads = nn.ModuleList(
                conv(c, cfg.num_classes, k, padding=k // 2) for c in ch[1:-1][::-1]
            )
            self.pyramid_perturbations = nn.ModuleList(
                urpc_head_perturbations(len(self.pyramid_heads)) if reference_urpc and d == 2
                else [nn.Identity() for _ in self.pyramid_heads]
            )
        if cfg.aux_decoders:
            self.aux_decoders = nn.ModuleList(Decoder(d, ch, up_mode=m) for m in cfg.aux_decoders)
            self.aux_classifiers = nn.ModuleList(
                conv(ch[0], cfg.num_classes, 1) for _ in cfg.aux_decoders
            )
        self._register_load_state_dict_pre_hook(_rename_legacy_mcnet_keys)

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
        # _head_dropout is the identity unless MC-Net+ 3D asks for it (then G1's own prediction
        # goes through it too, as every decoder of the reference V-Net).
        out = TrainOutputs(logits=self.classifier(self._head_dropout(f)))
        if m > 0 and n_unlabelled > 0:
            out.perturbed = self.perturbed_logits(f[-n_unlabelled:], m)
        if self.cfg.reconstruction:
            out.recon = self.recon_head(self.recon_decoder(feats)[-1])
        if self.cfg.deep_supervision:
            out.pyramid = self._pyramid(dec[:-1], x.shape[2:])
        if self.cfg.aux_decoders:
            for decoder, classifier in zip(self.aux_decoders, self.aux_classifiers, strict=True):
                out.aux_logits.append(classifier(self._head_dropout(decoder(feats)[-1])))
        return out

    def _pyramid(self, stages: list[torch.Tensor], size: torch.Size) -> list[torch.Tensor]:
        d = self.cfg.spatial_dims
        if self.cfg.pyramid_style == "reference":
            # SSL4MIS: F.interpolate(out, shape) (nearest) in 2D, nn.Upsample trilinear in 3D.
            mode = "nearest" if d == 2 else "trilinear"
        else:
            mode = "bilinear" if d == 2 else "trilinear"
        return [F.interpolate(head(perturb(stage)), size=size, mode=mode)
                for head, perturb, stage in zip(self.pyramid_heads, self.pyramid_perturbations,
                                                stages, strict=True)]

    def _head_dropout(self, f: torch.Tensor) -> torch.Tensor:
        if self.cfg.head_dropout <= 0:
            return f
        drop = F.dropout2d if self.cfg.spatial_dims == 2 else F.dropout3d
        return drop(f, self.cfg.head_dropout, training=self.training)

    def flpm(self) -> FLPM | None:
        return self.perturbation if isinstance(self.perturbation, FLPM) else None


def _rename_legacy_mcnet_keys(state_dict: dict, prefix: str, *args: object) -> None:
    """The earlier MC-Net stored its one extra decoder as aux_decoder / aux_classifier."""
    renames = (("aux_decoder.", "aux_decoders.0."), ("aux_classifier.", "aux_classifiers.0."))
    for old, new in renames:
        for key in [k for k in state_dict if k.startswith(prefix + old)]:
            state_dict[prefix + new + key[len(prefix + old):]] = state_dict.pop(key)


UNCERTAINTY_GRAPHS = ("folded", "stacked")


def sample_moments(logits: torch.Tensor, temperature: torch.Tensor | None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, B, K, *sp) logits of M samples -> the mean of softmax(logits / T) and the mean
    per-sample entropy (natural log), the uncertainty graph's two outputs."""
    if temperature is not None:
        logits = logits / temperature.reshape(1, -1, *([1] * (logits.dim() - 2)))
    probs = torch.softmax(logits, dim=2)
    entropy = -(probs * torch.log(probs.clamp_min(1e-12))).sum(dim=2, keepdim=True)
    return probs.mean(dim=0), entropy.mean(dim=0)


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
        return sample_moments(self.net.perturbed_logits(f, self.m), temperature)

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
