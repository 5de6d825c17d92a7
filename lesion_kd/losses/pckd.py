"""L_pckd: perturbation-consistent cross-architecture knowledge distillation (method.md, "L_pckd").

The frozen teacher's image embedding f_t (B, 256, 64, 64) is mapped by a trainable projector P into the
student's deepest feature space f_s (B, C_s, h, w), then

    L_map  = mean_{b,y,x} || n(c(f_s)) - n(c(P(f_t))) ||^2,       n = L2 normalisation over channels,
                                                                  c = centring: minus the image's spatial mean
    L_resp = mean_{b,y,x} KL( softmax(D(pi(P(f_t)))) || softmax(D(pi(f_s))) )
    L_pckd = L_map + beta * L_resp

where D(x) = decode([*skips, x]) is the student's own decoder fed with the student's own skips and the
deepest feature replaced, and pi is ONE random perturbation draw applied to both branches. The teacher
branch of L_resp is a target (detached), so the projector is trained by L_map alone.

Why the centring (``centered``, default on; method.md writes n(f_s) - n(P(f_t))): with both sides trainable
and the comparison scale-free, the uncentred L_map has a degenerate minimum: every pixel of the student's
deepest feature turned to one shared direction, P's output the same constant, and every trained run with
the uncentred L_map ended there (docs/method.md, section 4.1, has the measurement). Centred, a constant
feature has nothing left to match: the student has to reproduce the teacher's spatial structure.

Centring leaves a second easy minimum (docs/method.md, section 4.1, "What remains"): the student's centred
pixels along ONE direction (+u or -u times a scalar map), which a projector predicting one scalar map
matches to an L_map near zero. The optional relational term (``relation_weight``, off by default; a
reconstruction, not in method.md) adds

    L_rel = mean_{b,i,j} ( <n(c(f_s))_i, n(c(f_s))_j> - <n(c(f_t'))_i, n(c(f_t'))_j> )^2

over the h*w pixels i, j of each image, f_t' the teacher's raw embedding resized to the student grid (no
trainable part on the teacher side): the student must reproduce which of its pixels the teacher finds
alike, which a rank-one feature (all similarities +-1) cannot, whatever the projector does.
L_map then stands for L_map + relation_weight * L_rel (logged separately as "rel").

``FeatureKD`` is the FitNets-style ablation (regressor + MSE, no mapping network, no perturbation);
``PCKDLoss`` switches between the three modes. The projector and the regressor exist only for training:
they are not part of the deployed student and are not counted in its size.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "PERTURBATION_KINDS",
    "PCKD_MODES",
    "FeatureKD",
    "FeaturePerturbation",
    "PCKDLoss",
    "PerturbationDraw",
    "Projector",
    "center",
    "feature_map_loss",
    "relation_loss",
    "resize_features",
    "response_loss",
]

PERTURBATION_KINDS = ("noise", "channel_dropout", "feature_drop", "none")
PCKD_MODES = ("pckd", "map", "featkd")


def resize_features(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear resize of (B, C, H, W) to (B, C, *size); identity when the size already matches.

    Down-sampling is anti-aliased: the teacher grid is 64x64 and the student's bottleneck is as small as
    2x2 - 16x16, and plain bilinear would then read only a few teacher cells per output cell and ignore
    the rest of the embedding.
    """
    size = (int(size[0]), int(size[1]))
    if tuple(x.shape[-2:]) == size:
        return x
    down = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    if down and x.dtype in (torch.bfloat16, torch.float16):
        # anti-aliased interpolation has no reduced-precision CPU kernel (bf16-mixed runs): resize in float32
        return F.interpolate(x.float(), size=size, mode="bilinear", align_corners=False, antialias=True).to(x.dtype)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=down)


def _num_groups(channels: int, max_groups: int = 32) -> int:
    """The largest divisor of ``channels`` that is at most ``max_groups`` (246 -> 6, 256 -> 32)."""
    return max(g for g in range(1, min(channels, max_groups) + 1) if channels % g == 0)


