"""SASSNet: a signed-distance head, and a discriminator that makes unlabeled SDF predictions look labeled."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from .base import SegmentationModule
from .components import AuxiliaryOptimizer, check_weights, consistency_weight, split_batch


def signed_distance(mask: np.ndarray) -> np.ndarray:
    """SASSNet's normalised signed distance map of one binary mask (H, W) -> (H, W) float32 in [-1, 1]::

        sdf = d_out / max d_out - d_in / max d_in,   0 on the mask's inner boundary

    with d_in the Euclidean distance of a foreground pixel to the background and d_out that of a background
    pixel to the foreground (the authors' ``compute_sdf``: each normalised by its min-max, both minima
    0); negative inside, positive outside. An empty mask gives 0 everywhere (as the authors'), a full one
    -1 everywhere (the authors' would divide by zero)."""
    from scipy import ndimage

    pos = mask.astype(bool)
    if not pos.any():
        return np.zeros(mask.shape, np.float32)
    if pos.all():
        return -np.ones(mask.shape, np.float32)
    d_in = ndimage.distance_transform_edt(pos)
    d_out = ndimage.distance_transform_edt(~pos)
    sdf = d_out / d_out.max() - d_in / d_in.max()
    boundary = pos & ~ndimage.binary_erosion(pos, np.ones((3, 3), bool), border_value=1)
    sdf[boundary] = 0.0  # skimage's find_boundaries(mode="inner") with full connectivity
    return sdf.astype(np.float32)


def sdf_targets(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B, H, W) class map -> (B, K - 1, H, W) float32: the signed distance map of each foreground class."""
    arr = labels.detach().cpu().numpy()
    out = np.stack(
        [[signed_distance(arr[b] == c) for c in range(1, num_classes)] for b in range(arr.shape[0])]
    )
    return torch.from_numpy(out).to(labels.device)


def sdf_to_mask(sdf: torch.Tensor, k: float = 1500.0) -> torch.Tensor:
    """The smooth Heaviside inverse of a signed distance map: sigmoid(-k * sdf), ~1 inside, ~0 outside.

    k = 1500 as DTC (Luo et al., AAAI 2021), SASSNet's successor that uses it as a training transform;
    SASSNet's loss itself does not need it. Pixels on the boundary (sdf = 0) get 0.5."""
    return torch.sigmoid(-k * sdf)


class SDFDiscriminator(nn.Module):
    """SASSNet's discriminator (the authors' ``FC3DDiscriminator``) in 2D: is an SDF map from a labeled image?

    (sdf (B, K-1, H, W), image (B, C, H, W)) -> logits (B, 2) (class 1: labeled)::

        x = LReLU(conv0(sdf) + conv1(image)) -> dropout -> [conv -> LReLU -> dropout] x 2 -> conv -> LReLU
            -> global average -> linear

    4x4 convolutions with stride 2 (channels ndf, 2 ndf, 4 ndf, 8 ndf), LeakyReLU slope 0.2, channel
    dropout 0.5. The authors' fixed average pool (the map's whole extent at their patch size) is a global
    average here, so any input size works."""

    def __init__(self, sdf_channels: int, image_channels: int, ndf: int = 64) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(sdf_channels, ndf, 4, stride=2, padding=1)
        self.conv1 = nn.Conv2d(image_channels, ndf, 4, stride=2, padding=1)
        self.convs = nn.ModuleList(
            nn.Conv2d(ndf * 2**i, ndf * 2 ** (i + 1), 4, stride=2, padding=1) for i in range(3)
        )
        self.classifier = nn.Linear(ndf * 8, 2)
        self.dropout = nn.Dropout2d(0.5)

    def forward(self, sdf: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        x = self.dropout(F.leaky_relu(self.conv0(sdf) + self.conv1(image), 0.2))
        for i, conv in enumerate(self.convs):
            x = F.leaky_relu(conv(x), 0.2)
            if i < len(self.convs) - 1:
                x = self.dropout(x)
        return self.classifier(x.mean(dim=(2, 3)))


class SASSNet(SegmentationModule):
    """SASSNet (Li et al., "Shape-aware semi-supervised 3D semantic segmentation for medical images", MICCAI
    2020), in 2D, following the authors' ``train_gan_sdfloss.py`` (github.com/kleinzcy/SASSnet)::

        s = tanh(conv1x1(decoder features))                  signed distance head, K - 1 channels
        L = L_sup(f(x_l), y) + beta * mean (s_l - SDF(y))^2 + w(t) * CE(D(s_u, u), 1)
        L_D = CE(D(s, x), 1 for labeled, 0 for unlabeled)     (Adam, lr 1e-4, betas (0.9, 0.99))
        beta = 0.3,   w(t) = 0.01 * exp(-5 (1 - t/T)^2)

    SDF is the normalised signed distance map (:func:`signed_distance`). In the segmenter's loss the
    discriminator D is a constant (eval mode: no dropout); D is then trained, after the segmenter's
    optimiser step, on the updated segmenter's SDF predictions of the whole batch (no gradient, network
    in eval mode) as the authors' second pass. D is an :class:`~.components.AuxiliaryOptimizer` module:
    training-only, in checkpoints with its Adam state. The SDF head reads the network's last decoder map
    (``decode(..., return_features=True)``), so ``mamba_unet`` works as well as ``unet``; the network
    (``net``) is evaluated and deployed, the head and D are training-only.

    Deviations: L_sup is the base's 0.5 * (CE + Dice) on two-class softmax logits (the authors train one
    sigmoid channel with Dice only: their BCE is computed and left out of the loss); the learning rate
    follows the base's schedule (the authors divide it by 10 every 2500 of their 6000 iterations); the
    ramp spans ``ramp_fraction`` of the run (the authors': 40 "epochs" of 150 iterations = their whole run).

    Args:
        beta: weight of the SDF regression on labeled images (0.3).
        consistency: weight of the adversarial term after the ramp (0.01).
        ramp_fraction: length of the sigmoid ramp, as a fraction of the run's total steps (1.0).
        d_lr: the discriminator's Adam learning rate (1e-4).
        d_channels: the discriminator's first width ndf (64).
        **kwargs: the base's arguments (network, optimiser, learning-rate schedule).
    """

    method_name = "sassnet"
    display_name = "SASSNet"
    uses_unlabeled = True

    def __init__(
        self,
        beta: float = 0.3,
        consistency: float = 0.01,
        ramp_fraction: float = 1.0,
        d_lr: float = 1e-4,
        d_channels: int = 64,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        check_weights(ramp_fraction, beta=beta, consistency=consistency)
        if d_lr <= 0 or d_channels < 1:
            raise ValueError("model.d_lr must be > 0 and model.d_channels >= 1")
        hp = self.hparams
        # the last decoder map has feature_channels[0] channels (unet and mamba_unet)
        self.sdf_head = nn.Conv2d(self.net.feature_channels[0], hp.num_classes - 1, 1)
        self.discriminator = SDFDiscriminator(hp.num_classes - 1, hp.in_channels, d_channels)
        self.d_opt = AuxiliaryOptimizer(
            self.discriminator, lambda p: torch.optim.Adam(p, lr=d_lr, betas=(0.9, 0.99))
        )

    def seg_and_sdf(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (B, K, H, W), signed distance prediction tanh(...) (B, K - 1, H, W))."""
        logits, feat = self.net.decode(self.net.encode(x), return_features=True)
        return logits, torch.tanh(self.sdf_head(feat))

    def discriminate(
        self, sdf: torch.Tensor, images: torch.Tensor, params: dict | None = None
    ) -> torch.Tensor:
        """D's logits (B, 2); with ``params``, D runs on those tensors instead of its own parameters."""
        if params is None:
            return self.discriminator(sdf.float(), images.float())
        return functional_call(self.discriminator, params, (sdf.float(), images.float()))

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        hp = self.hparams
        lab, unl = split_batch(batch)
        n = lab["mask"].shape[0]
        logits, sdf = self.seg_and_sdf(torch.cat([lab["image_weak"], unl["image_weak"]]))
        sup = self.supervised_loss(logits[:n], lab["mask"])
        sdf_loss = F.mse_loss(sdf[:n].float(), sdf_targets(lab["mask"], hp.num_classes))
        was_training = self.discriminator.training
        self.discriminator.eval()  # the authors' D.eval() for the segmenter's pass (no dropout)
        d_u = self.discriminate(sdf[n:], unl["image_weak"])
        self.discriminator.train(was_training)
        adv = F.cross_entropy(d_u, torch.ones(d_u.shape[0], dtype=torch.long, device=d_u.device))
        w = consistency_weight(self, hp.consistency, hp.ramp_fraction)
        loss = sup + hp.beta * sdf_loss + w * adv
        self.log("train/consistency_weight", w, batch_size=n)
        self.log_losses({"loss": loss, "sup": sup, "sdf": sdf_loss, "adv": adv}, batch_size=n)
        return loss

    def discriminator_loss(
        self, sdf: torch.Tensor, images: torch.Tensor, n_labeled: int, params: dict
    ) -> torch.Tensor:
        """CE(D(s, x), 1 for the first ``n_labeled`` images, 0 for the rest)."""
        target = (torch.arange(sdf.shape[0], device=sdf.device) < n_labeled).long()
        return F.cross_entropy(self.discriminate(sdf, images, params), target)

    def on_train_batch_end(self, outputs: Any, batch: dict, batch_idx: int) -> None:
        lab, unl = split_batch(batch)
        x = torch.cat([lab["image_weak"], unl["image_weak"]])
        autocast = (
            self.trainer.precision_plugin.forward_context() if self._trainer is not None else nullcontext()
        )
        was_training = self.net.training
        self.net.eval()  # the authors' model.eval() for D's pass
        try:
            with torch.no_grad(), autocast:
                sdf = self.seg_and_sdf(x)[1]
        finally:
            self.net.train(was_training)
        d_loss = self.d_opt.step(lambda p: self.discriminator_loss(sdf, x, lab["mask"].shape[0], p))
        self.log("train/d_loss", d_loss, batch_size=lab["mask"].shape[0])

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["discriminator_optimizer"] = self.d_opt.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "discriminator_optimizer" in checkpoint:
            self.d_opt.load_state_dict(checkpoint["discriminator_optimizer"])
