"""Mean Teacher: a student and its EMA teacher agree on unlabeled images (SSL4MIS's 2D recipe)."""

from __future__ import annotations

from typing import Any

import torch

from .base import SegmentationModule
from .components import (
    EMATeacher,
    check_weights,
    consistency_weight,
    softmax_mse,
    split_batch,
    teacher_input_noise,
)


class MeanTeacher(SegmentationModule):
    """Mean Teacher (Tarvainen & Valpola, "Mean teachers are better role models", NeurIPS 2017), as in
    SSL4MIS's ``train_mean_teacher_2D.py``::

        L = L_sup(f_s(x_l), y) + w(t) * mean_{u,k,y,x} (softmax f_s(u) - softmax f_t(u + n))^2
        n = clamp(N(0, 0.1^2), -0.2, 0.2),     w(t) = 0.1 * exp(-5 (1 - t/T)^2)
        after every optimiser step t: theta_t <- alpha theta_t + (1 - alpha) theta_s,
                                      alpha = min(1 - 1/(t + 1), 0.99)

    L_sup is the base's 0.5 * (CE + Dice). Labeled and unlabeled weak views go through the student in
    one forward (one set of BatchNorm statistics, as SSL4MIS's mixed batch). The teacher averages the
    student's parameters only and keeps its own BatchNorm buffers, as SSL4MIS (see ``EMATeacher``);
    it is saved in checkpoints but only the student (``net``) is validated, tested and deployed.

    Args:
        ema_decay: alpha_max, the teacher's EMA decay once the true-average phase is over (0.99).
        consistency: weight of the consistency term after the ramp (SSL4MIS: 0.1).
        ramp_fraction: length T of the sigmoid ramp of the consistency weight, as a fraction of the
            run's total steps (SSL4MIS ramps over its whole run: 1.0).
        noise_std: standard deviation of the Gaussian noise added to the teacher's input (0.1).
        noise_clip: the teacher's input noise is clipped to [-noise_clip, noise_clip] (0.2).
        **kwargs: the base's arguments (network, optimiser, learning-rate schedule).
    """

    method_name = "mean_teacher"
    display_name = "Mean Teacher"
    uses_unlabeled = True

    def __init__(
        self,
        ema_decay: float = 0.99,
        consistency: float = 0.1,
        ramp_fraction: float = 1.0,
        noise_std: float = 0.1,
        noise_clip: float = 0.2,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"model.ema_decay={ema_decay}: must be in [0, 1)")
        check_weights(ramp_fraction, consistency=consistency, noise_std=noise_std, noise_clip=noise_clip)
        self.teacher = EMATeacher(self.net, buffers="own")

    def mt_losses(self, batch: dict) -> tuple[int, torch.Tensor, dict, torch.Tensor, torch.Tensor]:
        """Labeled + unlabeled weak views through the student in one forward: the labeled batch size n, the
        logits (labeled first), the unlabeled batch, L_sup and the teacher-consistency term."""
        lab, unl = split_batch(batch)
        n = lab["mask"].shape[0]
        logits = self(torch.cat([lab["image_weak"], unl["image_weak"]]))
        sup = self.supervised_loss(logits[:n], lab["mask"])
        return n, logits, unl, sup, self.consistency_loss(logits[n:], unl["image_weak"])

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        hp = self.hparams
        n, _, _, sup, cons = self.mt_losses(batch)
        w = consistency_weight(self, hp.consistency, hp.ramp_fraction)
        loss = sup + w * cons
        self.log("train/consistency_weight", w, batch_size=n)
        self.log_losses({"loss": loss, "sup": sup, "consistency": cons}, batch_size=n)
        return loss

    def teacher_probs(self, images: torch.Tensor) -> torch.Tensor:
        """softmax f_t(u + n): (B, K, H, W) float32, no graph."""
        hp = self.hparams
        return torch.softmax(self.teacher(teacher_input_noise(images, hp.noise_std, hp.noise_clip)).float(), dim=1)

    def consistency_loss(self, student_logits: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """mean (softmax f_s(u) - softmax f_t(u + n))^2 over the unlabeled batch, classes and pixels."""
        return softmax_mse(student_logits, self.teacher_probs(images)).mean()

    def on_train_batch_end(self, outputs: Any, batch: dict, batch_idx: int) -> None:
        self.teacher.update_after_step(self.net, self.global_step, self.hparams.ema_decay)