class Projector(nn.Module):
    """Teacher embedding -> student feature space: 1x1 conv -> GroupNorm -> GELU -> 3x3 conv -> resize.

    ``forward(f_t (B, in_channels, 64, 64), size=(h, w)) -> (B, out_channels, h, w)``.

    Args:
        in_channels: teacher embedding channels (256 for MedSAM / LiteMedSAM).
        out_channels: channels C_s of the student feature it is compared with.
        hidden: width after the 1x1 conv; ``out_channels`` when None.
        resize_first: where the bilinear resize goes relative to the 3x3 conv. None (auto): before it
            when ``size`` is smaller than the teacher grid, after it otherwise. Reason: a 3x3 conv on the
            64x64 grid followed by an 8x down-sampling sees about one student cell, i.e. it is almost a
            1x1 conv, and costs 64x the MACs of the same conv at the student's 8x8 (about 2.2 GMAC per
            image for C_s = 246); at the coarser grid the 3x3 conv mixes a 3x3 neighbourhood of student
            cells. ``False`` gives the literal order conv -> resize everywhere.
    """

    def __init__(
        self,
        in_channels: int = 256,
        out_channels: int = 256,
        hidden: int | None = None,
        resize_first: bool | None = None,
    ) -> None:
        super().__init__()
        hidden = out_channels if hidden is None else hidden
        self.in_channels, self.out_channels, self.resize_first = in_channels, out_channels, resize_first
        self.reduce = nn.Conv2d(in_channels, hidden, 1)
        # GroupNorm, not BatchNorm: statistics per sample, so the projection of an image does not depend
        # on the batch it shares (labeled/unlabeled halves, CPU batches of 2-4, DDP shards without
        # SyncBN), and there are no running statistics, which a training-only module would never use
        # in eval mode anyway (and which would make a validation-time loss differ from the training one).
        self.norm = nn.GroupNorm(_num_groups(hidden), hidden)
        self.act = nn.GELU()
        self.refine = nn.Conv2d(hidden, out_channels, 3, padding=1)

    def forward(self, f_t: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        """(B, in_channels, H_t, W_t) -> (B, out_channels, *size)."""
        if f_t.ndim != 4 or f_t.shape[1] != self.in_channels:
            raise ValueError(f"Projector expects (B, {self.in_channels}, H, W); got {tuple(f_t.shape)}")
        x = self.act(self.norm(self.reduce(f_t)))
        smaller = size[0] < x.shape[-2] or size[1] < x.shape[-1]
        first = smaller if self.resize_first is None else self.resize_first
        if first:
            return self.refine(resize_features(x, size))
        return resize_features(self.refine(x), size)


def center(x: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) minus each image's spatial mean per channel."""
    return x - x.mean(dim=(2, 3), keepdim=True)


def unit_pixels(f: torch.Tensor, centered: bool = True) -> torch.Tensor:
    """n(c(f)) of L_map and L_rel: (B, C, h, w) in float32, each pixel's C-vector (centred first when
    ``centered``) scaled to unit length."""
    f = f.float()
    return F.normalize(center(f) if centered else f, dim=1)


def feature_map_loss(f_s: torch.Tensor, p_t: torch.Tensor, centered: bool = True) -> torch.Tensor:
    """L_map = mean_{b,y,x} sum_c ( n(c(f_s)) - n(c(p_t)) )_c^2 with n(v) = v / ||v||_2 over channels and
    c(f) = f - mean_{y,x} f per image and channel (``centered``; without it, c is the identity).

    Args:
        f_s: student feature (B, C, h, w).
        p_t: projected teacher feature (B, C, h, w); gradient flows to both (the projector learns here).
        centered: compare the pixels' deviations from their image's mean feature (default), so that a
            feature map that is one constant vector cannot match (see the module docstring).

    Returns:
        scalar in [0, 4]: 0 when the two point the same way at every pixel (any positive scale), 2 when
        orthogonal. Computed in float32 (squared norms of fp16 features overflow).
    """
    if f_s.shape != p_t.shape:
        raise ValueError(f"feature_map_loss: shapes differ, {tuple(f_s.shape)} vs {tuple(p_t.shape)}")
    d = unit_pixels(f_s, centered) - unit_pixels(p_t, centered)
    return d.pow(2).sum(1).mean()


def relation_loss(f_s: torch.Tensor, f_t: torch.Tensor, centered: bool = True) -> torch.Tensor:
    """L_rel = mean_{b,i,j} ( S(f_s)_ij - S(f_t)_ij )^2, S(f)_ij = <n(c(f))_i, n(c(f))_j> over the h*w pixels.

    Args:
        f_s: student feature (B, C_s, h, w).
        f_t: teacher feature on the same grid (B, C_t, h, w); any channel count (S is pixels x pixels).
        centered: centre each image's pixels first (as ``feature_map_loss``).

    Returns:
        scalar in [0, 4], 0 when the two feature maps have the same pixel-to-pixel cosine similarities (e.g.
        one is an orthogonal channel mixing of the other), float32. Hand-written: no maintained library
        (MONAI, torchmetrics) has a similarity-preserving / relational KD loss.
    """
    if f_s.shape[0] != f_t.shape[0] or f_s.shape[-2:] != f_t.shape[-2:]:
        raise ValueError(f"relation_loss: batch or grid differ, {tuple(f_s.shape)} vs {tuple(f_t.shape)}")

    def sim(f: torch.Tensor) -> torch.Tensor:
        u = unit_pixels(f, centered).flatten(2)  # (B, C, N)
        return u.transpose(1, 2) @ u  # (B, N, N)

    return (sim(f_s) - sim(f_t)).pow(2).mean()


@dataclass
class PerturbationDraw:
    """One random draw of a feature perturbation, to apply to several tensors of the sampled shape.

    ``value`` (None for kind "none"): "noise": U(-a, a) of the feature's full shape (B, C, h, w);
    "channel_dropout": per-image channel keep mask already scaled by 1/(1-p), (B, C, 1, 1);
    "feature_drop": spatial keep mask {0, 1}, (B, 1, h, w).
    """

    kind: str
    value: torch.Tensor | None


class FeaturePerturbation(nn.Module):
    """Feature-level perturbations of CCT / UniMatch, split into ``sample`` (the random draw) and ``apply``.

    The split is the point: L_resp applies the SAME draw to the student and the projected teacher feature::

        draw = pert.sample(f_s)
        a, b = pert.apply(f_s, draw), pert.apply(p_t, draw)

    Kinds (f: (B, C, h, w)):
        "noise": f' = f + f * u, u ~ U(-a, a) elementwise, a = ``strength`` (CCT's 0.3; CCT shares one u
            over the batch, here every element of the batch has its own).
        "channel_dropout": Dropout2d: whole channels of each image zeroed with probability p = ``strength``,
            the kept ones scaled by 1/(1-p) (UniMatch uses p = 0.5).
        "feature_drop": CCT's feature drop: attention A = mean_c f (B, 1, h, w), gamma ~ U(0.7, 0.9) per
            image, locations with A > min A + gamma (max A - min A) zeroed (the most salient ones). CCT
            thresholds at gamma * max A, which equals this for post-ReLU maps whose minimum is 0; the
            min-max form also drops the top of signed feature maps (the Mamba student's are signed).
            ``strength`` is unused. The mask is computed from the tensor given to ``sample``.
        "none": identity.

    The draw is made whether or not the module is in training mode: it is part of a loss, not a layer.
    """

    def __init__(self, kind: str = "noise", strength: float = 0.3, drop_range: tuple[float, float] = (0.7, 0.9)):
        super().__init__()
        if kind not in PERTURBATION_KINDS:
            raise ValueError(f"unknown perturbation kind {kind!r}; choose one of: {', '.join(PERTURBATION_KINDS)}")
        if kind == "channel_dropout" and not 0.0 <= strength < 1.0:
            raise ValueError(f"channel_dropout strength (drop probability) must be in [0, 1); got {strength}")
        if kind == "noise" and strength < 0:
            raise ValueError(f"noise strength (uniform half-range) must be >= 0; got {strength}")
        if not 0.0 <= drop_range[0] <= drop_range[1] <= 1.0:
            raise ValueError(f"drop_range must satisfy 0 <= low <= high <= 1; got {drop_range}")
        self.kind, self.strength, self.drop_range = kind, float(strength), (float(drop_range[0]), float(drop_range[1]))

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, strength={self.strength}"

    @torch.no_grad()
    def sample(self, f: torch.Tensor, generator: torch.Generator | None = None) -> PerturbationDraw:
        """Draw a perturbation for tensors shaped like ``f`` (B, C, h, w). No gradient flows through it."""
        if f.ndim != 4:
            raise ValueError(f"FeaturePerturbation expects (B, C, h, w); got {tuple(f.shape)}")
        b, c = f.shape[:2]
        kw = dict(device=f.device, generator=generator)
        if self.kind == "noise":
            u = torch.rand(f.shape, dtype=f.dtype, **kw)
            return PerturbationDraw("noise", (2 * u - 1) * self.strength)
        if self.kind == "channel_dropout":
            p = self.strength
            keep = (torch.rand(b, c, 1, 1, **kw) >= p).to(f.dtype) / (1 - p)
            return PerturbationDraw("channel_dropout", keep)
        if self.kind == "feature_drop":
            att = f.float().mean(1, keepdim=True)  # (B, 1, h, w)
            lo = att.amin(dim=(2, 3), keepdim=True)
            hi = att.amax(dim=(2, 3), keepdim=True)
            g0, g1 = self.drop_range
            gamma = g0 + (g1 - g0) * torch.rand(b, 1, 1, 1, **kw)
            # drop only where A > threshold (strict): a constant map (hi == lo) then keeps everything
            # instead of losing everything
            keep = (att <= lo + gamma * (hi - lo)).to(f.dtype)
            return PerturbationDraw("feature_drop", keep)
        return PerturbationDraw("none", None)

    def apply(self, f: torch.Tensor, draw: PerturbationDraw) -> torch.Tensor:
        """pi(f) for the given draw; differentiable in ``f``. f: (B, C, h, w), the shape the draw was sampled for."""
        if draw.kind != self.kind:
            raise ValueError(f"draw of kind {draw.kind!r} given to a {self.kind!r} perturbation")
        if draw.value is None:
            return f
        v = draw.value.to(f.dtype)
        if v.ndim != 4 or v.shape[0] != f.shape[0] or any(
            a not in (1, s) for a, s in zip(v.shape[1:], f.shape[1:], strict=True)
        ):
            raise ValueError(f"draw of shape {tuple(v.shape)} does not fit a feature of shape {tuple(f.shape)}")
        if self.kind == "noise":
            return f + f * v
        return f * v

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        """A fresh draw applied to ``f`` alone (for single-branch use)."""
        return self.apply(f, self.sample(f))


def response_loss(
    decode: Callable[[list[torch.Tensor]], torch.Tensor],
    skips: Sequence[torch.Tensor],
    f_s: torch.Tensor,
    p_t: torch.Tensor,
    perturbation: FeaturePerturbation,
    *,
    rescale_teacher: bool = True,
    centered: bool = True,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, PerturbationDraw]:
    """L_resp = mean_{b,y,x} KL( softmax(D(pi(t))) || softmax(D(pi(f_s))) ),  D(x) = decode([*skips, x]).

    Args:
        decode: the student's decoder, list of features (deepest last) -> logits (B, K, H, W).
        skips: the student's own skip features (all encoder outputs but the deepest).
        f_s: the student's deepest feature (B, C_s, h, w); receives gradient (as do the skips and the
            decoder, through the student branch).
        p_t: the projected teacher feature P(f_t), same shape as ``f_s``.
        perturbation: one draw pi = ``perturbation.sample(f_s)`` is taken (for "feature_drop" the mask
            is computed from the student feature) and applied to both branches.
        rescale_teacher: t = n(p_t) * ||f_s|| (per-pixel channel norm of the student feature) when True,
            t = p_t when False. Why: L_map is scale-free and this term is detached, so nothing trains the
            scale of P(f_t); the decoder's response to an arbitrarily scaled input would be meaningless.
            With the rescaling the teacher branch carries the teacher's direction at the student's
            magnitude, exactly what L_map aligns, and L_resp = 0 whenever L_map = 0.
        centered: with ``rescale_teacher``, as L_map's centring: t = mean(f_s) + n(c(p_t)) * ||c(f_s)||, the
            student's own image mean plus the teacher's deviations at the student's per-pixel magnitude
            (L_map compares only the deviations, so nothing trains the mean of P(f_t)); again L_resp = 0
            whenever L_map = 0.
        generator: optional RNG for the draw.

    The teacher branch is a target: it is computed from ``p_t.detach()`` under ``no_grad``, so neither the
    projector nor the teacher embedding gets gradient from this term (the projector learns from L_map
    only), and it builds no graph. Note that in training mode it still passes through the decoder's
    BatchNorm layers (batch statistics, and one running-statistics update).

    Returns:
        (scalar loss in float32, the draw used).
    """
    if f_s.shape != p_t.shape:
        raise ValueError(f"response_loss: f_s {tuple(f_s.shape)} and p_t {tuple(p_t.shape)} differ")
    skips = list(skips)
    draw = perturbation.sample(f_s.detach(), generator=generator)
    t = p_t.detach()
    if rescale_teacher and centered:
        mean = f_s.detach().mean(dim=(2, 3), keepdim=True)
        t = mean + F.normalize(center(t), dim=1) * (f_s.detach() - mean).norm(dim=1, keepdim=True)
    elif rescale_teacher:
        t = F.normalize(t, dim=1) * f_s.detach().norm(dim=1, keepdim=True)
    with torch.no_grad():
        log_q = F.log_softmax(decode([*skips, perturbation.apply(t, draw)]).float(), dim=1)
    log_p = F.log_softmax(decode([*skips, perturbation.apply(f_s, draw)]).float(), dim=1)
    kl = (log_q.exp() * (log_q - log_p)).sum(1)  # (B, H, W)
    return kl.mean(), draw


class FeatureKD(nn.Module):
    """FitNets-style plain feature KD (ablation): L = mean ( R(f_s) - resize(f_t) )^2.

    R: 1x1 conv C_s -> teacher channels; the teacher embedding (B, 256, 64, 64) is resized (bilinear,
    anti-aliased when shrinking) to the student's (h, w). No mapping network, no normalisation, no
    perturbation. ``forward(f_s (B, C_s, h, w), f_t (B, 256, H_t, W_t)) -> scalar``; f_t is detached.
    """

    def __init__(self, student_channels: int, teacher_channels: int = 256) -> None:
        super().__init__()
        self.regressor = nn.Conv2d(student_channels, teacher_channels, 1)

    def forward(self, f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
        target = resize_features(f_t.detach().to(f_s.dtype), f_s.shape[-2:])
        return F.mse_loss(self.regressor(f_s).float(), target.float())


class PCKDLoss(nn.Module):
    """The KD term of SemiKD, one of three modes (the ablation switch):

    - "pckd": L_map + beta * L_resp  -> keys "map", "resp", "pckd"
    - "map":  L_map                  -> keys "map", "pckd"
    - with ``relation_weight`` > 0, "pckd" and "map" modes add relation_weight * L_rel (key "rel")
    - "featkd": FeatureKD (FitNets)  -> keys "featkd", "pckd"

    "pckd" is always the total to weight with lambda_kd(t). Only the modules the mode uses are built
    (the projector for "pckd"/"map", the regressor for "featkd"), so every parameter gets a gradient
    (DDP without ``find_unused_parameters``).

    ``forward(student_feats, teacher_emb, decode)``:
        student_feats: the student's ``encode`` output, list of (B, C_i, h_i, w_i), deepest last; the
            deepest (C_s = ``student_channels``) is distilled, the others are the decoder's skips.
        teacher_emb: (B, teacher_channels, 64, 64), already aligned to the student's view; any float
            dtype (fp16 from the cache) and device: it is detached and cast to the student feature's.
        decode: the student's ``decode`` (features -> logits); needed only in mode "pckd".
    """

    def __init__(
        self,
        student_channels: int,
        teacher_channels: int = 256,
        mode: str = "pckd",
        beta: float = 1.0,
        perturbation: str = "noise",
        strength: float = 0.3,
        projector_hidden: int | None = None,
        rescale_teacher: bool = True,
        centered: bool = True,
        relation_weight: float = 0.0,
    ) -> None:
        super().__init__()
        if mode not in PCKD_MODES:
            raise ValueError(f"unknown PCKD mode {mode!r}; choose one of: {', '.join(PCKD_MODES)}")
        if relation_weight < 0:
            raise ValueError(f"relation_weight={relation_weight}: must be >= 0")
        self.mode, self.beta, self.rescale_teacher, self.centered = mode, float(beta), rescale_teacher, centered
        if relation_weight > 0 and mode == "featkd":
            raise ValueError("relation_weight: the relational term extends L_map; mode 'featkd' has no L_map")
        self.relation_weight = float(relation_weight)
        self.student_channels, self.teacher_channels = student_channels, teacher_channels
        # validated even in modes that do not use it, so a typo in a config fails at construction
        self.perturbation = FeaturePerturbation(perturbation, strength)
        if mode == "featkd":
            self.featkd = FeatureKD(student_channels, teacher_channels)
        else:
            self.projector = Projector(teacher_channels, student_channels, projector_hidden)

    def forward(
        self,
        student_feats: Sequence[torch.Tensor],
        teacher_emb: torch.Tensor,
        decode: Callable[[list[torch.Tensor]], torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        f_s = student_feats[-1]
        if f_s.shape[1] != self.student_channels:
            raise ValueError(f"deepest student feature has {f_s.shape[1]} channels; expected {self.student_channels}")
        if teacher_emb.ndim != 4 or teacher_emb.shape[1] != self.teacher_channels or teacher_emb.shape[0] != f_s.shape[0]:
            raise ValueError(
                f"teacher embedding {tuple(teacher_emb.shape)} does not match (B={f_s.shape[0]}, {self.teacher_channels}, H, W)"
            )
        f_t = teacher_emb.detach().to(device=f_s.device, dtype=f_s.dtype)
        if self.mode == "featkd":
            loss = self.featkd(f_s, f_t)
            return {"featkd": loss, "pckd": loss}
        p_t = self.projector(f_t, f_s.shape[-2:])
        out = {"map": feature_map_loss(f_s, p_t, centered=self.centered)}
        total = out["map"]
        if self.relation_weight > 0:
            out["rel"] = relation_loss(f_s, resize_features(f_t, f_s.shape[-2:]), centered=self.centered)
            total = total + self.relation_weight * out["rel"]
        if self.mode == "pckd":
            if decode is None:
                raise ValueError("PCKDLoss mode 'pckd' needs the student's decode callable")
            out["resp"], _ = response_loss(
                decode, student_feats[:-1], f_s, p_t, self.perturbation, rescale_teacher=self.rescale_teacher,
                centered=self.centered,
            )
            total = total + self.beta * out["resp"]
        out["pckd"] = total
        return out
