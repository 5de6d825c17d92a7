"""SIGTERM (what SLURM sends before preemption): the run saves a checkpoint and exits; the checkpoint resumes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import BASE, REPO, lesion_kd

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("to", ["process", "group"])
def test_sigterm_saves_a_checkpoint_that_resumes(tmp_path, data_dir, to):
    """SIGTERM to the training process, or to its whole process group with its two loader workers (SLURM,
    ``kill -- -PGID``, ``timeout``): either way the checkpoint is written."""
    env = {**os.environ, "LESION_KD_DATA": str(data_dir), "PYTHONUNBUFFERED": "1"}
    long_run = [*BASE, "--trainer.max_steps", "100000", "--trainer.val_check_interval", "100000",
                "--test_after_fit", "false", "--trainer.enable_progress_bar", "false", "--data.num_workers", "2"]
    proc = subprocess.Popen([sys.executable, "-m", "lesion_kd.cli", "fit", *long_run,
                             "--trainer.default_root_dir", str(tmp_path)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.time() + 240
    while not list(tmp_path.rglob("split.json")) and time.time() < deadline:  # set-up done, training starts
        time.sleep(0.5)
    time.sleep(4)
    if to == "group":
        os.killpg(proc.pid, signal.SIGTERM)
    else:
        proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert "SIGTERM: checkpoint saved to" in out, out[-3000:]
    assert proc.returncode == 143  # stopped, not finished: 128 + SIGTERM, not 0
    ckpt = Path(out.split("SIGTERM: checkpoint saved to ")[1].split()[0])
    step = torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"]
    assert 0 < step < 100000
    # resume from it and run 2 more steps: another budget, so continued on purpose (the resume guard refuses a
    # changed trainer.max_steps otherwise)
    run = run_dir_of_ckpt(ckpt)
    lesion_kd("fit", "--config", str(run / "config.yaml"), "--ckpt_path", str(ckpt), "--trainer.max_steps",
              str(step + 2), "--test_after_fit", "false", "--trainer.default_root_dir", str(tmp_path / "resumed"),
              env_extra={"LESION_KD_DATA": str(data_dir), "LESION_KD_RESUME_CHANGED_CONFIG": "1"})
    (last,) = (tmp_path / "resumed").rglob("last.ckpt")
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == step + 2


def run_dir_of_ckpt(ckpt: Path) -> Path:
    return ckpt.parent.parent


