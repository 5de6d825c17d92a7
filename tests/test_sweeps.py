"""W&B logging and sweeps: the sweep files are valid W&B sweeps whose command lines the CLI accepts, the local
runner (``lesion-kd sweep``) runs and tabulates them offline, and the W&B logger writes the resolved config
(secrets redacted), per-step metrics, prediction images and the checkpoint artifact."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lesion_kd.callbacks import REDACTED, argv_has_secret, redact_secrets
from lesion_kd.commands import sweep as sweep_cmd

REPO = Path(__file__).resolve().parents[1]
SWEEP_FILES = sorted((REPO / "experiments" / "sweeps").glob("*.yaml"))
# the agent runs `${env} lesion-kd ...`; in-process we call the same entry point with what follows
PROGRAM_PREFIX = ["/usr/bin/env", "lesion-kd"]


def proposals(cfg: dict, n: int) -> list[dict]:
    """Up to ``n`` proposals of the sweep's own algorithm, each fed back as finished with a fake metric."""
    sweeps = sweep_cmd.import_sweeps()

    runs, out = [], []
    for i in range(n):
        values = sweep_cmd.propose(cfg, runs, seed=i)
        if values is None:
            break
        out.append(values)
        runs.append(sweeps.SweepRun(name=f"r{i}", state="finished", config={k: {"value": v} for k, v in values.items()},
                                    history=[{"val/dice": 0.1 * (i % 5)}]))
    return out


def test_sweep_files_exist_for_the_loss_weights_and_the_perturbation():
    assert {p.name for p in SWEEP_FILES} >= {"loss_weights.yaml", "perturbation.yaml"}


@pytest.mark.parametrize("path", SWEEP_FILES, ids=lambda p: p.name)
def test_every_sweep_file_is_a_valid_wandb_sweep_config(path):
    sweeps = sweep_cmd.import_sweeps()

    cfg = yaml.safe_load(path.read_text())
    assert sweeps.schema_violations_from_proposed_config(cfg) == []
    assert cfg["metric"] == {"name": "val/dice", "goal": "maximize"}
    cmd = [str(c) for c in cfg["command"]]
    assert cmd[-1] == "${args}" and cmd[:3] == ["${env}", "lesion-kd", "fit"]
    configs = [cmd[i + 1] for i, a in enumerate(cmd) if a == "--config"]
    assert configs == ["experiments/data/kvasir-seg.yaml", "experiments/method/semikd.yaml",
                       "experiments/profile/cpu.yaml"]
    assert all((REPO / c).is_file() for c in configs)
    assert cmd[cmd.index("--wandb") + 1] == "true"
    assert all(name.startswith("model.") for name in cfg["parameters"])
    assert sweep_cmd.load_sweep_config(path) == cfg


def test_sweep_methods_and_search_spaces():
    lw = yaml.safe_load((REPO / "experiments/sweeps/loss_weights.yaml").read_text())
    assert lw["method"] == "bayes"
    assert set(lw["parameters"]) == {"model.lambda_kd", "model.lambda_dss", "model.beta", "model.ramp_fraction"}
    assert 0 <= lw["parameters"]["model.ramp_fraction"]["min"] < lw["parameters"]["model.ramp_fraction"]["max"] <= 1
    pt = yaml.safe_load((REPO / "experiments/sweeps/perturbation.yaml").read_text())
    assert pt["method"] == "grid"
    assert pt["parameters"]["model.perturbation"]["values"] == ["noise", "channel_dropout", "feature_drop"]
    grid = proposals(pt, 20)
    assert len(grid) == 9 and len({tuple(sorted(g.items())) for g in grid}) == 9


