"""URPC: deep-supervision heads at several decoder scales, consistent with their mean where they agree."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..models.multihead import DeepSupervisionHeads, decoder_pyramid, require_unet
from .base import SegmentationModule
from .components import FeaturePerturbation, check_weights, consistency_weight, split_batch


def rectified_pyramid_consistency(probs: Sequence[torch.Tensor], eps: float = 1e-8) -> torch.Tensor:
    """URPC's uncertainty-rectified consistency of S predictions (each (B, K, H, W) probabilities)::

        p_bar = 1/S sum_s p_s
        D_s = sum_k p_bar_k (ln p_bar_k - ln p_s,k)                 KL(p_bar || p_s), (B, 1, H, W)
        L_s = mean((p_bar - p_s)^2 * exp(-D_s)) / (mean(exp(-D_s)) + eps) + mean(D_s)
        L = 1/S sum_s L_s

    Pixels where a scale disagrees with the mean weigh less in its squared error, and the mean KL term
    pulls the scales together. As SSL4MIS, gradient flows through p_bar as well."""
    p_bar = torch.stack(list(probs)).mean(0)
    log_bar = torch.log(p_bar.clamp_min(1e-12))
    total = p_bar.new_zeros(())
    for p in probs:
        d = (p_bar * (log_bar - torch.log(p.clamp_min(1e-12)))).sum(1, keepdim=True)
        e = torch.exp(-d)
        total = total + ((p_bar - p) ** 2 * e).mean() / (e.mean() + eps) + d.mean()
    return total / len(probs)


class URPC(SegmentationModule):
    """URPC (Luo et al., "Efficient semi-supervised gross target volume of nasopharyngeal carcinoma
    segmentation via uncertainty rectified pyramid consistency", MICCAI 2021 / MedIA 2022), as in SSL4MIS's
    ``train_uncertainty_rectified_pyramid_consistency_2D.py`` (``UNet_URPC``)::

        decoder maps at strides 8, 4, 2 -> perturbation -> 3x3 head -> nearest resize to H x W
            stride 8: dropout (p = 0.5, channel-wise), stride 4: feature drop (gamma ~ U(0.7, 0.9)),
            stride 2: feature noise (U(-0.3, 0.3)); stride 1: the U-Net's own head, unperturbed
        L = 1/4 sum_s L_sup(p_s on labeled) + w(t) * rectified_pyramid_consistency(p_s on unlabeled)
        w(t) = 0.1 * exp(-5 (1 - t/T)^2)

    The perturbations act in training only (the heads are training-only anyway): the U-Net (``net``) is
    evaluated and deployed. SSL4MIS's latest 2D script drops elements at stride 8; channel-wise dropout is
    its earlier 2D version's and its 3D model's (``Dropout3d``), and a ``FeaturePerturbation`` kind.

    Args:
        consistency: weight of the rectified consistency after the ramp (SSL4MIS: 0.1).
        ramp_fraction: length of the sigmoid ramp, as a fraction of the run's total steps (1.0).
        dropout: drop probability at the stride-8 head (0.5).
        noise_range: half-range a of the feature noise U(-a, a) at the stride-2 head (0.3).
        drop_range: range of gamma of the feature drop at the stride-4 head ((0.7, 0.9)).
        **kwargs: the base's arguments (network: must be ``unet``; optimiser; schedule).
    """

    method_name = "urpc"
    display_name = "URPC"
    uses_unlabeled = True

    def __init__(
        self,
        consistency: float = 0.1,
        ramp_fraction: float = 1.0,
        dropout: float = 0.5,
        noise_range: float = 0.3,
        drop_range: tuple[float, float] = (0.7, 0.9),
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        check_weights(ramp_fraction, consistency=consistency)
        net = require_unet(self.net, "URPC")
        ch = tuple(net.feature_channels)
        if len(ch) < 4:
            raise ValueError("URPC needs a U-Net with at least 4 levels (heads at strides 8, 4, 2)")
        # heads on the up-block outputs at strides 8, 4, 2 (coarsest first); channels ch[3], ch[2], ch[1]
        self.heads = DeepSupervisionHeads((ch[3], ch[2], ch[1]), self.hparams.num_classes)
        self.perturbations = torch.nn.ModuleList([
            FeaturePerturbation("channel_dropout", dropout),
            FeaturePerturbation("feature_drop", drop_range=drop_range),
            FeaturePerturbation("noise", noise_range),
        ])

    def pyramid_logits(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Logits (B, K, H, W) at strides 1, 2, 4, 8 (the main output first) for images x (B, C, H, W)."""
        maps = decoder_pyramid(self.net.decoder, self.net.encode(x))
        main = self.net.decoder.head(maps[-1])
        aux_in = maps[-4:-1]  # strides 8, 4, 2
        if self.training:
            aux_in = [pert(m) for pert, m in zip(self.perturbations, aux_in, strict=True)]
        aux = self.heads(aux_in, x.shape[-2:])
        return [main, *aux[::-1]]

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        hp = self.hparams
        lab, unl = split_batch(batch)
        n = lab["mask"].shape[0]
        outputs = self.pyramid_logits(torch.cat([lab["image_weak"], unl["image_weak"]]))
        sup = sum(self.supervised_loss(o[:n], lab["mask"]) for o in outputs) / len(outputs)
        cons = rectified_pyramid_consistency([torch.softmax(o[n:].float(), dim=1) for o in outputs])
        w = consistency_weight(self, hp.consistency, hp.ramp_fraction)
        loss = sup + w * cons
        self.log("train/consistency_weight", w, batch_size=n)
        self.log_losses({"loss": loss, "sup": sup, "consistency": cons}, batch_size=n)
        return loss
