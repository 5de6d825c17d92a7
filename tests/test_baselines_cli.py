"""Every semi-supervised baseline end to end through the ``lesion-kd`` command on real Kvasir-SEG data
(smoke profile): fit, then test from the best checkpoint; one 2-process CPU DDP fit of an EMA-teacher method;
a resumed fit that restores the teacher; the Mamba student trained by the methods whose structure allows it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_cli import lesion_kd, run_dir_of

pytestmark = pytest.mark.slow

METHODS = {"mean_teacher": "MeanTeacher", "ua_mt": "UAMT", "urpc": "URPC", "cct": "CCT", "cps": "CPS",
           "mcnet_plus": "MCNetPlus", "bcp": "BCP"}


def base(method: str) -> list[str]:
    return ["--config", "experiments/data/kvasir-seg.yaml", "--config", f"experiments/method/{method}.yaml",
            "--config", "experiments/profile/smoke.yaml"]


def fitter(tmp_path_factory, data_dir, extra: dict[str, list[str]] | None = None):
    """fit(method) -> its run directory; each method is fitted once (no test after fit), with its extra args."""
    runs: dict[str, Path] = {}

    def fit(method: str) -> Path:
        if method not in runs:
            root = tmp_path_factory.mktemp(method)
            lesion_kd("fit", *base(method), *(extra or {}).get(method, []), "--test_after_fit", "false",
                      "--trainer.default_root_dir", str(root), env_extra={"LESION_KD_DATA": str(data_dir)})
            (cfg,) = root.rglob("config.yaml")
            runs[method] = cfg.parent
        return runs[method]

    return fit


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, data_dir):
    return fitter(tmp_path_factory, data_dir)


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
    lesion_kd("fit", "--config", str(run / "config.yaml"), "--ckpt_path", str(last), "--trainer.max_steps", "5",
              "--test_after_fit", "false", "--trainer.default_root_dir", str(tmp_path),
              env_extra={"LESION_KD_DATA": str(data_dir)})
    after = torch.load(next(tmp_path.rglob("last.ckpt")), map_location="cpu", weights_only=True)
    assert after["global_step"] == 5
    k = teacher_keys[0]
    assert not torch.equal(before["state_dict"][k], after["state_dict"][k])


def test_two_process_cpu_ddp_fit_of_an_ema_teacher_method(tmp_path, data_dir):
    # 4 labeled images (not the smoke profile's 2): each rank must get one full labeled batch of 2, else its
    # labeled loader is empty and the epochs have no steps (the data module's DistributedSampler split)
    lesion_kd("fit", *base("mean_teacher"), "--trainer.devices", "2", "--trainer.strategy", "ddp",
              "--data.labeled_fraction", "0.25", "--trainer.default_root_dir", str(tmp_path),
              env_extra={"LESION_KD_DATA": str(data_dir)}, timeout=180)
    run = run_dir_of(tmp_path)
    assert json.loads((run / "metrics.json").read_text())["n_images"] == 8
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 3 and any(k.startswith("teacher.module.") for k in ckpt["state_dict"])


@pytest.mark.parametrize("method", ["mean_teacher", "ua_mt", "cps", "bcp"])
def test_smoke_fit_trains_the_mamba_student(method, tmp_path, data_dir):
    check_smoke_fit_trains_the_mamba_student(method, tmp_path, data_dir)


def check_smoke_fit_trains_the_mamba_student(method: str, tmp_path: Path, data_dir: Path, timeout: int = 300) -> None:
    """`lesion-kd fit` of the method with --model.network mamba_unet (smoke profile) trains and tests the student."""
    out = lesion_kd("fit", *base(method), "--model.network", "mamba_unet", "--trainer.default_root_dir", str(tmp_path),
                    env_extra={"LESION_KD_DATA": str(data_dir)}, timeout=timeout)
    run = run_dir_of(tmp_path)
    assert "network: mamba_unet" in (run / "config.yaml").read_text() and "metrics written to" in out.stdout
    assert json.loads((run / "metrics.json").read_text())["n_images"] == 8
