"""CauSSL: cross pseudo supervision between two networks whose weights are kept algorithmically independent."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .components import AuxiliaryOptimizer, check_weights, consistency_weight, total_steps
from .cps import CPS


def conv_weights(net: nn.Module) -> list[torch.Tensor]:
    """The network's convolution kernels (every 4-D weight: convolutions, transposed convolutions, the head)."""
    return [p for name, p in net.named_parameters() if p.ndim == 4 and name.endswith("weight")]


def dependence(
    target: Sequence[torch.Tensor], source: Sequence[torch.Tensor], predictors: Sequence[torch.Tensor]
) -> torch.Tensor:
    """CauSSL's algorithmic dependence of one network's weights on another's (``l_correlation_cos_mean``)::

        W_l, V_l: layer l's kernels of the target and the source network, reshaped to (n_l, d_l)
                  (n_l = the kernel tensor's first dimension, its filters)
        A_l:      a linear predictor (n_l, n_l): each target filter is predicted as a combination of the
                  source's filters, W_hat_l = A_l V_l
        dep = 1/L sum_l 1/n_l sum_i cos(W_hat_l,i, W_l,i)^2

    in [0, 1]: 0 when no linear combination of the source's filters points along any target filter, 1 when
    every target filter is (up to scale) a linear combination of the source's. Float32 (autocast off).
    Gradient reaches whatever requires it (the min step: the target's weights; the max step: A)."""
    if not (len(target) == len(source) == len(predictors)) or not target:
        raise ValueError("dependence: need one predictor per layer of two networks of the same structure")
    total = target[0].new_zeros((), dtype=torch.float32)
    with torch.autocast(device_type=target[0].device.type, enabled=False):
        for w, v, a in zip(target, source, predictors, strict=True):
            n = w.shape[0]
            pred = F.normalize(a.float() @ v.float().reshape(n, -1), dim=1)
            cos = (pred * F.normalize(w.float().reshape(n, -1), dim=1)).sum(1)
            total = total + cos.pow(2).mean()
    return total / len(target)


class WeightPredictors(nn.Module):
    """One (n_l, n_l) matrix per convolution kernel of a network, initialised N(0, std^2) (CauSSL's
    ``Linear_vector``, std 1e-3): the linear predictors A_l of :func:`dependence`."""

    def __init__(self, net: nn.Module, std: float = 1e-3) -> None:
        super().__init__()
        self.mats = nn.ParameterList(
            nn.Parameter(torch.randn(w.shape[0], w.shape[0]) * std) for w in conv_weights(net)
        )


