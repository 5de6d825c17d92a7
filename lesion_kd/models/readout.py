"""``litemedsam``: a light segmentation head on the frozen LiteMedSAM image embedding (the teacher's own
read-out, ``lesion_kd.methods.TeacherReadout``).

Unlike the other registered networks, its input is the teacher's (B, 256, 64, 64) image embedding, aligned with
the full extent of the image (``lesion_kd.teacher_cache``), not the image: the encoder is the frozen teacher,
kept outside the network (its embeddings come from the cache, or from the teacher run online for new images).
``encode`` / ``decode`` keep the registry's interface over that input.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .registry import register_model


class ReadoutHead(nn.Module):
    """3x3 conv + BatchNorm + ReLU, then a 1x1 conv to class logits, on the 64x64 embedding grid.

    Args:
        in_channels: ignored (the input is the embedding, ``embed_channels`` wide); kept for the registry's call.
        num_classes: output classes.
        embed_channels: channels of the teacher embedding (256 for SAM-family encoders).
        hidden: channels of the hidden layer (0: a linear probe, one 1x1 convolution).
    """

    reads_images = False  # its input is the teacher's embedding (what the report's picture grid asks)

    def __init__(self, in_channels: int = 3, num_classes: int = 2, embed_channels: int = 256, hidden: int = 64) -> None:
        super().__init__()
        del in_channels
        self.embed_channels = embed_channels
        if hidden > 0:
            self.body = nn.Sequential(nn.Conv2d(embed_channels, hidden, 3, padding=1, bias=False),
                                      nn.BatchNorm2d(hidden), nn.ReLU(inplace=True))
            self.out = nn.Conv2d(hidden, num_classes, 1)
        else:
            self.body = nn.Identity()
            self.out = nn.Conv2d(embed_channels, num_classes, 1)

    def encode(self, emb: torch.Tensor) -> list[torch.Tensor]:
        if emb.ndim != 4 or emb.shape[1] != self.embed_channels:
            raise ValueError(f"ReadoutHead expects a (B, {self.embed_channels}, h, w) teacher embedding, got "
                             f"{tuple(emb.shape)}")
        return [self.body(emb)]

    def decode(self, feats: list[torch.Tensor]) -> torch.Tensor:
        return self.out(feats[-1])

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(emb))


@register_model("litemedsam")
def litemedsam_readout(**kwargs) -> ReadoutHead:
    return ReadoutHead(**kwargs)
