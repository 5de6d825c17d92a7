"""End to end through the ``lesion-kd`` command on real Kvasir-SEG data (smoke profile)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import BASE, REPO, lesion_kd, make_folder_dataset, run_dir_of
from PIL import Image

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smoke_fit(tmp_path_factory, data_dir) -> tuple[Path, subprocess.CompletedProcess]:
    root = tmp_path_factory.mktemp("smoke")
    out = lesion_kd("fit", *BASE, "--trainer.default_root_dir", str(root), env_extra={"LESION_KD_DATA": str(data_dir)})
    assert "metrics written to" in out.stdout
    return run_dir_of(root), out


@pytest.fixture(scope="module")
def smoke_run(smoke_fit) -> Path:
    return smoke_fit[0]


def test_help_lists_subcommands():
    out = lesion_kd("--help").stdout
    for cmd in ("fit", "validate", "test", "predict", "cache-teacher", "reproduce-table", "compare"):
        assert f"  {cmd}" in out


def test_fit_options_have_help_strings():
    out = lesion_kd("fit", "--help").stdout
    assert "--data.labeled_fraction" in out and "fraction of the training split that keeps its labels" in out
    model = lesion_kd("fit", "--model.help", "lesion_kd.methods.Supervised").stdout
    assert "--model.network" in model and "registered network name" in model


def test_smoke_fit_writes_checkpoint_config_and_metrics(smoke_run):
    m = json.loads((smoke_run / "metrics.json").read_text())
    assert set(m) >= {"dice", "iou", "hd95", "asd", "n_images", "resolution", "per_image"}
    assert m["n_images"] == 8 and len(m["per_image"]) == 8 and m["resolution"] == "model"
    assert 0.0 <= m["dice"]["mean"] <= 1.0 and m["hd95"]["mean"] > 0
    assert list((smoke_run / "checkpoints").glob("best-*.ckpt")) and (smoke_run / "checkpoints" / "last.ckpt").is_file()
    assert (smoke_run / "config.yaml").is_file() and (smoke_run / "split.json").is_file()


# (issue 31, item 8) lines every run printed and nobody can act on: Lightning's note that tensorboardX is not installed
# (its default logger, which the CLI replaces by a CSVLogger anyway), its advertisement of litlogger, and MONAI's
# warning about an argument MONAI itself passes (its source line, `warn_deprecated(argname, msg, warning_category)`)
NOISE = ("`tensorboardX` has been removed as a dependency", "litlogger", "warn_deprecated(", "always_return_as_numpy")


def test_a_smoke_fit_prints_none_of_the_known_noise(smoke_fit):
    _, out = smoke_fit
    found = [n for n in NOISE if n in out.stderr or n in out.stdout]
    assert not found, f"{found} in the output of a smoke fit:\n{out.stderr[-3000:]}"
    assert "Seed set to 0" in out.stderr  # Lightning's other info lines still come through


def test_metrics_of_overlapping_masks_raise_no_monai_deprecation_warning():
    # the smoke fit's masks may all be empty (no HD95 computed): the metric itself, in a fresh interpreter
    code = ("import numpy as np; from lesion_kd.metrics import image_metrics\n"
            "a = np.zeros((32, 32)); a[4:20, 4:20] = 1; b = np.zeros((32, 32)); b[8:26, 6:24] = 1\n"
            "print(image_metrics(a, b)['hd95'])")
    proc = subprocess.run([sys.executable, "-W", "default", "-c", code], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert float(proc.stdout.split()[-1]) > 0
    assert "Warning" not in proc.stderr, proc.stderr[-3000:]


def test_fit_help_comes_from_the_cache_the_second_time_without_lightning(tmp_path):
    env = {**os.environ, "LESION_KD_CACHE": str(tmp_path)}
    code = ("import sys; from lesion_kd.cli import main\n"
            "try:\n    rc = main(['fit', '--help'])\nexcept SystemExit as e:\n    rc = e.code\n"
            "print('rc', rc, 'lightning' in sys.modules, file=sys.stderr)")
    runs = [subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=300) for _ in range(2)]
    built, again = runs
    assert built.stderr.splitlines()[-1] == "rc 0 True", built.stderr[-3000:]  # built by LightningCLI
    assert "--data.labeled_fraction" in built.stdout and list((tmp_path / "help").glob("fit-*.txt"))
    assert again.stderr.splitlines()[-1] == "rc 0 False", again.stderr[-3000:]  # printed from the cache
    assert again.stdout == built.stdout
    # any other argument (a config changes the defaults shown) builds the help as before
    from lesion_kd.help_cache import cacheable

    assert not cacheable(["fit", "--config", "x.yaml", "--help"]) and cacheable(["test", "-h"])


def test_make_install_builds_every_help_ahead_and_one_text_serves_every_terminal_width(tmp_path):
    # `python -m lesion_kd.commands.help_texts` (make install) builds the four helps in one process; afterwards even the
    # first `lesion-kd fit --help` prints without Lightning, and the text does not depend on $COLUMNS
    env = {**os.environ, "LESION_KD_CACHE": str(tmp_path)}
    warm = subprocess.run([sys.executable, "-m", "lesion_kd.commands.help_texts"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert warm.returncode == 0, warm.stderr[-3000:]
    assert "help of fit, validate, test, predict built" in warm.stdout
    assert sorted(p.name.split("-")[0] for p in (tmp_path / "help").glob("*.txt")) == ["fit", "predict", "test", "validate"]
    again = subprocess.run([sys.executable, "-m", "lesion_kd.commands.help_texts"], cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 0 and again.stdout == ""  # nothing stale: nothing built
    code = ("import sys; sys.argv[0] = 'lesion-kd'; from lesion_kd.cli import main\n"
            "try:\n    rc = main(['fit', '--help'])\nexcept SystemExit as e:\n    rc = e.code\n"
            "print('rc', rc, 'lightning' in sys.modules, file=sys.stderr)")
    texts = []
    for columns in ("60", "200"):
        run = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**env, "COLUMNS": columns},
                             capture_output=True, text=True, timeout=300)
        assert run.stderr.splitlines()[-1] == "rc 0 False", run.stderr[-3000:]
        texts.append(run.stdout)
    assert texts[0] == texts[1] and "--data.labeled_fraction" in texts[0] and texts[0].startswith("usage: lesion-kd")


def test_the_help_cache_key_follows_the_source_files(tmp_path, monkeypatch):
    from lesion_kd import help_cache

    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "a.py").write_text("x = 1\n")
    first = help_cache.key(["fit", "--help"], root=pkg)
    assert help_cache.key(["fit", "--help"], root=pkg) == first
    assert help_cache.key(["test", "--help"], root=pkg) != first
    (pkg / "a.py").write_text("x = 22\n")  # another size (and time)
    assert help_cache.key(["fit", "--help"], root=pkg) != first
    second = help_cache.key(["fit", "--help"], root=pkg)
    (pkg / "b.py").write_text("")
    assert help_cache.key(["fit", "--help"], root=pkg) != second
    monkeypatch.setenv(help_cache.ENV, "0")
    assert not help_cache.cacheable(["fit", "--help"])


def test_test_and_predict_from_the_checkpoint(smoke_run, tmp_path, data_dir):
    ckpt = next((smoke_run / "checkpoints").glob("best-*.ckpt"))
    env = {"LESION_KD_DATA": str(data_dir)}
    out = lesion_kd("test", "--config", str(smoke_run / "config.yaml"), "--ckpt_path", str(ckpt),
                    "--data.eval_original_resolution", "true",
                    "--trainer.default_root_dir", str(tmp_path / "test"), env_extra=env)
    path = Path(out.stdout.split("metrics written to ")[1].split()[0])
    m = json.loads(path.read_text())
    assert m["n_images"] == 8
    orig = json.loads((path.parent / "metrics_original_resolution.json").read_text())
    assert orig["resolution"] == "original" and set(orig["per_image"]) == set(m["per_image"])
    # predict on any folder of images: one mask + one overlay per image, at the image's own size
    folder = tmp_path / "imgs"
    folder.mkdir()
    kv = data_dir / "Kvasir-SEG" / "images"
    names = sorted(os.listdir(kv))[:2]
    for n in names:
        Image.open(kv / n).save(folder / n)
    Image.fromarray(np.zeros((50, 70), np.uint8)).save(folder / "gray.png")
    lesion_kd("predict", "--config", str(smoke_run / "config.yaml"), "--ckpt_path", str(ckpt),
              "--data.predict_input", str(folder), "--predict_output", str(tmp_path / "pred"),
              "--trainer.default_root_dir", str(tmp_path / "predrun"), env_extra=env)
    for n in [*names, "gray.png"]:
        stem = Path(n).stem
        mask = Image.open(tmp_path / "pred" / f"{stem}_mask.png")
        src = Image.open(folder / n)
        assert mask.size == src.size and set(np.unique(np.asarray(mask))) <= {0, 255}
        assert Image.open(tmp_path / "pred" / f"{stem}_overlay.png").size == src.size


def test_wandb_logging_offline_without_credentials(tmp_path, data_dir):
    env = {"LESION_KD_DATA": str(data_dir), "WANDB_API_KEY": "", "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    lesion_kd("fit", *BASE, "--wandb", "true", "--test_after_fit", "false",
              "--trainer.default_root_dir", str(tmp_path), env_extra=env)
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert runs, "no offline W&B run directory written"


def test_user_folder_trains_with_no_registry_entry(tmp_path):
    data = make_folder_dataset(tmp_path / "own", n=24, sizes=((70, 90), (64, 64)))
    out = lesion_kd("fit", "--config", "experiments/method/supervised.yaml", "--config", "experiments/profile/smoke.yaml",
                    "--data.root", str(data), "--data.dataset", "own", "--data.max_train_images", "null",
                    "--trainer.default_root_dir", str(tmp_path / "runs"))
    run = run_dir_of(tmp_path / "runs")
    rec = json.loads((run / "split.json").read_text())
    assert rec["root"] == str(data) and len(rec["test"]) == round(0.2 * 24)
    assert "metrics written to" in out.stdout
    assert not any(p.name == "split.json" for p in data.rglob("*"))


def test_two_process_cpu_ddp_fit(tmp_path, data_dir):
    # 2 labeled images at 10% of 16: one per process, so a labeled batch of 1
    lesion_kd("fit", *BASE, "--trainer.devices", "2", "--trainer.strategy", "ddp", "--data.labeled_batch_size", "1",
              "--trainer.default_root_dir", str(tmp_path), env_extra={"LESION_KD_DATA": str(data_dir)})
    run = run_dir_of(tmp_path)
    m = json.loads((run / "metrics.json").read_text())
    assert m["n_images"] == 8  # per-image metrics gathered from both ranks, duplicates collapsed
    steps = [line.split(",")[1] for line in (run / "metrics.csv").read_text().splitlines()[1:]]
    assert "2" in steps  # it really trained (3 steps), not an epoch without batches


def test_ddp_refuses_a_batch_larger_than_each_process_share(tmp_path, data_dir):
    with pytest.raises(AssertionError, match=r"data.labeled_batch_size=2 is larger than each process's share"):
        lesion_kd("fit", *BASE, "--trainer.devices", "2", "--trainer.strategy", "ddp",
                  "--trainer.default_root_dir", str(tmp_path), env_extra={"LESION_KD_DATA": str(data_dir)})


def test_experiment_file_composes_data_method_and_profile(tmp_path):
    from lesion_kd.cli import expand_configs

    exp = tmp_path / "exp.yaml"
    exp.write_text(f"compose:\n  - {REPO}/experiments/data/busi.yaml\n  - {REPO}/experiments/method/supervised.yaml\n"
                   f"  - {REPO}/experiments/profile/smoke.yaml\ndata:\n  labeled_fraction: 0.2\n")
    out = lesion_kd("fit", "--config", str(exp), "--print_config").stdout
    assert "dataset: busi" in out and "labeled_fraction: 0.2" in out and "max_steps: 3" in out
    assert "lesion_kd.methods.Supervised" in out
    assert expand_configs(["fit", "--config", str(REPO / "experiments/profile/smoke.yaml")])[-1].endswith("smoke.yaml")


def test_supervised_fit_trains_the_mamba_student_by_name(tmp_path, data_dir):
    """... and, with the progress bar off (as reproduce-table's cells run), prints a line per validation."""
    out = lesion_kd("fit", *BASE, "--model.network", "mamba_unet", "--trainer.default_root_dir", str(tmp_path),
                    "--trainer.enable_progress_bar", "false", env_extra={"LESION_KD_DATA": str(data_dir)})
    run = run_dir_of(tmp_path)
    assert "network: mamba_unet" in (run / "config.yaml").read_text()
    assert json.loads((run / "metrics.json").read_text())["n_images"] == 8 and "metrics written to" in out.stdout
    assert re.search(r"^\[val\] step \d+/\d+ \(\d+%\), [\d.]+ min.*val Dice [\d.]+$", out.stdout, re.M), out.stdout[-2000:]


def test_the_command_entry_point_does_not_load_lightning_until_a_lightning_command_runs():
    code = ("import sys; from lesion_kd.cli import main; main(['--help']); "
            "assert 'lightning' not in sys.modules and 'lesion_kd.methods' not in sys.modules, 'loaded'")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, capture_output=True, timeout=120)


