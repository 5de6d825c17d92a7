"""SASSNet, CauSSL, BaPC and DAMTN end to end through the ``lesion-kd`` command on real Kvasir-SEG data (smoke
profile): fit, then test from the best checkpoint; the min-max side's optimiser state in the checkpoint; DAMTN
training the Mamba student."""

from __future__ import annotations

import pytest
import torch
from test_baselines_cli import (
    check_smoke_fit_trains_the_mamba_student,
    check_test_from_the_best_checkpoint,
    fitter,
)

pytestmark = pytest.mark.slow

METHODS = {"sassnet": "SASSNet", "caussl": "CauSSL", "bapc": "BaPC", "damtn": "DAMTN"}
# CauSSL's first max phase comes after 10% of the run and every 60 steps: in a 3-step smoke run, make every
# step from the first one run a (2-iteration) max phase and the min term, so that the fit exercises both
EXTRA = {
    "caussl": [
        "--model.max_start",
        "0",
        "--model.min_start",
        "0",
        "--model.cps_start",
        "0",
        "--model.max_interval",
        "1",
        "--model.max_iters",
        "2",
    ]
}
AUX_STATE = {"sassnet": "discriminator_optimizer", "caussl": "predictor_optimizer"}


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, data_dir):
    return fitter(tmp_path_factory, data_dir, EXTRA)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_smoke_fit_then_test_from_the_best_checkpoint(method, fitted, tmp_path, data_dir):
    check_test_from_the_best_checkpoint(fitted(method), METHODS[method], tmp_path, data_dir)


@pytest.mark.parametrize("method", sorted(AUX_STATE))
def test_checkpoint_holds_the_min_max_side_and_its_optimiser_state(method, fitted):
    ckpt = torch.load(fitted(method) / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 3
    prefix = {"sassnet": "discriminator.", "caussl": "predictors."}[method]
    assert any(k.startswith(prefix) for k in ckpt["state_dict"])
    assert ckpt[AUX_STATE[method]]["state"]  # Adam moments: the auxiliary optimiser has stepped
    # the base's optimiser holds the networks only, not the min-max side
    n_aux = sum(1 for k in ckpt["state_dict"] if k.startswith(prefix))
    n_opt = sum(len(g["params"]) for g in ckpt["optimizer_states"][0]["param_groups"])
    buffers = ("running_mean", "running_var", "num_batches_tracked", "max_phases")
    n_trainable = sum(1 for k in ckpt["state_dict"] if not k.endswith(buffers)) - n_aux
    assert n_opt == n_trainable
    if method == "caussl":
        assert int(ckpt["state_dict"]["max_phases"]) == 2  # steps 1 and 2 (step 0 is not past the start)


def test_smoke_fit_of_damtn_trains_the_mamba_student(tmp_path, data_dir):
    check_smoke_fit_trains_the_mamba_student("damtn", tmp_path, data_dir)
