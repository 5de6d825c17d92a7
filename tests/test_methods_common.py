"""What every semi-supervised baseline must satisfy, and the pieces several of them share (CPU, fast).

The method tests are organised by family, one file each, with the slow end-to-end runs in one file:
test_methods_common.py (this file: every method's contract, shared components), test_methods_mean_teacher_family.py
(an EMA teacher: Mean Teacher, UA-MT, DAMTN, BCP), test_methods_multi_decoder.py (one encoder, several decoders:
URPC, CCT, MC-Net+), test_methods_two_networks.py (two segmenters: CPS, CauSSL), test_methods_shape_aware.py
(shape and boundary priors: SASSNet, BaPC), test_methods_sam.py (a SAM inside the method: SemiSAM-MT, CPC-SAM)
and test_methods_cli.py (each method's smoke fit through the ``lesion-kd`` command; slow).

Here: each config names its class with the class's defaults, a training step gives every trainable parameter a
gradient, impossible option values are refused naming the option, a batch without unlabeled images fails
clearly, the Mamba student trains; check_weights and the auxiliary optimiser of the min-max methods."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import yaml
from helpers import REPO, TINY, batch, tiny

from lesion_kd.methods import (
    BCP,
    CCT,
    CPS,
    DAMTN,
    UAMT,
    URPC,
    BaPC,
    CauSSL,
    MCNetPlus,
    MeanTeacher,
    SASSNet,
)
from lesion_kd.methods.components import AuxiliaryOptimizer, check_weights

# training_step outside a Trainer: self.log() only warns
pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
METHODS = {"mean_teacher": MeanTeacher, "ua_mt": UAMT, "urpc": URPC, "cct": CCT, "cps": CPS,
           "mcnet_plus": MCNetPlus, "bcp": BCP, "sassnet": SASSNet, "caussl": CauSSL, "bapc": BaPC, "damtn": DAMTN}
MAMBA = {"network": "mamba_unet", "network_kwargs": {"channels": [8, 16, 32, 64], "vss_depths": [1]}}


# ------------------------------------------------------------------------------------- every method
@pytest.mark.parametrize("name", sorted(METHODS))
def test_config_defaults_match_the_class_and_a_step_trains_every_trainable_parameter(name):
    cfg = yaml.safe_load((REPO / "experiments" / "method" / f"{name}.yaml").read_text())
    cls = METHODS[name]
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


@pytest.mark.parametrize("cls", [SASSNet, CauSSL, BaPC, DAMTN])
def test_a_step_trains_the_mamba_student(cls):
    torch.manual_seed(0)
    m = cls(**MAMBA)
    loss = m.training_step(batch(), 0)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in m.net.parameters())


# ------------------------------------------------------------------------------------ option checks
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
def test_impossible_values_of_sassnet_caussl_bapc_and_damtn_name_the_option(cls, option, value):
    with pytest.raises(ValueError, match=f"model.{option}"):
        cls(**{**TINY, option: value})


def test_check_weights_accepts_the_edges_and_names_the_first_bad_option():
    check_weights(0.0, consistency=0.0)
    check_weights(1.0)
    check_weights(beta=0.3)  # no ramp: nothing to check there
    with pytest.raises(ValueError, match=r"^model\.beta=-0.3: must be >= 0$"):
        check_weights(0.5, consistency=0.1, beta=-0.3)
    with pytest.raises(ValueError, match=r"^model\.ramp_fraction=1.01: must be in \[0, 1\]$"):
        check_weights(1.01, consistency=0.1)


# ----------------------------------------------------------------------------------- aux. optimiser
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
