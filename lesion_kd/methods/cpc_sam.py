"""CPC-SAM: a LoRA-tuned SAM with two mask decoders that prompt each other (cross prompting consistency).

The network itself, ``sam_lora``, is :mod:`lesion_kd.models.sam_lora`; here the training objective.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch

from .base import SegmentationModule
from .components import largest_component, masked_dice_ce, split_batch, total_steps


def point_prompts(
    pred: torch.Tensor, num_classes: int = 2, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CPC-SAM's ``prompt_generate_random_fast``: one point per class from a predicted label map.

    For each image and class c, in the largest 8-connected region of ``pred == c``: the centre-most point
    (maximum of the Euclidean distance to the region's border, ties broken at random) and a uniformly random
    point. Labels: 1 (positive) for the lesion, 0 (negative) for the background; an absent class repeats
    the background's points with label 0.

    Args:
        pred: (B, H, W) integer label map.

    Returns:
        centre (B, C, 2) and random (B, C, 2) float (x, y) pixel coordinates, labels (B, C) long.
    """
    from scipy import ndimage

    b = pred.shape[0]
    centre, rand = torch.zeros(b, num_classes, 2), torch.zeros(b, num_classes, 2)
    labels = torch.zeros(b, num_classes, dtype=torch.long)
    for i in range(b):
        for c in range(num_classes):
            region = largest_component((pred[i : i + 1] == c).long())[0].cpu().numpy() > 0
            if not region.any():
                centre[i, c], rand[i, c] = centre[i, 0], centre[i, 0]
                continue
            dist = ndimage.distance_transform_edt(np.pad(region, 1))[1:-1, 1:-1]
            for out, ys_xs in ((centre, np.nonzero(dist == dist.max())), (rand, np.nonzero(region))):
                j = int(torch.randint(len(ys_xs[0]), (1,), generator=generator))
                out[i, c] = torch.tensor([float(ys_xs[1][j]), float(ys_xs[0][j])])
            labels[i, c] = int(c > 0)
    return centre.to(pred.device), rand.to(pred.device), labels.to(pred.device)


def to_model_frame(xy: torch.Tensor, size: tuple[int, int], model_size: int) -> torch.Tensor:
    """Pixel (x, y) of an (H, W) image -> the same pixel centre in the encoder's model_size x model_size input."""
    scale = xy.new_tensor([model_size / size[1], model_size / size[0]])
    return (xy + 0.5) * scale - 0.5


