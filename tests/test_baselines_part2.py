"""The second group of semi-supervised baselines' distinctive mechanisms, on tiny tensors and tiny networks:
SASSNet's signed distance map, its inverse and the discriminator game; CauSSL's dependence measure and its
min-max; BaPC's boundary band, prototypes and contrast; DAMTN's distribution alignment and EMA teacher; the
shared auxiliary optimiser."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from test_baselines import TINY, batch, tiny

from lesion_kd.methods import DAMTN, BaPC, CauSSL, SASSNet
from lesion_kd.methods.bapc import (
    boundary_aware_prototypes,
    boundary_band,
    pixel_prototype_contrast,
    prototype_index,
    prototype_logits,
    prototype_similarity,
)
from lesion_kd.methods.caussl import conv_weights, dependence
from lesion_kd.methods.components import AuxiliaryOptimizer
from lesion_kd.methods.sassnet import sdf_targets, sdf_to_mask, signed_distance

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
MAMBA = {"network": "mamba_unet", "network_kwargs": {"channels": [8, 16, 32, 64], "vss_depths": [1]}}


@pytest.mark.parametrize(
    ("cls", "option", "value"),
    [
        (SASSNet, "beta", -1.0),
        (SASSNet, "d_lr", 0.0),
        (SASSNet, "ramp_fraction", 2.0),
        (CauSSL, "dependence_weight", -1.0),
        (CauSSL, "max_start", 1.5),
        (CauSSL, "max_interval", 0),
        (CauSSL, "predictor_lr", 0.0),
        (BaPC, "temperature", 0.0),
        (BaPC, "boundary_width", 0),
        (BaPC, "contrast_weight", -0.1),
        (DAMTN, "align_weight", -1.0),
        (DAMTN, "align_momentum", 1.0),
    ],
)
def test_impossible_values_name_the_option(cls, option, value):
    with pytest.raises(ValueError, match=f"model.{option}"):
        cls(**{**TINY, option: value})


@pytest.mark.parametrize("cls", [SASSNet, CauSSL, BaPC, DAMTN])
def test_a_step_trains_the_mamba_student(cls):
    torch.manual_seed(0)
    m = cls(**MAMBA)
    loss = m.training_step(batch(), 0)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in m.net.parameters())


# ------------------------------------------------------------------------------------------- SASSNet
def _square(size: int = 16, lo: int = 4, hi: int = 11) -> np.ndarray:
    m = np.zeros((size, size), np.uint8)
    m[lo:hi, lo:hi] = 1
    return m


def test_signed_distance_is_negative_inside_positive_outside_zero_on_the_inner_boundary():
    mask = _square()
    sdf = signed_distance(mask)
    assert sdf.dtype == np.float32 and sdf.min() == pytest.approx(-1.0) and sdf.max() == pytest.approx(1.0)
    inner = mask.astype(bool) & ~np.pad(np.ones((5, 5), bool), (5, 6))  # the square's 1-pixel rim
    assert (sdf[inner] == 0).all()
    assert (sdf[mask.astype(bool) & ~inner] < 0).all() and (sdf[~mask.astype(bool)] > 0).all()
    assert sdf[7, 7] == pytest.approx(-1.0)  # the centre: the farthest from the background
    assert sdf[15, 15] == pytest.approx(1.0)  # the corner: the farthest from the lesion
    assert (signed_distance(np.zeros((8, 8))) == 0).all() and (signed_distance(np.ones((8, 8))) == -1).all()


def test_smooth_heaviside_inverts_the_signed_distance_map():
    mask = _square()
    sdf = torch.from_numpy(signed_distance(mask))
    back = sdf_to_mask(sdf)
    assert torch.equal(back >= 0.5, torch.from_numpy(mask.astype(bool)))  # boundary (sdf 0) -> 0.5: inside
    assert back[7, 7] > 0.999 and back[0, 0] < 1e-3
    labels = torch.from_numpy(np.stack([mask, np.zeros_like(mask)])).long()
    t = sdf_targets(labels, 2)
    assert t.shape == (2, 1, 16, 16) and torch.equal(t[0, 0], sdf) and (t[1] == 0).all()


def test_sassnet_discriminator_labels_labeled_one_unlabeled_zero_and_is_trained_only_by_its_own_loss():
    m = tiny(SASSNet)
    assert not any(p.requires_grad for p in m.discriminator.parameters())
    trainable = {id(p) for p in m.parameters() if p.requires_grad}  # what the base's optimiser takes
    assert trainable.isdisjoint(id(p) for p in m.discriminator.parameters())
    assert {id(p) for p in m.sdf_head.parameters()} <= trainable
    # the adversarial term: gradient to the segmenter and its SDF head, none to D
    b = batch()
    _, sdf = m.seg_and_sdf(b["unlabeled"]["image_weak"])
    d = m.discriminate(sdf, b["unlabeled"]["image_weak"])
    F.cross_entropy(d, torch.ones(2, dtype=torch.long)).backward()
    assert m.sdf_head.weight.grad is not None and m.net.encoder.stages[0][0].weight.grad is not None
    assert all(p.grad is None for p in m.discriminator.parameters())
    # D's loss: CE against 1 for the labeled part, 0 for the rest
    s, x = torch.rand(4, 1, 32, 32), torch.rand(4, 3, 32, 32)
    params = dict(m.discriminator.named_parameters())
    m.discriminator.eval()
    expect = F.cross_entropy(m.discriminator(s, x), torch.tensor([1, 1, 0, 0]))
    assert torch.allclose(m.discriminator_loss(s, x, 2, params), expect)
    # D's step (after the optimiser step): D changes, the segmenter does not
    m.train()
    net_before = {k: v.clone() for k, v in m.net.state_dict().items()}
    d_before = [p.clone() for p in m.discriminator.parameters()]
    m.on_train_batch_end(None, b, 0)
    # the network ran in eval mode: no BatchNorm statistics moved
    assert all(torch.equal(v, m.net.state_dict()[k]) for k, v in net_before.items())
    assert any(not torch.equal(a, p) for a, p in zip(d_before, m.discriminator.parameters(), strict=True))
    assert m.net.training and m.discriminator.training
    assert m.d_opt.optimizer.defaults["lr"] == 1e-4 and m.d_opt.optimizer.defaults["betas"] == (0.9, 0.99)


def test_sassnet_discriminator_learns_to_separate_labeled_from_unlabeled_sdfs():
    torch.manual_seed(0)
    m = tiny(SASSNet, d_lr=1e-3, d_channels=8)
    s = torch.cat([torch.full((4, 1, 16, 16), -0.5), torch.full((4, 1, 16, 16), 0.5)])
    x = torch.zeros(8, 3, 16, 16)
    first = m.d_opt.step(lambda p: m.discriminator_loss(s, x, 4, p))
    for _ in range(100):
        last = m.d_opt.step(lambda p: m.discriminator_loss(s, x, 4, p))
    assert last < first and last < 0.1


# -------------------------------------------------------------------------------------------- CauSSL
def test_dependence_is_one_for_linearly_predictable_weights_and_about_zero_for_orthogonal_ones():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(4, 3, 3, 3, generator=g)
    a = torch.randn(4, 4, generator=g)
    w = (a @ v.reshape(4, -1)).reshape(4, 3, 3, 3) * 2.5  # predictable up to scale
    assert dependence([w], [v], [a]).item() == pytest.approx(1.0, abs=1e-5)
    q, _ = torch.linalg.qr(torch.randn(27, 8, generator=g))
    src, tgt = q[:, :4].T.reshape(4, 3, 3, 3), q[:, 4:].T.reshape(4, 3, 3, 3)  # orthogonal filter spans
    assert dependence([tgt], [src], [a]).item() == pytest.approx(0.0, abs=1e-6)
    mixed = dependence([w, tgt], [v, src], [a, a])  # the mean over layers
    assert mixed.item() == pytest.approx(0.5, abs=1e-5)


def test_caussl_max_step_raises_and_min_step_lowers_the_dependence():
    m = tiny(CauSSL, max_iters=30)
    assert len(m.predictors[0].mats) == len(conv_weights(m.net)) == len(conv_weights(m.net2))
    assert all(
        a.shape == (w.shape[0], w.shape[0])
        for a, w in zip(m.predictors[0].mats, conv_weights(m.net), strict=True)
    )
    assert all(a.std() < 3e-3 for a in m.predictors[0].mats)  # N(0, 1e-3^2)
    before = sum(m.dependences()).item()
    m.max_step()
    after_max = sum(m.dependences()).item()
    assert after_max > before + 0.05 and int(m.max_phases) == 1
    # min: gradient of dep(net | net2) reaches net only, not net2 (detached) nor the predictors (constants)
    dep1, _ = m.dependences()
    dep1.backward()
    assert all(p.grad is None for p in m.net2.parameters()) and all(
        p.grad is None for p in m.predictors.parameters()
    )
    assert all(w.grad is not None for w in conv_weights(m.net))
    with torch.no_grad():
        for w in conv_weights(m.net):
            w -= 0.5 * w.grad  # a plain gradient step on the dependence alone
    assert m.dependences()[0].item() < dep1.item()


def test_caussl_schedule_max_phase_every_interval_and_dependence_only_after_one(monkeypatch):
    m = tiny(CauSSL, max_iters=1, max_interval=2, max_start=0.0, min_start=0.0, cps_start=0.0)
    seen = []
    m.log = lambda name, value, **kw: seen.append((name, value))
    m.training_step(batch(), 0)  # global_step 0 is not > max_start * T: no max phase, no dependence term
    assert int(m.max_phases) == 0 and ("train/dependence_weight", 0.0) in seen
    step = {"t": 0}
    monkeypatch.setattr(CauSSL, "global_step", property(lambda self: step["t"]))
    for t, phases in ((1, 0), (2, 1), (3, 1), (4, 2)):
        step["t"] = t
        seen.clear()
        m.training_step(batch(), 0)
        assert int(m.max_phases) == phases
        assert ("train/dependence_weight", 3.0 if phases else 0.0) in seen


# ---------------------------------------------------------------------------------------------- BaPC
def test_boundary_band_covers_both_sides_of_the_edge_to_the_given_depth():
    labels = torch.zeros(1, 12, 12, dtype=torch.long)
    labels[0, 4:8, 4:8] = 1
    band = boundary_band(labels, 2, 1)
    ring_in = labels[0].bool() & ~F.pad(torch.ones(2, 2, dtype=torch.bool), (5, 5, 5, 5))
    ring_out = F.pad(torch.ones(6, 6, dtype=torch.bool), (3, 3, 3, 3)) & ~labels[0].bool()
    assert torch.equal(band[0], ring_in | ring_out)
    assert not boundary_band(torch.zeros(1, 5, 5, dtype=torch.long), 2, 1).any()  # no edge, no band
    assert boundary_band(labels, 2, 2)[0].sum() > band[0].sum()


def test_prototypes_are_normalised_means_of_each_class_and_region():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(2, 5, 12, 12, generator=g)
    labels = torch.zeros(2, 12, 12, dtype=torch.long)
    labels[0, 2:9, 3:10] = 1
    index = prototype_index(labels, boundary_band(labels, 2, 1))
    protos, valid = boundary_aware_prototypes(feats, index, 4)
    assert valid.tolist() == [True, True, True, True] and torch.allclose(protos.norm(dim=1), torch.ones(4))
    fn = F.normalize(feats, dim=1).permute(0, 2, 3, 1)  # (B, H, W, C)
    for j in range(4):
        expect = F.normalize(fn[index == j].mean(0), dim=0)
        assert torch.allclose(protos[j], expect, atol=1e-5)
    _, valid = boundary_aware_prototypes(
        feats, prototype_index(torch.zeros_like(labels), torch.zeros_like(labels)), 4
    )
    assert valid.tolist() == [True, False, False, False]
    sim = prototype_similarity(feats, protos, valid, 0.1)
    assert (sim[:, 1:] == -1e4).all() and sim[:, 0].abs().max() <= 10 + 1e-4


def test_prototype_classifier_takes_the_nearest_of_each_class_prototypes_and_contrast_skips_the_sibling():
    # prototypes: background centre, background boundary, lesion centre, lesion boundary
    sim = torch.tensor([1.0, 3.0, 2.0, -1.0]).view(1, 4, 1, 1)
    assert prototype_logits(sim).flatten().tolist() == [3.0, 2.0]
    index = torch.tensor([2]).view(1, 1, 1)  # a lesion-centre pixel: positive 2, negatives 0 and 1, not 3
    expect = -torch.log_softmax(torch.tensor([1.0, 3.0, 2.0]), 0)[2]
    assert torch.allclose(pixel_prototype_contrast(sim, index), expect)


def test_bapc_prototype_supervision_on_labeled_images_reaches_unlabeled_features():
    m = tiny(BaPC, network_kwargs={"channels": [8, 16, 32, 64, 128], "dropout": [0.0] * 5})
    b = batch()
    xl, xu = b["labeled"]["image_weak"], b["unlabeled"]["image_weak"].clone().requires_grad_()
    logits, feats = m.net.decode(m.net.encode(torch.cat([xl, xu])), return_features=True)
    labels = torch.cat([b["labeled"]["mask"], logits[2:].detach().argmax(1)])
    index = prototype_index(labels, boundary_band(labels, 2, 3))
    protos, valid = boundary_aware_prototypes(feats, index, 4)
    proto = prototype_logits(prototype_similarity(feats, protos, valid, 0.1))
    m.supervised_loss(proto[:2], b["labeled"]["mask"]).backward()  # labeled images' loss only
    assert xu.grad is not None and xu.grad.abs().sum() > 0  # through the shared prototypes


# --------------------------------------------------------------------------------------------- DAMTN
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


# ------------------------------------------------------------------------------------ aux. optimiser
def test_auxiliary_optimizer_freezes_its_module_skips_non_finite_steps_and_restores_its_state():
    lin = nn.Linear(2, 1)
    aux = AuxiliaryOptimizer(lin, lambda p: torch.optim.Adam(p, lr=0.1))
    assert not any(p.requires_grad for p in lin.parameters())
    x = torch.ones(3, 2)
    w0 = lin.weight.clone()
    loss = aux.step(lambda p: torch.func.functional_call(lin, p, (x,)).pow(2).mean())
    assert loss > 0 and not torch.equal(w0, lin.weight) and lin.weight.grad is None
    w1 = lin.weight.clone()
    bad = aux.step(lambda p: p["weight"].sum() * float("nan"))
    assert not torch.isfinite(bad) and torch.equal(w1, lin.weight)  # dropped
    state = aux.state_dict()
    other = AuxiliaryOptimizer(nn.Linear(2, 1), lambda p: torch.optim.Adam(p, lr=0.1))
    other.load_state_dict(state)  # pending until the optimiser is built
    assert int(other.optimizer.state_dict()["state"][0]["step"]) == 1
