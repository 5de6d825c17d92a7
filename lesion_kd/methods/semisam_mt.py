"""SemiSAM-MT: Mean Teacher plus pseudo-labels of a frozen SAM prompted by the student's own prediction."""

from __future__ import annotations

import torch

from ..models import build_teacher
from .components import consistency_weight, largest_component, softmax_mse, total_steps
from .mean_teacher import MeanTeacher
from .ramps import sigmoid_rampup

# MedSAM's training box perturbation: each side moved out by 0..20 px of a 1024 px image (LiteMedSAM: 0..5 of 256).
MEDSAM_BOX_SHIFT = 20 / 1024


def box_from_prediction(
    pred: torch.Tensor, shift: float = MEDSAM_BOX_SHIFT, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Box prompts from a predicted label map: the bounding box of the largest foreground component,
    each side moved outwards by a random 0..round(shift * side) pixels (MedSAM's box jitter), clipped to
    the image.

    Args:
        pred: (B, H, W) integer label map (0 = background).

    Returns:
        boxes (B, 4) float x0 y0 x1 y1 in pixels (zeros where nothing is predicted) and keep (B,) bool,
        False for images with no foreground (they get no prompt and no pseudo-label).
    """
    b, h, w = pred.shape
    fg = largest_component((pred > 0).long()) > 0
    boxes, keep = torch.zeros(b, 4), fg.flatten(1).any(1).cpu()
    sx, sy = round(shift * w), round(shift * h)
    for i in torch.nonzero(keep).flatten().tolist():
        ys, xs = torch.nonzero(fg[i], as_tuple=True)
        jitter = torch.tensor(
            [int(torch.randint(0, s + 1, (1,), generator=generator)) for s in (sx, sy, sx, sy)]
        )
        box = torch.stack([xs.min(), ys.min(), xs.max(), ys.max()]).cpu() + jitter * torch.tensor(
            [-1, -1, 1, 1]
        )
        boxes[i] = torch.minimum(box.clamp_min(0), torch.tensor([w - 1, h - 1, w - 1, h - 1])).float()
    return boxes.to(pred.device), keep.to(pred.device)


class SemiSAMMT(MeanTeacher):
    """SemiSAM-MT (Zhang et al., "SemiSAM: Exploring SAM for Enhancing Semi-Supervised Medical Image
    Segmentation with Extremely Limited Annotations", 2023; the authors' ``train_LA_semisam_mt.py``),
    in 2D with a MedSAM/LiteMedSAM box prompt::

        L = L_MT + w_sam(t) * mean_{u,k,y,x} (softmax f_s(u) - onehot(s(u)))^2      over images with a prompt
        s(u) = [SAM(u, box(LCC(argmax f_s(u)))) > 0.5],   w_sam(t) = 0.05 * exp(-5 (t/T)^2)

    L_MT is :class:`MeanTeacher`'s loss (supervised + ramped-up EMA-teacher consistency). The frozen SAM
    gets, for each unlabeled image, the bounding box of the largest connected component of the student's
    current prediction, jittered outwards as in MedSAM's training (:func:`box_from_prediction`); images
    where the student predicts no lesion get no prompt and no SAM term. SAM's thresholded mask is the
    target of an MSE with the student's softmax. Its weight ramps *down* over the run: SemiSAM's
    ``0.5 * 0.1 * sigmoid_rampup((max_iter - iter) / 150, 40)``, with its 40 x 150 = 6000 iterations
    being the whole run: 0.05 at the start, 0.05 e^-5 at the end (SAM helps most while the student is
    weak). Deviations: SemiSAM is 3D (SAM-Med3D with 10 point clicks, which the public script draws from
    the ground truth of every image, labeled or not); here the prompt is a box from the student's
    prediction only, so no unlabeled label is ever read.

    The SAM teacher is frozen and kept out of the module tree (built when fitting starts, never saved in
    checkpoints nor given to the optimiser): a checkpoint tests and predicts without it.

    Args:
        teacher: SAM backend, ``litemedsam`` (bundled weights) or ``medsam``.
        teacher_checkpoint: checkpoint file of the ``medsam`` teacher (e.g. ``medsam_vit_b.pth``).
        sam_weight: w_sam at the start of the run (0.5 * 0.1).
        sam_ramp_fraction: length T of the ramp-down, as a fraction of the run's total steps (1.0).
        box_shift: maximum outward jitter of each box side, as a fraction of the image side (20/1024).
        sam_threshold: SAM probability above which a pixel is lesion (0.5).
        **kwargs: :class:`MeanTeacher`'s arguments (network, EMA decay, consistency, noise, optimiser).
    """

    method_name = "semisam_mt"
    display_name = "SemiSAM-MT"

    def __init__(
        self,
        teacher: str = "litemedsam",
        teacher_checkpoint: str | None = None,
        sam_weight: float = 0.05,
        sam_ramp_fraction: float = 1.0,
        box_shift: float = MEDSAM_BOX_SHIFT,
        sam_threshold: float = 0.5,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if teacher == "medsam" and teacher_checkpoint is None:
            raise ValueError(
                "model.teacher_checkpoint: the medsam teacher needs a checkpoint file (e.g. medsam_vit_b.pth)"
            )
        if (
            sam_weight < 0
            or box_shift < 0
            or not 0.0 < sam_ramp_fraction <= 1.0
            or not 0.0 < sam_threshold < 1.0
        ):
            raise ValueError(
                "model.sam_weight and model.box_shift must be >= 0, sam_ramp_fraction in (0, 1], "
                "sam_threshold in (0, 1)"
            )
        self.__dict__["_sam"] = None  # not a sub-module: frozen, never saved

    def setup(self, stage: str) -> None:
        if stage == "fit":
            self.sam_teacher()  # fail before training on a missing or wrong checkpoint

    def sam_teacher(self):
        if self.__dict__["_sam"] is None:
            self.__dict__["_sam"] = build_teacher(
                self.hparams.teacher, checkpoint=self.hparams.teacher_checkpoint
            )
        return self.__dict__["_sam"]

    @torch.no_grad()
    def sam_pseudo_labels(
        self, images: torch.Tensor, student_logits: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(labels (B, H, W) long, keep (B,) bool): SAM's mask from the box of the student's prediction."""
        boxes, keep = box_from_prediction(student_logits.argmax(1), self.hparams.box_shift)
        labels = torch.zeros_like(student_logits[:, 0], dtype=torch.long)
        if keep.any():
            sam = self.sam_teacher()
            if sam.device != images.device:
                sam.to(images.device)
            prob = sam.predict_mask(images[keep].float(), boxes[keep])
            labels[keep] = (prob[:, 0] > self.hparams.sam_threshold).long()
        return labels, keep

    def sam_weight_now(self) -> float:
        """w_sam(t) = sam_weight * exp(-5 (t/T)^2) for t < T, then sam_weight * e^-5."""
        length = self.hparams.sam_ramp_fraction * total_steps(self)
        return self.hparams.sam_weight * sigmoid_rampup(length - self.global_step, length)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        hp = self.hparams
        n, logits, unl, sup, cons = self.mt_losses(batch)
        target, keep = self.sam_pseudo_labels(unl["image_weak"], logits[n:].detach())
        onehot = torch.nn.functional.one_hot(target, logits.shape[1]).permute(0, 3, 1, 2)
        sam = softmax_mse(logits[n:][keep], onehot[keep]).mean() if keep.any() else logits.sum() * 0.0
        w, w_sam = consistency_weight(self, hp.consistency, hp.ramp_fraction), self.sam_weight_now()
        loss = sup + w * cons + w_sam * sam
        self.log_dict(
            {
                "train/consistency_weight": w,
                "train/sam_weight": w_sam,
                "train/sam_prompted": keep.float().mean(),
            },
            batch_size=n,
        )
        self.log_losses({"loss": loss, "sup": sup, "consistency": cons, "sam": sam}, batch_size=n)
        return loss