class CPCSAM(SegmentationModule):
    """CPC-SAM (Miao et al., "Cross Prompting Consistency with Segment Anything Model for Semi-supervised
    Medical Image Segmentation", MICCAI 2024), as in the authors' ``trainer_dualmask.py``
    (``trainer_acdc_dualmask_prompt_ssl_fixcoe_random_new_mean_up``, point prompts). The trained network
    is SAM itself (:class:`~lesion_kd.models.sam_lora.SAMDualDecoder`: LoRA rank 4 on the encoder's q/v,
    two mask decoders D1, D2). With S = 0.2 CE + 0.8 Dice and C = 0.5 (CE + Dice) (Dice: SSL4MIS's, squared denominators, pooled
    over the batch), on labeled x_l (labels y) and unlabeled x_u::

        L1 = S(D1(x_l), y) + S(D2(x_l), y)                                  prompt-free, every step
        after the supervised warm-up (the first ``warm_fraction`` of the steps):
        p, p_r = centre-most and random point of each class of argmax D2(x)   (see ``point_prompts``)
        L2 = S(D1(x_l | p), y) + S(D1(x_l | p_r), y)
             + 0.4 C(D2(x_u), q) + 0.05 C(D1(x_u | p_r), q),   q = argmax (softmax D1(x_u|p) + softmax D1(x_u|p_r))/2
        L3 = L2 with D1 and D2 swapped (D1's prompt-free mask prompts D2)
        L = L1 + L2 + L3

    so each decoder's prompt-free prediction is supervised on unlabeled images by the other decoder
    prompted with points from it. AdamW (lr 1e-3, weight decay 0.1), 250 warm-up steps then poly 0.9.
    The validated, tested and deployed output is the mean of both decoders' prompt-free probabilities.
    Deviations: the authors take three optimiser steps per iteration (one per loss, each after a new
    forward pass); here one step on L1 + L2 + L3 from one encoder pass. Their warm-up is 5000 of about
    30k iterations: ``warm_fraction`` 1/6 of the run. Binary lesions: SAM's single-mask output and its
    positive/negative point labels stand in for their per-class mask tokens and point embeddings.

    Args:
        network: ``sam_lora`` (the only network this method trains).
        network_kwargs: :class:`~lesion_kd.models.sam_lora.SAMDualDecoder`'s ``backbone`` (``litemedsam`` or
            ``medsam``), ``checkpoint``, ``rank``, ``backbone_kwargs``.
        dice_weight: weight of Dice in S (0.8; CE gets 1 - dice_weight).
        warm_fraction: supervised-only warm-up, as a fraction of the run's steps (1/6).
        coe: weight of the cross-prompting consistency on the prompt-free decoder (0.4).
        coe2: weight of the consistency on the random-point prompted decoder (0.05).
        **kwargs: the base's other arguments.
    """

    method_name = "cpc_sam"
    display_name = "CPC-SAM"
    uses_unlabeled = True

    def __init__(
        self,
        network: str = "sam_lora",
        network_kwargs: dict[str, Any] | None = None,
        optimizer: Literal["sgd", "adamw"] = "adamw",
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        schedule: Literal["poly", "cosine", "constant"] = "poly",
        warmup_steps: int = 250,
        dice_weight: float = 0.8,
        warm_fraction: float = 1 / 6,
        coe: float = 0.4,
        coe2: float = 0.05,
        **kwargs,
    ) -> None:
        if network != "sam_lora":
            raise ValueError(f"model.network={network!r}: CPC-SAM trains SAM itself (network: sam_lora)")
        super().__init__(
            network=network,
            network_kwargs=network_kwargs,
            optimizer=optimizer,
            lr=lr,
            weight_decay=weight_decay,
            schedule=schedule,
            warmup_steps=warmup_steps,
            **kwargs,
        )
        if not 0.0 <= dice_weight <= 1.0 or not 0.0 <= warm_fraction <= 1.0 or coe < 0 or coe2 < 0:
            raise ValueError(
                "model.dice_weight and model.warm_fraction must be in [0, 1], model.coe/coe2 >= 0"
            )

    def seg_loss(self, logits: torch.Tensor, target: torch.Tensor, dice_weight: float) -> torch.Tensor:
        dice, ce = masked_dice_ce(logits, target, torch.ones_like(target))
        return (1 - dice_weight) * ce + dice_weight * dice

    def cross_prompted(
        self, emb: torch.Tensor, free_logits: torch.Tensor, target: int, size: tuple[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoder ``target``'s logits prompted by the centre-most and by the random points of the other
        decoder's prompt-free prediction ``free_logits``."""
        centre, rand, labels = point_prompts(free_logits.detach().argmax(1))
        s = self.net.input_size
        return (
            self.net.decode_one(emb, target, size, (to_model_frame(centre, size, s), labels)),
            self.net.decode_one(emb, target, size, (to_model_frame(rand, size, s), labels)),
        )

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        hp = self.hparams
        lab, unl = split_batch(batch)
        n, y = lab["mask"].shape[0], lab["mask"]
        size = tuple(lab["image_weak"].shape[-2:])
        emb = self.net.encode(torch.cat([lab["image_weak"], unl["image_weak"]]))[-1]
        free = [self.net.decode_one(emb, k, size) for k in (0, 1)]
        losses = {
            "sup": self.seg_loss(free[0][:n], y, hp.dice_weight)
            + self.seg_loss(free[1][:n], y, hp.dice_weight)
        }
        loss = losses["sup"]
        if self.global_step >= hp.warm_fraction * total_steps(self):
            for src, tgt in ((1, 0), (0, 1)):  # L2: D2 prompts D1; L3: D1 prompts D2
                prompted, prompted_r = self.cross_prompted(emb, free[src], tgt, size)
                q = (
                    ((torch.softmax(prompted[n:], 1) + torch.softmax(prompted_r[n:], 1)) / 2)
                    .detach()
                    .argmax(1)
                )
                sup = self.seg_loss(prompted[:n], y, hp.dice_weight) + self.seg_loss(
                    prompted_r[:n], y, hp.dice_weight
                )
                cons = self.seg_loss(free[src][n:], q, 0.5)
                cons_r = self.seg_loss(prompted_r[n:], q, 0.5)
                losses[f"prompted_sup{tgt + 1}"], losses[f"cross{src + 1}"] = sup, cons
                loss = loss + sup + hp.coe * cons + hp.coe2 * cons_r
        losses["loss"] = loss
        self.log_losses(losses, batch_size=n)
        return loss
