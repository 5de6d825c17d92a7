"""CPS: two differently initialised networks teach each other with their hard pseudo-labels."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..models import build_model
from .base import SegmentationModule
from .components import check_weights, consistency_weight, split_batch

InitScheme = Literal["kaiming", "xavier", "default"]


def init_weights(net: nn.Module, scheme: InitScheme) -> nn.Module:
    """Re-initialise ``net``'s Conv2d weights with ``kaiming`` (He normal) or ``xavier`` (Glorot normal),
    BatchNorm weights to 1 and biases to 0, as SSL4MIS's ``kaiming_normal_init_weight`` /
    ``xavier_normal_init_weight`` (conv biases and other layers keep their default init); ``default``
    leaves the network as built."""
    if scheme == "default":
        return net
    init = {"kaiming": nn.init.kaiming_normal_, "xavier": nn.init.xavier_normal_}[scheme]
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            init(m.weight)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return net


def cross_pseudo_supervision(logits1: torch.Tensor, logits2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(CE(logits1, argmax logits2), CE(logits2, argmax logits1)) on (B, K, H, W) logits.

    The pseudo-labels are hard and detached: each network learns from the other's decision, never
    through it."""
    y1 = logits1.detach().argmax(1)
    y2 = logits2.detach().argmax(1)
    return F.cross_entropy(logits1.float(), y2), F.cross_entropy(logits2.float(), y1)


class CPS(SegmentationModule):
    """Cross Pseudo Supervision (Chen et al., "Semi-supervised semantic segmentation with cross pseudo
    supervision", CVPR 2021), as in SSL4MIS's ``train_cross_pseudo_supervision_2D.py``::

        L = sum_{i=1,2} L_sup(f_i(x_l), y) + w(t) * [CE(f_1(u), argmax f_2(u)) + CE(f_2(u), argmax f_1(u))]
        w(t) = 0.1 * exp(-5 (1 - t/T)^2)

    Two copies of the configured network, initialised differently and trained jointly by one optimiser
    (SSL4MIS: two SGD optimisers with identical settings, the same thing). "Differently" is the paper's
    requirement; here by default two independent draws of PyTorch's default initialisation. SSL4MIS
    re-initialises them He-normal and Glorot-normal (``init1: kaiming``, ``init2: xavier`` reproduce it), but
    with SSL4MIS's U-Net (dropout 0.05-0.5 between convolution and BatchNorm) and a 2000-step budget that
    makes the BatchNorm running statistics, gathered with dropout on, miss the eval-mode activations (at the
    bottleneck a batch/running variance ratio of 0.15 after 750 steps): both networks predicted almost no
    lesion in eval mode (validation Dice 0.19 / 0.14 / 0.07 / 0.17 at steps 250-1000, 0.46 with batch
    statistics; ``experiments/results/diagnostics/kvasir-cps-ssl4mis-init/``). The paper's own weight is 1.5 with pseudo-supervision on
    labeled images too; SSL4MIS's medical 2D recipe (followed here) uses 0.1 on unlabeled images.

    Evaluation, checkpoint selection and deployment use the first network (``net``), as SSL4MIS reports
    ``model1``; the second (``net2``) is training-only, though saved in checkpoints.

    Args:
        consistency: weight of the cross pseudo-supervision after the ramp (SSL4MIS: 0.1).
        ramp_fraction: length T of the sigmoid ramp, as a fraction of the run's total steps (SSL4MIS: 1.0).
        init1: initialisation of the first network's convolutions (``kaiming``, ``xavier`` or ``default``).
        init2: initialisation of the second network's convolutions.
        **kwargs: the base's arguments (network, optimiser, learning-rate schedule).
    """

    method_name = "cps"
    display_name = "CPS"
    uses_unlabeled = True

    def __init__(
        self,
        consistency: float = 0.1,
        ramp_fraction: float = 1.0,
        init1: InitScheme = "default",
        init2: InitScheme = "default",
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        check_weights(ramp_fraction, consistency=consistency)
        hp = self.hparams
        self.net2 = build_model(hp.network, in_channels=hp.in_channels, num_classes=hp.num_classes,
                                **(hp.network_kwargs or {}))
        init_weights(self.net, init1)
        init_weights(self.net2, init2)

    def cps_losses(self, batch: dict) -> tuple[int, dict[str, torch.Tensor]]:
        """Both networks on the labeled + unlabeled weak views: the labeled batch size and
        ``sup`` / ``sup2`` (each network's L_sup) and ``cps`` / ``cps2`` (cross pseudo supervision)."""
        lab, unl = split_batch(batch)
        n = lab["mask"].shape[0]
        x = torch.cat([lab["image_weak"], unl["image_weak"]])
        logits1, logits2 = self.net(x), self.net2(x)
        cps1, cps2 = cross_pseudo_supervision(logits1[n:], logits2[n:])
        return n, {"sup": self.supervised_loss(logits1[:n], lab["mask"]),
                   "sup2": self.supervised_loss(logits2[:n], lab["mask"]), "cps": cps1, "cps2": cps2}

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        hp = self.hparams
        n, terms = self.cps_losses(batch)
        sup1, sup2, cps1, cps2 = terms["sup"], terms["sup2"], terms["cps"], terms["cps2"]
        w = consistency_weight(self, hp.consistency, hp.ramp_fraction)
        loss = sup1 + sup2 + w * (cps1 + cps2)
        self.log("train/consistency_weight", w, batch_size=n)
        self.log_losses({"loss": loss, "sup": sup1, "sup2": sup2, "cps": cps1, "cps2": cps2}, batch_size=n)
        return loss
