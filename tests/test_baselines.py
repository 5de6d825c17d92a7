"""The semi-supervised baselines' distinctive mechanisms, on tiny tensors and tiny U-Nets (32x32, 8-128 channels):
EMA teacher (formula, BN buffers, optimiser/checkpoint), ramps, UA-MT's uncertainty mask, URPC's rectified loss
and pyramid, CCT's perturbed decoders, CPS's cross pseudo-labels, MC-Net+'s sharpening, BCP's copy-paste."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml

from lesion_kd.methods import BCP, CCT, CPS, DAMTN, UAMT, URPC, BaPC, CauSSL, MCNetPlus, MeanTeacher, SASSNet
from lesion_kd.methods.bcp import mix_loss
from lesion_kd.methods.components import (
    EMATeacher,
    box_mask,
    check_weights,
    copy_paste,
    ema_alpha,
    largest_component,
    masked_dice_ce,
    teacher_input_noise,
)
from lesion_kd.methods.cps import cross_pseudo_supervision
from lesion_kd.methods.mcnet_plus import mutual_consistency, sharpen
from lesion_kd.methods.ua_mt import masked_consistency, predictive_entropy, uncertainty_threshold
from lesion_kd.methods.urpc import rectified_pyramid_consistency
from lesion_kd.models.multihead import decoder_pyramid

REPO = Path(__file__).resolve().parents[1]
# training_step outside a Trainer: self.log() only warns
pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
TINY = {"network": "unet", "network_kwargs": {"channels": [8, 16, 32, 64, 128]}}
METHODS = {"mean_teacher": MeanTeacher, "ua_mt": UAMT, "urpc": URPC, "cct": CCT, "cps": CPS,
           "mcnet_plus": MCNetPlus, "bcp": BCP}
# part 2 (tests/test_baselines_part2.py) shares this module's helpers and the every-method test below
METHODS_PART2 = {"sassnet": SASSNet, "caussl": CauSSL, "bapc": BaPC, "damtn": DAMTN}


def batch(n_lab: int = 2, n_unl: int = 2, size: int = 32, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)

    def part(n: int) -> dict:
        mask = torch.zeros(n, size, size, dtype=torch.long)
        mask[:, 8:20, 10:24] = 1
        return {"image_weak": torch.rand(n, 3, size, size, generator=g),
                "image_strong": torch.rand(n, 3, size, size, generator=g), "mask": mask,
                "index": torch.arange(n), "id": [f"x{i}" for i in range(n)]}

    return {"labeled": part(n_lab), "unlabeled": part(n_unl)}


def tiny(cls, **kw):
    torch.manual_seed(0)
    return cls(**{**TINY, **kw})


# ------------------------------------------------------------------------------------------ all methods
@pytest.mark.parametrize("name", sorted(METHODS) + sorted(METHODS_PART2))
def test_config_defaults_match_the_class_and_a_step_trains_every_trainable_parameter(name):
    cfg = yaml.safe_load((REPO / "experiments" / "method" / f"{name}.yaml").read_text())
    cls = {**METHODS, **METHODS_PART2}[name]
    assert cfg["model"]["class_path"] == f"lesion_kd.methods.{cls.__name__}"
    assert cls.method_name == name and cls.uses_unlabeled
    torch.manual_seed(0)
    m = cls(**{**cfg["model"]["init_args"], **TINY})
    loss = m.training_step(batch(), 0)
    assert loss.ndim == 0 and torch.isfinite(loss) and loss > 0
    loss.backward()
    # DDP without find_unused_parameters needs a gradient for every trainable parameter in every step
    missing = [n for n, p in m.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing
    # frozen: an EMA teacher, or the other side of a min-max game (trained by its own optimiser)
    frozen = [n for n, p in m.named_parameters() if not p.requires_grad]
    assert all(n.startswith(("teacher.", "discriminator.", "predictors.")) for n in frozen), frozen
    assert all(p.grad is None for n, p in m.named_parameters() if not p.requires_grad)


def test_methods_without_unlabeled_images_fail_clearly():
    b = batch()
    del b["unlabeled"]
    with pytest.raises(ValueError, match="unlabeled_batch_size"):
        tiny(MeanTeacher).training_step(b, 0)


@pytest.mark.parametrize(
    ("cls", "option", "value"),
    [
        (MeanTeacher, "consistency", -0.1),
        (MeanTeacher, "noise_clip", -1.0),
        (MeanTeacher, "ramp_fraction", 1.5),
        (CPS, "consistency", -0.1),
        (CCT, "ramp_fraction", -0.5),
        (URPC, "consistency", -1.0),
        (MCNetPlus, "temperature", 0.0),
        (MCNetPlus, "consistency", -0.1),
    ],
)
def test_impossible_values_name_the_option_and_its_value(cls, option, value):
    with pytest.raises(ValueError, match=rf"^model\.{option}={value}: must be"):
        tiny(cls, **{option: value})


def test_check_weights_accepts_the_edges_and_names_the_first_bad_option():
    check_weights(0.0, consistency=0.0)
    check_weights(1.0)
    check_weights(beta=0.3)  # no ramp: nothing to check there
    with pytest.raises(ValueError, match=r"^model\.beta=-0.3: must be >= 0$"):
        check_weights(0.5, consistency=0.1, beta=-0.3)
    with pytest.raises(ValueError, match=r"^model\.ramp_fraction=1.01: must be in \[0, 1\]$"):
        check_weights(1.01, consistency=0.1)


@pytest.mark.parametrize("cls", [URPC, CCT, MCNetPlus])
def test_multi_decoder_methods_need_the_reference_unet(cls):
    with pytest.raises(ValueError, match="network: unet"):
        cls(network="mamba_unet", network_kwargs={"channels": [8, 16, 32, 64], "vss_depths": [1]})


# ------------------------------------------------------------------------------------------ EMA teacher
def test_ema_alpha_is_the_true_average_first_then_capped():
    assert ema_alpha(0, 0.99) == 0.0  # the first update copies the student
    assert ema_alpha(1, 0.99) == 0.5 and ema_alpha(3, 0.99) == 0.75
    assert ema_alpha(99, 0.99) == pytest.approx(0.99) and ema_alpha(10_000, 0.99) == 0.99


def _bn_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4))


def test_ema_update_formula_on_parameters_and_own_buffers_untouched():
    torch.manual_seed(0)
    student = _bn_net()
    teacher = EMATeacher(student, buffers="own")
    assert all(not p.requires_grad for p in teacher.parameters())
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
        student(torch.randn(2, 3, 8, 8))  # moves the student's running statistics (training mode)
    before = {k: v.clone() for k, v in teacher.module.state_dict().items()}
    teacher.update(student, 0.9)
    for (name, t), s in zip(teacher.module.named_parameters(), student.parameters(), strict=True):
        assert torch.allclose(t, 0.9 * before[name] + 0.1 * s)
    bn = teacher.module[1]
    assert torch.equal(bn.running_mean, before["1.running_mean"]) and int(bn.num_batches_tracked) == 0


def test_ema_update_of_the_whole_state_averages_bn_statistics_and_copies_the_counter():
    torch.manual_seed(0)
    student = _bn_net()
    teacher = EMATeacher(student, buffers="ema")
    with torch.no_grad():
        student(torch.randn(2, 3, 8, 8) + 3)
    teacher.update(student, 0.99)
    s_bn, t_bn = student[1], teacher.module[1]
    assert torch.allclose(t_bn.running_mean, 0.01 * s_bn.running_mean)  # the teacher's started at 0
    assert torch.allclose(t_bn.running_var, 0.99 * 1 + 0.01 * s_bn.running_var)
    assert int(t_bn.num_batches_tracked) == int(s_bn.num_batches_tracked) == 1


def test_copy_from_sets_parameters_and_buffers():
    student, other = _bn_net(), _bn_net()
    with torch.no_grad():
        student(torch.randn(2, 3, 8, 8) + 3)
    teacher = EMATeacher(other, buffers="ema")
    teacher.copy_from(student)
    for t, s in zip(teacher.module.state_dict().values(), student.state_dict().values(), strict=True):
        assert torch.equal(t, s)


def test_ema_updates_once_per_optimiser_step_and_first_update_copies_student():
    student = _bn_net()
    teacher = EMATeacher(student)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    assert teacher.update_after_step(student, 1, 0.99)  # after step t = 0: alpha = 0
    assert all(torch.equal(t, s) for t, s in zip(teacher.module.parameters(), student.parameters(), strict=True))
    assert not teacher.update_after_step(student, 1, 0.99)  # same step again (gradient accumulation): no-op
    assert teacher.update_after_step(student, 2, 0.99)


def test_teacher_is_in_the_checkpoint_but_not_in_the_optimiser():
    m = tiny(MeanTeacher)
    keys = m.state_dict().keys()
    assert any(k.startswith("teacher.module.") for k in keys) and any(k.startswith("net.") for k in keys)
    assert any("teacher.module." in k and "running_mean" in k for k in keys)
    trainable = {id(p) for p in m.parameters() if p.requires_grad}  # what the base's optimiser takes
    assert trainable.isdisjoint(id(p) for p in m.teacher.parameters())
    assert trainable == {id(p) for p in m.net.parameters()}


def test_mean_teacher_consistency_uses_noisy_teacher_softmax_and_gives_no_teacher_gradient():
    x = torch.rand(64, 3, 8, 8)
    n = teacher_input_noise(x) - x
    assert n.abs().max() <= 0.2 + 1e-6 and 0.07 < n.std() < 0.11
    m = tiny(MeanTeacher, noise_std=0.0, network_kwargs={"channels": [8, 16, 32, 64, 128], "dropout": [0.0] * 5})
    m.eval()  # deterministic BN: teacher == student, no noise -> zero consistency
    u = torch.rand(2, 3, 32, 32)
    assert m.consistency_loss(m(u), u).item() == pytest.approx(0.0, abs=1e-10)


# ---------------------------------------------------------------------------------------------- UA-MT
def test_uamt_threshold_ramps_from_three_quarters_to_the_max_entropy():
    assert uncertainty_threshold(0.0, 2) == pytest.approx(0.75 * math.log(2))
    assert uncertainty_threshold(1.0, 2) == pytest.approx(math.log(2))
    assert uncertainty_threshold(math.exp(-5 * 0.25), 2) == pytest.approx((0.75 + 0.25 * math.exp(-1.25)) * math.log(2))
    uniform = torch.full((1, 2, 3, 3), 0.5)
    assert torch.allclose(predictive_entropy(uniform), torch.full((1, 1, 3, 3), math.log(2)), atol=1e-5)
    sure = torch.stack([torch.zeros(3, 3), torch.ones(3, 3)])[None]
    assert predictive_entropy(sure).max() < 1e-4


def test_uamt_mask_keeps_only_certain_pixels():
    dist = torch.zeros(1, 2, 2, 2)
    dist[..., 0, 0], dist[..., 1, 1] = 4.0, 100.0  # the large error sits on an uncertain pixel
    mask = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
    assert masked_consistency(dist, mask).item() == pytest.approx(4.0)  # mean over K = 2 classes of pixel (0,0)
    assert masked_consistency(dist, torch.zeros_like(mask)).item() == 0.0


def test_uamt_averages_the_requested_number_of_teacher_passes(monkeypatch):
    m = tiny(UAMT, passes=3)
    calls = []

    def fake_probs(images):
        calls.append(images.shape[0])
        return torch.full((images.shape[0], 2, 32, 32), 0.25 * len(calls))

    monkeypatch.setattr(m, "teacher_probs", fake_probs)
    p = m.mean_teacher_probs(torch.rand(2, 3, 32, 32))
    assert calls == [4, 2]  # two copies of the batch per forward, then the odd one
    assert torch.allclose(p, torch.full_like(p, (2 * 0.25 + 0.5) / 3))


# ----------------------------------------------------------------------------------------------- URPC
def _urpc_reference(probs):
    """SSL4MIS's loop: KLDivLoss(log p_s, mean) summed over classes, rectified MSE + mean KL, averaged."""
    kl = nn.KLDivLoss(reduction="none")
    mean = sum(probs) / len(probs)
    out = 0
    for p in probs:
        v = torch.sum(kl(torch.log(p), mean), dim=1, keepdim=True)
        e = torch.exp(-v)
        out = out + torch.mean((mean - p) ** 2 * e) / (torch.mean(e) + 1e-8) + torch.mean(v)
    return out / len(probs)


