"""L_pckd units: projector, L_map, the shared perturbation draw, L_resp, FitNets ablation, PCKDLoss modes.

Tiny tensors and a stand-in decoder keep this file fast; one test runs the real U-Net at 32x32 to check
the decode/skips plumbing.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lesion_kd.losses import (
    PERTURBATION_KINDS,
    FeatureKD,
    FeaturePerturbation,
    PCKDLoss,
    Projector,
    feature_map_loss,
    relation_loss,
    response_loss,
)

B, C_SKIP, C_S, H = 2, 4, 8, 16  # skip (B, 4, 16, 16), deepest (B, 8, 4, 4), logits (B, 2, 16, 16)
C_T = 16  # a narrow stand-in teacher keeps the projector cheap; the real one is 256


class TinyDecoder(nn.Module):
    """Stand-in for ``net.decode``: 1x1 conv of the deepest feature, up-sampled, plus a 1x1 conv of the skip."""

    def __init__(self) -> None:
        super().__init__()
        self.deep = nn.Conv2d(C_S, 2, 1)
        self.skip = nn.Conv2d(C_SKIP, 2, 1)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        skip, deep = feats
        return self.skip(skip) + F.interpolate(self.deep(deep), size=skip.shape[-2:], mode="bilinear")


def student_feats(requires_grad: bool = True) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    skip = torch.randn(B, C_SKIP, H, H, generator=g).requires_grad_(requires_grad)
    deep = torch.randn(B, C_S, H // 4, H // 4, generator=g).requires_grad_(requires_grad)
    return [skip, deep]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# --- L_map -----------------------------------------------------------------------------------------


def test_feature_map_loss_is_zero_for_same_direction_at_any_scale_and_positive_otherwise():
    f = torch.randn(B, C_S, 4, 4)
    assert feature_map_loss(f, 3.0 * f).item() == pytest.approx(0.0, abs=1e-6)
    other = feature_map_loss(f, torch.randn(B, C_S, 4, 4))
    assert torch.isfinite(other) and 0 < other.item() <= 4
    assert feature_map_loss(f, -f).item() == pytest.approx(4.0, abs=1e-5)


def test_centred_feature_map_loss_cannot_be_met_by_a_constant_feature():
    """The degenerate minimum of the uncentred L_map: every pixel of the student's feature one shared
    direction (a large constant vector plus small deviations), the projected teacher that same constant.
    Uncentred that scores about 0; centred, the deviations have to match the teacher's, and a teacher
    whose deviations are the student's, plus another mean and scale, scores 0."""
    g = torch.Generator().manual_seed(0)
    v = torch.randn(1, C_S, 1, 1, generator=g)
    collapsed = 100 * v + 0.1 * torch.randn(B, C_S, 4, 4, generator=g)
    constant = v.expand(B, C_S, 4, 4)
    assert feature_map_loss(collapsed, constant, centered=False).item() < 1e-3
    assert feature_map_loss(collapsed, constant + 1e-3 * torch.randn(B, C_S, 4, 4, generator=g)).item() > 1.0
    teacher = torch.randn(B, C_S, 4, 4, generator=g)
    assert feature_map_loss(collapsed, teacher).item() > 1.0
    dev = collapsed - collapsed.mean(dim=(2, 3), keepdim=True)
    assert feature_map_loss(collapsed, 7.0 * dev - 3.0 * v).item() == pytest.approx(0.0, abs=1e-5)


def test_feature_map_loss_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="shapes differ"):
        feature_map_loss(torch.randn(1, 8, 4, 4), torch.randn(1, 8, 2, 2))


# --- L_rel (the optional relational term) ---------------------------------------------------------


def test_relation_loss_ignores_channel_mixing_and_scale_but_not_structure():
    """S is pixels x pixels, so two maps with different channel counts compare: a student whose pixel
    vectors are an orthogonal mixing of the teacher's (any scale, any mean) scores 0, a random one does not."""
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(B, C_T, 4, 4, generator=g)
    q, _ = torch.linalg.qr(torch.randn(C_T + 8, C_T, generator=g))  # orthonormal columns: C_T -> C_T + 8
    student = 5.0 * torch.einsum("oc,bchw->bohw", q, teacher) + torch.randn(1, C_T + 8, 1, 1, generator=g)
    assert relation_loss(student, teacher).item() == pytest.approx(0.0, abs=1e-5)
    other = relation_loss(torch.randn(B, C_S, 4, 4, generator=g), teacher)
    assert torch.isfinite(other) and 0.05 < other.item() <= 4


