"""Every semi-supervised baseline end to end through the ``lesion-kd`` command on real Kvasir-SEG data (smoke
profile; slow): fit, then test from the best checkpoint (the SAM-based ones load without their frozen SAM);
the min-max side's optimiser state in the checkpoint (SASSNet, CauSSL); one 2-process CPU DDP fit of an
EMA-teacher method; a resumed fit that restores the teacher; the Mamba student trained by the methods whose
structure allows it. CPC-SAM runs LiteMedSAM's TinyViT on the CPU: about a minute a step on two busy cores.

The method tests are organised by family, one file each (tests/test_methods_common.py lists them); this file
holds the slow command-line runs of all of them, so that ``-m "not slow"`` skips it whole."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import lesion_kd, method_config_args, run_dir_of

pytestmark = pytest.mark.slow

METHODS = {"mean_teacher": "MeanTeacher", "ua_mt": "UAMT", "urpc": "URPC", "cct": "CCT", "cps": "CPS",
           "mcnet_plus": "MCNetPlus", "bcp": "BCP", "sassnet": "SASSNet", "caussl": "CauSSL", "bapc": "BaPC",
           "damtn": "DAMTN"}
SAM_METHODS = {"semisam_mt": "SemiSAMMT", "cpc_sam": "CPCSAM"}
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
# the methods whose structure allows the Mamba student, and how long a fit of each may take (s)
MAMBA_STUDENT = {"bcp": 300, "cps": 300, "damtn": 300, "mean_teacher": 300, "semisam_mt": 600, "ua_mt": 300}


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, data_dir):
    """fit(method) -> its run directory; each method is fitted once (no test after fit), with its EXTRA args."""
    runs: dict[str, Path] = {}

    def fit(method: str) -> Path:
        if method not in runs:
            root = tmp_path_factory.mktemp(method)
            lesion_kd("fit", *method_config_args(method), *EXTRA.get(method, []), "--test_after_fit", "false",
                      "--trainer.default_root_dir", str(root), env_extra={"LESION_KD_DATA": str(data_dir)})
            (cfg,) = root.rglob("config.yaml")
            runs[method] = cfg.parent
        return runs[method]

    return fit


def check_test_from_the_best_checkpoint(run: Path, class_name: str, tmp_path: Path, data_dir: Path,
                                        timeout: int = 300) -> None:
    """The fitted run is of the class, and `lesion-kd test` from its best checkpoint writes sound metrics."""
    assert f"class_path: lesion_kd.methods.{class_name}" in (run / "config.yaml").read_text()
    ckpt = next((run / "checkpoints").glob("best-*.ckpt"))
    out = lesion_kd("test", "--config", str(run / "config.yaml"), "--ckpt_path", str(ckpt),
                    "--trainer.default_root_dir", str(tmp_path), env_extra={"LESION_KD_DATA": str(data_dir)},
                    timeout=timeout)
    assert "metrics written to" in out.stdout
    m = json.loads((run_dir_of(tmp_path) / "metrics.json").read_text())
    assert m["n_images"] == 8 and 0.0 <= m["dice"]["mean"] <= 1.0


@pytest.mark.parametrize("method", sorted(METHODS))
def test_smoke_fit_then_test_from_the_best_checkpoint(method, fitted, tmp_path, data_dir):
    check_test_from_the_best_checkpoint(fitted(method), METHODS[method], tmp_path, data_dir)


@pytest.mark.parametrize("method", sorted(SAM_METHODS))
def test_sam_method_smoke_fit_then_test_from_the_best_checkpoint(method, tmp_path, data_dir):
    env = {"LESION_KD_DATA": str(data_dir)}
    fit_root, test_root = tmp_path / "fit", tmp_path / "test"
    lesion_kd(
        "fit",
        *method_config_args(method),
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
    check_test_from_the_best_checkpoint(cfg.parent, SAM_METHODS[method], test_root, data_dir, timeout=600)


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


def test_resumed_fit_restores_and_keeps_updating_the_ema_teacher(fitted, tmp_path, data_dir):
    run = fitted("mean_teacher")
    last = run / "checkpoints" / "last.ckpt"
    before = torch.load(last, map_location="cpu", weights_only=True)
    teacher_keys = [k for k in before["state_dict"] if k.startswith("teacher.module.") and k.endswith(".weight")]
    assert teacher_keys and before["global_step"] == 3
    # the optimiser holds exactly the student's parameters (not the teacher's)
    buffers = ("running_mean", "running_var", "num_batches_tracked")
    n_student = sum(1 for k in before["state_dict"] if k.startswith("net.") and not k.endswith(buffers))
    assert sum(len(g["params"]) for g in before["optimizer_states"][0]["param_groups"]) == n_student
    # a longer budget is another run to the resume guard: extended here on purpose
    lesion_kd("fit", "--config", str(run / "config.yaml"), "--ckpt_path", str(last), "--trainer.max_steps", "5",
              "--test_after_fit", "false", "--trainer.default_root_dir", str(tmp_path),
              env_extra={"LESION_KD_DATA": str(data_dir), "LESION_KD_RESUME_CHANGED_CONFIG": "1"})
    after = torch.load(next(tmp_path.rglob("last.ckpt")), map_location="cpu", weights_only=True)
    assert after["global_step"] == 5
    k = teacher_keys[0]
    assert not torch.equal(before["state_dict"][k], after["state_dict"][k])


def test_two_process_cpu_ddp_fit_of_an_ema_teacher_method(tmp_path, data_dir):
    # 4 labeled images (not the smoke profile's 2): each rank must get one full labeled batch of 2, else its
    # labeled loader is empty and the epochs have no steps (the data module's DistributedSampler split)
    lesion_kd("fit", *method_config_args("mean_teacher"), "--trainer.devices", "2", "--trainer.strategy", "ddp",
              "--data.labeled_fraction", "0.25", "--trainer.default_root_dir", str(tmp_path),
              env_extra={"LESION_KD_DATA": str(data_dir)}, timeout=180)
    run = run_dir_of(tmp_path)
    assert json.loads((run / "metrics.json").read_text())["n_images"] == 8
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 3 and any(k.startswith("teacher.module.") for k in ckpt["state_dict"])


@pytest.mark.parametrize("method", sorted(MAMBA_STUDENT))
def test_smoke_fit_trains_the_mamba_student(method, tmp_path, data_dir):
    """`lesion-kd fit` of the method with --model.network mamba_unet (smoke profile) trains and tests the student."""
    out = lesion_kd("fit", *method_config_args(method), "--model.network", "mamba_unet",
                    "--trainer.default_root_dir", str(tmp_path), env_extra={"LESION_KD_DATA": str(data_dir)},
                    timeout=MAMBA_STUDENT[method])
    run = run_dir_of(tmp_path)
    assert "network: mamba_unet" in (run / "config.yaml").read_text() and "metrics written to" in out.stdout
    assert json.loads((run / "metrics.json").read_text())["n_images"] == 8