def test_urpc_rectified_loss_matches_the_reference_formula_and_is_zero_on_agreement():
    g = torch.Generator().manual_seed(0)
    probs = [torch.softmax(torch.randn(2, 2, 5, 5, generator=g) * 2, 1) for _ in range(4)]
    assert torch.allclose(rectified_pyramid_consistency(probs), _urpc_reference(probs), atol=1e-6)
    same = [probs[0]] * 4
    assert rectified_pyramid_consistency(same).item() == pytest.approx(0.0, abs=1e-7)


def test_urpc_pyramid_has_four_full_size_outputs_perturbed_in_training_only():
    m = tiny(URPC, network_kwargs={"channels": [8, 16, 32, 64, 128], "dropout": [0.0] * 5})
    x = torch.rand(2, 3, 32, 32)
    m.eval()
    out = m.pyramid_logits(x)
    assert len(out) == 4 and all(o.shape == (2, 2, 32, 32) for o in out)
    assert torch.allclose(out[0], m(x))  # the main output is the deployed U-Net's
    assert all(torch.equal(a, b) for a, b in zip(out, m.pyramid_logits(x), strict=True))
    maps = decoder_pyramid(m.net.decoder, m.net.encode(x))
    assert [t.shape[-1] for t in maps] == [4, 8, 16, 32]
    m.train()
    torch.manual_seed(1)
    first = m.pyramid_logits(x)
    torch.manual_seed(2)
    second = m.pyramid_logits(x)
    assert torch.allclose(first[0], second[0])  # the main output is not perturbed (no encoder dropout here)
    for a, b in zip(first[1:], second[1:], strict=True):  # strides 2, 4, 8: noise, feature drop, dropout
        assert not torch.allclose(a, b)


