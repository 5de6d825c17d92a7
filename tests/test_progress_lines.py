"""ProgressLines: where the progress bar is off, a line per validation and every few minutes of training."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from lesion_kd.callbacks import ProgressLines


def fake_trainer(step, metrics, fn="fit", sanity=False, rank0=True):
    return SimpleNamespace(global_step=step, max_steps=2000, is_global_zero=rank0, callback_metrics=metrics,
                           sanity_checking=sanity, state=SimpleNamespace(fn=fn), estimated_stepping_batches=2000)


def test_a_validation_line_has_step_time_left_loss_and_dice(monkeypatch, capsys):
    clock = iter([100.0, 100.0 + 600.0])  # train start, then 10 minutes later
    monkeypatch.setattr("lesion_kd.callbacks.time.monotonic", lambda: next(clock))
    cb = ProgressLines()
    cb.on_train_start(fake_trainer(500, {}), None)  # resumed at step 500
    metrics = {"train/loss": torch.tensor(0.4123), "val/dice": torch.tensor(0.5678)}
    cb.on_validation_end(fake_trainer(750, metrics), None)
    out = capsys.readouterr().out.strip()
    # 250 steps in 10 min since the resume: 1250 steps left take 50 min
    assert out == "[val] step 750/2000 (38%), 10.0 min, about 50 min left, loss 0.4123, val Dice 0.5678"


def test_no_line_during_sanity_checks_tests_or_on_other_ranks(capsys):
    cb = ProgressLines()
    cb.on_train_start(fake_trainer(0, {}), None)
    cb.on_validation_end(fake_trainer(0, {}, sanity=True), None)
    cb.on_validation_end(fake_trainer(0, {}, fn="test"), None)
    cb.on_validation_end(fake_trainer(10, {}, rank0=False), None)
    assert capsys.readouterr().out == ""


def test_training_lines_come_every_few_minutes(monkeypatch, capsys):
    now = [0.0]
    monkeypatch.setattr("lesion_kd.callbacks.time.monotonic", lambda: now[0])
    cb = ProgressLines(minutes=5)
    cb.on_train_start(fake_trainer(0, {}), None)
    for step, t in ((1, 60.0), (2, 299.0), (3, 301.0), (4, 400.0), (5, 602.0)):
        now[0] = t
        cb.on_train_batch_end(fake_trainer(step, {}), None)
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split(",")[0] for ln in lines] == ["[train] step 3/2000 (0%)", "[train] step 5/2000 (0%)"]
