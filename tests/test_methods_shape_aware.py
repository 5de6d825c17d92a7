"""The methods with a shape or boundary prior (SASSNet, BaPC; CPU, fast): SASSNet's signed distance map, its
inverse and the discriminator game; BaPC's boundary band, prototypes, prototype classifier and contrast.
The method tests are organised by family: see tests/test_methods_common.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import batch, tiny

from lesion_kd.methods import BaPC, SASSNet
from lesion_kd.methods.bapc import (
    boundary_aware_prototypes,
    boundary_band,
    pixel_prototype_contrast,
    prototype_index,
    prototype_logits,
    prototype_similarity,
)
from lesion_kd.methods.sassnet import sdf_targets, sdf_to_mask, signed_distance

# training_step outside a Trainer: self.log() only warns
pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")


# ------------------------------------------------------------------------------------------ SASSNet
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


# --------------------------------------------------------------------------------------------- BaPC
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
