"""The reference 2D U-Net of the semi-supervised toolkit SSL4MIS (Luo et al.), re-written here.

Channels 16-32-64-128-256, BatchNorm + LeakyReLU, encoder dropout 0.05/0.1/0.2/0.3/0.5, transposed
convolutions for up-sampling, about 1.8-1.9 M parameters. Written by hand (not MONAI's BasicUNet)
because the baselines' numbers are defined on this exact network, and because the multi-decoder
baselines (URPC, CCT, MC-Net+) need its encoder and decoder as separate, reusable pieces.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .registry import register_model


class ConvBlock(nn.Sequential):
    """conv3x3-BN-LeakyReLU-dropout-conv3x3-BN-LeakyReLU; (B, C_in, H, W) -> (B, C_out, H, W)."""

    def __init__(self, in_ch: int, out_ch: int, dropout: float) -> None:
        super().__init__(
            nn.Conv2d(in_ch, out_ch, 3, padding=1),
            nn.BatchNorm2d(out_ch),
            nn.LeakyReLU(),
            nn.Dropout(dropout),
            nn.Conv2d(out_ch, out_ch, 3, padding=1),
            nn.BatchNorm2d(out_ch),
            nn.LeakyReLU(),
        )


class UpBlock(nn.Module):
    """Up-sample the deeper map (x2), concatenate the skip, ConvBlock.

    ``mode``: ``"transpose"`` (SSL4MIS default), ``"bilinear"`` or ``"nearest"`` (MC-Net+'s decoders).
    """

    def __init__(self, deep_ch: int, skip_ch: int, out_ch: int, mode: str = "transpose") -> None:
        super().__init__()
        if mode == "transpose":
            self.up = nn.ConvTranspose2d(deep_ch, skip_ch, kernel_size=2, stride=2)
        elif mode in ("bilinear", "nearest"):
            kw = {"align_corners": True} if mode == "bilinear" else {}
            self.up = nn.Sequential(nn.Conv2d(deep_ch, skip_ch, 1), nn.Upsample(scale_factor=2, mode=mode, **kw))
        else:
            raise ValueError(f"unknown up-sampling mode {mode!r} (transpose, bilinear, nearest)")
        self.conv = ConvBlock(2 * skip_ch, out_ch, 0.0)

    def forward(self, deep: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([skip, self.up(deep)], dim=1))


class UNetEncoder(nn.Module):
    """(B, C_in, H, W) -> 5 feature maps at strides 1, 2, 4, 8, 16 (deepest last)."""

    def __init__(self, in_channels: int, channels: tuple[int, ...], dropout: tuple[float, ...]) -> None:
        super().__init__()
        self.stages = nn.ModuleList([ConvBlock(in_channels, channels[0], dropout[0])])
        for i in range(1, len(channels)):
            self.stages.append(nn.Sequential(nn.MaxPool2d(2), ConvBlock(channels[i - 1], channels[i], dropout[i])))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats


class UNetDecoder(nn.Module):
    """Encoder features (deepest last) -> logits (B, num_classes, H, W)."""

    def __init__(self, channels: tuple[int, ...], num_classes: int, mode: str = "transpose") -> None:
        super().__init__()
        rev = channels[::-1]
        self.ups = nn.ModuleList(UpBlock(rev[i], rev[i + 1], rev[i + 1], mode) for i in range(len(rev) - 1))
        self.head = nn.Conv2d(channels[0], num_classes, 3, padding=1)

    def forward(self, feats: list[torch.Tensor], return_features: bool = False):
        x = feats[-1]
        for up, skip in zip(self.ups, feats[-2::-1], strict=True):
            x = up(x, skip)
        logits = self.head(x)
        return (logits, x) if return_features else logits


class UNet(nn.Module):
    """SSL4MIS 2D U-Net. Input (B, in_channels, H, W) with H, W multiples of 16; output logits."""

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 2,
        channels: tuple[int, ...] = (16, 32, 64, 128, 256),
        dropout: tuple[float, ...] = (0.05, 0.1, 0.2, 0.3, 0.5),
        up_mode: str = "transpose",
    ) -> None:
        super().__init__()
        if len(channels) != len(dropout):
            raise ValueError("channels and dropout must have the same length")
        self.encoder = UNetEncoder(in_channels, tuple(channels), tuple(dropout))
        self.decoder = UNetDecoder(tuple(channels), num_classes, up_mode)
        self.feature_channels = tuple(channels)

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.encoder(x)

    def decode(self, feats: list[torch.Tensor], return_features: bool = False):
        """Logits (B, num_classes, H, W); with ``return_features`` also the last decoder map (B, 16, H, W)."""
        return self.decoder(feats, return_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))


@register_model("unet")
def unet(in_channels: int = 3, num_classes: int = 2, **kwargs) -> UNet:
    """The reference U-Net (about 1.8 M parameters with 3 input channels)."""
    return UNet(in_channels=in_channels, num_classes=num_classes, **kwargs)