# ------------------------------------------------------------------------------------------------ CCT
def test_cct_auxiliary_decoders_read_perturbed_features():
    m = tiny(CCT)
    assert [p.kind for p in m.perturbations] == ["noise", "channel_dropout", "feature_drop"]
    assert m.perturbations[0].strength == 0.3 and m.perturbations[1].strength == 0.3
    assert m.perturbations[2].drop_range == (0.7, 0.9) and len(m.aux_decoders) == 3
    m.eval()
    feats = m.net.encode(torch.rand(2, 3, 32, 32))
    for dec, pert in zip(m.aux_decoders, m.perturbations, strict=True):
        clean = dec(feats)
        noisy = dec([pert(f) for f in feats])
        assert not torch.allclose(clean, noisy)


def test_cct_detach_main_stops_consistency_gradient_into_the_main_decoder():
    b = batch()
    for detach, expect in ((True, False), (False, True)):
        m = tiny(CCT, detach_main=detach, consistency=1.0, ramp_fraction=0.0)
        # only the consistency term can reach the main head from unlabeled images: drop the labeled part
        feats = m.net.encode(b["unlabeled"]["image_weak"])
        main = m.net.decode(feats)
        target = torch.softmax(main, 1).detach() if detach else torch.softmax(main, 1)
        aux = m.aux_decoders[0](feats)
        ((torch.softmax(aux, 1) - target) ** 2).mean().backward()
        assert (m.net.decoder.head.weight.grad is not None) == expect


