"""The methods with one encoder and several decoders (URPC, CCT, MC-Net+; CPU, fast): they need the reference
U-Net, URPC's rectified loss and decoder pyramid, CCT's perturbed auxiliary decoders, MC-Net+'s sharpening and
mutual consistency. The method tests are organised by family: see tests/test_methods_common.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import batch, tiny

from lesion_kd.methods import CCT, URPC, MCNetPlus
from lesion_kd.methods.mcnet_plus import mutual_consistency, sharpen
from lesion_kd.methods.urpc import rectified_pyramid_consistency
from lesion_kd.models.multihead import decoder_pyramid

# training_step outside a Trainer: self.log() only warns
pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")


@pytest.mark.parametrize("cls", [URPC, CCT, MCNetPlus])
def test_multi_decoder_methods_need_the_reference_unet(cls):
    with pytest.raises(ValueError, match="network: unet"):
        cls(network="mamba_unet", network_kwargs={"channels": [8, 16, 32, 64], "vss_depths": [1]})


# --------------------------------------------------------------------------------------------- URPC
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


# ---------------------------------------------------------------------------------------------- CCT
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


# ------------------------------------------------------------------------------------------ MC-Net+
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
