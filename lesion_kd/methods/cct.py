"""CCT: auxiliary decoders on perturbed encoder features match the main decoder."""

from __future__ import annotations

import torch

from ..models.multihead import auxiliary_decoders, require_unet
from .base import SegmentationModule
from .components import FeaturePerturbation, check_weights, consistency_weight, perturbed, split_batch


class CCT(SegmentationModule):
    """Cross-Consistency Training (Ouali et al., "Semi-supervised semantic segmentation with
    cross-consistency training", CVPR 2020), with the 2D U-Net, perturbations and weights of SSL4MIS's
    ``train_cross_consistency_training_2D.py`` (``UNet_CCT``)::

        F = E(x);  main = D_0(F);  aux_k = D_k(pi_k(F)) for k = 1..3, pi_k applied to every encoder level
        pi_1: feature noise  f + f * u,  u ~ U(-0.3, 0.3)
        pi_2: dropout, p = 0.3 (channel-wise, CCT's ``Dropout2d``; SSL4MIS's 2D port drops elements)
        pi_3: feature drop: zero where the channel-mean attention exceeds gamma * max, gamma ~ U(0.7, 0.9)
        L = L_sup(main on labeled) + w(t) * 1/3 sum_k mean (softmax main - softmax aux_k)^2
        w(t) = 0.1 * exp(-5 (1 - t/T)^2)

    The consistency is on unlabeled images. As in Ouali et al., the main decoder is supervised and the
    auxiliary ones are trained by the consistency alone; SSL4MIS's port instead averages L_sup over all four
    decoders (``supervise_aux: true``: 1/4 sum_{d in main, aux} L_sup(d)), which leaves the evaluated decoder a
    quarter of the supervised gradient and cost 6.5 test Dice points at the cpu budget (Kvasir-SEG 10%, seed 0:
    49.43 against 55.96; README, "Results"). E + D_0 is the configured U-Net (``net``), evaluated and
    deployed; the auxiliary decoders are training-only. The perturbations are ``FeaturePerturbation`` kinds
    (one noise draw per sample; feature drop's threshold in its min-max form, equal to CCT's for the U-Net's
    nearly non-negative LeakyReLU maps).

    Args:
        consistency: weight of the consistency after the ramp (SSL4MIS: 0.1).
        ramp_fraction: length of the sigmoid ramp, as a fraction of the run's total steps (1.0).
        noise_range: half-range a of the multiplicative feature noise U(-a, a) (0.3).
        dropout: drop probability of the dropout decoder (0.3).
        drop_range: range of gamma of the feature-drop decoder ((0.7, 0.9)).
        detach_main: use the main decoder's prediction as a fixed target (the original CCT) instead of
            letting the consistency train it too (SSL4MIS, the default).
        supervise_aux: supervise the main decoder only (false, the default: Ouali et al.'s CCT, so that the
            evaluated decoder gets the whole supervised gradient) or average the supervised loss over the main
            and the three auxiliary decoders (true: SSL4MIS's port).
        **kwargs: the base's arguments (network: must be ``unet``; optimiser; schedule).
    """

    method_name = "cct"
    display_name = "CCT"
    uses_unlabeled = True

    def __init__(
        self,
        consistency: float = 0.1,
        ramp_fraction: float = 1.0,
        noise_range: float = 0.3,
        dropout: float = 0.3,
        drop_range: tuple[float, float] = (0.7, 0.9),
        detach_main: bool = False,
        supervise_aux: bool = False,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        check_weights(ramp_fraction, consistency=consistency)
        net = require_unet(self.net, "CCT")
        self.perturbations = torch.nn.ModuleList([
            FeaturePerturbation("noise", noise_range),
            FeaturePerturbation("channel_dropout", dropout),
            FeaturePerturbation("feature_drop", drop_range=drop_range),
        ])
        self.aux_decoders = auxiliary_decoders(net, ("transpose",) * 3, self.hparams.num_classes)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        hp = self.hparams
        lab, unl = split_batch(batch)
        n = lab["mask"].shape[0]
        feats = self.net.encode(torch.cat([lab["image_weak"], unl["image_weak"]]))
        main = self.net.decode(feats)
        aux = [dec(perturbed(feats, pert)) for dec, pert in zip(self.aux_decoders, self.perturbations, strict=True)]
        supervised = [main, *aux] if hp.supervise_aux else [main]
        sup = sum(self.supervised_loss(o[:n], lab["mask"]) for o in supervised) / len(supervised)
        target = torch.softmax(main[n:].float(), dim=1)
        if hp.detach_main:
            target = target.detach()
        cons = sum(((torch.softmax(a[n:].float(), dim=1) - target) ** 2).mean() for a in aux) / len(aux)
        w = consistency_weight(self, hp.consistency, hp.ramp_fraction)
        loss = sup + w * cons
        self.log("train/consistency_weight", w, batch_size=n)
        self.log_losses({"loss": loss, "sup": sup, "consistency": cons}, batch_size=n)
        return loss
