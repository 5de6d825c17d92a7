"""Fault injection: a run killed with SIGKILL between two checkpoints and resumed with ``--ckpt_path last``
ends bit-identical to an uninterrupted run with the same seed (CPU, 2 data-loader workers, several epochs)."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import REPO, lesion_kd

pytestmark = pytest.mark.slow

# Mean Teacher: labeled + unlabeled streams (the labeled one cycles inside an epoch), an EMA teacher and
# random input noise every step. 16 train images: 2 labeled, 14 unlabeled -> 7 batches an epoch; 24 steps.
RUN = ["--config", "experiments/data/kvasir-seg.yaml", "--config", "experiments/method/mean_teacher.yaml",
       "--config", "experiments/profile/smoke.yaml", "--trainer.max_steps", "24", "--trainer.val_check_interval", "6",
       "--data.num_workers", "2", "--checkpoint.last_every_n_steps", "2", "--trainer.enable_progress_bar", "false"]
KILL_AFTER_STEP = 10


def final_state(root: Path) -> tuple[dict, dict]:
    (last,) = root.rglob("last.ckpt")
    (metrics,) = root.rglob("metrics.json")
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 24
    return ckpt["state_dict"], json.loads(metrics.read_text())


def test_sigkill_mid_epoch_then_resume_is_bit_exact(tmp_path, data_dir):
    env = {**os.environ, "LESION_KD_DATA": str(data_dir), "PYTHONUNBUFFERED": "1"}
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    lesion_kd("fit", *RUN, "--trainer.default_root_dir", str(straight), env_extra=env)

    step_at_kill = kill_after_checkpoint(RUN, killed, env, min_step=KILL_AFTER_STEP)
    (interrupted,) = killed.rglob("last.ckpt")
    assert KILL_AFTER_STEP <= step_at_kill < 24 and not list(killed.rglob("metrics.json"))  # not finished

    out = lesion_kd("fit", *RUN, "--trainer.default_root_dir", str(killed), "--ckpt_path", "last", env_extra=env)
    assert f"--ckpt_path last: resuming {interrupted}" in out.stdout
    # the resume is exact (asserted below), so Lightning's warning that it may not be is silenced (cli.py)
    assert "dataloader is not resumable" not in out.stdout + out.stderr
    # resumed in the same run directory, its CSV log continued: every step's row once
    assert [p.parent.name for p in killed.rglob("config.yaml")] == ["version_0"]
    (log,) = killed.rglob("metrics.csv")
    steps = [int(r["step"]) for r in csv.DictReader(log.open()) if r.get("train/loss")]
    assert steps == sorted(set(steps)) and steps[0] < step_at_kill < steps[-1]

    want_state, want_metrics = final_state(straight)
    got_state, got_metrics = final_state(killed)
    assert want_state.keys() == got_state.keys()
    differing = [k for k in want_state if not torch.equal(want_state[k], got_state[k])]
    assert not differing, f"{len(differing)} tensors differ after resume, e.g. {differing[:5]}"
    for key in ("dice", "iou", "hd95", "asd"):
        assert got_metrics[key] == want_metrics[key], key


# Supervised AdamW/cosine on 8 labeled images: validation Dice moves between validations (every 8 steps),
# so a validation run one step early changes the best checkpoint and metrics.json (issue 30, item 1).
VARYING = ["--config", "experiments/data/kvasir-seg.yaml", "--config", "experiments/method/supervised.yaml",
           "--config", "experiments/profile/smoke.yaml", "--trainer.max_steps", "48", "--trainer.val_check_interval", "8",
           "--checkpoint.last_every_n_steps", "3", "--data.labeled_fraction", "0.5", "--model.optimizer", "adamw",
           "--model.lr", "0.003", "--model.weight_decay", "0.01", "--model.schedule", "cosine",
           "--trainer.enable_progress_bar", "false"]


def kill_after_checkpoint(args: list[str], root: Path, env: dict, min_step: int) -> int:
    """Start ``fit``, SIGKILL it as soon as a periodic last.ckpt at step >= min_step is on disk; that step."""
    proc = subprocess.Popen([sys.executable, "-m", "lesion_kd.cli", "fit", *args, "--trainer.default_root_dir", str(root)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen, deadline = [], time.time() + 300
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("checkpoint: ") and int(line.split(" at step ")[1]) >= min_step:
            proc.send_signal(signal.SIGKILL)
            break
        assert time.time() < deadline, "".join(seen[-50:])
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "".join(seen[-50:])
    (last,) = root.rglob("last.ckpt")
    return int(torch.load(last, map_location="cpu", weights_only=True)["global_step"])


def validations(root: Path) -> list[tuple[int, str]]:
    (log,) = root.rglob("metrics.csv")
    return [(int(r["step"]), r["val/dice"]) for r in csv.DictReader(log.open()) if r.get("val/dice")]


def test_resume_after_a_periodic_save_between_validations_validates_at_the_same_steps(tmp_path, data_dir):
    """A periodic last.ckpt is written before the next batch, when Lightning has already counted that batch;
    resumed from it, the run must validate at the uninterrupted run's steps, keep the same best checkpoint and
    write the same metrics.json (it validated one step early, and picked another best, before the fix)."""
    env = {**os.environ, "LESION_KD_DATA": str(data_dir), "PYTHONUNBUFFERED": "1"}
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    lesion_kd("fit", *VARYING, "--trainer.default_root_dir", str(straight), env_extra=env)
    want = validations(straight)
    assert [s for s, _ in want] == [7, 15, 23, 31, 39, 47]  # logged at the step index of steps 8, 16, ... 48
    assert len({d for _, d in want}) > 1, want  # the premise: Dice differs between validations

    # step 12: between the validations at 8 and 16, and an epoch's first batch (8 labeled images, 2 a batch),
    # where Lightning has also counted a new epoch as started
    step_at_kill = kill_after_checkpoint(VARYING, killed, env, min_step=12)
    assert step_at_kill == 12 and not list(killed.rglob("metrics.json"))
    lesion_kd("fit", *VARYING, "--trainer.default_root_dir", str(killed), "--ckpt_path", "last", env_extra=env)

    assert validations(killed) == want
    best = lambda root: sorted(p.name for p in root.rglob("best-*.ckpt"))  # noqa: E731
    assert best(killed) == best(straight)
    (m_want,), (m_got,) = straight.rglob("metrics.json"), killed.rglob("metrics.json")
    assert json.loads(m_got.read_text()) == json.loads(m_want.read_text())
    (csv_want,), (csv_got,) = straight.rglob("metrics.csv"), killed.rglob("metrics.csv")
    assert csv_got.read_text() == csv_want.read_text()  # every logged row, at the same logging step


def test_ckpt_path_last_without_a_previous_run_starts_a_new_one(tmp_path, data_dir):
    out = lesion_kd("fit", "--config", "experiments/data/kvasir-seg.yaml", "--config", "experiments/method/supervised.yaml",
                    "--config", "experiments/profile/smoke.yaml", "--trainer.default_root_dir", str(tmp_path),
                    "--ckpt_path", "last", "--test_after_fit", "false",
                    env_extra={"LESION_KD_DATA": str(data_dir)})
    assert "no last.ckpt under" in out.stdout and list(tmp_path.rglob("last.ckpt"))


def test_resuming_with_another_model_configuration_is_refused_naming_the_change(tmp_path, data_dir):
    """A run resumed with other model options (or with code that added an option since) would mix two
    trainings in one result: refused before training, naming the options; the run's own config resumes."""
    env = {"LESION_KD_DATA": str(data_dir)}
    base = ["--config", "experiments/data/kvasir-seg.yaml", "--config", "experiments/method/supervised.yaml",
            "--config", "experiments/profile/smoke.yaml", "--trainer.default_root_dir", str(tmp_path),
            "--test_after_fit", "false", "--trainer.max_steps", "2"]
    lesion_kd("fit", *base, env_extra=env)
    args = [*base, "--ckpt_path", "last"]
    proc = subprocess.run([sys.executable, "-m", "lesion_kd.cli", "fit", *args, "--model.lr", "0.5"], cwd=REPO,
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "was trained with another configuration" in proc.stderr, proc.stderr[-2000:]
    assert "model.lr: 0.01 -> 0.5" in proc.stderr
    out = lesion_kd("fit", *args, env_extra=env)  # the same options resume
    assert "resuming" in out.stdout


def test_resuming_another_run_is_refused_listing_seed_data_and_budget(tmp_path, data_dir):
    """Another seed, another labeled fraction or another budget is another run: refused before anything is
    written, naming every differing option; the run's config.yaml and split.json stay as they were. The
    override variable resumes anyway, on purpose."""
    env = {"LESION_KD_DATA": str(data_dir)}
    base = ["--config", "experiments/data/kvasir-seg.yaml", "--config", "experiments/method/supervised.yaml",
            "--config", "experiments/profile/smoke.yaml", "--trainer.default_root_dir", str(tmp_path),
            "--test_after_fit", "false", "--trainer.max_steps", "2"]
    lesion_kd("fit", *base, env_extra=env)
    (run,) = tmp_path.glob("lightning_logs/version_0")
    before = {f: (run / f).read_bytes() for f in ("config.yaml", "split.json")}
    other = ["--ckpt_path", "last", "--seed_everything", "1", "--data.labeled_fraction", "0.2", "--trainer.max_steps", "4"]
    proc = subprocess.run([sys.executable, "-m", "lesion_kd.cli", "fit", *base, *other], cwd=REPO,
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0, proc.stdout[-2000:]
    for change in ("seed_everything: 0 -> 1", "data.labeled_fraction: 0.1 -> 0.2", "trainer.max_steps: 2 -> 4"):
        assert change in proc.stderr, proc.stderr[-2000:]
    assert {f: (run / f).read_bytes() for f in before} == before
    assert sorted(p.name for p in tmp_path.glob("lightning_logs/*")) == ["version_0"]
    out = lesion_kd("fit", *base, *other, env_extra={**env, "LESION_KD_RESUME_CHANGED_CONFIG": "1"})
    assert "resuming" in out.stdout
    assert json.loads((run / "split.json").read_text())["labeled_fraction"] == 0.2  # continued, on purpose


def test_nothing_the_suite_writes_holds_a_secret_and_a_redacted_run_still_resumes(tmp_path, data_dir):
    """Credentials in a URL option value and the value of a *TOKEN* variable never reach config.yaml,
    hparams.yaml, either checkpoint or any other file of the run; resumed from its own (redacted)
    config.yaml, the run resumes: a redacted value is no change."""
    token = "tok-9f8e7d6c5b4a-secret"
    env = {"LESION_KD_DATA": str(data_dir), "LESION_KD_TEST_TOKEN": token}
    url = "https://bob:hunter2-pw@example.org/images/x.png"
    args = ["--config", "experiments/data/kvasir-seg.yaml", "--config", "experiments/method/supervised.yaml",
            "--config", "experiments/profile/smoke.yaml", "--trainer.default_root_dir", str(tmp_path / "runs"),
            "--data.predict_input", url, "--predict_output", f"/tmp/{token}"]
    lesion_kd("fit", *args, env_extra=env)
    files = [f for f in (tmp_path / "runs").rglob("*") if f.is_file()]
    names = {f.name for f in files}
    assert {"config.yaml", "hparams.yaml", "last.ckpt", "metrics.json", "split.json"} <= names
    assert any(n.startswith("best-") for n in names)
    for f in files:
        data = f.read_bytes()
        assert b"hunter2-pw" not in data and token.encode() not in data, f"secret written to {f}"
    (config,) = (tmp_path / "runs").rglob("config.yaml")
    assert "https://<redacted>@example.org/images/x.png" in config.read_text()
    (last,) = (tmp_path / "runs").rglob("last.ckpt")
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    assert ckpt["datamodule_hyper_parameters"]["predict_input"] == "https://<redacted>@example.org/images/x.png"
    out = lesion_kd("fit", "--config", str(config), "--ckpt_path", "last", env_extra=env)
    assert "resuming" in out.stdout


def test_redaction_cuts_url_credentials_and_is_idempotent(monkeypatch):
    from lesion_kd.callbacks import REDACTED, redact_secrets

    monkeypatch.setenv("MY_SERVICE_KEY", "k-0123456789")
    cfg = {"a": "s3://AKIA:xyz@bucket/p", "b": ("plain", "https://h.org/x"), "c": "use k-0123456789 here", "n": 3}
    red = redact_secrets(cfg)
    assert red == {"a": f"s3://{REDACTED}@bucket/p", "b": ("plain", "https://h.org/x"), "c": REDACTED, "n": 3}
    assert red["b"] is cfg["b"] and redact_secrets(red) == red  # untouched values kept as they are; idempotent
    clean = {"x": [1, "y"]}
    assert redact_secrets(clean) is clean


def test_changed_hparams_counts_an_option_the_checkpoint_lacks(tmp_path):
    from lesion_kd.lightning_cli import changed_hparams

    ckpt = tmp_path / "c.ckpt"
    torch.save({"hyper_parameters": {"lr": 0.01, "network_kwargs": {"channels": (8, 16)}, "_instantiator": "x"}}, ckpt)
    assert changed_hparams(ckpt, {"lr": 0.01, "network_kwargs": {"channels": [8, 16]}, "_instantiator": "y"}) == []
    assert changed_hparams(ckpt, {"lr": 0.01, "network_kwargs": {"channels": [8, 16]}, "map_centered": True}) == [
        "model.map_centered: (absent) -> True"]


def test_an_added_option_at_its_neutral_value_does_not_block_a_resume(tmp_path):
    """An option added since the checkpoint, whose value trains as before it existed (SemiKD's relational
    term at weight 0), resumes; any other value of it, or an added option not declared neutral, does not."""
    from lesion_kd.lightning_cli import changed_hparams
    from lesion_kd.methods import SemiKDModule

    ckpt = tmp_path / "c.ckpt"
    torch.save({"hyper_parameters": {"lr": 0.01}}, ckpt)
    neutral = SemiKDModule.NEUTRAL_ADDED_OPTIONS
    assert changed_hparams(ckpt, {"lr": 0.01, "map_relation_weight": 0.0}, neutral) == []
    assert changed_hparams(ckpt, {"lr": 0.01, "map_relation_weight": 1.0}, neutral) == [
        "model.map_relation_weight: (absent) -> 1.0"]
    assert changed_hparams(ckpt, {"lr": 0.01, "map_relation_weight": 0.0}) == [
        "model.map_relation_weight: (absent) -> 0.0"]
    assert changed_hparams(ckpt, {"lr": 0.01, "map_centered": True}, neutral) == ["model.map_centered: (absent) -> True"]


def test_resumed_run_continues_its_wandb_run(tmp_path, data_dir):
    env = {"LESION_KD_DATA": str(data_dir), "WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_API_KEY": ""}
    args = ["--config", "experiments/data/kvasir-seg.yaml", "--config", "experiments/method/supervised.yaml",
            "--config", "experiments/profile/smoke.yaml", "--trainer.default_root_dir", str(tmp_path), "--wandb", "true",
            "--wandb_num_images", "0", "--test_after_fit", "false"]
    lesion_kd("fit", *args, "--trainer.max_steps", "2", env_extra=env)
    (id_file,) = tmp_path.rglob("wandb_id.txt")
    run_id = id_file.read_text().strip()
    # a longer budget is another run: continued on purpose
    lesion_kd("fit", *args, "--trainer.max_steps", "4", "--ckpt_path", "last",
              env_extra={**env, "LESION_KD_RESUME_CHANGED_CONFIG": "1"})
    runs = sorted(p.name for p in (tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.endswith(f"-{run_id}") for r in runs), runs
    assert id_file.read_text().strip() == run_id


def test_committed_resumed_cells_validated_at_their_profile_multiples():
    """Every committed cell marked resumed (timing.json) validated at its own val_check_interval's multiples and
    logged its training loss on its logging grid: none of them resumed from a periodic save taken before the
    fix above (which would have shifted both by one step), so none needs a rerun."""
    import yaml

    results = REPO / "experiments" / "results"
    checked = 0
    for timing in sorted(results.rglob("timing.json")):
        run = timing.parent
        if not json.loads(timing.read_text()).get("resumed") or not (run / "metrics.csv").is_file():
            continue
        trainer = yaml.safe_load((run / "config.yaml").read_text())["trainer"]
        every, log_every = int(trainer["val_check_interval"]), int(trainer["log_every_n_steps"])
        rows = list(csv.DictReader((run / "metrics.csv").open()))
        val = [int(r["step"]) for r in rows if r.get("val/dice")]
        train = [int(r["step"]) for r in rows if r.get("train/loss")]
        assert val and all((s + 1) % every == 0 for s in val), (run, val)
        assert train and all((s + 1) % log_every == 0 for s in train), (run, train[:10])
        checked += 1
    assert checked >= 8  # the table's resumed cells (report: "8 resumed cell(s)")