def test_a_rank_one_student_meets_centred_l_map_but_not_l_rel():
    """The measured second minimum: centred student pixels all along one direction u (+-u times a scalar map
    s). A projector output with the same structure matches L_map exactly, so L_map cannot tell it from a good
    student; L_rel against the teacher's own, richer similarities can."""
    g = torch.Generator().manual_seed(0)
    u = torch.randn(1, C_S, 1, 1, generator=g)
    s = torch.randn(B, 1, 4, 4, generator=g)
    rank_one = u * s + 3.0 * torch.randn(1, C_S, 1, 1, generator=g)
    projected = 2.0 * u * s  # a projector that read s off the teacher's embedding
    assert feature_map_loss(rank_one, projected).item() == pytest.approx(0.0, abs=1e-5)
    teacher = torch.randn(B, C_T, 4, 4, generator=g)
    assert relation_loss(rank_one, teacher).item() > 0.3
    assert relation_loss(teacher[:, :C_S], teacher[:, :C_S]).item() == pytest.approx(0.0, abs=1e-6)


def test_relation_term_is_added_to_l_map_trains_the_student_and_is_refused_without_l_map():
    feats = student_feats()
    teacher = torch.randn(B, C_T, 64, 64, dtype=torch.float16).requires_grad_(True)
    loss = PCKDLoss(C_S, C_T, mode="map", relation_weight=0.5)
    out = loss(feats, teacher)
    assert set(out) == {"map", "rel", "pckd"} and out["rel"].item() > 0
    torch.testing.assert_close(out["pckd"], out["map"] + 0.5 * out["rel"])
    (g_rel,) = torch.autograd.grad(out["rel"], feats[-1], retain_graph=True)
    assert g_rel.abs().sum() > 0
    out["pckd"].backward()
    assert teacher.grad is None
    assert "rel" not in PCKDLoss(C_S, C_T, mode="map")(student_feats(), teacher.detach())
    with pytest.raises(ValueError, match="featkd"):
        PCKDLoss(C_S, C_T, mode="featkd", relation_weight=1.0)
    with pytest.raises(ValueError, match="relation_weight"):
        PCKDLoss(C_S, C_T, relation_weight=-1.0)


def test_relation_loss_rejects_different_grids():
    with pytest.raises(ValueError, match="grid"):
        relation_loss(torch.randn(1, 8, 4, 4), torch.randn(1, 8, 2, 2))


# --- projector -------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(2, 2), (8, 8), (64, 64), (96, 80)])
@pytest.mark.parametrize("resize_first", [None, False])
def test_projector_maps_teacher_grid_to_student_size(size, resize_first):
    proj = Projector(C_T, C_S, hidden=8, resize_first=resize_first)
    out = proj(torch.randn(B, C_T, 64, 64), size)
    assert out.shape == (B, C_S, *size) and torch.isfinite(out).all()


def test_projector_output_of_an_image_does_not_depend_on_its_batch():
    # the reason for GroupNorm over BatchNorm: labeled/unlabeled halves and tiny batches project alike
    proj = Projector(C_T, C_S, hidden=8)
    x = torch.randn(3, C_T, 64, 64)
    torch.testing.assert_close(proj(x[:1], (4, 4)), proj(x, (4, 4))[:1], rtol=1e-5, atol=1e-6)


def test_projector_rejects_wrong_teacher_channels():
    with pytest.raises(ValueError, match="expects"):
        Projector(C_T, C_S)(torch.randn(1, C_T + 1, 64, 64), (4, 4))


# --- perturbation: one draw, both branches ---------------------------------------------------------


@pytest.mark.parametrize("kind", PERTURBATION_KINDS)
def test_one_draw_perturbs_both_branches_identically(kind):
    pert = FeaturePerturbation(kind, 0.5)
    f = torch.randn(B, C_S, 4, 4)
    draw = pert.sample(f)
    a, b = pert.apply(f, draw), pert.apply(f.clone(), draw)
    assert torch.equal(a, b)
    if kind != "none":
        assert not torch.equal(a, f)


@pytest.mark.parametrize("kind", ["noise", "channel_dropout"])
def test_two_draws_differ(kind):
    pert = FeaturePerturbation(kind, 0.5)
    f = torch.randn(B, 32, 4, 4)
    assert not torch.equal(pert.apply(f, pert.sample(f)), pert.apply(f, pert.sample(f)))


def test_feature_drop_gamma_is_random_per_draw():
    pert = FeaturePerturbation("feature_drop")
    ramp = torch.linspace(0, 1, 64).view(1, 1, 8, 8).expand(B, C_S, 8, 8)  # every threshold cuts elsewhere
    masks = {tuple(pert.sample(ramp).value.flatten().tolist()) for _ in range(5)}
    assert len(masks) > 1


def test_noise_is_multiplicative_and_bounded_by_strength():
    pert = FeaturePerturbation("noise", 0.3)
    f = torch.randn(B, C_S, 4, 4)
    out = pert(f)
    assert ((out - f).abs() <= 0.3 * f.abs() + 1e-6).all()


