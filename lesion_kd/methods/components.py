"""Pieces shared by the semi-supervised baselines (MT, UA-MT, URPC, CCT, CPS, MC-Net+, BCP).

- option checks: :func:`check_weights` (loss weights and the ramp's length);
- batch access: :func:`split_batch`;
- loss-weight ramps: :func:`ramp`, :func:`consistency_weight` (SSL4MIS: 0.1 * exp(-5 (1 - t/T)^2));
- an EMA teacher: :class:`EMATeacher`, :func:`ema_alpha`, :func:`teacher_input_noise`;
- consistency terms: :func:`softmax_mse`;
- feature perturbations: CCT's/URPC's noise, dropout and feature drop are
  :class:`~lesion_kd.losses.pckd.FeaturePerturbation` kinds (re-exported here, not re-implemented);
- copy-paste mixing (BCP): :func:`box_mask`, :func:`copy_paste`, :func:`largest_component`,
  :func:`masked_dice_ce`;
- the other side of a min-max game (SASSNet's discriminator, CauSSL's weight predictors):
  :class:`AuxiliaryOptimizer`.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Literal

import lightning as L
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..losses.pckd import FeaturePerturbation
from .ramps import sigmoid_rampup

__all__ = [
    "AuxiliaryOptimizer",
    "EMATeacher",
    "FeaturePerturbation",
    "box_mask",
    "check_weights",
    "consistency_weight",
    "copy_paste",
    "ema_alpha",
    "largest_component",
    "masked_dice_ce",
    "perturbed",
    "ramp",
    "softmax_mse",
    "split_batch",
    "teacher_input_noise",
    "total_steps",
]


# ------------------------------------------------------------------------------------------- options
def check_weights(ramp_fraction: float | None = None, **weights: float) -> None:
    """Refuse impossible loss options before a run starts: every weight in ``weights`` must be >= 0 and
    ``ramp_fraction`` (the ramp's length as a fraction of the run) in [0, 1]. The error names the first bad
    option as it is set in a config, e.g. ``model.consistency=-0.1: must be >= 0``."""
    for name, value in weights.items():
        if value < 0:
            raise ValueError(f"model.{name}={value}: must be >= 0")
    if ramp_fraction is not None and not 0.0 <= ramp_fraction <= 1.0:
        raise ValueError(f"model.ramp_fraction={ramp_fraction}: must be in [0, 1]")


# ------------------------------------------------------------------------------------------- batches
def split_batch(batch: dict) -> tuple[dict, dict]:
    """(labeled, unlabeled) parts of a training batch; an error when the unlabeled stream is missing
    (the data module gives it when the method sets ``uses_unlabeled`` and ``data.unlabeled_batch_size > 0``)."""
    unl = batch.get("unlabeled")
    if unl is None:
        raise ValueError("this method needs unlabeled images: set data.unlabeled_batch_size > 0")
    return batch["labeled"], unl


# --------------------------------------------------------------------------------------------- ramps
def total_steps(module: L.LightningModule) -> int:
    """The run's optimiser steps (1 outside a trainer, e.g. in unit tests)."""
    return max(1, int(module.trainer.estimated_stepping_batches)) if module._trainer is not None else 1


def ramp(module: L.LightningModule, fraction: float) -> float:
    """exp(-5 (1 - t/T)^2) at t = ``module.global_step``, T = ``fraction`` * the run's total steps; then 1.

    A fraction of the run, not SSL4MIS's fixed 200 "epochs" of 150 iterations, so a short run ramps
    the same way relative to its length (SSL4MIS's ramp spans its whole 30k-iteration run: fraction 1).
    """
    return sigmoid_rampup(module.global_step, fraction * total_steps(module))


def consistency_weight(module: L.LightningModule, weight: float, fraction: float) -> float:
    """SSL4MIS's consistency weight w(t) = ``weight`` * exp(-5 (1 - t/T)^2) (``weight`` 0.1 there)."""
    return weight * ramp(module, fraction)


# --------------------------------------------------------------------------------------- EMA teacher
def ema_alpha(step: int, alpha_max: float) -> float:
    """alpha = min(1 - 1/(t + 1), alpha_max) for the update after optimiser step t (0-based).

    The first update (t = 0, alpha = 0) copies the student; the teacher is then the true running
    average of the student's weights until the exponential average with ``alpha_max`` takes over
    (Tarvainen & Valpola 2017; SSL4MIS's ``update_ema_variables``).
    """
    return min(1.0 - 1.0 / (step + 1), alpha_max)


class EMATeacher(nn.Module):
    """An exponential moving average of a student network: theta_t <- alpha theta_t + (1 - alpha) theta_s.

    The teacher is a deep copy of the student whose parameters have ``requires_grad=False``: the base's
    optimiser (which takes trainable parameters only) never sees them and DDP reduces no gradient for
    them, yet, as a registered sub-module, they are in the LightningModule's ``state_dict`` and so in
    every checkpoint: resuming a run resumes the teacher.

    BatchNorm buffers (running mean/var, ``num_batches_tracked``) are handled by ``buffers``:

    - ``"own"`` (Mean Teacher, UA-MT: SSL4MIS's ``update_ema_variables`` averages ``parameters()``
      only): the teacher keeps its own buffers, updated by its own training-mode forward passes;
    - ``"ema"`` (BCP's ``update_model_ema`` averages the whole ``state_dict``): floating-point buffers
      are averaged like the parameters, integer ones (``num_batches_tracked``) copied from the student.

    The teacher runs in the mode of the module tree, i.e. in training mode inside ``training_step``
    (batch statistics, dropout active): both originals never call ``ema_model.eval()``, and UA-MT's
    Monte-Carlo uncertainty relies on the dropout. Under DDP the update runs on every rank from the
    same all-reduced student weights, so the teacher's parameters stay identical across ranks (its
    buffers are broadcast from rank 0 with the student's at every forward, DDP's ``broadcast_buffers``).

    Args:
        student: the network to copy (its current weights initialise the teacher).
        buffers: ``"own"`` or ``"ema"``, see above.
    """

    def __init__(self, student: nn.Module, buffers: Literal["own", "ema"] = "own") -> None:
        super().__init__()
        if buffers not in ("own", "ema"):
            raise ValueError(f"buffers must be 'own' or 'ema'; got {buffers!r}")
        self.module = copy.deepcopy(student)
        self.module.requires_grad_(False)
        self.buffers_mode = buffers
        # optimiser step of the last update: under gradient accumulation on_train_batch_end runs once per
        # micro-batch, but the student changes once per step. Not state: a resumed run starts past it.
        self._last_step = -1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Teacher logits (B, K, H, W) for images (B, C, H, W); never builds a graph."""
        with torch.no_grad():
            return self.module(x)

    @torch.no_grad()
    def copy_from(self, student: nn.Module) -> None:
        """theta_t <- theta_s for parameters and buffers (BCP: the teacher starts as the pre-trained student)."""
        self.module.load_state_dict(student.state_dict())

    @torch.no_grad()
    def update(self, student: nn.Module, alpha: float) -> None:
        """theta_t <- alpha theta_t + (1 - alpha) theta_s (and the buffers, per ``buffers``)."""
        for (name, t), (sname, s) in zip(self.module.named_parameters(), student.named_parameters(), strict=True):
            if name != sname:
                raise ValueError(f"teacher and student differ: {name} vs {sname}")
            t.lerp_(s.detach().to(t.dtype), 1.0 - alpha)
        if self.buffers_mode == "own":
            return
        for (name, t), (sname, s) in zip(self.module.named_buffers(), student.named_buffers(), strict=True):
            if name != sname:
                raise ValueError(f"teacher and student differ: {name} vs {sname}")
            if t.is_floating_point():
                t.lerp_(s.to(t.dtype), 1.0 - alpha)
            else:
                t.copy_(s)

    def update_after_step(self, student: nn.Module, global_step: int, alpha_max: float, warmup: bool = True) -> bool:
        """Update once per optimiser step, for the step just taken (``global_step`` steps done so far).

        alpha = :func:`ema_alpha` (global_step - 1, alpha_max) with ``warmup`` (Mean Teacher), else the
        constant ``alpha_max`` (BCP, whose teacher starts as a trained student). True if it updated."""
        if global_step <= self._last_step or global_step < 1:
            return False
        self.update(student, ema_alpha(global_step - 1, alpha_max) if warmup else alpha_max)
        self._last_step = global_step
        return True


def teacher_input_noise(x: torch.Tensor, std: float = 0.1, clip: float = 0.2) -> torch.Tensor:
    """x + clamp(N(0, std^2), -clip, clip), the Mean Teacher's input perturbation in SSL4MIS."""
    return x + torch.clamp(torch.randn_like(x) * std, -clip, clip)


# --------------------------------------------------------------------------------------- consistency
def softmax_mse(student_logits: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    """Element-wise (softmax(student) - target)^2, (B, K, H, W) in float32; callers reduce (mean, or masked)."""
    return (torch.softmax(student_logits.float(), dim=1) - target_probs.float()) ** 2


# ---------------------------------------------------------------------------- copy-paste mixing (BCP)
def box_mask(height: int, width: int, ratio: float = 2 / 3, device: torch.device | str | None = None,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """BCP's mixing mask M (H, W) float: ones with a zero box of int(ratio H) x int(ratio W) at a random
    position (uniform over all positions where the box fits). M = 1 keeps the "outer" image, 0 takes
    the pasted one; one box per training step for the whole batch, as BCP's ``generate_mask``."""
    bh, bw = int(height * ratio), int(width * ratio)
    y = int(torch.randint(0, height - bh + 1, (1,), generator=generator))
    x = int(torch.randint(0, width - bw + 1, (1,), generator=generator))
    m = torch.ones(height, width, device=device)
    m[y : y + bh, x : x + bw] = 0
    return m


def copy_paste(outer: torch.Tensor, inner: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """outer * M + inner * (1 - M): images (B, C, H, W) or label maps (B, H, W) with mask M (H, W) in {0, 1}.
    Label maps stay integer."""
    if outer.shape != inner.shape:
        raise ValueError(f"copy_paste: shapes differ, {tuple(outer.shape)} vs {tuple(inner.shape)}")
    if not outer.is_floating_point():
        return torch.where(mask.bool(), outer, inner)
    return outer * mask + inner * (1 - mask)


_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def largest_component(labels: torch.Tensor) -> torch.Tensor:
    """Per image and per foreground class, keep only the largest 8-connected component.

    labels: (B, H, W) integer class map -> same shape, device and dtype. A class absent from an image
    stays absent (BCP's ``get_ACDC_2DLargestCC``, skimage's default full connectivity in 2D).
    """
    from scipy import ndimage

    arr = labels.detach().cpu().numpy()
    out = np.zeros_like(arr)
    for b in range(arr.shape[0]):
        for c in np.unique(arr[b]):
            if c == 0:
                continue
            comp, n = ndimage.label(arr[b] == c, structure=_EIGHT_CONNECTED)
            if n == 0:
                continue
            sizes = np.bincount(comp.ravel())[1:]
            out[b][comp == int(np.argmax(sizes)) + 1] = c
    return torch.from_numpy(out).to(labels.device)


def masked_dice_ce(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                   smooth: float = 1e-10) -> tuple[torch.Tensor, torch.Tensor]:
    """Dice and CE of ``logits`` against ``target`` restricted to the pixels where ``mask`` is 1 (BCP's losses).

    Dice (BCP's ``DiceLoss`` with a mask, pooled over the batch, averaged over the K classes)::

        1 - 1/K sum_k (2 sum p_k y_k m + s) / (sum p_k^2 m + sum y_k^2 m + s)

    CE = sum_{pixels} CE(logits, target) m / (sum m + 1e-16).

    Args:
        logits: (B, K, H, W).
        target: (B, H, W) long.
        mask: (H, W) or (B, H, W), {0, 1}.

    Returns:
        (dice, ce), scalars in float32.
    """
    logits = logits.float()
    k = logits.shape[1]
    m = mask.float().expand(target.shape)[:, None]  # (B, 1, H, W)
    p = torch.softmax(logits, dim=1)
    y = F.one_hot(target.long(), k).permute(0, 3, 1, 2).float()
    dims = (0, 2, 3)
    inter = (p * y * m).sum(dims)
    denom = (p * p * m).sum(dims) + (y * y * m).sum(dims)
    dice = 1 - ((2 * inter + smooth) / (denom + smooth)).mean()
    ce = (F.cross_entropy(logits, target.long(), reduction="none") * m[:, 0]).sum() / (m.sum() + 1e-16)
    return dice, ce


def perturbed(feats: Sequence[torch.Tensor], perturbation: FeaturePerturbation) -> list[torch.Tensor]:
    """A fresh draw of ``perturbation`` applied to each feature map (CCT perturbs every encoder level)."""
    return [perturbation(f) for f in feats]


# ------------------------------------------------------- auxiliary optimisers (SASSNet, CauSSL)
class AuxiliaryOptimizer:
    """The private optimiser of a training-only module that plays the other side of a min-max game
    (SASSNet's discriminator, CauSSL's weight predictors), stepped inside the method, not by Lightning.

    The module's parameters get ``requires_grad=False`` here, so the base's optimiser (which takes
    trainable parameters only) never sees them, DDP reduces nothing for them, and the networks' losses
    reach them through no path: in the networks' objective they are constants. :meth:`step` then runs the
    module's own objective on differentiable copies of its parameters (``torch.autograd.grad``, which
    leaves ``.grad`` of every other tensor untouched and fires no DDP hook), averages the gradients
    over DDP processes (an all-reduce: every process must call ``step`` equally often), and lets the
    optimiser step. A step whose gradient is not finite is dropped (and returns the non-finite loss, which
    the method logs, so that the base's ``--on_nonfinite`` names it).

    The parameters are in the method's ``state_dict`` (as sub-module parameters); the optimiser's own
    state (e.g. Adam's moments) goes into checkpoints through :meth:`state_dict` / :meth:`load_state_dict`,
    which the method calls from ``on_save_checkpoint`` / ``on_load_checkpoint``. The optimiser is built on
    first use, after Lightning has moved the module to its device.

    Args:
        module: the training-only module.
        make: ``params -> torch.optim.Optimizer`` (e.g. ``lambda p: torch.optim.Adam(p, 1e-4)``).
    """

    def __init__(self, module: nn.Module, make) -> None:
        module.requires_grad_(False)
        self.module = module
        self._make = make
        self._opt: torch.optim.Optimizer | None = None
        self._pending: dict | None = None

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        if self._opt is None:
            self._opt = self._make(list(self.module.parameters()))
            if self._pending is not None:
                self._opt.load_state_dict(self._pending)
                self._pending = None
        return self._opt

    def step(self, objective) -> torch.Tensor:
        """Minimise ``objective(params)`` by one optimiser step; ``params`` maps the module's parameter
        names to differentiable copies (use them through ``torch.func.functional_call`` or directly).
        Returns the objective's value before the step, detached, float32."""
        named = dict(self.module.named_parameters())
        leaves = {n: p.detach().requires_grad_() for n, p in named.items()}
        with torch.enable_grad():
            loss = objective(leaves)
            grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(named.values(), grads, strict=True)]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            world = torch.distributed.get_world_size()
            for g in grads:
                torch.distributed.all_reduce(g)
                g.div_(world)
        if all(bool(torch.isfinite(g).all()) for g in grads):
            opt = self.optimizer
            for p, g in zip(named.values(), grads, strict=True):
                p.grad = g.to(p.dtype)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return loss.detach().float()

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        if self._opt is None:
            self._pending = state
        else:
            self._opt.load_state_dict(state)
