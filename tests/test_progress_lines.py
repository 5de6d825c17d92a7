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


# ------------------------------------------------------------------ ProgressFile and the sweep's progress (issue 31, item 8)
def test_the_progress_file_holds_step_total_loss_and_dice_and_is_throttled(tmp_path, monkeypatch):
    import json

    from lesion_kd.callbacks import ProgressFile

    now = [0.0]
    monkeypatch.setattr("lesion_kd.callbacks.time.monotonic", lambda: now[0])
    path = tmp_path / "run" / "progress.json"
    cb = ProgressFile(path, seconds=2.0)
    cb.on_train_start(fake_trainer(0, {}), None)
    assert json.loads(path.read_text())["stage"] == "train"
    now[0] = 1.0
    cb.on_train_batch_end(fake_trainer(1, {"train/loss": torch.tensor(0.5)}), None)
    assert json.loads(path.read_text())["step"] == 0  # within 2 s of the last write: not rewritten
    now[0] = 2.5
    cb.on_train_batch_end(fake_trainer(2, {"train/loss": torch.tensor(0.5)}), None)
    doc = json.loads(path.read_text())
    assert (doc["step"], doc["total"], doc["loss"]) == (2, 2000, 0.5) and "val_dice" not in doc
    cb.on_validation_end(fake_trainer(3, {"train/loss": torch.tensor(0.25), "val/dice": torch.tensor(0.75)}), None)
    doc = json.loads(path.read_text())
    assert (doc["stage"], doc["step"], doc["loss"], doc["val_dice"]) == ("train", 3, 0.25, 0.75)
    cb.on_test_start(fake_trainer(2000, {}, fn="test"), None)
    assert json.loads(path.read_text())["stage"] == "test"
    assert cb.write(fake_trainer(5, {}, rank0=False), "train") is None  # rank 0 only
    assert [p.name for p in path.parent.iterdir()] == ["progress.json"]  # no temporary file left


def test_sweep_progress_lines_on_a_log_file(tmp_path, monkeypatch, capsys):
    import json

    from lesion_kd.commands.sweep import RunProgress

    now = [0.0]
    monkeypatch.setattr("lesion_kd.commands.sweep.time.monotonic", lambda: now[0])
    path = tmp_path / "progress.json"
    progress = RunProgress("run-001", path, minutes=5, tty=False)
    assert progress.poll() is None  # starting: nothing to say yet
    now[0] = 30.0
    path.write_text(json.dumps({"stage": "train", "step": 0, "total": 2000}))
    assert progress.poll() == "[sweep] run-001: training, step 0/2000 (0%), 0.5 min"
    now[0] = 60.0
    path.write_text(json.dumps({"stage": "train", "step": 100, "total": 2000, "loss": 0.5}))
    assert progress.poll() is None  # same stage, no new validation, not 5 minutes yet
    now[0] = 120.0
    path.write_text(json.dumps({"stage": "train", "step": 250, "total": 2000, "loss": 0.25, "val_dice": 0.5}))
    assert progress.poll() == "[sweep] run-001: training, step 250/2000 (12%), 2.0 min, loss 0.2500, val Dice 0.5000"
    now[0] = 420.0  # 5 minutes since the last line
    path.write_text(json.dumps({"stage": "train", "step": 900, "total": 2000, "loss": 0.2, "val_dice": 0.5}))
    assert progress.poll().startswith("[sweep] run-001: training, step 900/2000 (45%), 7.0 min")
    path.write_text(json.dumps({"stage": "test", "step": 2000, "total": 2000, "loss": 0.1, "val_dice": 0.6}))
    assert progress.poll().startswith("[sweep] run-001: testing, step 2000/2000 (100%)")
    progress.close()
    assert capsys.readouterr().out.count("[sweep] run-001:") == 4


def test_sweep_shows_a_running_runs_progress(tmp_path, monkeypatch, capsys):
    """The runner hands each run a progress file ($LESION_KD_PROGRESS_FILE) and shows what the run writes there."""
    import yaml

    from lesion_kd.commands import sweep as sweep_cmd

    script = tmp_path / "train.py"
    script.write_text(
        "import json, os, pathlib, sys, time\n"
        "p = pathlib.Path(os.environ['LESION_KD_PROGRESS_FILE'])\n"
        "p.write_text(json.dumps({'stage': 'train', 'step': 5, 'total': 10, 'loss': 0.5, 'val_dice': 0.25}))\n"
        "time.sleep(2.5)\n"
        "run = pathlib.Path(sys.argv[sys.argv.index('--trainer.default_root_dir') + 1]) / 'lightning_logs' / 'version_0'\n"
        "run.mkdir(parents=True)\n"
        "(run / 'metrics.csv').write_text('step,val/dice\\n5,0.25\\n')\n")
    sweep = tmp_path / "grid.yaml"
    sweep.write_text(yaml.safe_dump({
        "method": "grid", "metric": {"name": "val/dice", "goal": "maximize"}, "program": str(script),
        "parameters": {"x": {"values": [0.2]}}, "command": ["${interpreter}", "${program}", "${args}"]}))
    monkeypatch.setattr(sweep_cmd, "POLL_SECONDS", 0.2)
    monkeypatch.setattr("sys.stderr.isatty", lambda: False, raising=False)
    assert sweep_cmd.main([str(sweep), "--count", "1", "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "[sweep] run-001: training, step 5/10 (50%)" in out and "loss 0.5000, val Dice 0.2500" in out, out


def test_sweep_progress_bar_on_a_terminal(tmp_path):
    import json

    from lesion_kd.commands.sweep import RunProgress

    path = tmp_path / "progress.json"
    progress = RunProgress("run-002", path, tty=True)
    assert progress.poll() is None and progress.bar.total is None
    path.write_text(json.dumps({"stage": "train", "step": 40, "total": 160, "loss": 0.5, "val_dice": 0.25}))
    progress.poll()
    assert (progress.bar.n, progress.bar.total) == (40, 160)
    assert progress.bar.postfix == "training, loss 0.5000, val Dice 0.2500"
    progress.close()