def test_channel_dropout_zeroes_whole_channels_and_rescales_the_rest():
    pert = FeaturePerturbation("channel_dropout", 0.5)
    f = torch.rand(B, 64, 4, 4) + 0.1
    out = pert(f)
    ratio = out / f
    per_channel = ratio.flatten(2)
    assert torch.allclose(per_channel, per_channel[..., :1].expand_as(per_channel))  # one factor per channel
    assert set(torch.unique(per_channel.round(decimals=4)).tolist()) == {0.0, 2.0}


def test_feature_drop_zeroes_the_most_salient_locations_on_every_channel():
    pert = FeaturePerturbation("feature_drop")
    f = torch.ones(1, C_S, 4, 4)
    f[..., 1, 2] = 5.0  # the peak of the channel-mean attention
    draw = pert.sample(f)
    assert draw.value.shape == (1, 1, 4, 4)
    out = pert.apply(f, draw)
    assert (out[..., 1, 2] == 0).all() and (out[..., 0, 0] == 1).all()
    flat = FeaturePerturbation("feature_drop").sample(torch.ones(1, C_S, 4, 4)).value
    assert flat.all()  # a constant map keeps everything


def test_unknown_perturbation_kind_names_the_valid_kinds():
    with pytest.raises(ValueError, match=r"unknown perturbation kind 'gaussian'.*noise, channel_dropout, feature_drop, none"):
        FeaturePerturbation("gaussian")
    with pytest.raises(ValueError, match="unknown perturbation kind"):
        PCKDLoss(C_S, C_T, perturbation="gaussian")


def test_bad_mode_and_strength_are_rejected():
    with pytest.raises(ValueError, match=r"unknown PCKD mode 'fitnet'.*pckd, map, featkd"):
        PCKDLoss(C_S, C_T, mode="fitnet")
    with pytest.raises(ValueError, match="channel_dropout"):
        FeaturePerturbation("channel_dropout", 1.0)
    pert = FeaturePerturbation("noise")
    with pytest.raises(ValueError, match="draw of kind"):
        pert.apply(torch.ones(1, 2, 2, 2), FeaturePerturbation("feature_drop").sample(torch.ones(1, 2, 2, 2)))


# --- L_resp ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", PERTURBATION_KINDS)
def test_response_loss_is_zero_when_projected_teacher_matches_student(kind):
    # strong perturbation: if the two branches got different draws the loss would be clearly positive
    skip, f_s = student_feats()
    dec = TinyDecoder()
    loss, draw = response_loss(dec, [skip], f_s, f_s.detach() * 2.5, FeaturePerturbation(kind, 0.9))
    assert draw.kind == kind
    assert loss.item() == pytest.approx(0.0, abs=1e-6)


def test_centred_response_loss_is_zero_when_the_teachers_deviations_match_whatever_its_mean():
    """The centred teacher branch is the student's image mean plus the teacher's deviations at the
    student's scale: a projected teacher with the student's deviations (scaled) and another mean gives 0,
    which the uncentred branch does not."""
    skip, f_s = student_feats()
    dec = TinyDecoder()
    dev = f_s.detach() - f_s.detach().mean(dim=(2, 3), keepdim=True)
    p_t = 2.5 * dev + torch.randn(1, f_s.shape[1], 1, 1)
    loss, _ = response_loss(dec, [skip], f_s, p_t, FeaturePerturbation("noise", 0.9))
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    uncentred, _ = response_loss(dec, [skip], f_s, p_t, FeaturePerturbation("noise", 0.9), centered=False)
    assert uncentred.item() > 1e-4


def test_response_loss_is_positive_when_teacher_differs_and_uses_the_given_decoder_skips():
    skip, f_s = student_feats()
    dec = TinyDecoder()
    p_t = torch.randn_like(f_s)
    loss, _ = response_loss(dec, [skip], f_s, p_t, FeaturePerturbation("noise"))
    assert torch.isfinite(loss) and loss.item() > 0
    loss_raw, _ = response_loss(dec, [skip], f_s, p_t, FeaturePerturbation("none"), rescale_teacher=False)
    assert torch.isfinite(loss_raw) and loss_raw.item() > 0


def test_response_loss_gradient_reaches_student_and_decoder_not_teacher_branch():
    skip, f_s = student_feats()
    dec = TinyDecoder()
    p_t = torch.randn_like(f_s).requires_grad_(True)
    loss, _ = response_loss(dec, [skip], f_s, p_t, FeaturePerturbation("noise"))
    loss.backward()
    assert p_t.grad is None  # the teacher branch is a detached target
    assert f_s.grad is not None and f_s.grad.abs().sum() > 0
    assert skip.grad is not None and skip.grad.abs().sum() > 0
    assert dec.deep.weight.grad.abs().sum() > 0


# --- FitNets ablation ------------------------------------------------------------------------------


