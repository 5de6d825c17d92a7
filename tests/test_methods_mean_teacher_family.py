"""The methods with an EMA teacher (Mean Teacher, UA-MT, DAMTN, BCP; CPU, fast): the EMA teacher itself
(formula, BN buffers, once per optimiser step, in the checkpoint but not the optimiser), Mean Teacher's noisy
consistency, UA-MT's uncertainty mask, DAMTN's distribution alignment, BCP's copy-paste and its pre-training.
The method tests are organised by family: see tests/test_methods_common.py."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import batch, tiny

from lesion_kd.methods import BCP, DAMTN, UAMT, MeanTeacher
from lesion_kd.methods.bcp import mix_loss
from lesion_kd.methods.components import (
    EMATeacher,
    box_mask,
    copy_paste,
    ema_alpha,
    largest_component,
    masked_dice_ce,
    teacher_input_noise,
)
from lesion_kd.methods.ua_mt import masked_consistency, predictive_entropy, uncertainty_threshold

# training_step outside a Trainer: self.log() only warns
pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")


# -------------------------------------------------------------------------------------- EMA teacher
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


# ------------------------------------------------------------------------------------- Mean Teacher
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


# -------------------------------------------------------------------------------------------- UA-MT
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


# -------------------------------------------------------------------------------------------- DAMTN
def test_damtn_alignment_is_zero_for_equal_distributions_and_positive_otherwise():
    m = tiny(DAMTN)
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(3, 2, 8, 8, generator=g) * 3, 1)
    assert m.alignment(probs).item() == 0.0  # no labeled statistics yet
    m.alignment.update_labeled(probs)
    assert m.alignment(probs).item() == pytest.approx(0.0, abs=1e-10)
    shifted = torch.softmax(
        torch.randn(3, 2, 8, 8, generator=g) * 3 + torch.tensor([0.0, 2.0]).view(1, 2, 1, 1), 1
    )
    assert m.alignment(shifted).item() > 1e-3


def test_damtn_alignment_trains_the_student_and_the_teacher_keeps_its_own_bn_buffers():
    m = tiny(DAMTN, consistency=0.0, ramp_fraction=0.0)
    assert m.teacher.buffers_mode == "own"  # SSL4MIS's Mean Teacher averages parameters only
    b = batch()
    m.alignment.update_labeled(torch.tensor([0.9, 0.1]).view(1, 2, 1, 1).expand(2, 2, 32, 32))  # 10% lesion
    align = m.alignment(torch.softmax(m(b["unlabeled"]["image_weak"]).float(), 1))
    align.backward()
    assert align > 0 and m.net.decoder.head.weight.grad is not None
    assert all(p.grad is None for p in m.teacher.parameters())
    teacher_bn = m.teacher.module.encoder.stages[0][1]
    before = teacher_bn.running_mean.clone()
    with torch.no_grad():
        for p in m.net.parameters():
            p.add_(0.1)
        m.net(torch.rand(2, 3, 32, 32) + 5)  # moves the student's BN statistics
    m.teacher.update(m.net, 0.5)
    assert torch.equal(teacher_bn.running_mean, before)  # own buffers: not averaged from the student
    s, t = m.net.encoder.stages[0][0].weight, m.teacher.module.encoder.stages[0][0].weight
    assert not torch.equal(s, t)


# ---------------------------------------------------------------------------------------------- BCP
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
