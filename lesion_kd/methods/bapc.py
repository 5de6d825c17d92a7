"""BaPC: boundary-aware class prototypes from the features of labeled and unlabeled images; a nearest-prototype
classifier and the network's linear head supervise each other."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import SegmentationModule
from .components import check_weights, consistency_weight, split_batch

_MISSING = -1e4  # logit of a prototype that no pixel of the batch defines (finite: no NaN in softmax/CE)


def boundary_band(labels: torch.Tensor, num_classes: int, width: int) -> torch.Tensor:
    """(B, H, W) class map -> (B, H, W) bool: pixels with a pixel of another class within ``width`` pixels
    (Chebyshev distance, i.e. a (2 width + 1)^2 window; the image border is no boundary). Both sides of
    every class edge are in the band, each side ``width`` pixels deep."""
    onehot = F.one_hot(labels.long(), num_classes).permute(0, 3, 1, 2).float()
    present = F.max_pool2d(onehot, 2 * width + 1, stride=1, padding=width)  # classes seen in the window
    return present.sum(1) > 1


def prototype_index(labels: torch.Tensor, boundary: torch.Tensor) -> torch.Tensor:
    """Prototype of each pixel: 2 k + 1 for a pixel of class k in the boundary band, 2 k in the centre."""
    return 2 * labels.long() + boundary.long()


def boundary_aware_prototypes(
    features: torch.Tensor, index: torch.Tensor, num_prototypes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prototypes c_j = normalise(mean of the L2-normalised features of the pixels whose ``index`` is j).

    features (B, C, H, W), index (B, H, W) from :func:`prototype_index` -> (prototypes (P, C) unit vectors,
    valid (P,) bool: some pixel defines it). Over the whole batch (labeled and unlabeled images together:
    the prototypes are the bridge between the two); float32; gradient flows into the features."""
    f = F.normalize(features.float(), dim=1)
    member = F.one_hot(index, num_prototypes).permute(0, 3, 1, 2).float()  # (B, P, H, W)
    mass = member.sum(dim=(0, 2, 3))
    protos = torch.einsum("bphw,bchw->pc", member, f) / mass.clamp_min(1.0)[:, None]
    return F.normalize(protos, dim=1), mass > 0


def prototype_similarity(
    features: torch.Tensor, prototypes: torch.Tensor, valid: torch.Tensor, temperature: float
) -> torch.Tensor:
    """cos(f(x), c_j) / T for every pixel and prototype: (B, P, H, W) float32; missing prototypes get -1e4."""
    sim = torch.einsum("bchw,pc->bphw", F.normalize(features.float(), dim=1), prototypes) / temperature
    return sim.masked_fill(~valid.view(1, -1, 1, 1), _MISSING)


