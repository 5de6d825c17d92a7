"""MC-Net+: one encoder, three decoders that differ in up-sampling, mutually consistent."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..models.multihead import auxiliary_decoders, require_unet
from .base import SegmentationModule
from .components import check_weights, consistency_weight, split_batch


def sharpen(p: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """MC-Net+'s sharpening of probabilities: p^(1/T) / (p^(1/T) + (1 - p)^(1/T)), element-wise.

    For two classes this is the softmax of the logits divided by T; values at 0.5 stay, others move
    towards 0 or 1 (T = 0.1 turns 0.6 into 0.98)."""
    inv = 1.0 / temperature
    a, b = p.pow(inv), (1 - p).pow(inv)
    return a / (a + b)


def mutual_consistency(probs: Sequence[torch.Tensor], temperature: float = 0.1) -> torch.Tensor:
    """sum_{i != j} mean (p_i - sharpen(p_j))^2 over the decoders' probabilities (each (B, K, H, W)).

    As the authors' code, the sharpened targets are not detached: gradient reaches both decoders of a pair."""
    soft = [sharpen(p, temperature) for p in probs]
    loss = probs[0].new_zeros(())
    for i, p in enumerate(probs):
        for j, s in enumerate(soft):
            if i != j:
                loss = loss + ((p - s) ** 2).mean()
    return loss


class MCNetPlus(SegmentationModule):
    """MC-Net+ (Wu et al., "Mutual consistency learning for semi-supervised medical image segmentation",
    Medical Image Analysis 2022; the 2D ``mcnet2d_v2`` of the authors' code)::

        p_d = softmax D_d(E(x)),  d = 1..3 (transposed-conv, bilinear, nearest-neighbour up-sampling)
        L = sum_d L_sup(p_d on labeled) + w(t) * sum_{i != j} mean (p_i - sharpen(p_j, 0.1))^2
        w(t) = 0.1 * exp(-5 (1 - t/T)^2)

    on labeled and unlabeled images alike. E + D_1 is the configured U-Net (``net``; the reference
    transposed-conv decoder), which is evaluated and deployed, so that the row's network is the same
    ``unet`` as the other baselines' (the authors evaluate their first decoder, the bilinear one); D_2, D_3
    are training-only decoders on the same encoder. Supervision per decoder is the base's 0.5 * (CE + Dice); the authors' 2D script trains
    with 0.5 * Dice per decoder (it computes the CE but leaves it out of the loss).

    Args:
        temperature: sharpening temperature T of the pseudo-labels (0.1).
        consistency: weight of the mutual consistency after the ramp (0.1).
        ramp_fraction: length of the sigmoid ramp, as a fraction of the run's total steps (1.0).
        aux_modes: up-sampling of the extra decoders (``bilinear``, ``nearest``; ``transpose`` possible).
        **kwargs: the base's arguments (network: must be ``unet``; optimiser; schedule).
    """

    method_name = "mcnet_plus"
    display_name = "MC-Net+"
    uses_unlabeled = True

    def __init__(
        self,
        temperature: float = 0.1,
        consistency: float = 0.1,
        ramp_fraction: float = 1.0,
        aux_modes: tuple[str, ...] = ("bilinear", "nearest"),
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if temperature <= 0:
            raise ValueError(f"model.temperature={temperature}: must be > 0")
        check_weights(ramp_fraction, consistency=consistency)
        net = require_unet(self.net, "MC-Net+")
        self.aux_decoders = auxiliary_decoders(net, aux_modes, self.hparams.num_classes)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        hp = self.hparams
        lab, unl = split_batch(batch)
        n = lab["mask"].shape[0]
        feats = self.net.encode(torch.cat([lab["image_weak"], unl["image_weak"]]))
        outputs = [self.net.decode(feats)] + [dec(feats) for dec in self.aux_decoders]
        sup = sum(self.supervised_loss(o[:n], lab["mask"]) for o in outputs)
        mc = mutual_consistency([torch.softmax(o.float(), dim=1) for o in outputs], hp.temperature)
        w = consistency_weight(self, hp.consistency, hp.ramp_fraction)
        loss = sup + w * mc
        self.log("train/consistency_weight", w, batch_size=n)
        self.log_losses({"loss": loss, "sup": sup, "mutual_consistency": mc}, batch_size=n)
        return loss
