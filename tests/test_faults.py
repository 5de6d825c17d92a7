"""Bad input and faults a new user meets (issue 30): each gets one clear message naming the file or option, exit
status 2 and no traceback (``LESION_KD_DEBUG=1`` shows it), or is repaired with a warning."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
from helpers import REPO

from lesion_kd.data import DataError, LesionDataModule
from lesion_kd.data.prep import entry_path, load_canonical

SMOKE = ["--config", "experiments/data/kvasir-seg.yaml", "--config", "experiments/method/supervised.yaml",
         "--config", "experiments/profile/smoke.yaml"]


def fails(*args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``lesion-kd ARGS`` expecting a user error: exit status 2."""
    env = {**os.environ, **(env_extra or {})}
    env.pop("LESION_KD_DEBUG", None)
    env.update(env_extra or {})
    proc = subprocess.run([sys.executable, "-m", "lesion_kd.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2, f"{proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


def one_message(proc: subprocess.CompletedProcess) -> str:
    """The error: no traceback, no usage dump; the message line itself."""
    assert "Traceback" not in proc.stderr and "usage:" not in proc.stderr, proc.stderr[-3000:]
    (line,) = [ln for ln in proc.stderr.splitlines() if "error:" in ln]
    assert "LESION_KD_DEBUG=1" in proc.stderr
    return line


# ------------------------------------------------------------------------------------ item 3: image cache
def test_a_truncated_image_cache_entry_is_rebuilt_with_a_warning(folder_dataset, tmp_path):
    dm = LesionDataModule(dataset=str(folder_dataset), image_size=32, cache_dir=str(tmp_path / "c"), num_workers=0,
                          labeled_fraction=0.5, labeled_batch_size=1)
    dm.setup()
    sample = dm.splits["train"][0]
    good = load_canonical(sample, 32, tmp_path / "c")
    path = entry_path(tmp_path / "c", sample, 32)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # a zip cut in the middle
    with pytest.warns(RuntimeWarning, match=rf"{path.name}: damaged cache entry .*BadZipFile.*rebuilt"):
        again = load_canonical(sample, 32, tmp_path / "c")
    assert np.array_equal(again.image, good.image) and np.array_equal(again.mask, good.mask)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # repaired on disk: read without a warning now
        load_canonical(sample, 32, tmp_path / "c")


# ------------------------------------------------------------------------------------ item 4: divergence
def test_a_diverging_run_stops_with_a_clear_error_and_writes_no_result(tmp_path, data_dir):
    proc = fails("fit", *SMOKE, "--model.lr", "1000", "--trainer.max_steps", "6", "--trainer.default_root_dir",
                 str(tmp_path), env_extra={"LESION_KD_DATA": str(data_dir)})
    line = one_message(proc)
    assert "training diverged at step" in line and "--max_loss_ratio 100" in line, line
    assert not list(tmp_path.rglob("metrics.json"))


def test_mean_teacher_with_an_absurd_consistency_weight_stops(tmp_path, data_dir):
    proc = fails("fit", "--config", "experiments/data/kvasir-seg.yaml", "--config", "experiments/method/mean_teacher.yaml",
                 "--config", "experiments/profile/smoke.yaml", "--model.consistency", "1e9", "--trainer.default_root_dir",
                 str(tmp_path), env_extra={"LESION_KD_DATA": str(data_dir)})
    assert "training diverged at step 0" in one_message(proc)
    assert not list(tmp_path.rglob("metrics.json"))


# ------------------------------------------------------------------------------- items 5, 6: messages
def test_malformed_yaml_is_named_with_its_line(tmp_path):
    bad = tmp_path / "exp.yaml"
    bad.write_text("trainer:\n  max_steps: 3\nmodel: {class_path: x\n")
    line = one_message(fails("fit", "--config", str(bad)))
    assert f"{bad}:4:1: not valid YAML" in line, line


def test_a_data_error_and_an_option_error_are_one_message_and_exit_2(tmp_path, data_dir):
    env = {"LESION_KD_DATA": str(data_dir)}
    (tmp_path / "empty" / "images").mkdir(parents=True)
    line = one_message(fails("fit", *SMOKE, "--data.dataset", str(tmp_path / "empty"), env_extra=env))
    assert "empty folder" in line and str(tmp_path / "empty" / "images") in line
    assert "model.lr=-1.0: must be positive" in one_message(fails("fit", *SMOKE, "--model.lr", "-1", env_extra=env))
    line = one_message(fails("fit", *SMOKE, "--model.network", "unetz", env_extra=env))
    assert "unknown network 'unetz'; registered networks:" in line and "mamba_unet" in line
    debug = subprocess.run([sys.executable, "-m", "lesion_kd.cli", "fit", *SMOKE, "--model.lr", "-1"], cwd=REPO,
                           env={**os.environ, **env, "LESION_KD_DEBUG": "1"}, capture_output=True, text=True, timeout=300)
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "model.lr=-1.0" in debug.stderr


def test_a_bug_keeps_its_traceback():
    from lesion_kd.errors import find_user_error

    assert find_user_error(RuntimeError("boom")) is None
    assert find_user_error(ValueError("prediction (3,) and target (4,) must be the same")) is None
    try:
        try:
            raise ValueError("model.lr=-1.0: must be positive")
        except ValueError as inner:
            raise ValueError("Does not validate against any of the Union subtypes") from inner
    except ValueError as outer:
        assert str(find_user_error(outer)) == "model.lr=-1.0: must be positive"


# ------------------------------------------------------------------------------------ item 7: data.root
def test_a_missing_root_is_named_not_the_dataset(tmp_path):
    with pytest.raises(DataError, match=r"^data.root=/nonexistent/x: no such folder$"):
        LesionDataModule(dataset="mydata", root="/nonexistent/x").setup()
    with pytest.raises(DataError, match=r"^data.root=/nonexistent/x: no such folder \(where dataset 'kvasir-seg'"):
        LesionDataModule(dataset="kvasir-seg", root="/nonexistent/x").setup()
    line = one_message(fails("fit", *SMOKE, "--data.dataset", "mydata", "--data.root", "/nonexistent/x"))
    assert "data.root=/nonexistent/x: no such folder" in line


# ------------------------------------------------------------------------ item 9: skip covers a missing mask
def test_skip_drops_an_image_without_a_mask_and_counts_it(folder_dataset, tmp_path):
    os.remove(folder_dataset / "masks" / "case003.png")
    (folder_dataset / "masks" / "stray.png").write_bytes((folder_dataset / "masks" / "case004.png").read_bytes())
    with pytest.raises(DataError, match=r"case003\.png: no mask for this image"):
        LesionDataModule(dataset=str(folder_dataset), image_size=32, num_workers=0).setup()
    dm = LesionDataModule(dataset=str(folder_dataset), image_size=32, num_workers=0, on_bad_sample="skip",
                          labeled_fraction=0.5, labeled_batch_size=1, run_dir=str(tmp_path))
    with pytest.warns(UserWarning, match=r"skipped 2 file\(s\) without a partner"):
        dm.setup()
    ids = {s.id for split in dm.splits.values() for s in split}
    assert "case003" not in ids and "stray" not in ids and len(ids) == 11
    recorded = json.loads((tmp_path / "split.json").read_text())["bad_samples"]
    assert any("case003.png: no mask for this image" in b for b in recorded)
    assert any("stray.png: mask without an image" in b for b in recorded)


def test_skip_is_documented_exactly():
    doc = LesionDataModule.__doc__
    for what in ("an image\n            without a mask", "Never skipped"):
        assert what in doc


# ------------------------------------------------------------------------------ item 10: unknown method
def test_an_unknown_method_lists_the_methods_and_suggests_the_closest(tmp_path):
    line = one_message(fails("fit", *SMOKE, "--model", "SemiKd"))
    assert "--model SemiKd: no such method; did you mean 'SemiKDModule'?" in line
    for name in ("MeanTeacher", "Supervised", "MCNetPlus", "SemiKDModule"):
        assert name in line
    exp = tmp_path / "exp.yaml"
    exp.write_text("model:\n  class_path: lesion_kd.methods.MeanTeachr\n")
    assert "did you mean 'MeanTeacher'?" in one_message(fails("fit", *SMOKE, "--config", str(exp)))

