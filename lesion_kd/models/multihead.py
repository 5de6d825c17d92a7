"""Extra decoders and deep-supervision heads on the reference U-Net, for the multi-decoder baselines.

Networks only (the perturbations and losses live in the methods):

- :func:`auxiliary_decoders`: more :class:`~lesion_kd.models.unet.UNetDecoder` s that read the same
  encoder features as the U-Net's own decoder (CCT's auxiliary decoders, MC-Net+'s bilinear and
  nearest-neighbour decoders);
- :func:`decoder_pyramid`: the U-Net decoder's intermediate maps, coarsest first (URPC's pyramid);
- :class:`DeepSupervisionHeads`: one 3x3 classifier per intermediate decoder scale, logits resized to
  the input size (URPC's auxiliary outputs).

They are built around the network the method trains (``self.net``), so the deployed network, its
checkpoint keys (``net.*``) and its evaluation stay those of the plain ``unet``; the extra modules are
training-only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .unet import UNet, UNetDecoder

__all__ = ["DeepSupervisionHeads", "auxiliary_decoders", "decoder_pyramid", "require_unet"]


def require_unet(net: nn.Module, method: str) -> UNet:
    """``net`` itself when it is the reference U-Net; a clear error otherwise.

    The multi-decoder baselines attach decoders to the U-Net's encoder and read its decoder's
    intermediate maps, which other networks (e.g. ``mamba_unet``) do not have in the same form.
    """
    if not isinstance(net, UNet):
        raise ValueError(f"{method} builds extra decoders/heads on the reference U-Net: use network: unet "
                         f"(got {type(net).__name__})")
    return net


def auxiliary_decoders(net: UNet, modes: Sequence[str], num_classes: int) -> nn.ModuleList:
    """One new U-Net decoder per up-sampling mode (``transpose``, ``bilinear``, ``nearest``), each mapping
    ``net.encode(x)`` (B, C_i, H / 2^i, W / 2^i) to logits (B, num_classes, H, W). Independently initialised."""
    return nn.ModuleList(UNetDecoder(tuple(net.feature_channels), num_classes, mode) for mode in modes)


def decoder_pyramid(decoder: UNetDecoder, feats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The decoder's map after each up-block, coarsest first.

    For the 5-level U-Net and input (B, 3, H, W): [(B, C_3, H/8, W/8), (B, C_2, H/4, W/4),
    (B, C_1, H/2, W/2), (B, C_0, H, W)]; ``decoder.head`` of the last one equals ``decoder(feats)``.
    """
    x, maps = feats[-1], []
    for up, skip in zip(decoder.ups, feats[-2::-1], strict=True):
        x = up(x, skip)
        maps.append(x)
    return maps


class DeepSupervisionHeads(nn.Module):
    """3x3 conv classifiers on the intermediate decoder maps (all but the full-resolution one).

    ``forward(maps, size)`` with ``maps`` the first ``len(channels)`` outputs of :func:`decoder_pyramid`
    (coarsest first) -> logits, each (B, num_classes, *size), resized with nearest-neighbour
    interpolation (as SSL4MIS's URPC decoder, ``F.interpolate``'s default mode).

    Args:
        channels: channels of the maps the heads read, coarsest first (128, 64, 32 for the U-Net).
        num_classes: output classes.
    """

    def __init__(self, channels: Sequence[int], num_classes: int) -> None:
        super().__init__()
        self.heads = nn.ModuleList(nn.Conv2d(c, num_classes, 3, padding=1) for c in channels)

    def forward(self, maps: Sequence[torch.Tensor], size: Sequence[int]) -> list[torch.Tensor]:
        if len(maps) != len(self.heads):
            raise ValueError(f"expected {len(self.heads)} decoder maps, got {len(maps)}")
        return [F.interpolate(head(m), size=tuple(size), mode="nearest") for head, m in zip(self.heads, maps, strict=True)]
