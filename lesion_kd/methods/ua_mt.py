"""UA-MT: Mean Teacher whose consistency counts only where the teacher is certain."""

from __future__ import annotations

import math

import torch

from .components import ramp, softmax_mse
from .mean_teacher import MeanTeacher


def uncertainty_threshold(ramp_value: float, num_classes: int) -> float:
    """H(t) = (0.75 + 0.25 * ramp(t)) * U_max, U_max = ln K the largest entropy (ln 2 for lesion/background)."""
    return (0.75 + 0.25 * ramp_value) * math.log(num_classes)


def predictive_entropy(probs: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """U = -sum_k p_k ln(p_k + eps): (B, K, H, W) mean probabilities -> (B, 1, H, W)."""
    return -(probs * torch.log(probs + eps)).sum(1, keepdim=True)


def masked_consistency(dist: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sum(mask * dist) / (K * sum(mask) + 1e-16): the mean of ``dist`` (B, K, H, W) over the certain pixels
    (``mask`` (B, 1, H, W) in {0, 1}); 0 when no pixel is certain. (SSL4MIS divides by 2 sum(mask): K = 2.)"""
    return (mask * dist).sum() / (dist.shape[1] * mask.sum() + 1e-16)


class UAMT(MeanTeacher):
    """UA-MT (Yu et al., "Uncertainty-aware self-ensembling model for semi-supervised 3D left atrium
    segmentation", MICCAI 2019), as in SSL4MIS's ``train_uncertainty_aware_mean_teacher_2D.py``.

    The Mean Teacher (all of its arguments and constants apply) with the consistency masked::

        p_bar = 1/T sum_{i=1..T} softmax f_t(u + n_i)         T = 8 noisy teacher passes (dropout active)
        U = -sum_k p_bar_k ln p_bar_k                         per pixel
        mask = [U < H(t)],  H(t) = (0.75 + 0.25 * ramp(t)) * ln 2
        L_cons = sum(mask * (softmax f_s(u) - softmax f_t(u + n))^2) / (K * sum(mask))

    The threshold ramp(t) = exp(-5 (1 - t/T_H)^2) spans ``threshold_ramp_fraction`` of the run (SSL4MIS:
    the whole run). The teacher passes run two copies of the batch per forward, as SSL4MIS.

    Args:
        passes: T, the number of stochastic teacher passes for the uncertainty (8).
        threshold_ramp_fraction: length of the threshold's ramp from 0.75 ln K to ln K, as a fraction of
            the run's total steps (1.0).
        **kwargs: MeanTeacher's arguments (EMA decay, consistency weight and ramp, teacher noise) and the
            base's (network, optimiser, schedule).
    """

    method_name = "ua_mt"
    display_name = "UA-MT"
    uses_unlabeled = True

    def __init__(self, passes: int = 8, threshold_ramp_fraction: float = 1.0, **kwargs) -> None:
        super().__init__(**kwargs)
        if passes < 1:
            raise ValueError(f"model.passes={passes}: must be >= 1")
        if not 0.0 <= threshold_ramp_fraction <= 1.0:
            raise ValueError(f"model.threshold_ramp_fraction={threshold_ramp_fraction}: must be in [0, 1]")

    def mean_teacher_probs(self, images: torch.Tensor) -> torch.Tensor:
        """p_bar (B, K, H, W): the mean of ``passes`` noisy teacher softmaxes, two batch copies per forward."""
        b, total, acc = images.shape[0], self.hparams.passes, None
        for i in range(0, total, 2):
            k = min(2, total - i)
            p = self.teacher_probs(images.repeat(k, 1, 1, 1))  # (k * B, K, H, W), copy-major
            p = p.view(k, b, *p.shape[1:])
            acc = p.sum(0) if acc is None else acc + p.sum(0)
        return acc / total

    def consistency_loss(self, student_logits: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        target = self.teacher_probs(images)
        uncertainty = predictive_entropy(self.mean_teacher_probs(images))
        threshold = uncertainty_threshold(ramp(self, self.hparams.threshold_ramp_fraction), student_logits.shape[1])
        mask = (uncertainty < threshold).float()
        n = images.shape[0]
        self.log("train/uncertainty_threshold", threshold, batch_size=n)
        self.log("train/certain_fraction", mask.mean(), batch_size=n)
        return masked_consistency(softmax_mse(student_logits, target), mask)
