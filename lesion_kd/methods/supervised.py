"""Supervised-only training on the labeled fraction (the lower bound; with 100% labels, the upper bound)."""

from __future__ import annotations

import torch

from .base import SegmentationModule


class Supervised(SegmentationModule):
    """Any registered network trained with 0.5 * (CE + Dice) on the weak views of labeled images only.

    Defaults follow SSL4MIS (SGD lr 0.01, momentum 0.9, weight decay 1e-4, poly 0.9).
    """

    method_name = "supervised"
    display_name = "supervised"
    uses_unlabeled = False

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        lab = batch["labeled"]
        loss = self.supervised_loss(self(lab["image_weak"]), lab["mask"])
        self.log_losses({"loss": loss, "sup": loss}, batch_size=lab["mask"].shape[0])
        return loss
