"""A newcomer's own data (issue 31): ``--data.root DIR`` alone trains on DIR with a seeded split, lossy masks are
binarised by ``--data.mask_threshold``, a missing mask's message says which names are accepted, and datasets
without a committed split never write into the checkout."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import REPO, disk_image, lesion_kd, make_folder_dataset, real_data_dir, run_dir_of
from PIL import Image

from lesion_kd.data import DataError, LesionDataModule, read_mask
from lesion_kd.data.datamodule import DEFAULT_DATASET
from lesion_kd.data.splits import SPLITS_DIR

SMOKE = ["--config", "experiments/method/supervised.yaml", "--config", "experiments/profile/smoke.yaml"]


def git_status() -> set[str]:
    out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout
    return set(out.splitlines())


def changed_by_a_run(before: set[str], after: set[str]) -> list[str]:
    """``git status`` entries that appeared or went between two snapshots, less source and doc files (.py, .md):
    a run never writes those, while someone editing the checkout during the test may (the test would fail for
    a reason that is not its own)."""
    return sorted(e for e in before ^ after if not e.rstrip('"').endswith((".py", ".md")))


def jpeg_bytes(arr: np.ndarray, quality: int = 60) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def renamed_folder_with_jpeg_masks(dest: Path, n: int = 24) -> Path:
    """``n`` Kvasir-SEG images (synthetic disks without the real data) under new names, their masks re-encoded as
    lossy JPEG (grey levels besides 0 and 255); half the masks named ``<id>.jpg``, half ``<id>_mask.jpg``."""
    (dest / "images").mkdir(parents=True)
    (dest / "masks").mkdir()
    data = real_data_dir()
    kvasir = sorted((data / "Kvasir-SEG" / "images").iterdir())[:n] if data else []
    for k in range(n):
        if kvasir:
            src = kvasir[k]
            shutil.copyfile(src, dest / "images" / f"polyp_{k:03d}{src.suffix}")
            mask = read_mask(next((data / "Kvasir-SEG" / "masks").glob(f"{src.stem}.*"))) * 255
        else:
            img, mask = disk_image(96, 128, seed=k, cx=0.3 + 0.4 * (k % 3) / 2)
            Image.fromarray(img).save(dest / "images" / f"polyp_{k:03d}.jpg")
            mask = mask * 255
        name = f"polyp_{k:03d}{'_mask' if k % 2 else ''}.jpg"
        (dest / "masks" / name).write_bytes(jpeg_bytes(mask.astype(np.uint8)))
    return dest


@pytest.mark.slow
def test_root_alone_trains_on_a_renamed_folder_with_jpeg_masks_and_leaves_the_checkout_alone(tmp_path):
    data = renamed_folder_with_jpeg_masks(tmp_path / "MyPolyps")
    levels = set(np.unique(np.asarray(Image.open(data / "masks" / "polyp_000.jpg"))).tolist())
    assert len(levels) > 2, levels  # really lossy: the strict check refuses it
    before = git_status()
    runs = tmp_path / "runs"

    # without a threshold: one message naming the mask file and the option, exit 2, no empty run folder left
    proc = subprocess.run([sys.executable, "-m", "lesion_kd.cli", "fit", *SMOKE, "--data.root", str(data),
                           "--trainer.default_root_dir", str(runs)], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "mask has values" in proc.stderr and "data.mask_threshold" in proc.stderr
    assert str(data / "masks") in proc.stderr and "Traceback" not in proc.stderr
    assert not list(runs.rglob("version_*")), sorted(map(str, runs.rglob("*")))

    # --data.root and --data.mask_threshold alone as the data options: trains on the folder's own seeded split
    out = lesion_kd("fit", *SMOKE, "--data.root", str(data), "--data.mask_threshold", "128",
                    "--trainer.default_root_dir", str(runs))
    assert "metrics written to" in out.stdout
    run = run_dir_of(runs)
    rec = json.loads((run / "split.json").read_text())
    assert rec["dataset"] == "MyPolyps" and rec["root"] == str(data) and rec["mask_threshold"] == 128
    assert rec["source"] == f"seeded split of {data} (seed 0)"
    used = rec["labeled"] + rec["unlabeled"] + rec["val"] + rec["test"]
    assert len(rec["test"]) == 5 and set(used) <= {f"polyp_{k:03d}" for k in range(24)}
    assert json.loads((run / "metrics.json").read_text())["n_images"] == 5
    assert "mask_threshold: 128" in (run / "config.yaml").read_text()
    assert not changed_by_a_run(before, git_status())  # nothing written into the repository (experiments/splits, ...)
    assert sorted(p.name for p in data.rglob("*") if p.is_file() and "polyp" not in p.name) == []


# --------------------------------------------------------------------------------------- the dataset rule
def test_root_without_a_dataset_name_is_your_own_folder(tmp_path):
    own = make_folder_dataset(tmp_path / "PH2")
    dm = LesionDataModule(root=str(own), image_size=32, num_workers=0)
    name, root, samples, splits, source = dm.resolve()
    assert (name, root, dm.dataset_label) == ("PH2", own, "PH2")
    assert source == f"seeded split of {own} (seed 0)" and len(samples) == 12
    assert LesionDataModule().dataset_label == DEFAULT_DATASET == "kvasir-seg"


def test_an_unset_dataset_resumes_a_run_that_named_the_default():
    """config.yaml of runs from before data.dataset could be unset hold 'kvasir-seg': the same command resumes them,
    and an own folder at data.root (another split) does not pass for them."""
    from lesion_kd.lightning_cli import run_options

    assert run_options({"data": {"dataset": None, "root": None}})["data.dataset"] == "kvasir-seg"
    assert run_options({"data": {"dataset": None, "root": "/my/PH2"}})["data.dataset"] is None
    assert run_options({"data": {"dataset": "busi", "root": None}})["data.dataset"] == "busi"


def test_root_that_holds_datasets_is_refused_with_the_way_to_read_them(tmp_path):
    make_folder_dataset(tmp_path / "data" / "Kvasir-SEG")
    with pytest.raises(DataError, match=r"^data.root=\S+data: no images/ folder\. With data.dataset unset") as e:
        LesionDataModule(root=str(tmp_path / "data")).resolve()
    assert "Kvasir-SEG/" in str(e.value) and f"--data.data_dir {tmp_path / 'data'} --data.dataset kvasir-seg" in str(e.value)


def test_a_known_dataset_at_another_root_keeps_its_committed_split(tmp_path, data_dir):
    copy = tmp_path / "elsewhere" / "my-kvasir"
    copy.mkdir(parents=True)
    for sub in ("images", "masks"):  # the user's own copy, without splits/pranet_test.txt: the split is read
        (copy / sub).symlink_to(data_dir / "Kvasir-SEG" / sub)
    before = git_status()
    dm = LesionDataModule(dataset="kvasir-seg", root=str(copy))
    name, root, samples, splits, source = dm.resolve()
    committed = json.loads((SPLITS_DIR / "kvasir-seg_v1.json").read_text())["splits"]
    assert (name, root, source) == ("kvasir-seg", copy, str(SPLITS_DIR / "kvasir-seg_v1.json"))
    assert splits == committed and len(splits["test"]) == 100
    # a folder that is not that dataset: the stale-split message says how to train on it as your own
    other = make_folder_dataset(tmp_path / "PH2")
    with pytest.raises(DataError, match=r"kvasir-seg_v1.json: train id .* leave data.dataset unset \(null\)$"):
        LesionDataModule(dataset="kvasir-seg", root=str(other)).resolve()
    assert not changed_by_a_run(before, git_status())


def test_a_named_dataset_without_a_committed_split_writes_it_beside_the_run_and_in_the_cache(tmp_path):
    data = tmp_path / "data"
    make_folder_dataset(data / "PH2", n=20)
    assert not (SPLITS_DIR / "ph2_v1.json").exists()
    before = git_status()
    dm = LesionDataModule(dataset="ph2", data_dir=str(data), image_size=32, num_workers=0, labeled_fraction=0.5,
                          labeled_batch_size=2, cache_dir=str(tmp_path / "cache"), run_dir=str(tmp_path / "run"))
    dm.setup()
    assert not (SPLITS_DIR / "ph2_v1.json").exists() and not changed_by_a_run(before, git_status())
    (cached,) = (tmp_path / "cache" / "splits").glob("ph2_v1-*.json")
    beside = json.loads((tmp_path / "run" / "ph2_v1.json").read_text())
    assert beside == json.loads(cached.read_text()) and beside["counts"] == {"train": 14, "val": 2, "test": 4}
    rec = json.loads((tmp_path / "run" / "split.json").read_text())
    assert rec["source"].startswith(str(cached)) and sorted(rec["test"]) == sorted(beside["splits"]["test"])
    # the next run reads the cached split back and checks it against the folder
    for sub in ("images", "masks"):
        (data / "PH2" / sub / f"{beside['splits']['test'][0]}.png").unlink()
    with pytest.raises(DataError, match=r"test id .* is not in .* delete \S+ph2_v1-\w+\.json to draw it again$"):
        LesionDataModule(dataset="ph2", data_dir=str(data), cache_dir=str(tmp_path / "cache")).resolve()


# ------------------------------------------------------------------------------------------------ masks
def test_mask_threshold_binarises_lossy_masks_at_or_above_it_and_is_recorded(tmp_path):
    data = make_folder_dataset(tmp_path / "own", n=12)
    mask = np.zeros((48, 64), np.uint8)
    mask[10:30, 20:40] = 200
    mask[0, 0], mask[0, 1], mask[0, 2] = 127, 128, 129  # at the threshold counts as lesion
    Image.fromarray(mask).save(data / "masks" / "case000.png")
    with pytest.raises(DataError, match=r"case000\.png: mask has values \{0, 127, 128, 129, 200\}.*data.mask_threshold"):
        LesionDataModule(root=str(data), image_size=32, num_workers=0).setup()
    got = read_mask(data / "masks" / "case000.png", 128)
    assert got[0, :3].tolist() == [0, 1, 1] and got.sum() == 20 * 20 + 2
    dm = LesionDataModule(root=str(data), mask_threshold=128, image_size=32, num_workers=0, labeled_fraction=0.5,
                          labeled_batch_size=2, run_dir=str(tmp_path / "run"))
    dm.setup()
    assert json.loads((tmp_path / "run" / "split.json").read_text())["mask_threshold"] == 128
    assert all(s.mask_threshold == 128.0 for split in dm.splits.values() for s in split)
    for bad in (0, -1, float("nan")):
        with pytest.raises(ValueError, match=rf"^data.mask_threshold={bad}: must be a positive number"):
            LesionDataModule(root=str(data), mask_threshold=bad)


def test_a_missing_mask_lists_the_accepted_names_and_what_masks_holds(tmp_path):
    data = make_folder_dataset(tmp_path / "own", n=6)
    for k in range(6):  # PH2's raw names are matched; these are not
        (data / "masks" / f"case{k:03d}.png").rename(data / "masks" / f"case{k:03d}{'_lesion' if k < 3 else '_gt'}.png")
    with pytest.raises(DataError) as e:
        LesionDataModule(root=str(data), image_size=32, num_workers=0).setup()
    msg = str(e.value)
    assert msg.startswith(f"{data / 'images' / 'case003.png'}: no mask for this image in {data / 'masks'} (3 image(s)")
    for pattern in ("<id>.<ext>", "<id>_mask.<ext>", "<id>_segmentation.<ext>", "<id>_lesion.<ext>"):
        assert pattern in msg
    assert "holds 3 files no image matched: case003_gt.png, case004_gt.png, case005_gt.png" in msg


def test_two_masks_for_one_image_are_named(tmp_path):
    data = make_folder_dataset(tmp_path / "own", n=4)
    shutil.copyfile(data / "masks" / "case001.png", data / "masks" / "case001_lesion.png")
    with pytest.raises(DataError, match=r"two masks for the image case001\.png: case001\.png and case001_lesion\.png"):
        LesionDataModule(root=str(data)).resolve()


def test_a_failed_set_up_leaves_no_empty_run_folder(tmp_path):
    import lightning as L

    from lesion_kd.methods import Supervised

    data = make_folder_dataset(tmp_path / "own", n=4)
    (data / "images" / "case000.png").write_bytes(b"not an image")
    dm = LesionDataModule(root=str(data), image_size=32, num_workers=0, labeled_fraction=0.5, labeled_batch_size=1)
    trainer = L.Trainer(default_root_dir=str(tmp_path / "runs"), max_steps=1, accelerator="cpu",
                        enable_progress_bar=False, enable_model_summary=False, logger=L.pytorch.loggers.CSVLogger(
                            str(tmp_path / "runs")))
    with pytest.raises(DataError, match=r"case000\.png: corrupt or unreadable"):
        trainer.fit(Supervised(network="unet", network_kwargs={"channels": [4, 8, 16, 32, 64]}), datamodule=dm)
    assert not list((tmp_path / "runs").rglob("version_*"))
