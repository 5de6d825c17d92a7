"""The methods that train two segmenters against each other (CPS, CauSSL; CPU, fast): CPS's cross
pseudo-labels and its two initialisations, CauSSL's dependence measure, its max and min steps and their schedule.
The method tests are organised by family: see tests/test_methods_common.py."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import batch, tiny

from lesion_kd.methods import CPS, CauSSL
from lesion_kd.methods.caussl import conv_weights, dependence
from lesion_kd.methods.cps import cross_pseudo_supervision

# training_step outside a Trainer: self.log() only warns
pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")


# ---------------------------------------------------------------------------------------------- CPS
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


# ------------------------------------------------------------------------------------------- CauSSL
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
