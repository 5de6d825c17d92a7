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


@pytest.mark.parametrize("method", ["semikd", "supervised"])
def test_deterministic_runs_skip_the_nan_fill_and_compute_the_same_step(method):
    """relax_deterministic_fill (issue 29): keeps deterministic algorithms, drops the NaN fill of new tensors, and a
    SemiKD / supervised training step (forward, backward) is bit-identical with and without the fill."""
    import torch

    from lesion_kd.methods import SemiKDModule, Supervised
    from lesion_kd.methods.base import relax_deterministic_fill

    def step(fill: bool):
        torch.manual_seed(0)
        b, s = 2, 64
        part = lambda lab: {  # noqa: E731
            "image_weak": torch.rand(b, 3, s, s), "image_strong": torch.rand(b, 3, s, s),
            "mask": (torch.rand(b, s, s) > 0.7).long(), "theta": torch.eye(2, 3).repeat(b, 1, 1) * 0.9,
            "teacher_emb": torch.randn(b, 256, 64, 64).half(), "index": torch.arange(b), "id": ["a", "b"]}
        batch = {"labeled": part(True), "unlabeled": part(False)}
        m = (SemiKDModule(network="mamba_unet", ramp_fraction=0.0) if method == "semikd"
             else Supervised(network="mamba_unet"))
        torch.use_deterministic_algorithms(True)
        torch.utils.deterministic.fill_uninitialized_memory = True
        if not fill:
            relax_deterministic_fill()
        filled = torch.utils.deterministic.fill_uninitialized_memory
        m.train()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = m.training_step(batch, 0)
        loss.backward()
        return filled, loss.detach(), [p.grad.clone() for p in m.parameters() if p.grad is not None]

    before = (torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory)
    try:
        filled_on, loss_on, grads_on = step(True)
        filled_off, loss_off, grads_off = step(False)
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(before[0])
        torch.utils.deterministic.fill_uninitialized_memory = before[1]
    assert filled_on and not filled_off
    assert torch.equal(loss_on, loss_off)
    assert len(grads_on) == len(grads_off) > 10
    assert all(torch.equal(a, b) for a, b in zip(grads_on, grads_off, strict=True))