def test_the_default_logger_is_csv_even_where_tensorboard_is_installed(tmp_path):
    # Lightning's own default (logger null/true) is TensorBoard when tensorboard is importable (it is on the lent
    # GPU machine, not here): the report's curves, sweeps and resume read metrics.csv, so the CLI makes it CSV.
    from lightning.pytorch import Trainer
    from lightning.pytorch.loggers import CSVLogger, Logger

    from lesion_kd.lightning_cli import csv_unless_configured

    class Other(Logger):  # stands in for TensorBoardLogger, which needs the tensorboard package
        name, version, log_hyperparams, log_metrics = "other", 0, None, None

    for configured in (None, True):
        trainer = Trainer(logger=Other(), default_root_dir=tmp_path, enable_checkpointing=False)
        csv_unless_configured(trainer, configured)
        (lg,) = trainer.loggers
        # a CSVLogger that redacts secrets from hparams.yaml (issue 30, item 8), not Lightning's default
        assert isinstance(lg, CSVLogger) and type(lg).__name__ == "SecretSafeCSVLogger"
        assert Path(lg.log_dir).parent == tmp_path / "lightning_logs"
    named = Other()
    trainer = Trainer(logger=named, default_root_dir=tmp_path, enable_checkpointing=False)
    csv_unless_configured(trainer, {"class_path": "Other"})  # a logger the config names is kept
    assert trainer.loggers == [named]
    trainer = Trainer(logger=False, default_root_dir=tmp_path, enable_checkpointing=False)
    csv_unless_configured(trainer, False)
    assert trainer.loggers == []


@pytest.mark.parametrize("outcome", ["finished", "failed"])
def test_a_lightning_command_destroys_its_process_group_before_the_interpreter_exits(tmp_path, monkeypatch, outcome):
    # left to Lightning's atexit handler, a gloo rank can abort at teardown (-6) after a finished DDP run
    import torch.distributed as dist

    import lesion_kd.lightning_cli as lcli
    from lesion_kd import cli

    def fake_run(args):
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
        assert dist.is_initialized()
        if outcome == "failed":
            raise RuntimeError("training failed")

    monkeypatch.setattr(lcli, "run_lightning", fake_run)
    try:
        if outcome == "failed":
            with pytest.raises(RuntimeError, match="training failed"):
                cli.run_lightning([])
        else:
            assert cli.run_lightning([]) == 0
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
