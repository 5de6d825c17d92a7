"""``lesion-kd demo`` (``make demo``), end to end on real Kvasir-SEG images with a tiny budget: cache fill, both
runs, the side-by-side test Dice, the paired line and the overlay picture; the real budget is
experiments/profile/demo.yaml (its wall time and output: README, "The demo")."""

from __future__ import annotations

import json

import pytest
import yaml
from helpers import REPO, lesion_kd

pytestmark = pytest.mark.slow


def test_demo_trains_the_method_and_its_supervised_student_and_compares_them(tmp_path, data_dir):
    profile = yaml.safe_load((REPO / "experiments/profile/demo.yaml").read_text())
    profile["trainer"].update(max_steps=4, val_check_interval=2)
    profile["data"].update(image_size=64, max_train_images=20, max_val_images=4, max_test_images=6,
                           labeled_batch_size=2, unlabeled_batch_size=2, eval_batch_size=6, num_workers=0)
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(profile))
    out = tmp_path / "demo"
    proc = lesion_kd("demo", "--profile", str(tmp_path / "tiny.yaml"), "--out", str(out),
                     env_extra={"LESION_KD_DATA": str(data_dir)}, timeout=900)
    text = proc.stdout
    for step in ("[demo] 1/3 teacher cache", "[demo] 2/3 training semikd_plus and semikd_sup", "[demo] 3/3 results"):
        assert step in text
    dice = {}
    for name in ("semikd_plus", "semikd_sup"):
        (metrics,) = (out / "results" / "kvasir-seg").glob(f"{name}-mamba_unet-*/metrics.json")
        m = json.loads(metrics.read_text())
        assert m["n_images"] == 6
        dice[name] = 100 * m["dice"]["mean"]
    # the side-by-side lines print each run's own figure, and the paired line is over the same 6 images
    assert f"{dice['semikd_plus']:8.2f}" in text.split("SemiKD+ (teacher: LiteMedSAM)")[1].splitlines()[0]
    assert f"{dice['semikd_sup']:8.2f}" in text.split("semikd_sup (same recipe, no teacher)")[1].splitlines()[0]
    assert "paired over 6 images (semikd_plus minus semikd_sup): Dice" in text
    assert (out / "overlay.png").stat().st_size > 1000
    # a second call finds both runs finished and only reports
    again = lesion_kd("demo", "--profile", str(tmp_path / "tiny.yaml"), "--out", str(out),
                      env_extra={"LESION_KD_DATA": str(data_dir)}, timeout=600)
    assert again.stdout.count("already finished") == 2


def test_demo_without_the_data_says_where_to_point_it(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "lesion_kd.cli", "demo", "--out", str(tmp_path)], cwd=REPO,
                          env={"PATH": "/usr/bin:/bin", "LESION_KD_DATA": str(tmp_path / "nowhere"),
                               "LESION_KD_CACHE": str(tmp_path / "cache")}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "LESION_KD_DATA" in proc.stderr and "Kvasir-SEG" in proc.stderr
