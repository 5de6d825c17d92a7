"""L_dss: distribution-based self-supervised loss on unlabeled images (method.md, "L_dss").

    L_dss = L_cons + gamma2 * L_align + gamma3 * L_contrast

- ``class_balanced_consistency``: weak-to-strong KL, each pixel weighted inversely to its class's
  predicted area in the batch (small lesions are not drowned by background).
- ``DistributionAlignment``: the batch mean and variance of per-image predicted lesion area and mean
  lesion confidence on unlabeled images are pulled toward moving averages measured on labeled images.
- ``contrast_loss``: -log of a Fisher-like foreground/background separation of decoder features.

All terms are computed in float32 whatever the input dtype (AMP), and return float32 scalars.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["DSSLoss", "DistributionAlignment", "class_balanced_consistency", "contrast_loss"]

CONTRAST_FORMS = ("log", "softplus")  # contrast_loss(form=...): method.md's -log r, or log(1 + 1/r)
ALIGN_STATS = ("area_mean", "area_var", "conf_mean", "conf_var")  # DistributionAlignment's statistics, in order


def class_balanced_consistency(
    logits_weak: torch.Tensor, logits_strong: torch.Tensor, eps: float = 1e-6, hard: bool = False,
    area: torch.Tensor | None = None,
) -> torch.Tensor:
    """Class-balanced weak-to-strong consistency.

    With q = softmax(logits_weak) (stop-gradient), p = softmax(logits_strong), both (B, K, H, W), and
    N = B * H * W pixels i::

        KL_i = sum_k q_ik (log q_ik - log p_ik)
        r_ik = q_ik                       (soft, default)   or   1[argmax_k q_i = k]   (``hard``)
        A_k  = (1/N) sum_i r_ik           predicted area fraction of class k in the batch
        w_i  = sum_k r_ik / (K' A_k + eps) K' = K (soft) or the number of classes present (hard)
        L    = (1/N) sum_i w_i KL_i

    Equivalently (eps -> 0) L = (1/K') sum_k [ sum_i r_ik KL_i / sum_i r_ik ]: the mean over classes of
    the class-conditional mean KL. The weights average to 1, so a balanced batch (A_k = 1/K) gives
    w_i = 1, the plain mean KL, and L never exceeds max_i KL_i; a lesion covering 2% of the batch has
    its pixels weighted about 25x, the background about 0.5x. The strong view must be pixel-aligned
    with the weak one (the caller mixes the weak prediction the same way as a CutMix'd strong view).

    ``area`` (K,) replaces the batch's own A_k (e.g. the lesion prior measured on labeled images): a batch
    with little predicted lesion (small lesions, or lesion-free images) then does not weight its few lesion
    pixels tens of times.

    Returns:
        scalar, >= 0, 0 when the two predictions agree; gradient only to ``logits_strong``.
    """
    if logits_weak.shape != logits_strong.shape or logits_weak.ndim != 4:
        raise ValueError(f"expected two (B, K, H, W) logits of one shape; got {tuple(logits_weak.shape)}, {tuple(logits_strong.shape)}")
    log_q = F.log_softmax(logits_weak.detach().float(), dim=1)
    q = log_q.exp()
    log_p = F.log_softmax(logits_strong.float(), dim=1)
    kl = (q * (log_q - log_p)).sum(1)  # (B, H, W)
    k = q.shape[1]
    r = F.one_hot(q.argmax(1), k).permute(0, 3, 1, 2).float() if hard else q
    area = r.mean(dim=(0, 2, 3)) if area is None else area.to(r)  # (K,)
    k_eff = (area > 0).sum().clamp_min(1) if hard else k
    w = (r / (k_eff * area + eps).view(1, k, 1, 1)).sum(1)  # (B, H, W)
    return (w * kl).mean()


class DistributionAlignment(nn.Module):
    """Pull the unlabeled batch's prediction statistics toward the labeled ones (DAMTN's idea).

    Per image b, with p = probs[:, 1] (lesion probability, (B, H, W)):
        area_b = mean_{y,x} p                               predicted lesion area fraction
        conf_b = sum_{y,x} p^2 / (sum_{y,x} p + eps)        mean lesion confidence (p-weighted mean of p)
    Batch statistics s = (mean_b area, var_b area, mean_b conf, var_b conf) (population variance, so a
    batch of one has variance 0). Buffers hold an exponential moving average of the labeled s:
    s_L <- s (first update), then s_L <- m s_L + (1 - m) s. The loss is

        L_align = sum_{j in stats} ( s_U[j] - s_L[j] )^2    (0 before the first labeled update)

    ``stats`` picks which of the four enter the loss (default all four, method.md's): the area statistics hold
    the predicted lesion area, the confidence ones pull the unlabeled predictions toward the confidence the
    student reaches on the images it is trained on (an entropy-minimising push). The buffers hold all four.

    Both statistics are soft (no argmax), so the loss is differentiable and empty masks are no special
    case. Its magnitude is small (areas ~0.1, variances ~0.01: squared gaps ~1e-4 to 1e-2), which the
    weight gamma2 has to account for.

    Buffers ``labeled_stats`` (4,) and ``num_updates`` () are in the state dict (checkpoints) and follow
    ``.to(device)``. Under DDP each process updates its own copy from its own labeled shard; with DDP's
    default ``broadcast_buffers`` rank 0's copy is the one all processes use.
    """

    STATS = ALIGN_STATS

    def __init__(self, momentum: float = 0.99, eps: float = 1e-6, stats: tuple[str, ...] | list[str] = ALIGN_STATS) -> None:
        super().__init__()
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1); got {momentum}")
        unknown = [n for n in stats if n not in ALIGN_STATS]
        if unknown or not stats:
            raise ValueError(f"alignment stats {list(stats)!r}: a non-empty subset of {ALIGN_STATS}")
        self.momentum, self.eps = float(momentum), float(eps)
        self.stats = tuple(n for n in ALIGN_STATS if n in stats)
        self._index = [ALIGN_STATS.index(n) for n in self.stats]
        self.register_buffer("labeled_stats", torch.zeros(4))
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    def batch_stats(self, probs: torch.Tensor) -> torch.Tensor:
        """(B, 2, H, W) probabilities -> (4,) float32: mean and variance over the batch of area and confidence."""
        if probs.ndim != 4 or probs.shape[1] < 2:
            raise ValueError(f"expected probabilities (B, 2, H, W); got {tuple(probs.shape)}")
        p = probs[:, 1].float()
        area = p.mean(dim=(1, 2))
        conf = p.pow(2).sum(dim=(1, 2)) / (p.sum(dim=(1, 2)) + self.eps)
        return torch.stack([area.mean(), area.var(unbiased=False), conf.mean(), conf.var(unbiased=False)])

    @torch.no_grad()
    def update_labeled(self, probs_labeled: torch.Tensor) -> None:
        """Fold one labeled batch's statistics (B, 2, H, W) into the moving average (no gradient)."""
        s = self.batch_stats(probs_labeled.detach())
        # torch.where, not a Python branch on num_updates: no device sync per step
        ema = self.momentum * self.labeled_stats + (1 - self.momentum) * s
        self.labeled_stats.copy_(torch.where(self.num_updates > 0, ema, s))
        self.num_updates += 1

    def forward(self, probs_unlabeled: torch.Tensor) -> torch.Tensor:
        """(B, 2, H, W) unlabeled probabilities (with gradient) -> scalar L_align (float32)."""
        s_u = self.batch_stats(probs_unlabeled)
        loss = (s_u - self.labeled_stats.detach()).pow(2)[self._index].sum()
        return torch.where(self.num_updates > 0, loss, torch.zeros_like(loss))


def _resize_weights(w: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize (B, K, H, W) weights: area averaging when shrinking (keeps the mass of thin lesions),
    bilinear when enlarging."""
    if tuple(w.shape[-2:]) == size:
        return w
    if size[0] <= w.shape[-2] and size[1] <= w.shape[-1]:
        return F.adaptive_avg_pool2d(w, size)
    return F.interpolate(w, size=size, mode="bilinear", align_corners=False)


def contrast_loss(
    features: torch.Tensor, probs: torch.Tensor, eps: float = 1e-6, min_mass: float = 1.0, min_area: float = 0.0,
    form: str = "log",
) -> torch.Tensor:
    """Foreground/background feature contrast, per image, averaged over images.

    features f: (B, C, H, W); probs: (B, 2, H, W) (resized to (H, W) if different), detached: the
    term shapes the features, not the mask. For each image, weights w_f = probs[:, 1], w_b = probs[:, 0]::

        mu_f = sum_x w_f(x) f(x) / sum_x w_f(x)                                (C,)
        s_f  = (1/C) sum_c [ sum_x w_f(x) (f_c(x) - mu_f,c)^2 / sum_x w_f(x) ]  (mean per-channel variance)
        (mu_b, s_b likewise with w_b)
        r_b  = ||mu_f - mu_b||^2 / (s_f + s_b + eps)
        L_b  = -log(r_b + eps)                       (``form="log"``, method.md)
        L_b  = log(1 + 1 / (r_b + eps)) = softplus(-log(r_b + eps))   (``form="softplus"``)

    Per image rather than over the batch: a lesion has to stand out from its own surroundings, and
    backgrounds differ between images. Images with soft foreground or background mass below
    ``min_mass`` (in feature pixels), or whose predicted lesion (probs[:, 1] > 0.5) covers less than
    ``min_area`` of the image, are left out; the result is the mean over the rest (0 if none). With
    ``min_area`` > 0 an image without a confident lesion (a lesion-free image, as BUSI's "normal" class)
    does not make the features separate a lesion that is not there.
    The ratio is invariant to the scale of f, so features cannot lower the loss by growing. The ``log``
    form is unbounded below (well-separated features give negative values) and pushes with the same force
    (d L / d log r = -1) however well the features already separate, along whatever mask the student
    predicts, right or wrong; on BUSI that self-confirmation pulled the validation Dice down (README,
    "BUSI"). The ``softplus`` form equals it for poorly separated features (r << 1) but is >= 0 and its push
    fades once they separate (d L / d log r = -1 / (1 + r): 0.09 at r = 10). Near zero separation the
    gradient of either is of order 1/sqrt(eps (s_f + s_b)): keep the weight small early in training.

    Returns:
        scalar (float32); lower for better separated features.
    """
    if features.ndim != 4 or probs.ndim != 4 or probs.shape[1] < 2 or features.shape[0] != probs.shape[0]:
        raise ValueError(f"expected features (B, C, H, W) and probs (B, 2, H, W); got {tuple(features.shape)}, {tuple(probs.shape)}")
    f = features.float()
    w = _resize_weights(probs.detach().float(), tuple(f.shape[-2:]))

    def moments(wk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        wk = wk[:, None]  # (B, 1, H, W)
        mass = wk.sum(dim=(2, 3))  # (B, 1)
        mu = (wk * f).sum(dim=(2, 3)) / (mass + eps)  # (B, C)
        var = (wk * (f - mu[..., None, None]).pow(2)).sum(dim=(2, 3)) / (mass + eps)  # (B, C)
        return mu, var.mean(1), mass[:, 0]

    mu_f, s_f, m_f = moments(w[:, 1])
    mu_b, s_b, m_b = moments(w[:, 0])
    ratio = (mu_f - mu_b).pow(2).sum(1) / (s_f + s_b + eps)
    if form == "log":
        per_image = -torch.log(ratio + eps)
    elif form == "softplus":
        per_image = F.softplus(-torch.log(ratio + eps))
    else:
        raise ValueError(f"contrast form {form!r}: one of {CONTRAST_FORMS}")
    area = (probs.detach()[:, 1] > 0.5).float().mean(dim=(1, 2))  # hard lesion fraction, at the probs' size
    valid = ((m_f >= min_mass) & (m_b >= min_mass) & (area >= min_area)).float()
    return (per_image * valid).sum() / valid.sum().clamp_min(1)


class DSSLoss(nn.Module):
    """L_dss = cons + gamma2 * align + gamma3 * contrast, each term switchable.

    ``forward(logits_weak, logits_strong, features, probs_labeled=None, contrast_probs=None)``:
        logits_weak: (B, 2, H, W) student logits on the weak unlabeled view. The consistency target is
            their stop-gradient softmax; the alignment uses softmax(logits_weak) WITH gradient (the
            labeled statistics are measured on weak labeled views, so weak is compared with weak).
        logits_strong: (B, 2, H, W) student logits on the strong view, pixel-aligned with the weak ones.
        features: (B, C, h, w) student decoder features (``decode(..., return_features=True)[1]``) of
            the strong or the weak view; may be None when the contrast term is off.
        probs_labeled: (B_l, 2, H, W) labeled-batch probabilities; when given, the alignment's moving
            average is updated (no gradient) before the loss is computed.
        contrast_probs: soft masks for the contrast weights; default softmax(logits_weak) (the more
            reliable prediction, pixel-aligned with either view's features by the same assumption as
            the consistency term). Detached inside.

    Returns a dict with "cons", "align", "contrast" (only the terms switched on; an off term is neither
    computed nor returned) and "dss", the weighted total (0 when every term is off). The alignment
    module (its buffers) exists even when the term is off, so checkpoints of all ablations share keys.
    ``align_stats``: the alignment's statistics (``DistributionAlignment``'s ``stats``).
    """

    def __init__(
        self,
        gamma2: float = 10.0,
        gamma3: float = 0.1,
        use_consistency: bool = True,
        use_alignment: bool = True,
        use_contrast: bool = True,
        momentum: float = 0.99,
        hard_balance: bool = False,
        contrast_min_area: float = 0.0,
        balance_area: str = "batch",
        contrast_form: str = "log",
        align_stats: tuple[str, ...] | list[str] = ALIGN_STATS,
    ) -> None:
        super().__init__()
        if contrast_form not in CONTRAST_FORMS:  # at construction, before any training step
            raise ValueError(f"contrast_form={contrast_form!r}: one of {CONTRAST_FORMS}")
        self.contrast_form = contrast_form
        if balance_area not in ("batch", "labeled"):
            raise ValueError(f"balance_area={balance_area!r}: 'batch' or 'labeled'")
        self.balance_area = balance_area
        if not 0.0 <= contrast_min_area <= 1.0:
            raise ValueError(f"contrast_min_area={contrast_min_area}: must be in [0, 1]")
        self.contrast_min_area = float(contrast_min_area)
        self.gamma2, self.gamma3 = float(gamma2), float(gamma3)
        self.use_consistency, self.use_alignment, self.use_contrast = use_consistency, use_alignment, use_contrast
        self.hard_balance = hard_balance
        self.alignment = DistributionAlignment(momentum, stats=align_stats)

    def forward(
        self,
        logits_weak: torch.Tensor,
        logits_strong: torch.Tensor,
        features: torch.Tensor | None,
        probs_labeled: torch.Tensor | None = None,
        contrast_probs: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        total = logits_strong.new_zeros((), dtype=torch.float32)
        if probs_labeled is not None and (self.use_alignment or self.balance_area == "labeled"):
            self.alignment.update_labeled(probs_labeled)
        if self.use_consistency:
            area = None
            if self.balance_area == "labeled" and probs_labeled is not None:  # just updated: no empty average
                lesion = self.alignment.labeled_stats[0].clamp(1e-3, 1 - 1e-3)  # labeled mean lesion area
                area = torch.stack([1 - lesion, lesion])
            out["cons"] = class_balanced_consistency(logits_weak, logits_strong, hard=self.hard_balance, area=area)
            total = total + out["cons"]
        if self.use_alignment:
            out["align"] = self.alignment(F.softmax(logits_weak.float(), dim=1))
            total = total + self.gamma2 * out["align"]
        if self.use_contrast:
            if features is None:
                raise ValueError("DSSLoss: the contrast term needs the student's decoder features")
            probs = F.softmax(logits_weak.float(), dim=1) if contrast_probs is None else contrast_probs
            out["contrast"] = contrast_loss(features, probs, min_area=self.contrast_min_area, form=self.contrast_form)
            total = total + self.gamma3 * out["contrast"]
        out["dss"] = total
        return out