class CauSSL(CPS):
    """CauSSL (Miao et al., "CauSSL: Causality-inspired semi-supervised learning for medical image
    segmentation", ICCV 2023), its CPS variant (the authors' ``train_CT_CPSCauSSL.py``,
    github.com/JuzhengMiao/CauSSL), in 2D on two copies of the configured network::

        L_i = L_sup(f_i(x_l), y) + 0.3 w(t) CE(f_i(u), argmax f_j(u)) + lambda dep(f_i | f_j; A_i)
        w(t) = 0.1 * exp(-5 (1 - t/T)^2),   lambda = 3.0

    with :func:`dependence` dep(f_i | f_j; A_i) of f_i's kernels on f_j's (detached) under the fixed linear
    predictors A_i. The min-max game over the algorithmic dependence (the networks should be independent
    "mechanisms"): max: every ``max_interval`` (60) iterations after ``max_start`` (500 of the authors'
    5000 iterations), ``max_iters`` (60) Adam steps (lr 2e-2) raise dep(f_i | f_j; A_i) over A_i with the
    networks fixed, i.e. A_i becomes the best linear predictor of f_i's filters from f_j's; min: after
    ``min_start`` (500 of 5000) and once a max phase has run, the networks lower the dependence under the
    fixed A_i (the ``lambda dep`` term). The cross pseudo-supervision starts after ``cps_start`` (400 of
    5000). The predictors are :class:`~.components.AuxiliaryOptimizer` parameters (their Adam state is in
    checkpoints); the networks are trained jointly by the base's optimiser (the authors use two SGD
    optimisers with identical settings, the same thing). ``net`` is evaluated and deployed, as CPS.

    Deviations: starts are fractions of the run; the ramp spans ``ramp_fraction`` of the run (the authors':
    40 "epochs" of 150 iterations, longer than their 5000-iteration run); 0.5 * (CE + Dice) as theirs but
    with the base's two-class Dice; the base's learning-rate schedule (theirs: /10 after 2500 iterations);
    initialisation: CPS's default, two independent default draws (SSL4MIS's He / Glorot normal, used here
    before, left CPS's networks with eval-mode BatchNorm statistics off by the dropout variance
    shift at this budget: :class:`~.cps.CPS`; ``init1: kaiming``, ``init2: xavier`` restore it).

    Args:
        consistency: weight of the cross pseudo-supervision after the ramp, before ``cps_scale`` (0.1).
        cps_scale: the authors' extra factor of the cross pseudo-supervision (0.3).
        dependence_weight: lambda, weight of the dependence in each network's loss (3.0).
        cps_start: fraction of the run before the cross pseudo-supervision starts (400 / 5000 = 0.08).
        max_start: fraction of the run before the first max phase (500 / 5000 = 0.1).
        min_start: fraction of the run before the dependence enters the loss (500 / 5000 = 0.1).
        max_interval: iterations between max phases (60).
        max_iters: Adam steps of the predictors per max phase (60).
        predictor_lr: the predictors' Adam learning rate (2e-2).
        predictor_std: standard deviation of the predictors' initialisation (1e-3).
        **kwargs: CPS's ``ramp_fraction``, ``init1``, ``init2`` and the base's arguments.
    """

    method_name = "caussl"
    display_name = "CauSSL"
    uses_unlabeled = True

    def __init__(
        self,
        consistency: float = 0.1,
        cps_scale: float = 0.3,
        dependence_weight: float = 3.0,
        cps_start: float = 0.08,
        max_start: float = 0.1,
        min_start: float = 0.1,
        max_interval: int = 60,
        max_iters: int = 60,
        predictor_lr: float = 2e-2,
        predictor_std: float = 1e-3,
        **kwargs,
    ) -> None:
        super().__init__(consistency=consistency, **kwargs)
        check_weights(cps_scale=cps_scale, dependence_weight=dependence_weight)
        for name, v in (("cps_start", cps_start), ("max_start", max_start), ("min_start", min_start)):
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"model.{name}={v}: must be in [0, 1]")
        if max_interval < 1 or max_iters < 0:
            raise ValueError("model.max_interval must be >= 1 and model.max_iters >= 0")
        if predictor_lr <= 0 or predictor_std < 0:
            raise ValueError("model.predictor_lr must be > 0 and model.predictor_std >= 0")
        # predictors[0]: A_1 (net's kernels from net2's); predictors[1]: A_2 (net2's from net's)
        self.predictors = nn.ModuleList(
            [WeightPredictors(self.net, predictor_std), WeightPredictors(self.net2, predictor_std)]
        )
        self.predictor_opt = AuxiliaryOptimizer(
            self.predictors, lambda p: torch.optim.Adam(p, lr=predictor_lr)
        )
        self.register_buffer("max_phases", torch.zeros((), dtype=torch.long))  # in checkpoints

    def dependences(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The min step's terms (dep(net | net2; A_1), dep(net2 | net; A_2)): gradient to the target network
        only (the source is detached, the predictors are constants)."""
        w1, w2 = conv_weights(self.net), conv_weights(self.net2)
        a1, a2 = (list(m.mats) for m in self.predictors)
        return dependence(w1, [w.detach() for w in w2], a1), dependence(w2, [w.detach() for w in w1], a2)

    def max_step(self) -> torch.Tensor:
        """``max_iters`` Adam steps raising both dependences over the predictors (networks fixed); the last value."""
        w1, w2 = [w.detach() for w in conv_weights(self.net)], [w.detach() for w in conv_weights(self.net2)]
        n = len(w1)

        def objective(p: dict) -> torch.Tensor:
            return -(
                dependence(w1, w2, [p[f"0.mats.{j}"] for j in range(n)])
                + dependence(w2, w1, [p[f"1.mats.{j}"] for j in range(n)])
            )

        value = torch.zeros(())
        for _ in range(self.hparams.max_iters):
            value = -self.predictor_opt.step(objective)
        self.max_phases += 1
        return value

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        hp = self.hparams
        t, total = self.global_step, total_steps(self)
        if t > hp.max_start * total and t % hp.max_interval == 0:
            self.log("train/dependence_after_max", self.max_step(), batch_size=1)
        n, terms = self.cps_losses(batch)
        sup1, sup2, cps1, cps2 = terms["sup"], terms["sup2"], terms["cps"], terms["cps2"]
        w = (
            consistency_weight(self, hp.consistency, hp.ramp_fraction) * hp.cps_scale
            if t > hp.cps_start * total
            else 0.0
        )
        dep1, dep2 = self.dependences()
        lam = hp.dependence_weight if t > hp.min_start * total and bool(self.max_phases > 0) else 0.0
        loss = sup1 + sup2 + w * (cps1 + cps2) + lam * (dep1 + dep2)
        self.log("train/consistency_weight", w, batch_size=n)
        self.log("train/dependence_weight", lam, batch_size=n)
        self.log_losses({"loss": loss, **terms, "dependence": dep1, "dependence2": dep2}, batch_size=n)
        return loss

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["predictor_optimizer"] = self.predictor_opt.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "predictor_optimizer" in checkpoint:
            self.predictor_opt.load_state_dict(checkpoint["predictor_optimizer"])
