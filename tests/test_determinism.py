"""Same config and seed, same metrics: two smoke runs through the CLI give identical results."""

from __future__ import annotations

import json

import pytest
from helpers import BASE, lesion_kd, run_dir_of

pytestmark = pytest.mark.slow


def test_two_runs_with_the_same_seed_give_identical_metrics(tmp_path, data_dir):
    results = []
    for name in ("a", "b"):
        lesion_kd("fit", *BASE, "--data.num_workers", "2", "--trainer.default_root_dir", str(tmp_path / name),
                  env_extra={"LESION_KD_DATA": str(data_dir)})
        run = run_dir_of(tmp_path / name)
        losses = [line.split(",") for line in (run / "metrics.csv").read_text().splitlines()]
        results.append((json.loads((run / "metrics.json").read_text()), losses))
    (m1, l1), (m2, l2) = results
    assert m1 == m2  # every per-image metric, bit for bit
    assert l1 == l2  # and the logged training losses of every step
    c = lesion_kd("fit", *BASE, "--seed_everything", "1", "--test_after_fit", "false",
                  "--trainer.default_root_dir", str(tmp_path / "c"), env_extra={"LESION_KD_DATA": str(data_dir)})
    assert c.returncode == 0
    l3 = [line.split(",") for line in (run_dir_of_csv(tmp_path / "c")).read_text().splitlines()]
    assert l3 != l1  # a different seed changes the run (the test can fail)


def run_dir_of_csv(root):
    (csv,) = root.rglob("metrics.csv")
    return csv
