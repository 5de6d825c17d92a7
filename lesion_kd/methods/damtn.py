"""DAMTN: Mean Teacher made distribution-aware: the unlabeled predictions' statistics follow the labeled ones'."""

from __future__ import annotations

import torch

from ..losses.dss import DistributionAlignment
from .components import check_weights, consistency_weight, ramp, split_batch
from .mean_teacher import MeanTeacher


class DAMTN(MeanTeacher):
    """Distribution-aware Mean Teacher (DAMTN, Zhao et al. 2025, as cited by the paper), reconstructed from
    its idea (no public code was found): SSL4MIS's Mean Teacher plus an alignment of the student's
    prediction distribution on unlabeled images with the one on labeled images::

        L = L_sup(f_s(x_l), y) + w(t) * mean (softmax f_s(u) - softmax f_t(u + n))^2
            + gamma * r(t) * L_align(softmax f_s(u))
        L_align = sum_j (s_U[j] - s_L[j])^2,  s = (mean, var of per-image lesion area; mean, var of per-image
                  mean lesion confidence) over the batch; s_L an EMA (momentum 0.99) of the labeled batches'
        w(t) = 0.1 r(t),   r(t) = exp(-5 (1 - t/T)^2)

    The alignment is our L_dss's :class:`~lesion_kd.losses.dss.DistributionAlignment` (the same idea, one
    implementation): labeled statistics from the student's labeled predictions (no gradient), unlabeled ones
    with gradient into the student. Everything else is :class:`~.mean_teacher.MeanTeacher`'s: EMA alpha
    min(1 - 1/(t + 1), 0.99) on parameters, the teacher keeping its own BatchNorm buffers (as SSL4MIS),
    teacher input noise clamp(N(0, 0.1^2), +-0.2). Works with any network (``unet``, ``mamba_unet``). gamma =
    0.1 is L_dss's default alignment weight (our choice: DAMTN's weights are not public).

    Args:
        align_weight: gamma, weight of the distribution alignment after the ramp (0.1).
        align_momentum: momentum of the labeled statistics' moving average (0.99).
        **kwargs: MeanTeacher's arguments (ema_decay, consistency, ramp_fraction, noise) and the base's.
    """

    method_name = "damtn"
    display_name = "DAMTN"
    uses_unlabeled = True

    def __init__(self, align_weight: float = 0.1, align_momentum: float = 0.99, **kwargs) -> None:
        super().__init__(**kwargs)
        check_weights(align_weight=align_weight)
        if not 0.0 <= align_momentum < 1.0:
            raise ValueError(f"model.align_momentum={align_momentum}: must be in [0, 1)")
        if self.hparams.num_classes != 2:
            raise ValueError("DAMTN's alignment uses lesion statistics: model.num_classes must be 2")
        self.alignment = DistributionAlignment(align_momentum)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        hp = self.hparams
        lab, unl = split_batch(batch)
        n = lab["mask"].shape[0]
        logits = self(torch.cat([lab["image_weak"], unl["image_weak"]]))
        probs = torch.softmax(logits.float(), dim=1)
        sup = self.supervised_loss(logits[:n], lab["mask"])
        cons = self.consistency_loss(logits[n:], unl["image_weak"])
        self.alignment.update_labeled(probs[:n])
        align = self.alignment(probs[n:])
        r = ramp(self, hp.ramp_fraction)
        w = consistency_weight(self, hp.consistency, hp.ramp_fraction)
        loss = sup + w * cons + hp.align_weight * r * align
        self.log("train/consistency_weight", w, batch_size=n)
        self.log_losses({"loss": loss, "sup": sup, "consistency": cons, "align": align}, batch_size=n)
        return loss