def test_cct_supervises_all_four_decoders_or_only_the_main_one():
    """SSL4MIS averages L_sup over the main and the auxiliary decoders; Ouali et al. supervise the main one only,
    so that, with the consistency off, the auxiliary decoders get no gradient and L_sup is the main decoder's."""
    b = batch()
    for supervise_aux in (True, False):
        m = tiny(CCT, supervise_aux=supervise_aux, consistency=0.0)
        m.training_step(b, 0).backward()
        aux_grads = [p.grad for d in m.aux_decoders for p in d.parameters()]
        assert all(g is not None and g.abs().sum() > 0 for g in aux_grads) == supervise_aux
        assert all(g is None or g.abs().sum() == 0 for g in aux_grads) != supervise_aux
    m = tiny(CCT, consistency=0.0)
    assert m.hparams.supervise_aux is False  # the default is Ouali et al.'s: the main decoder only
    m.eval()  # no encoder dropout: the step's main output equals a plain forward
    with torch.no_grad():
        expected = m.supervised_loss(m.net(b["labeled"]["image_weak"]), b["labeled"]["mask"])
    torch.manual_seed(0)
    m.training_step(b, 0)
    assert m._last_losses["sup"].item() == pytest.approx(expected.item(), rel=1e-5)


# ------------------------------------------------------------------------------------------------ CPS
def test_cps_each_network_learns_from_the_others_argmax():
    g = torch.Generator().manual_seed(0)
    l1 = torch.randn(2, 2, 4, 4, generator=g, requires_grad=True)
    l2 = torch.randn(2, 2, 4, 4, generator=g, requires_grad=True)
    c1, c2 = cross_pseudo_supervision(l1, l2)
    assert torch.allclose(c1, F.cross_entropy(l1, l2.argmax(1)))
    assert torch.allclose(c2, F.cross_entropy(l2, l1.argmax(1)))
    c1.backward()
    assert l2.grad is None and l1.grad is not None  # the pseudo-label is a target, not a path


