"""UNet building blocks for 2D and 3D, in the layout of the SSL4MIS code base.

Channels 16-32-64-128-256, two convs per stage (conv -> norm -> LeakyReLU), max-pool down,
transposed-conv or (tri)linear up with concatenated skips. BatchNorm in 2D, InstanceNorm in 3D.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

DEFAULT_CHANNELS = (16, 32, 64, 128, 256)
# SSL4MIS puts growing dropout in the encoder stages; it regularises small labelled sets and is
# what MC-dropout uncertainty switches on at inference.
DEFAULT_ENCODER_DROPOUT = (0.05, 0.1, 0.2, 0.3, 0.5)


def conv_nd(spatial_dims: int) -> type[nn.Module]:
    return {2: nn.Conv2d, 3: nn.Conv3d}[spatial_dims]


def norm_nd(spatial_dims: int, channels: int) -> nn.Module:
    if spatial_dims == 2:
        return nn.BatchNorm2d(channels)
    return nn.InstanceNorm3d(channels, affine=True)


def dropout_nd(spatial_dims: int, p: float) -> nn.Module:
    # Element-wise dropout as in SSL4MIS; identity when p == 0 keeps exported graphs clean.
    return nn.Dropout(p) if p > 0 else nn.Identity()


class ConvBlock(nn.Module):
    """Two (conv -> norm -> LeakyReLU) layers, optional dropout between them."""

    def __init__(self, spatial_dims: int, in_ch: int, out_ch: int, dropout: float = 0.0):
        super().__init__()
        conv = conv_nd(spatial_dims)
        self.block = nn.Sequential(
            conv(in_ch, out_ch, 3, padding=1),
            norm_nd(spatial_dims, out_ch),
            nn.LeakyReLU(0.01, inplace=True),
            dropout_nd(spatial_dims, dropout),
            conv(out_ch, out_ch, 3, padding=1),
            norm_nd(spatial_dims, out_ch),
            nn.LeakyReLU(0.01, inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class Encoder(nn.Module):
    """Shared encoder E: returns the feature map of every stage, finest first."""

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        channels: Sequence[int] = DEFAULT_CHANNELS,
        dropout: Sequence[float] = DEFAULT_ENCODER_DROPOUT,
    ):
        super().__init__()
        pool = {2: nn.MaxPool2d, 3: nn.MaxPool3d}[spatial_dims]
        self.stages = nn.ModuleList()
        prev = in_channels
        for i, ch in enumerate(channels):
            layers: list[nn.Module] = [] if i == 0 else [pool(2)]
            layers.append(ConvBlock(spatial_dims, prev, ch, dropout[i]))
            self.stages.append(nn.Sequential(*layers))
            prev = ch

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats


# Up-sampling of a decoder stage. "transpose" is a 2x2(x2) transposed convolution; the others are
# a 1x1 convolution to the skip's channels followed by interpolation, as SSL4MIS's and MC-Net's
# UNet UpBlock. "linear-aligned" and "nearest" are MC-Net+'s second and third decoders
# (align_corners=True as there); "linear" (align_corners=False) is the project's earlier MC-Net
# decoder, kept so that its checkpoints and the committed benchmark rows stay reproducible.
UP_MODES = ("transpose", "linear", "linear-aligned", "nearest")


class UpBlock(nn.Module):
    def __init__(self, spatial_dims: int, in_ch: int, skip_ch: int, out_ch: int, up_mode: str):
        super().__init__()
        linear = "bilinear" if spatial_dims == 2 else "trilinear"
        if up_mode == "transpose":
            tconv = {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[spatial_dims]
            self.up: nn.Module = tconv(in_ch, skip_ch, kernel_size=2, stride=2)
        elif up_mode in ("linear", "linear-aligned"):
            self.up = nn.Sequential(
                conv_nd(spatial_dims)(in_ch, skip_ch, 1),
                nn.Upsample(scale_factor=2, mode=linear,
                            align_corners=up_mode == "linear-aligned"),
            )
        elif up_mode == "nearest":
            self.up = nn.Sequential(
                conv_nd(spatial_dims)(in_ch, skip_ch, 1),
                nn.Upsample(scale_factor=2, mode="nearest"),
            )
        else:
            raise ValueError(f"unknown up_mode {up_mode!r}: use one of {', '.join(UP_MODES)}")
        self.conv = ConvBlock(spatial_dims, 2 * skip_ch, out_ch)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([skip, self.up(x)], dim=1))


class Decoder(nn.Module):
    """A decoder body: upsampling stages with skips. Returns every stage's output, coarsest first.

    The last element is the feature map f that the perturbation module acts on; the classifier
    (a 1x1 conv) is kept outside so that M perturbed copies of f share one classifier call.
    `stage_dropout` (coarsest stage first) puts channel dropout after each stage, on the decoder
    path itself, as SSL4MIS's 3D URPC network (unet_3D_dv_semi: Dropout3d 0.5/0.3/0.2/0.1); it is
    active in train() only, so the exported graph is unchanged.
    """

    def __init__(
        self,
        spatial_dims: int,
        channels: Sequence[int] = DEFAULT_CHANNELS,
        up_mode: str = "transpose",
        stage_dropout: Sequence[float] = (),
    ):
        super().__init__()
        rev = list(channels)[::-1]
        self.ups = nn.ModuleList(
            UpBlock(spatial_dims, rev[i], rev[i + 1], rev[i + 1], up_mode)
            for i in range(len(rev) - 1)
        )
        if stage_dropout and len(stage_dropout) != len(self.ups):
            raise ValueError(f"stage_dropout needs {len(self.ups)} values (one per decoder stage), "
                             f"got {len(stage_dropout)}")
        drop = {2: nn.Dropout2d, 3: nn.Dropout3d}[spatial_dims]
        # No parameters, so the state-dict keys are those of a decoder without dropout.
        self.stage_dropout = nn.ModuleList(
            drop(p) if p > 0 else nn.Identity() for p in stage_dropout
        )

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        x = feats[-1]
        outs = []
        for i, up in enumerate(self.ups):
            x = up(x, feats[-2 - i])
            if len(self.stage_dropout):
                x = self.stage_dropout[i](x)
            outs.append(x)
        return outs
