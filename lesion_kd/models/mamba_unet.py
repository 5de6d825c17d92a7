"""The Mamba student: a 1.34 M-parameter visual state-space U-Net (the paper's student, reconstructed).

Layout (defaults; strides and sizes for a 256x256 input, channels in brackets)::

    encoder (features returned by encode)          decoder
    s1  [8]   conv3x3 + ReLU                         + up   -> 3x3 head (2 classes)
    s2  [16]  conv3x3/2-BN-ReLU + DS-conv block      + up   -> DS-conv block
    s4  [32]  conv3x3/2-BN-ReLU + DS-conv block      + up   -> DS-conv block
    s8  [64]  conv3x3/2-BN-ReLU + DS-conv block      + up   -> DS-conv block
    s16 [128] patch-merge + 2 VSS blocks (L=256)     + up   -> 1 VSS block
    s32 [248] patch-merge + 2 VSS blocks (L=64)      (bottleneck: the deepest feature)

"+ up": 1x1 conv + BN at the low resolution, bilinear x2, add the skip (no concatenation).
DS-conv block: residual depthwise 3x3 - BN - ReLU - pointwise - BN, ReLU. VSS block: LayerNorm,
in-projection to 2x width (x, z), depthwise 3x3 + SiLU, selective scan over four orders (row-major,
column-major, both reversed; one order per quarter of the channels), LayerNorm, SiLU(z) gate,
out-projection, residual (:mod:`lesion_kd.models.vss`). 1,333,930 parameters, 0.55 GFLOPs at 256x256.

Why this shape: on CPU the cost of the high-resolution levels is memory traffic, not arithmetic, so
they get few channels and cheap layers; the scan runs where sequences are short (256 and 64 tokens)
and where most parameters sit, since a parameter at stride 32 costs 1/1024 of the FLOPs of one at
stride 1. The state size is 8 (Mamba's default is 16; VMamba found small states sufficient in 2D):
it halves the scan's memory traffic, the bulk of a VSS block's time on CPU and in an ONNX export.
The widths 248 at s32 put the count at the paper's 1.34 M.

Same interface as the reference U-Net (:mod:`lesion_kd.models.unet`): ``encode`` / ``decode`` /
``feature_channels`` / ``forward == decode(encode(x))``. Inputs must have sides divisible by 32.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .registry import register_model
from .vss import VSSBlock

__all__ = ["MambaUNet", "mamba_unet"]

# Modules here take and return NCHW tensors whose memory is channels-last (see MambaUNet.encode).


class Pointwise(nn.Linear):
    """1x1 convolution as a matrix product over channels-last memory; (B, C_in, H, W) -> (B, C_out, H, W).

    On a channels-last map this is one GEMM on contiguous rows, about 3x faster on CPU than a 1x1
    ``nn.Conv2d`` (which oneDNN does not specialise); the output is channels-last too.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvBN(nn.Module):
    """A convolution (``nn.Conv2d`` or :class:`Pointwise`) followed by BatchNorm; (B, C_in, H, W) -> (B, C_out, H', W').

    In eval mode the BatchNorm is folded into the convolution's weight and bias (the same function,
    one pass over the output instead of two): on CPU these small high-resolution layers are
    memory-bound, so each full-size tensor that is not written counts.
    """

    def __init__(self, conv: nn.Conv2d | Pointwise) -> None:
        super().__init__()
        self.conv = conv
        self.bn = nn.BatchNorm2d(conv.out_channels if isinstance(conv, nn.Conv2d) else conv.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training or self.bn.running_var is None:
            return self.bn(self.conv(x))
        bn = self.bn
        scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
        bias = bn.bias - bn.running_mean * scale
        if self.conv.bias is not None:
            bias = bias + self.conv.bias * scale
        if isinstance(self.conv, Pointwise):
            return F.linear(x.permute(0, 2, 3, 1), self.conv.weight * scale[:, None], bias).permute(0, 3, 1, 2)
        c = self.conv
        return F.conv2d(x, c.weight * scale.view(-1, 1, 1, 1), bias, c.stride, c.padding, c.dilation, c.groups)


class ConvBNAct(nn.Sequential):
    """conv(k, stride)-BN-ReLU; (B, C_in, H, W) -> (B, C_out, H / stride, W / stride)."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int = 3, stride: int = 1) -> None:
        super().__init__(
            ConvBN(nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2, bias=False)),
            nn.ReLU(inplace=True),
        )


class DSConvBlock(nn.Module):
    """Residual depthwise-separable block: ReLU(x + BN(pw(ReLU(BN(dw3x3(x)))))); (B, C, H, W) -> same."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.dw = ConvBN(nn.Conv2d(ch, ch, 3, padding=1, groups=ch, bias=False))
        self.pw = ConvBN(Pointwise(ch, ch, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.pw(F.relu(self.dw(x), inplace=True))
        out += x  # in place: one full-size tensor fewer (BN's backward does not need its output)
        return F.relu(out, inplace=True)


class PatchMerge(nn.Module):
    """2x2 stride-2 conv then channels-last LayerNorm; (B, C_in, H, W) -> (B, H/2, W/2, C_out)."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_ch, out_ch, 2, stride=2)
        self.norm = nn.LayerNorm(out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class VSSStage(nn.Module):
    """Encoder stage at a deep level: patch-merge then VSS blocks; (B, C_in, H, W) -> (B, C_out, H/2, W/2)."""

    def __init__(self, in_ch: int, out_ch: int, depth: int, **vss_kwargs) -> None:
        super().__init__()
        self.down = PatchMerge(in_ch, out_ch)
        self.blocks = nn.Sequential(*(VSSBlock(out_ch, **vss_kwargs) for _ in range(depth)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.down(x)).permute(0, 3, 1, 2)  # NCHW view of channels-last memory


class UpAdd(nn.Module):
    """1x1 conv (deep -> skip channels) at the low resolution, bilinear x2, add the skip.

    (B, C_deep, h, w), (B, C_skip, 2h, 2w) -> (B, C_skip, 2h, 2w).
    """

    def __init__(self, deep_ch: int, skip_ch: int) -> None:
        super().__init__()
        self.proj = ConvBN(Pointwise(deep_ch, skip_ch, bias=False))

    def forward(self, deep: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        up = F.interpolate(self.proj(deep), size=skip.shape[-2:], mode="bilinear", align_corners=False)
        up += skip  # in place: interpolate's backward does not need its output
        return up


class VSSDecoderBlock(nn.Module):
    """VSS blocks on an NCHW map; (B, C, H, W) -> (B, C, H, W)."""

    def __init__(self, ch: int, depth: int, **vss_kwargs) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*(VSSBlock(ch, **vss_kwargs) for _ in range(depth)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class MambaUNet(nn.Module):
    """Visual state-space U-Net; (B, in_channels, H, W) -> logits (B, num_classes, H, W), H, W % 32 == 0.

    ``channels[i]`` is the width at stride 2**i; the last ``len(vss_depths)`` levels are VSS stages
    with ``vss_depths`` blocks each (encoder) and ``decoder_vss_depth`` blocks (decoder, except the
    bottleneck, which has no decoder block). It computes channels-last: ``encode``'s features are
    NCHW tensors with channels-last memory; ``decode`` accepts either memory format.
    """

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 2,
        channels: tuple[int, ...] = (8, 16, 32, 64, 128, 248),
        vss_depths: tuple[int, ...] = (2, 2),
        decoder_vss_depth: int = 1,
        d_state: int = 8,
        expand: float = 2.0,
        mlp_ratio: float = 0.0,
        scan_backend: str = "auto",
    ) -> None:
        super().__init__()
        channels = tuple(channels)
        n_vss = len(vss_depths)
        n_conv = len(channels) - n_vss
        if n_conv < 1:
            raise ValueError("need at least one convolutional level (the full-resolution stem)")
        vss_kwargs = dict(d_state=d_state, expand=expand, mlp_ratio=mlp_ratio, scan_backend=scan_backend)
        self.feature_channels = channels
        self.stride = 2 ** (len(channels) - 1)

        # Full resolution is where memory traffic costs most: the stem is a bare conv + ReLU, and the
        # decoder ends there with the skip sum and a 3x3 head, no block.
        stages: list[nn.Module] = [
            nn.Sequential(nn.Conv2d(in_channels, channels[0], 3, padding=1), nn.ReLU(inplace=True))
        ]
        for i in range(1, n_conv):
            stages.append(nn.Sequential(ConvBNAct(channels[i - 1], channels[i], stride=2), DSConvBlock(channels[i])))
        for j, depth in enumerate(vss_depths):
            i = n_conv + j
            stages.append(VSSStage(channels[i - 1], channels[i], depth, **vss_kwargs))
        self.encoder = nn.ModuleList(stages)

        # Decoder level i (fed from level i + 1): VSS blocks where the encoder has them, else DS-conv.
        self.ups = nn.ModuleList(UpAdd(channels[i + 1], channels[i]) for i in range(len(channels) - 1))
        self.dec_blocks = nn.ModuleList(
            VSSDecoderBlock(channels[i], decoder_vss_depth, **vss_kwargs)
            if i >= n_conv
            else (DSConvBlock(channels[i]) if i > 0 else nn.Identity())
            for i in range(len(channels) - 1)
        )
        self.head = nn.Conv2d(channels[0], num_classes, 3, padding=1)

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, in_channels, H, W) -> features at strides 1, 2, ..., 32: (B, channels[i], H / 2**i, W / 2**i)."""
        if x.shape[-1] % self.stride or x.shape[-2] % self.stride:
            raise ValueError(f"input sides must be multiples of {self.stride}; got {tuple(x.shape[-2:])}")
        # Channels-last throughout: oneDNN's convolutions with few channels are several times faster
        # on NHWC than on NCHW, and the VSS stages then get (B, H, W, C) rows without a copy.
        x = x.contiguous(memory_format=torch.channels_last)
        feats = []
        for stage in self.encoder:
            x = stage(x)
            feats.append(x)
        return feats

    def decode(self, feats: list[torch.Tensor], return_features: bool = False):
        """Features (deepest last; the deepest may be replaced, e.g. by a projected teacher feature)
        -> logits (B, num_classes, H, W); with ``return_features`` also the last decoder map (B, channels[0], H, W)."""
        x = feats[-1]
        for i in range(len(feats) - 2, -1, -1):
            x = self.dec_blocks[i](self.ups[i](x, feats[i]))
        logits = self.head(x)
        return (logits, x) if return_features else logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))


@register_model("mamba_unet")
def mamba_unet(in_channels: int = 3, num_classes: int = 2, **kwargs) -> MambaUNet:
    """The Mamba student (about 1.34 M parameters with the defaults)."""
    return MambaUNet(in_channels=in_channels, num_classes=num_classes, **kwargs)