def test_feature_kd_is_zero_for_an_exact_regression_and_positive_otherwise():
    kd = FeatureKD(C_S, C_S)
    with torch.no_grad():
        kd.regressor.weight.copy_(torch.eye(C_S).view(C_S, C_S, 1, 1))
        kd.regressor.bias.zero_()
    f_t = torch.randn(B, C_S, 1, 1).expand(B, C_S, 64, 64)  # spatially constant: exact after any resize
    f_s = f_t[..., :4, :4].clone()
    assert kd(f_s, f_t).item() == pytest.approx(0.0, abs=1e-10)
    assert kd(f_s + 1, f_t).item() == pytest.approx(1.0, rel=1e-5)


# --- PCKDLoss --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "keys", "module"),
    [("pckd", {"map", "resp", "pckd"}, "projector"), ("map", {"map", "pckd"}, "projector"), ("featkd", {"featkd", "pckd"}, "featkd")],
)
def test_pckd_loss_modes_return_their_documented_keys(mode, keys, module):
    loss = PCKDLoss(C_S, C_T, mode=mode, beta=0.7)
    assert hasattr(loss, module) and not hasattr(loss, {"projector": "featkd", "featkd": "projector"}[module])
    out = loss(student_feats(), torch.randn(B, C_T, 64, 64), TinyDecoder())
    assert set(out) == keys
    assert all(v.ndim == 0 and torch.isfinite(v) for v in out.values())
    if mode == "pckd":
        torch.testing.assert_close(out["pckd"], out["map"] + 0.7 * out["resp"])
    else:
        assert out["pckd"] is out[mode if mode == "map" else "featkd"]


@pytest.mark.parametrize("mode", ["pckd", "map", "featkd"])
def test_gradients_reach_student_and_projector_never_the_teacher_embedding(mode):
    feats = student_feats()
    dec = TinyDecoder()
    loss = PCKDLoss(C_S, C_T, mode=mode)
    teacher = torch.randn(B, C_T, 64, 64, dtype=torch.float16).requires_grad_(True)  # as from the cache
    out = loss(feats, teacher, dec)
    assert out["pckd"].dtype == torch.float32
    out["pckd"].backward()
    assert teacher.grad is None
    assert feats[-1].grad is not None and feats[-1].grad.abs().sum() > 0
    for name, p in loss.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    if mode == "pckd":
        assert feats[0].grad.abs().sum() > 0  # the skips, through the decoder of L_resp


def test_projector_gets_gradient_only_from_the_map_term():
    feats = student_feats()
    loss = PCKDLoss(C_S, C_T, mode="pckd")
    out = loss(feats, torch.randn(B, C_T, 64, 64), TinyDecoder())
    (g_resp,) = torch.autograd.grad(out["resp"], loss.projector.refine.weight, allow_unused=True)
    assert g_resp is None


def test_pckd_mode_needs_decode_and_checks_teacher_shape():
    loss = PCKDLoss(C_S, C_T)
    with pytest.raises(ValueError, match="decode"):
        loss(student_feats(), torch.randn(B, C_T, 64, 64))
    with pytest.raises(ValueError, match="teacher embedding"):
        loss(student_feats(), torch.randn(B, C_T + 1, 64, 64), TinyDecoder())


def test_real_unet_decode_and_skips_plumbing():
    from lesion_kd.models import build_model

    net = build_model("unet")
    x = torch.randn(2, 3, 32, 32)
    feats = net.encode(x)  # deepest (2, 256, 2, 2)
    loss = PCKDLoss(net.feature_channels[-1], mode="pckd", projector_hidden=8)
    teacher = torch.randn(2, 256, 64, 64, dtype=torch.float16).requires_grad_(True)
    out = loss(feats, teacher, net.decode)
    assert set(out) == {"map", "resp", "pckd"} and torch.isfinite(out["pckd"])
    out["pckd"].backward()
    assert teacher.grad is None
    assert net.encoder.stages[0][0].weight.grad.abs().sum() > 0  # shallowest skip, via the decoder
    assert net.decoder.head.weight.grad.abs().sum() > 0
    # same plumbing, teacher == student, no perturbation: both branches decode the same features
    r, _ = response_loss(net.decode, feats[:-1], feats[-1], feats[-1].detach(), FeaturePerturbation("none"))
    assert r.item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_loss_follows_the_device_of_its_inputs(device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    loss = PCKDLoss(C_S, C_T, perturbation="feature_drop").to(device)
    feats = [f.detach().to(device) for f in student_feats()]
    teacher = torch.randn(B, C_T, 64, 64, dtype=torch.float16)  # on the CPU, as read from the cache
    out = loss(feats, teacher, TinyDecoder().to(device))
    assert out["pckd"].device.type == device and torch.isfinite(out["pckd"])