def test_cps_networks_are_initialised_differently_and_the_first_is_evaluated():
    m = tiny(CPS)  # default: two independent draws of PyTorch's default initialisation
    w1 = m.net.encoder.stages[0][0].weight
    w2 = m.net2.encoder.stages[0][0].weight
    fan_in, fan_out = w1[0].numel(), w1.shape[0] * w1[0, 0].numel()
    assert not torch.allclose(w1, w2)
    assert w1.std().item() == pytest.approx(w2.std().item(), rel=0.25)
    assert w1.std().item() == pytest.approx(math.sqrt(1 / (3 * fan_in)), rel=0.25)  # kaiming_uniform(a=sqrt 5)
    ssl4mis = tiny(CPS, init1="kaiming", init2="xavier")  # SSL4MIS's re-initialisation, still available
    w1 = ssl4mis.net.encoder.stages[0][0].weight
    w2 = ssl4mis.net2.encoder.stages[0][0].weight
    assert w1.std().item() == pytest.approx(math.sqrt(2 / fan_in), rel=0.25)  # He normal
    assert w2.std().item() == pytest.approx(math.sqrt(2 / (fan_in + fan_out)), rel=0.25)  # Glorot normal
    x = torch.rand(1, 3, 32, 32)
    m.eval()
    assert torch.equal(m(x), m.net(x)) and not torch.allclose(m(x), m.net2(x))


# -------------------------------------------------------------------------------------------- MC-Net+
def test_mcnet_sharpening_with_temperature_point_one():
    p = torch.tensor([0.0, 0.3, 0.5, 0.6, 1.0])
    s = sharpen(p, 0.1)
    assert torch.allclose(s, torch.tensor([0.0, 0.3**10 / (0.3**10 + 0.7**10), 0.5, 0.6**10 / (0.6**10 + 0.4**10), 1.0]))
    assert s[3] > 0.98
    two = torch.softmax(torch.randn(1, 2, 3, 3), 1)  # two classes: the sharpened pair still sums to 1
    assert torch.allclose(sharpen(two, 0.1).sum(1), torch.ones(1, 3, 3), atol=1e-6)


def test_mcnet_mutual_consistency_sums_ordered_pairs_and_vanishes_on_one_hot_agreement():
    onehot = F.one_hot(torch.randint(0, 2, (1, 4, 4)), 2).permute(0, 3, 1, 2).float()
    assert mutual_consistency([onehot] * 3).item() == 0.0
    a, b = torch.full((1, 2, 1, 1), 0.5), torch.tensor([0.6, 0.4]).view(1, 2, 1, 1)
    expect = ((a - sharpen(b, 0.1)) ** 2).mean() + ((b - sharpen(a, 0.1)) ** 2).mean()
    assert torch.allclose(mutual_consistency([a, b]), expect)


