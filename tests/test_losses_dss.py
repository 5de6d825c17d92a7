"""L_dss units: class-balanced consistency, distribution alignment, contrast term, DSSLoss switches."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lesion_kd.losses import DistributionAlignment, DSSLoss, class_balanced_consistency, contrast_loss


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def plain_mean_kl(logits_weak: torch.Tensor, logits_strong: torch.Tensor) -> torch.Tensor:
    log_q = F.log_softmax(logits_weak, 1)
    return (log_q.exp() * (log_q - F.log_softmax(logits_strong, 1))).sum(1).mean()


def lesion_logits(mask: torch.Tensor, margin: float = 4.0) -> torch.Tensor:
    """(B, H, W) {0,1} mask -> confident logits (B, 2, H, W)."""
    m = mask.float()
    return torch.stack([(1 - m) * margin, m * margin], 1)


def small_lesion_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Weak prediction: a 4x4 lesion in each 16x16 image (area 1/16); region masks of the same size."""
    mask = torch.zeros(2, 16, 16)
    mask[:, 6:10, 6:10] = 1
    bg_region = torch.zeros(2, 16, 16)
    bg_region[:, 0:4, 0:4] = 1
    return mask, bg_region


# --- class-balanced consistency ------------------------------------------------------------------


@pytest.mark.parametrize("hard", [False, True])
def test_consistency_is_zero_for_agreeing_views_and_positive_otherwise(hard):
    weak = torch.randn(2, 2, 8, 8)
    assert class_balanced_consistency(weak, weak.clone(), hard=hard).item() == pytest.approx(0.0, abs=1e-7)
    loss = class_balanced_consistency(weak, torch.randn(2, 2, 8, 8), hard=hard)
    assert torch.isfinite(loss) and loss.item() > 0


def test_consistency_gradient_reaches_strong_view_only():
    weak = torch.randn(2, 2, 8, 8, requires_grad=True)
    strong = torch.randn(2, 2, 8, 8, requires_grad=True)
    class_balanced_consistency(weak, strong).backward()
    assert weak.grad is None and strong.grad.abs().sum() > 0


