"""BCP: bidirectional copy-paste between labeled and unlabeled images, after a labeled-only pre-training."""

from __future__ import annotations

from typing import Any, Literal

import torch

from .base import SegmentationModule
from .components import (
    EMATeacher,
    box_mask,
    copy_paste,
    largest_component,
    masked_dice_ce,
    split_batch,
    total_steps,
)


def mix_loss(logits: torch.Tensor, outer_target: torch.Tensor, inner_target: torch.Tensor, mask: torch.Tensor,
             outer_weight: float = 1.0, inner_weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """BCP's loss on a copy-paste mix: (Dice, CE), each w_out * term(outside the box) + w_in * term(inside).

    Args:
        logits: (B, K, H, W) prediction on ``copy_paste(outer, inner, mask)``.
        outer_target: (B, H, W) labels of the outer image (used where mask = 1).
        inner_target: (B, H, W) labels of the pasted image (used where mask = 0).
        mask: (H, W) mixing mask from :func:`~lesion_kd.methods.components.box_mask`.
        outer_weight, inner_weight: 0.5 for the pixels whose labels are pseudo-labels (unlabeled origin).
    """
    d_out, c_out = masked_dice_ce(logits, outer_target, mask)
    d_in, c_in = masked_dice_ce(logits, inner_target, 1 - mask)
    return outer_weight * d_out + inner_weight * d_in, outer_weight * c_out + inner_weight * c_in


class BCP(SegmentationModule):
    """Bidirectional Copy-Paste (Bai et al., "Bidirectional copy-paste for semi-supervised medical image
    segmentation", CVPR 2023), as in the authors' ``ACDC_BCP_train.py``. Two stages in one run:

    Pre-training (the first ``pretrain_fraction`` of the steps), labeled images only: the labeled batch is
    split into halves a, b; M is ones with a zero box of 2/3 H x 2/3 W (one random position per step)::

        x = a * M + b * (1 - M),   L = (Dice + CE)/2 of f(x) against y_a outside the box and y_b inside

    Self-training: the teacher is set to the current student (parameters and BatchNorm buffers) and
    follows it by EMA with alpha = 0.99 on the whole state after every step. With labeled halves a, b and
    unlabeled halves u_a, u_b, and pseudo-labels p = LCC(argmax f_t(u)) (largest connected component per
    class)::

        x_1 = u_a * M + a * (1 - M)    targets p_a outside (weight 0.5), y_a inside (weight 1)
        x_2 = b * M + u_b * (1 - M)    targets y_b outside (weight 1),   p_b inside (weight 0.5)
        L = (Dice_1 + Dice_2 + CE_1 + CE_2) / 2                      masked Dice and CE (``mix_loss``)

    Learning rate: a constant 0.01 (the authors never decay it). No consistency weight (the authors'
    script computes one and never uses it). The self-training starts, student and teacher, from the
    pre-training's best validation state, as the authors' ``self_train`` loads ``{model}_best_model.pth``
    (the idle teacher holds that state during the pre-training; with no validation in the pre-training,
    the last state). Deviations: one run instead of two (the optimiser's momentum carries over instead of
    being reloaded with the best weights), and the box position is uniform over all positions where it
    fits. The teacher runs in training mode (batch statistics, dropout) as the authors' ``ema_model.train()``. The student (``net``) is evaluated and
    deployed.

    Args:
        pretrain_fraction: fraction of the run's steps spent in the labeled-only pre-training stage (the
            authors' script runs 30k pre-training then 30k self-training iterations: 0.5).
        ema_decay: the teacher's constant EMA decay alpha (0.99).
        unlabeled_weight: loss weight of the pixels with pseudo-labels (unlabeled origin) (0.5).
        box_ratio: side of the pasted box as a fraction of the image side (2/3).
        largest_cc: keep only the largest connected component of each class in the pseudo-labels.
        self_train_from: ``best`` (the pre-training's best validation Dice, the authors' choice) or ``last``
            (its last step; the suite's earlier default, docs/method.md, section 4.9).
        schedule: learning-rate schedule (BCP: ``constant``).
        **kwargs: the base's other arguments (network, optimiser, learning rate).
    """

    method_name = "bcp"
    display_name = "BCP"
    uses_unlabeled = True

    def __init__(
        self,
        pretrain_fraction: float = 0.5,
        ema_decay: float = 0.99,
        unlabeled_weight: float = 0.5,
        box_ratio: float = 2 / 3,
        largest_cc: bool = True,
        self_train_from: Literal["best", "last"] = "best",
        schedule: Literal["poly", "cosine", "constant"] = "constant",
        **kwargs,
    ) -> None:
        super().__init__(schedule=schedule, **kwargs)
        if not 0.0 <= pretrain_fraction < 1.0:
            raise ValueError(f"model.pretrain_fraction={pretrain_fraction}: must be in [0, 1)")
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"model.ema_decay={ema_decay}: must be in [0, 1)")
        if unlabeled_weight < 0 or not 0.0 < box_ratio < 1.0:
            raise ValueError("model.unlabeled_weight must be >= 0 and model.box_ratio in (0, 1)")
        self.teacher = EMATeacher(self.net, buffers="ema")
        # 1 once the self-training stage has set the teacher to the student: a buffer, so that it is in
        # checkpoints and a run resumed in the self-training stage keeps its teacher.
        self.register_buffer("teacher_ready", torch.zeros(()))
        # validation Dice of the best pre-training state, which the idle teacher holds until the
        # self-training starts from it (-1: no validation yet). A buffer: resumed runs keep it.
        self.register_buffer("pretrain_best_dice", torch.full((), -1.0))

    def pretrain_steps(self) -> int:
        return int(round(self.hparams.pretrain_fraction * total_steps(self)))

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        lab, unl = split_batch(batch)
        if self.global_step < self.pretrain_steps():
            return self.pretrain_step(lab)
        if not bool(self.teacher_ready):
            self.start_self_training()
        return self.self_train_step(lab, unl)

    def record_pretrain_validation(self, dice: float) -> None:
        """During the pre-training, keep the student's state in the (idle) teacher when ``dice`` is its best."""
        if self.hparams.self_train_from == "best" and not bool(self.teacher_ready) and dice > float(self.pretrain_best_dice):
            self.pretrain_best_dice.fill_(dice)
            self.teacher.copy_from(self.net)

    def start_self_training(self) -> None:
        """Student and teacher from the pre-training's best state (or its last, see ``self_train_from``)."""
        if self.hparams.self_train_from == "best" and float(self.pretrain_best_dice) >= 0:
            with torch.no_grad():
                self.net.load_state_dict(self.teacher.module.state_dict())  # in place: the optimiser keeps them
        else:
            self.teacher.copy_from(self.net)
        self.teacher_ready.fill_(1.0)

    def on_validation_epoch_end(self) -> None:
        summary = self._finish_eval("val")  # every rank gets the same (gathered) summary: one decision
        if summary is not None and not self.trainer.sanity_checking:
            self.record_pretrain_validation(float(summary["dice"]["mean"]))

    @staticmethod
    def _halves(x: torch.Tensor, what: str) -> tuple[torch.Tensor, torch.Tensor]:
        h = x.shape[0] // 2
        if h < 1:
            raise ValueError(f"BCP splits each {what} batch into two halves: its batch size must be >= 2")
        return x[:h], x[h : 2 * h]

    def _mask(self, images: torch.Tensor) -> torch.Tensor:
        return box_mask(images.shape[-2], images.shape[-1], self.hparams.box_ratio, device=images.device)

    def pretrain_step(self, lab: dict) -> torch.Tensor:
        a, b = self._halves(lab["image_weak"], "labeled")
        ya, yb = self._halves(lab["mask"], "labeled")
        m = self._mask(a)
        dice, ce = mix_loss(self(copy_paste(a, b, m)), ya, yb, m)
        loss = (dice + ce) / 2
        self.log("train/stage", 0.0, batch_size=a.shape[0])
        self.log_losses({"loss": loss, "mix_dice": dice, "mix_ce": ce}, batch_size=a.shape[0])
        return loss

    def pseudo_labels(self, images: torch.Tensor) -> torch.Tensor:
        """The teacher's (B, H, W) labels, reduced to the largest component per class when ``largest_cc``."""
        labels = self.teacher(images).argmax(1)
        return largest_component(labels) if self.hparams.largest_cc else labels

    def self_train_step(self, lab: dict, unl: dict) -> torch.Tensor:
        u = self.hparams.unlabeled_weight
        a, b = self._halves(lab["image_weak"], "labeled")
        ya, yb = self._halves(lab["mask"], "labeled")
        ua, ub = self._halves(unl["image_weak"], "unlabeled")
        if ua.shape[0] != a.shape[0]:
            raise ValueError("BCP pairs labeled and unlabeled images: use equal labeled and unlabeled batch sizes")
        pa, pb = self.pseudo_labels(ua), self.pseudo_labels(ub)  # two teacher calls, as the authors'
        m = self._mask(a)
        d1, c1 = mix_loss(self(copy_paste(ua, a, m)), pa, ya, m, outer_weight=u, inner_weight=1.0)
        d2, c2 = mix_loss(self(copy_paste(b, ub, m)), yb, pb, m, outer_weight=1.0, inner_weight=u)
        dice, ce = d1 + d2, c1 + c2
        loss = (dice + ce) / 2
        self.log("train/stage", 1.0, batch_size=a.shape[0])
        self.log_losses({"loss": loss, "mix_dice": dice, "mix_ce": ce}, batch_size=a.shape[0])
        return loss

    def on_train_batch_end(self, outputs: Any, batch: dict, batch_idx: int) -> None:
        if bool(self.teacher_ready):
            self.teacher.update_after_step(self.net, self.global_step, self.hparams.ema_decay, warmup=False)