def test_mcnet_has_three_decoders_with_different_upsampling():
    m = tiny(MCNetPlus)
    ups = [type(m.net.decoder.ups[0].up).__name__] + [
        d.ups[0].up[1].mode for d in m.aux_decoders  # Sequential(conv1x1, Upsample)
    ]
    assert ups == ["ConvTranspose2d", "bilinear", "nearest"]


# ------------------------------------------------------------------------------------------------ BCP
def test_bcp_box_mask_is_one_zero_box_of_two_thirds_the_sides():
    for seed in range(5):
        m = box_mask(30, 24, generator=torch.Generator().manual_seed(seed))
        zeros = (m == 0).nonzero()
        (y0, x0), (y1, x1) = zeros.min(0).values.tolist(), zeros.max(0).values.tolist()
        assert (y1 - y0 + 1, x1 - x0 + 1) == (20, 16) and len(zeros) == 20 * 16
        assert set(m.unique().tolist()) == {0.0, 1.0}


def test_bcp_copy_paste_pastes_images_and_labels_inside_the_box():
    m = box_mask(12, 12, generator=torch.Generator().manual_seed(0))
    outer, inner = torch.zeros(2, 3, 12, 12), torch.ones(2, 3, 12, 12)
    mixed = copy_paste(outer, inner, m)
    assert torch.equal(mixed[:, 0], (1 - m).expand(2, 12, 12))
    y_out, y_in = torch.zeros(2, 12, 12, dtype=torch.long), torch.ones(2, 12, 12, dtype=torch.long)
    y = copy_paste(y_out, y_in, m)
    assert y.dtype == torch.long and torch.equal(y, (m == 0).long().expand(2, 12, 12))


def test_bcp_pseudo_labels_keep_the_largest_eight_connected_component():
    lab = torch.zeros(2, 8, 8, dtype=torch.long)
    lab[0, 0:2, 0:2] = 1  # 4 pixels
    lab[0, 2, 2] = 1  # touches the first blob diagonally: 8-connected, so kept with it (5 pixels)
    lab[0, 5:8, 5:7] = 1  # 6 pixels: the largest
    out = largest_component(lab)
    assert out[0].sum() == 6 and out[0, 5:8, 5:7].all()
    assert out[1].sum() == 0  # no foreground stays no foreground
    lab[0, 5:8, 5:7] = 0
    assert largest_component(lab)[0].sum() == 5


def test_bcp_masked_dice_ce_ignores_pixels_outside_the_mask():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 2, 6, 6, generator=g)
    target = torch.randint(0, 2, (2, 6, 6), generator=g)
    mask = torch.zeros(6, 6)
    mask[1:4, 1:4] = 1
    d, c = masked_dice_ce(logits, target, mask)
    changed = logits.clone()
    changed[..., 0, :] = 50.0 * torch.randn(2, 2, 6, generator=g)  # row 0 is outside the mask
    d2, c2 = masked_dice_ce(changed, target, mask)
    assert torch.allclose(d, d2) and torch.allclose(c, c2)
    inside = logits[..., 1:4, 1:4].permute(0, 2, 3, 1).reshape(-1, 2)
    assert torch.allclose(c, F.cross_entropy(inside, target[:, 1:4, 1:4].reshape(-1)), atol=1e-6)
    p = torch.softmax(logits, 1)[..., 1:4, 1:4]
    y = F.one_hot(target[:, 1:4, 1:4], 2).permute(0, 3, 1, 2).float()
    ref = 1 - ((2 * (p * y).sum((0, 2, 3))) / ((p * p).sum((0, 2, 3)) + (y * y).sum((0, 2, 3)))).mean()
    assert torch.allclose(d, ref, atol=1e-6)


