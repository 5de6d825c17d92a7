"""The SAM-based baselines end to end through the ``lesion-kd`` command on real Kvasir-SEG data (smoke profile):
fit, then test from the best checkpoint (which loads without the frozen SAM teacher of SemiSAM-MT); SemiSAM-MT
with the Mamba student. CPC-SAM runs LiteMedSAM's TinyViT on the CPU: about a minute a step on two busy cores."""

from __future__ import annotations

import pytest
import torch
from test_baselines_cli import (
    base,
    check_smoke_fit_trains_the_mamba_student,
    check_test_from_the_best_checkpoint,
)
from test_cli import lesion_kd

pytestmark = pytest.mark.slow
METHODS = {"semisam_mt": "SemiSAMMT", "cpc_sam": "CPCSAM"}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_smoke_fit_then_test_from_the_best_checkpoint(method, tmp_path, data_dir):
    env = {"LESION_KD_DATA": str(data_dir)}
    fit_root, test_root = tmp_path / "fit", tmp_path / "test"
    lesion_kd(
        "fit",
        *base(method),
        "--test_after_fit",
        "false",
        "--trainer.default_root_dir",
        str(fit_root),
        env_extra=env,
        timeout=900,
    )
    (cfg,) = fit_root.rglob("config.yaml")
    ckpt = next((cfg.parent / "checkpoints").glob("best-*.ckpt"))
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert state["global_step"] == 3
    if method == "semisam_mt":  # the frozen SAM is not saved: student + EMA teacher only
        assert {k.split(".")[0] for k in state["state_dict"]} == {"net", "teacher"}
    else:  # the trained network is SAM: LoRA layers in its encoder, two decoders
        assert any(".a_q." in k for k in state["state_dict"]) and any(
            k.startswith("net.decoders.1.") for k in state["state_dict"]
        )
    check_test_from_the_best_checkpoint(cfg.parent, METHODS[method], test_root, data_dir, timeout=600)


def test_semisam_mt_smoke_fit_trains_the_mamba_student(tmp_path, data_dir):
    check_smoke_fit_trains_the_mamba_student("semisam_mt", tmp_path, data_dir, timeout=600)