def test_balanced_batch_gives_plain_mean_kl():
    half = torch.zeros(2, 8, 8)
    half[:, :, :4] = 1  # soft areas exactly 1/2 each: mirrored logits on the two halves
    weak = lesion_logits(half, 1.5)
    strong = torch.randn(2, 2, 8, 8)
    torch.testing.assert_close(class_balanced_consistency(weak, strong), plain_mean_kl(weak, strong), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(class_balanced_consistency(weak, strong, hard=True), plain_mean_kl(weak, strong), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("hard", [False, True])
def test_disagreement_on_a_small_lesion_counts_more_than_under_plain_mean_kl(hard):
    mask, bg_region = small_lesion_batch()
    weak = lesion_logits(mask)
    on_lesion = lesion_logits(mask * 0)  # the strong view misses the lesion
    on_background = lesion_logits(mask + bg_region)  # the same number of pixels wrong, in the background
    cb_lesion = class_balanced_consistency(weak, on_lesion, hard=hard)
    cb_bg = class_balanced_consistency(weak, on_background, hard=hard)
    plain_lesion, plain_bg = plain_mean_kl(weak, on_lesion), plain_mean_kl(weak, on_background)
    torch.testing.assert_close(plain_lesion, plain_bg, rtol=1e-3, atol=0)  # plain KL cannot tell them apart
    assert cb_lesion > 5 * plain_lesion  # lesion area 1/16: its pixels weigh 6-8x (soft-hard)
    assert cb_bg < plain_bg  # background pixels weigh about 0.53x
    # the weights average to one: never above the largest per-pixel KL
    kl_max = (F.softmax(weak, 1) * (F.log_softmax(weak, 1) - F.log_softmax(on_lesion, 1))).sum(1).max()
    assert cb_lesion <= kl_max


# --- distribution alignment -----------------------------------------------------------------------


def random_probs(b: int = 4, scale: float = 2.0, shift: float = 0.0) -> torch.Tensor:
    return F.softmax(torch.randn(b, 2, 8, 8) * scale + torch.tensor([0.0, shift]).view(1, 2, 1, 1), 1)


def test_alignment_is_zero_before_any_labeled_update():
    da = DistributionAlignment()
    loss = da(random_probs())
    assert loss.item() == 0.0 and int(da.num_updates) == 0


def test_alignment_is_zero_for_matching_statistics_and_positive_otherwise():
    da = DistributionAlignment(momentum=0.9)
    labeled = random_probs()
    da.update_labeled(labeled)
    assert da(labeled.flip(0)).item() == pytest.approx(0.0, abs=1e-12)  # same images, another order
    unlabeled = random_probs(shift=-3.0).requires_grad_(True)  # predicts much less lesion
    loss = da(unlabeled)
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    assert unlabeled.grad.abs().sum() > 0


def test_alignment_stats_select_which_gaps_enter_the_loss():
    labeled, unlabeled = random_probs(), random_probs(shift=-3.0)
    gaps = {}
    for stats in (("area_mean", "area_var"), ("conf_mean", "conf_var"), DistributionAlignment.STATS):
        da = DistributionAlignment(stats=stats)
        da.update_labeled(labeled)
        gaps[stats] = da(unlabeled).item()
    s_l = DistributionAlignment().batch_stats(labeled)
    s_u = DistributionAlignment().batch_stats(unlabeled)
    expected = (s_u - s_l).pow(2)
    assert gaps[("area_mean", "area_var")] == pytest.approx(expected[:2].sum().item(), rel=1e-5)
    assert gaps[("conf_mean", "conf_var")] == pytest.approx(expected[2:].sum().item(), rel=1e-5)
    assert gaps[DistributionAlignment.STATS] == pytest.approx(expected.sum().item(), rel=1e-5)
    assert 0 < gaps[("area_mean", "area_var")] < gaps[DistributionAlignment.STATS]
    assert DistributionAlignment(stats=["conf_var", "area_mean"]).stats == ("area_mean", "conf_var")  # canonical order


@pytest.mark.parametrize("stats", [(), ("area",), ["area_mean", "entropy"]])
def test_alignment_stats_must_be_known_names(stats):
    with pytest.raises(ValueError, match="alignment stats"):
        DistributionAlignment(stats=stats)
    with pytest.raises(ValueError, match="alignment stats"):
        DSSLoss(align_stats=stats)


def test_alignment_buffers_update_with_momentum_without_gradient_and_are_saved():
    da = DistributionAlignment(momentum=0.9)
    p1, p2 = random_probs(shift=1.0).requires_grad_(True), random_probs(shift=-1.0)
    s1, s2 = da.batch_stats(p1).detach(), da.batch_stats(p2)
    da.update_labeled(p1)
    torch.testing.assert_close(da.labeled_stats, s1)  # first update: taken as is, not blended with 0
    da.update_labeled(p2)
    torch.testing.assert_close(da.labeled_stats, 0.9 * s1 + 0.1 * s2)
    assert int(da.num_updates) == 2 and not da.labeled_stats.requires_grad
    da(random_probs().requires_grad_(True)).backward()
    assert p1.grad is None  # the labeled side never gets gradient
    state = da.state_dict()
    assert set(state) == {"labeled_stats", "num_updates"}
    fresh = DistributionAlignment(momentum=0.9)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.labeled_stats, da.labeled_stats)
    assert fresh.to(torch.float64).labeled_stats.dtype == torch.float64  # buffers follow .to()


def test_alignment_statistics_are_area_and_confidence():
    p = torch.zeros(2, 2, 4, 4)
    p[:, 0] = 1
    p[0, 1, :2] = 1.0  # image 0: half lesion, confidence 1
    p[0, 0, :2] = 0.0
    p[1, 1, :1] = 0.5  # image 1: a quarter at p = 0.5
    p[1, 0, :1] = 0.5
    stats = DistributionAlignment().batch_stats(p)
    area, conf = torch.tensor([0.5, 0.125]), torch.tensor([1.0, 0.5])
    expected = torch.stack([area.mean(), area.var(unbiased=False), conf.mean(), conf.var(unbiased=False)])
    torch.testing.assert_close(stats, expected, rtol=1e-4, atol=1e-5)


# --- contrast --------------------------------------------------------------------------------------


def two_region_features(separation: float) -> tuple[torch.Tensor, torch.Tensor]:
    mask = torch.zeros(2, 8, 8)
    mask[:, 2:6, 2:6] = 1
    feats = torch.randn(2, 6, 8, 8) + separation * mask[:, None]
    return feats, F.softmax(lesion_logits(mask), 1)


def test_contrast_is_lower_for_separated_features_than_for_overlapping_ones():
    separated, probs = two_region_features(4.0)
    overlapping, _ = two_region_features(0.0)
    lo, hi = contrast_loss(separated, probs), contrast_loss(overlapping, probs)
    assert torch.isfinite(lo) and torch.isfinite(hi) and lo < hi
    torch.testing.assert_close(contrast_loss(10 * separated, probs), lo, rtol=1e-4, atol=1e-4)  # scale-free


def test_contrast_gradient_shapes_features_not_the_mask_and_resizes_probs():
    feats, probs = two_region_features(1.0)
    feats.requires_grad_(True)
    probs = F.interpolate(probs, scale_factor=2, mode="nearest").requires_grad_(True)  # (2, 2, 16, 16)
    loss = contrast_loss(feats, probs)
    loss.backward()
    assert torch.isfinite(loss) and probs.grad is None and feats.grad.abs().sum() > 0


def test_contrast_skips_images_without_foreground():
    feats, probs = two_region_features(4.0)
    empty = probs.clone()
    empty[1, 1], empty[1, 0] = 0.0, 1.0
    torch.testing.assert_close(contrast_loss(feats, empty), contrast_loss(feats[:1], probs[:1]))


def test_contrast_min_area_leaves_out_images_without_a_confident_lesion():
    """A lesion-free image whose prediction is a diffuse low lesion probability still has soft foreground
    mass (so min_mass keeps it); min_area leaves it out, as it leaves out a confident lesion under the area."""
    feats, probs = two_region_features(4.0)  # lesion: 16 of 64 pixels (25%) in both images
    diffuse = probs.clone()
    diffuse[1, 1], diffuse[1, 0] = 0.2, 0.8  # image 1: p = 0.2 everywhere, soft mass 12.8 pixels
    both = contrast_loss(feats, diffuse)
    assert both != contrast_loss(feats[:1], probs[:1])  # the diffuse image counts without min_area
    torch.testing.assert_close(contrast_loss(feats, diffuse, min_area=0.01), contrast_loss(feats[:1], probs[:1]))
    assert contrast_loss(feats, probs, min_area=0.3) == 0  # 25% < 30%: no image left
    torch.testing.assert_close(contrast_loss(feats, probs, min_area=0.25), contrast_loss(feats, probs))
    with pytest.raises(ValueError, match="contrast_min_area"):
        DSSLoss(contrast_min_area=1.5)


def test_softplus_contrast_is_bounded_and_stops_pushing_separated_features():
    """log(1 + 1/r) = -log r + log(1 + r): >= 0, the log form plus a term that vanishes for overlapping
    features, and its gradient on features that already separate well is a small fraction of the log form's
    (which pushes as hard at any separation)."""
    overlapping, probs = two_region_features(0.0)
    one, probs1 = overlapping[:1], probs[:1]  # one image: the identity holds per image, not for the mean
    log_form = contrast_loss(one, probs1)
    torch.testing.assert_close(contrast_loss(one, probs1, form="softplus"), log_form + torch.log1p(torch.exp(-log_form)))

    def grad_norm(form: str) -> tuple[torch.Tensor, float]:
        feats, probs = two_region_features(6.0)
        feats.requires_grad_(True)
        loss = contrast_loss(feats, probs, form=form)
        loss.backward()
        return loss.detach(), feats.grad.norm().item()

    (log_val, log_grad), (sp_val, sp_grad) = grad_norm("log"), grad_norm("softplus")
    assert log_val < 0 <= sp_val  # the log form keeps rewarding more separation, the softplus one saturates
    assert 0 < sp_grad < 0.2 * log_grad
    with pytest.raises(ValueError, match="contrast_form"):
        DSSLoss(contrast_form="square")


# --- DSSLoss ---------------------------------------------------------------------------------------


def dss_inputs():
    weak = torch.randn(2, 2, 8, 8, requires_grad=True)
    strong = torch.randn(2, 2, 8, 8, requires_grad=True)
    return weak, strong, torch.randn(2, 4, 8, 8, requires_grad=True), random_probs(2)


def test_dss_returns_every_term_and_their_weighted_total():
    loss = DSSLoss(gamma2=0.3, gamma3=0.2)
    weak, strong, feats, labeled = dss_inputs()
    out = loss(weak, strong, feats, probs_labeled=labeled)
    assert set(out) == {"cons", "align", "contrast", "dss"}
    torch.testing.assert_close(out["dss"], out["cons"] + 0.3 * out["align"] + 0.2 * out["contrast"])
    assert int(loss.alignment.num_updates) == 1
    out["dss"].backward()
    assert strong.grad.abs().sum() > 0 and feats.grad.abs().sum() > 0 and weak.grad.abs().sum() > 0  # align


@pytest.mark.parametrize("off", ["consistency", "alignment", "contrast"])
def test_dss_switched_off_terms_are_absent(off):
    loss = DSSLoss(**{f"use_{off}": False})
    weak, strong, feats, labeled = dss_inputs()
    out = loss(weak, strong, None if off == "contrast" else feats, probs_labeled=labeled)
    key = {"consistency": "cons", "alignment": "align", "contrast": "contrast"}[off]
    assert key not in out and "dss" in out and len(out) == 3
    assert "alignment.labeled_stats" in loss.state_dict()  # checkpoints of all ablations share keys


def test_dss_all_off_is_zero_and_contrast_without_features_is_an_error():
    weak, strong, feats, _ = dss_inputs()
    out = DSSLoss(use_consistency=False, use_alignment=False, use_contrast=False)(weak, strong, feats)
    assert set(out) == {"dss"} and out["dss"].item() == 0.0
    with pytest.raises(ValueError, match="decoder features"):
        DSSLoss()(weak, strong, None)


def test_labeled_balance_area_keeps_a_lesion_free_batch_from_weighting_its_spurious_pixels():
    """A batch of lesion-free images with a few spurious lesion pixels: balanced by the batch's own area,
    those pixels weigh about 80 times; balanced by the labeled lesion area (here 20%), about 2.5 times."""
    weak = torch.full((2, 2, 16, 16), 0.0)
    weak[:, 0] = 6.0  # confident background...
    weak[0, 1, 0, :2] = 12.0  # ...but two spurious lesion pixels
    strong = torch.randn(2, 2, 16, 16)
    labeled = torch.zeros(2, 2, 16, 16)
    labeled[:, 1, :8, :] = 0.4  # labeled predictions: 0.4 on half the pixels, a mean lesion area of 20%
    labeled[:, 0] = 1 - labeled[:, 1]
    batch, prior = DSSLoss(balance_area="batch"), DSSLoss(balance_area="labeled")
    feats = torch.randn(2, 4, 16, 16)
    out_b = batch(weak, strong, feats, probs_labeled=labeled)["cons"]
    out_p = prior(weak, strong, feats, probs_labeled=labeled)["cons"]
    area = torch.tensor([0.8, 0.2])
    torch.testing.assert_close(out_p, class_balanced_consistency(weak, strong, area=area))
    torch.testing.assert_close(out_b, class_balanced_consistency(weak, strong))
    q = torch.softmax(weak, 1)
    w_batch = (q / (2 * q.mean(dim=(0, 2, 3)) + 1e-6).view(1, 2, 1, 1)).sum(1)
    w_prior = (q / (2 * area + 1e-6).view(1, 2, 1, 1)).sum(1)
    assert w_batch[0, 0, 0] > 50 and w_prior[0, 0, 0] < 3
    with pytest.raises(ValueError, match="balance_area"):
        DSSLoss(balance_area="image")