def test_an_invalid_sweep_file_is_refused_naming_file_and_problem(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: bayes\nparameters:\n  model.lr: {min: 2}\nsurprise: 1\ncommand: [x]\n")
    with pytest.raises(SystemExit, match=r"bad.yaml: not a valid W&B sweep config(.|\n)*surprise"):
        sweep_cmd.load_sweep_config(bad)
    with pytest.raises(SystemExit, match="unknown macro"):
        sweep_cmd.expand_command({"command": ["${interpreter}", "${argz}"]}, {})


def test_args_macros_are_formatted_exactly_as_the_wandb_agent_does():
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

    values = {"model.lambda_kd": 0.123456789, "model.perturbation": "noise", "model.use_dss": False, "n": 3}
    ours = sweep_cmd.command_args(values)
    theirs = create_sweep_command_args({"args": {k: {"value": v} for k, v in values.items()}})
    for key, expansion in ours.items():
        assert expansion == theirs[key], key
    cmd = sweep_cmd.expand_command({"program": "lesion_kd/cli.py", "command": [
        "${env}", "${interpreter}", "${program}", "--x", "${envvar:LESION_KD_SWEEP_TEST}", "${args}"]},
        {"model.beta": 0.5})
    assert cmd[-3:] == ["--x", os.environ.get("LESION_KD_SWEEP_TEST", "LESION_KD_SWEEP_TEST"), "--model.beta=0.5"]
    assert cmd[cmd.index(sys.executable) + 1] == "lesion_kd/cli.py"


def test_finished_runs_are_fed_back_with_their_metric_history():
    records = [{"run": "run-001", "values": {"model.beta": 0.5}, "result": {"state": "finished", "metric_history": [0.2, 0.4]}},
               {"run": "run-002", "values": {"model.beta": 2.0}, "result": {"state": "failed", "metric_history": []}},
               {"run": "run-003", "values": {"model.beta": 1.0}}]  # interrupted: re-run, not fed
    runs = sweep_cmd.sweep_runs(records, {"metric": {"name": "val/dice"}})
    assert [r.name for r in runs] == ["run-001", "run-002"]
    assert runs[0].metric_extremum("val/dice", "maximum") == 0.4 and runs[1].state == "failed"
    assert runs[0].config == {"model.beta": {"value": 0.5}}


def test_profile_swap_replaces_only_the_profile_config():
    cmd = ["lesion-kd", "fit", "--config", "experiments/data/kvasir-seg.yaml", "--config", "experiments/profile/cpu.yaml"]
    assert sweep_cmd.swap_profile(cmd, "smoke")[-1] == str(Path("experiments/profile/smoke.yaml"))
    assert sweep_cmd.swap_profile(cmd, "smoke")[3] == "experiments/data/kvasir-seg.yaml"
    with pytest.raises(SystemExit, match="--profile nope"):
        sweep_cmd.swap_profile(cmd, "nope")


FAKE_TRAINING = """
import pathlib, sys
args = dict(a.split("=", 1) for a in sys.argv[1:] if "=" in a)
x = float(args["--x"])
if x > 0.9:
    sys.exit(3)
run = pathlib.Path(sys.argv[sys.argv.index("--trainer.default_root_dir") + 1]) / "lightning_logs" / "version_0"
run.mkdir(parents=True)
(run / "metrics.csv").write_text(f"step,val/dice,train/loss\\n1,,0.5\\n2,{x / 2},\\n4,{x},\\n")
"""


def test_runner_records_failures_resumes_an_interrupted_run_and_stops_when_the_grid_is_exhausted(tmp_path, capsys):
    """The local runner's bookkeeping, with a stand-in training script (no real training)."""
    script = tmp_path / "train.py"
    script.write_text(FAKE_TRAINING)
    sweep = tmp_path / "grid.yaml"
    sweep.write_text(yaml.safe_dump({
        "method": "grid", "metric": {"name": "val/dice", "goal": "maximize"}, "program": str(script),
        "parameters": {"x": {"values": [0.2, 0.95, 0.6]}}, "command": ["${interpreter}", "${program}", "${args}"]}))
    out = tmp_path / "out"
    assert sweep_cmd.main([str(sweep), "--count", "2", "--out", str(out)]) == 0
    res = [json.loads((out / f"run-00{i}" / "result.json").read_text()) for i in (1, 2)]
    assert res[0]["state"] == "finished" and res[0]["metric_history"] == [0.1, 0.2] and res[0]["metric_best"] == 0.2
    assert res[1]["state"] == "failed" and res[1]["returncode"] == 3 and "FAILED (exit 3)" in capsys.readouterr().out

    # an interrupted run (proposal written, no result) is run again with its own parameters, nothing else
    rec = json.loads((out / "run-002" / "proposal.json").read_text())
    (out / "run-003").mkdir()
    cmd = [c.replace("run-002", "run-003").replace("--x=0.95", "--x=0.6") for c in rec["command"]]
    (out / "run-003" / "proposal.json").write_text(json.dumps({"run": "run-003", "values": {"x": 0.6}, "command": cmd}))
    mtime = (out / "run-001" / "result.json").stat().st_mtime_ns
    assert sweep_cmd.main([str(sweep), "--count", "5", "--out", str(out)]) == 0
    log = capsys.readouterr().out
    assert "run 3/5 run-003: x=0.6" in log and "the grid is exhausted after 3 runs" in log
    assert (out / "run-001" / "result.json").stat().st_mtime_ns == mtime
    with (out / "sweep_results.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["run"], r["state"], r["x"], r["val/dice (best)"]) for r in rows] == [
        ("run-001", "finished", "0.2", "0.2"), ("run-002", "failed", "0.95", ""), ("run-003", "finished", "0.6", "0.6")]
    assert "Best: run-003" in (out / "sweep_results.md").read_text()

    # a sweep directory keeps one search space
    sweep.write_text(sweep.read_text().replace("0.6", "0.7"))
    with pytest.raises(SystemExit, match="different sweep config"):
        sweep_cmd.main([str(sweep), "--count", "4", "--out", str(out)])


@pytest.mark.slow
@pytest.mark.parametrize("path", SWEEP_FILES, ids=lambda p: p.name)
def test_every_proposed_command_line_is_accepted_by_the_cli(path, capsys, monkeypatch):
    """Each command the sweep would run parses (``--print_config``) and carries the proposed values."""
    from lesion_kd.cli import main

    monkeypatch.chdir(REPO)
    cfg = sweep_cmd.load_sweep_config(path)
    drawn = proposals(cfg, 9 if cfg["method"] == "grid" else 4)
    assert drawn
    for values in drawn:
        cmd = sweep_cmd.expand_command(cfg, values)
        assert cmd[:2] == PROGRAM_PREFIX
        with pytest.raises(SystemExit) as e:
            main([*cmd[2:], "--print_config"])
        assert e.value.code in (0, None)
        printed = yaml.safe_load(capsys.readouterr().out)
        init = printed["model"]["init_args"]
        assert printed["model"]["class_path"] == "lesion_kd.methods.SemiKDModule" and printed["wandb"] is True
        for name, v in values.items():
            got = init[name.removeprefix("model.")]
            assert (math.isclose(got, v, rel_tol=1e-12) if isinstance(v, float) else got == v), (name, got, v)
    # and the literal command line (/usr/bin/env lesion-kd ...) as the agent would start it
    cmd = sweep_cmd.expand_command(cfg, drawn[-1])
    proc = subprocess.run([*cmd, "--print_config"], cwd=REPO, env=sweep_cmd.run_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    init = yaml.safe_load(proc.stdout)["model"]["init_args"]
    assert {k: init[k.removeprefix("model.")] for k in drawn[-1]} == pytest.approx(drawn[-1])


@pytest.mark.slow
def test_local_sweep_runs_two_configs_offline_and_tabulates_them(tmp_path, data_dir):
    from helpers import lesion_kd

    out = tmp_path / "sweep"
    env = {"LESION_KD_DATA": str(data_dir), "WANDB_SILENT": "true", "WANDB_API_KEY": ""}
    args = ("sweep", "experiments/sweeps/loss_weights.yaml", "--count", "2", "--profile", "smoke", "--out", str(out))
    log = lesion_kd(*args, env_extra=env, timeout=900).stdout
    assert "[sweep] run 1/2" in log and "[sweep] run 2/2" in log
    with (out / "sweep_results.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and all(r["state"] == "finished" for r in rows)
    params = ["model.lambda_kd", "model.lambda_dss", "model.beta", "model.ramp_fraction"]
    assert len({tuple(r[p] for p in params) for r in rows}) == 2  # two different configs
    for r in rows:
        assert 0.0 <= float(r["val/dice (best)"]) <= 1.0 and 0.0 <= float(r["test/dice"]) <= 1.0
        run = Path(r["run_dir"])
        proposal = json.loads((run / "proposal.json").read_text())
        assert "--profile" not in proposal["command"] and str(Path("experiments/profile/smoke.yaml")) in proposal["command"]
        # the proposed values reached the model, and W&B logged offline beside the run
        hp = yaml.safe_load(next(run.glob("lightning_logs/version_*/config.yaml")).read_text())["model"]["init_args"]
        assert all(hp[p.removeprefix("model.")] == pytest.approx(float(r[p])) for p in params)
        assert list((run / "wandb").glob("offline-run-*"))
    md = (out / "sweep_results.md").read_text()
    table_rows = [ln for ln in md.splitlines() if ln.startswith("| ") and "run-00" in ln]
    assert len(table_rows) == 2 and "Best: run-00" in md

    # resumable: finished runs are not redone; a larger count proposes only the missing run
    logs = {p: p.stat().st_mtime_ns for p in out.glob("run-*/output.log")}
    again = lesion_kd(*args, env_extra=env).stdout
    assert "2 run(s) done (0 failed)" in again and "[sweep] run " not in again
    assert {p: p.stat().st_mtime_ns for p in out.glob("run-*/output.log")} == logs
    dry = lesion_kd(*args[:3], "3", *args[4:], "--dry_run", env_extra=env).stdout
    assert len([ln for ln in dry.splitlines() if ln.startswith("/usr/bin/env lesion-kd fit")]) == 1
    assert "run-003" in dry and not (out / "run-003").exists()


# ------------------------------------------------------------------------------------------- W&B logging
def test_secret_looking_values_are_redacted(monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "0123456789abcdef-secret")
    cfg = {"data": {"root": "/data/x", "predict_input": "0123456789abcdef-secret"}, "api_key": "k",
           "model": {"init_args": {"token": "abc", "lr": 0.1, "network_kwargs": None}}, "list": ["a", "0123456789abcdef-secret"]}
    red = redact_secrets(cfg)
    assert red["data"] == {"root": "/data/x", "predict_input": REDACTED} and red["api_key"] == REDACTED
    assert red["model"]["init_args"] == {"token": REDACTED, "lr": 0.1, "network_kwargs": None}
    assert red["list"] == ["a", REDACTED]
    assert argv_has_secret(["fit", "--x", "0123456789abcdef-secret"]) and argv_has_secret(["--api_key=abc"])
    assert not argv_has_secret(["fit", "--config", "a.yaml", "--wandb", "true"])


def wandb_records(path: Path) -> list:
    """Records of an offline ``run-*.wandb`` file (LevelDB log format: 32 KiB blocks, 7-byte record headers)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block, pos, part, out = path.read_bytes(), 32768, 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer padding
            pos += left
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        payload, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 1:
            out.append(payload)
        elif kind == 2:
            part = payload
        elif kind == 3:
            part += payload
        elif kind == 4:
            out.append(part + payload)
    return [pb.Record.FromString(p) for p in out]


@pytest.mark.slow
def test_wandb_run_gets_resolved_config_metrics_images_and_checkpoint_without_secrets(tmp_path, data_dir):
    from helpers import BASE, lesion_kd

    secret = "s3cr3t-value-of-a-token-0042"
    env = {"LESION_KD_DATA": str(data_dir), "WANDB_API_KEY": "", "WANDB_MODE": "offline", "WANDB_SILENT": "true",
           "LESION_KD_TEST_TOKEN": secret}
    lesion_kd("fit", *BASE, "--wandb", "true", "--wandb_log_model", "true", "--wandb_num_images", "3",
              "--data.predict_input", secret, "--test_after_fit", "false", "--trainer.default_root_dir", str(tmp_path),
              env_extra=env)
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    for f in run_dir.rglob("*"):
        assert not f.is_file() or secret.encode() not in f.read_bytes(), f"secret written to {f}"
    records = wandb_records(next(run_dir.glob("run-*.wandb")))
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run.display_name == "kvasir-seg-supervised-unet-10pct-seed0"
    config = {u.key: json.loads(u.value_json) for u in run.config.update}
    assert config["model"]["class_path"] == "lesion_kd.methods.Supervised"
    assert config["trainer"]["max_steps"] == 3 and config["data"]["image_size"] == 64
    assert config["data"]["predict_input"] == REDACTED and config["wandb"] is True
    history = [{i.key or "/".join(i.nested_key): i.value_json for i in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]
    assert sum("train/loss" in h for h in history) == 3  # every step (smoke: log_every_n_steps 1)
    assert any("val/dice" in h for h in history)
    (images,) = [h for h in history if "val/predictions/_type" in h]
    assert json.loads(images["val/predictions/count"]) == 3
    masks = json.loads(images["val/predictions/all_masks"])
    assert len(masks) == 3 and all(set(m) == {"prediction", "ground_truth"} for m in masks)
    assert len(list((run_dir / "files" / "media" / "images" / "val").glob("predictions_*.png"))) == 3
    artifacts = [r.artifact for r in records if r.WhichOneof("record_type") == "artifact"]
    assert any(a.type == "model" and "best" in a.aliases for a in artifacts)
