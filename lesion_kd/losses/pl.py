"""L_pl: the student learns the teacher's segmentation of unlabeled views (SemiKD+, issue 28).

The teacher's pseudo-label of a view is its read-out's lesion probability ``q`` (the head on the frozen
embedding, brought onto the view by the recorded geometry). Each pixel counts by the teacher's confidence,
``w = |2q - 1|`` (0 where it hesitates, 1 where it is sure), in a cross-entropy to the hard label and a soft
Dice, averaged: the supervised loss's 0.5 CE + 0.5 Dice, confidence-weighted. Written by hand: MONAI's and
torchmetrics' Dice and CE losses take no per-pixel weight map of this kind.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def confidence_weights(q: torch.Tensor) -> torch.Tensor:
    """(B, H, W) weights |2q - 1| of a (B, H, W) lesion probability."""
    return (2 * q - 1).abs()


def pseudo_label_loss(student_logits: torch.Tensor, teacher_probs: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """0.5 (weighted CE + weighted soft Dice) of two-class student logits (B, 2, H, W) to the teacher's class
    probabilities (B, 2, H, W) (detached: the target), each pixel weighted by the teacher's confidence."""
    if student_logits.shape != teacher_probs.shape or student_logits.shape[1] != 2:
        raise ValueError(f"pseudo_label_loss: expected two (B, 2, H, W) tensors of one shape, got "
                         f"{tuple(student_logits.shape)} and {tuple(teacher_probs.shape)}")
    q = teacher_probs.detach().float()[:, 1]
    w = confidence_weights(q)
    target = (q >= 0.5).long()
    logp = F.log_softmax(student_logits.float(), dim=1)
    ce = -(logp.gather(1, target[:, None])[:, 0] * w).sum() / w.sum().clamp_min(eps)
    p = logp.exp()[:, 1]
    y = target.float()
    inter = (w * p * y).sum((1, 2))
    denom = (w * (p + y)).sum((1, 2))
    dice = 1 - (2 * inter + eps) / (denom + eps)
    return 0.5 * (ce + dice.mean())