def test_bcp_mix_loss_weights_unlabeled_origin_pixels_by_half():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 2, 6, 6, generator=g)
    ya, yb = torch.randint(0, 2, (2, 1, 6, 6), generator=g)
    m = box_mask(6, 6, generator=g)
    d_out, c_out = masked_dice_ce(logits, ya, m)
    d_in, c_in = masked_dice_ce(logits, yb, 1 - m)
    d, c = mix_loss(logits, ya, yb, m, outer_weight=0.5, inner_weight=1.0)
    assert torch.allclose(d, 0.5 * d_out + d_in) and torch.allclose(c, 0.5 * c_out + c_in)


def test_bcp_pretrains_on_labeled_mixes_then_starts_the_teacher_from_the_student():
    m = tiny(BCP)
    assert m.teacher.buffers_mode == "ema" and m.hparams.schedule == "constant"
    b = batch()
    calls = []
    m.pretrain_step = lambda lab: calls.append("pre") or torch.zeros(())
    m.pretrain_steps = lambda: 1  # global_step is 0 outside a trainer: still pre-training
    m.training_step(b, 0)
    assert calls == ["pre"] and not bool(m.teacher_ready)
    with torch.no_grad():
        for p in m.net.parameters():
            p.add_(0.5)  # the "pre-trained" student differs from the initial teacher copy
    m.pretrain_steps = lambda: 0
    loss = m.training_step(b, 0)
    assert bool(m.teacher_ready) and torch.isfinite(loss)
    # parameters equal the student's (buffers were copied too, then moved by both networks' forward passes)
    for t, s in zip(m.teacher.module.parameters(), m.net.parameters(), strict=True):
        assert torch.equal(t, s)
    assert "teacher_ready" in m.state_dict()


def test_bcp_pretrain_step_supervises_the_pasted_labels():
    m = tiny(BCP)
    b = batch()
    b["labeled"]["mask"][1] = 0  # image b has no lesion: inside the box the target is background
    seen = {}

    def fake_mix_loss(logits, outer, inner, mask, **kw):
        seen.update(outer=outer, inner=inner, mask=mask)
        return logits.sum() * 0, logits.sum() * 0

    import lesion_kd.methods.bcp as bcp_mod

    orig = bcp_mod.mix_loss
    bcp_mod.mix_loss = fake_mix_loss
    try:
        m.pretrain_step(b["labeled"])
    finally:
        bcp_mod.mix_loss = orig
    assert torch.equal(seen["outer"], b["labeled"]["mask"][:1]) and torch.equal(seen["inner"], b["labeled"]["mask"][1:2])
    assert seen["mask"].shape == (32, 32) and (seen["mask"] == 0).sum() == 21 * 21


def test_bcp_self_training_starts_from_the_pretrainings_best_validation_state():
    """The authors' self_train loads the pre-training's best model into student and teacher: the idle teacher
    keeps the state of the best validation Dice seen so far, and the switch puts it back into the student."""
    m = tiny(BCP)
    assert m.hparams.self_train_from == "best" and float(m.pretrain_best_dice) == -1
    best = {k: v.clone() for k, v in m.net.state_dict().items()}
    m.record_pretrain_validation(0.6)
    with torch.no_grad():
        for p in m.net.parameters():
            p.add_(0.5)  # trained on: a worse validation does not replace the kept state
    m.record_pretrain_validation(0.4)
    assert float(m.pretrain_best_dice) == pytest.approx(0.6)
    m.pretrain_steps = lambda: 0
    m.training_step(batch(), 0)
    assert bool(m.teacher_ready)
    for name, p in m.net.named_parameters():  # the student is the best state (before this step's update)
        assert torch.equal(p, best[name]), name
    for t, s in zip(m.teacher.module.parameters(), m.net.parameters(), strict=True):
        assert torch.equal(t, s)
    m.record_pretrain_validation(0.9)  # self-training: validations no longer touch the teacher
    assert float(m.pretrain_best_dice) == pytest.approx(0.6)
    last = tiny(BCP, self_train_from="last")
    last.record_pretrain_validation(0.6)
    assert float(last.pretrain_best_dice) == -1  # "last": nothing kept