def prototype_logits(similarity: torch.Tensor) -> torch.Tensor:
    """The nearest-prototype classifier: class k's logit is max(sim to k's centre, sim to k's boundary
    prototype). (B, 2K, H, W) -> (B, K, H, W)."""
    b, p, h, w = similarity.shape
    return similarity.view(b, p // 2, 2, h, w).amax(2)


def pixel_prototype_contrast(similarity: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """InfoNCE of each pixel against the prototypes: positive its own (class, region) prototype, negatives
    the prototypes of the other classes (boundary and centre; the other region of its own class is left
    out, neither pulled nor pushed)::

        L = mean_x -log exp(s_{x, j(x)}) / (exp(s_{x, j(x)}) + sum_{j: class(j) != class(x)} exp(s_{x, j}))
    """
    own_class = index.div(2, rounding_mode="floor")[:, None]  # (B, 1, H, W)
    classes = (
        torch.arange(similarity.shape[1], device=index.device).div(2, rounding_mode="floor").view(1, -1, 1, 1)
    )
    sibling = (classes == own_class) & (
        torch.arange(similarity.shape[1], device=index.device).view(1, -1, 1, 1) != index[:, None]
    )
    return F.cross_entropy(similarity.masked_fill(sibling, float("-inf")), index)


class BaPC(SegmentationModule):
    """BaPC (Wang, Xiao, Bi, Li & Gao, "Boundary-aware prototype in semi-supervised medical image
    segmentation", IEEE TIP 2024), reconstructed from the paper's abstract (no public code was found)::

        f = the last decoder map (B, C, H, W); linear head: the network's own logits z
        labels: y on labeled images, argmax z (detached) on unlabeled ones
        band: pixels within ``boundary_width`` px of another class (``boundary_band``)
        prototypes c_{k,centre}, c_{k,boundary}: mean normalised features of those pixels over the whole
            batch (labeled and unlabeled together; gradient flows through them)
        s_j(x) = cos(f(x), c_j) / T;   proto logit of class k = max(s_{k,centre}, s_{k,boundary})
        L = L_sup(z_l, y) + L_sup(proto_l, y)
            + w(t) [CE(z_u, argmax proto_u) + CE(proto_u, argmax z_u)]
            + lambda_c * pixel_prototype_contrast(s, (class, region) of every pixel)
        w(t) = 0.1 * exp(-5 (1 - t/T)^2)

    The linear head (the CNN's classifier) and the non-parametric nearest-prototype classifier predict
    each image; on unlabeled images each one's hard decision is the other's pseudo-label; the prototype
    prediction on labeled images is supervised by the true label, which through the prototypes reaches
    the unlabeled images' features too. Boundary-aware: each class has a boundary and a centre prototype,
    and pixel-prototype contrast separates each pixel from the other classes' prototypes (the neighbouring
    class's boundary prototype included). Constants not in the abstract are ours: T = 0.1 (the usual
    pixel-prototype contrast temperature, e.g. ProtoSeg, Zhou et al. CVPR 2022), band width 3 px,
    lambda_c = 0.1, the SSL4MIS consistency weight and ramp. The features come from
    ``decode(..., return_features=True)``, so ``mamba_unet`` works as well as ``unet``; the network
    (``net``, its linear head) is evaluated and deployed.

    Args:
        temperature: T of the prototype similarities (0.1).
        boundary_width: half-width of the boundary band in pixels (3).
        proto_weight: weight of the supervised loss of the prototype prediction on labeled images (1.0).
        consistency: weight of the cross pseudo-labels between the two classifiers after the ramp (0.1).
        ramp_fraction: length of the sigmoid ramp, as a fraction of the run's total steps (1.0).
        contrast_weight: lambda_c, weight of the pixel-prototype contrast (0.1).
        **kwargs: the base's arguments (network, optimiser, learning-rate schedule).
    """

    method_name = "bapc"
    display_name = "BaPC"
    uses_unlabeled = True

    def __init__(
        self,
        temperature: float = 0.1,
        boundary_width: int = 3,
        proto_weight: float = 1.0,
        consistency: float = 0.1,
        ramp_fraction: float = 1.0,
        contrast_weight: float = 0.1,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if temperature <= 0:
            raise ValueError(f"model.temperature={temperature}: must be > 0")
        if boundary_width < 1:
            raise ValueError(f"model.boundary_width={boundary_width}: must be >= 1")
        check_weights(ramp_fraction, proto_weight=proto_weight, consistency=consistency, contrast_weight=contrast_weight)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        hp = self.hparams
        lab, unl = split_batch(batch)
        n = lab["mask"].shape[0]
        logits, feats = self.net.decode(
            self.net.encode(torch.cat([lab["image_weak"], unl["image_weak"]])), return_features=True
        )
        labels = torch.cat([lab["mask"].long(), logits[n:].detach().argmax(1)])
        index = prototype_index(labels, boundary_band(labels, hp.num_classes, hp.boundary_width))
        protos, valid = boundary_aware_prototypes(feats, index, 2 * hp.num_classes)
        sim = prototype_similarity(feats, protos, valid, hp.temperature)
        proto = prototype_logits(sim)
        sup = self.supervised_loss(logits[:n], lab["mask"])
        sup_proto = self.supervised_loss(proto[:n], lab["mask"])
        cross = F.cross_entropy(logits[n:].float(), proto[n:].detach().argmax(1)) + F.cross_entropy(
            proto[n:], logits[n:].detach().argmax(1)
        )
        contrast = pixel_prototype_contrast(sim, index)
        w = consistency_weight(self, hp.consistency, hp.ramp_fraction)
        loss = sup + hp.proto_weight * sup_proto + w * cross + hp.contrast_weight * contrast
        self.log("train/consistency_weight", w, batch_size=n)
        self.log_losses(
            {"loss": loss, "sup": sup, "sup_proto": sup_proto, "cross": cross, "contrast": contrast},
            batch_size=n,
        )
        return loss
