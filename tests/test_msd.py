"""prepare-msd on small synthetic Decathlon tasks written here: windowing, lesion-label selection, the
empty-slice ratio, the patient-level split, idempotence, and multi-channel MR."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from lesion_kd.data import DataError, read_mask, scan_folder
from lesion_kd.data.listing import read_listing
from lesion_kd.data.msd import normalize_mr, prepare_msd, window_ct

X, Y, Z = 32, 24, 8  # non-square in-plane, to pin the orientation (rows = y)
LESION_SLICES = {"liver_0": (2, 3, 4), "liver_1": (1, 2, 3), "liver_2": (4, 5, 6)}
PROBE = (-1000, -160, 40, 100, 240, 1000)  # HU written at x = 0..5, y = 1 of every slice


def write_liver_task(root: Path) -> Path:
    """Task03-like: 3 CT cases, label 1 = liver, 2 = tumour in three slices per case; MSD's '._' junk."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for case, slices in LESION_SLICES.items():
        img = rng.integers(-200, 200, size=(X, Y, Z)).astype(np.int16)
        img[:6, 1, :] = np.array(PROBE, np.int16)[:, None]
        lab = np.zeros((X, Y, Z), np.uint8)
        lab[8:24, 6:18, :] = 1  # liver in every slice: must not count as lesion
        for z in slices:
            lab[12:16, 8:11, z] = 2  # tumour: 4 (x) by 3 (y)
        nib.save(nib.Nifti1Image(img, np.eye(4)), root / "imagesTr" / f"{case}.nii.gz")
        nib.save(nib.Nifti1Image(lab, np.eye(4)), root / "labelsTr" / f"{case}.nii.gz")
    (root / "imagesTr" / "._liver_0.nii.gz").write_bytes(b"\x00\x05\x16\x07 macOS resource fork")
    (root / "labelsTr" / "._liver_0.nii.gz").write_bytes(b"\x00\x05\x16\x07 macOS resource fork")
    (root / "dataset.json").write_text(json.dumps({
        "name": "Liver", "modality": {"0": "CT"}, "labels": {"0": "background", "1": "liver", "2": "cancer"},
        "training": [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"} for c in LESION_SLICES],
    }))
    return root


@pytest.fixture
def liver_task(tmp_path) -> Path:
    return write_liver_task(tmp_path / "Task03_Liver")


def png(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im)


def test_ct_window_clips_to_level_width_and_scales_to_0_255():
    out = window_ct(np.array(PROBE), level=40, width=400)  # [-160, 240] -> [0, 255]
    assert out.tolist() == [0, 0, 128, 166, 255, 255]
    mr = normalize_mr(np.array([0.0, 1.0, 50.0, 99.0, 500.0]), lo=1.0, hi=99.0)
    assert mr.tolist() == [0, 0, 128, 255, 255]  # (50 - 1) / 98 * 255 = 127.5; background zeros stay 0


def test_liver_task_slices_windowed_lesion_only_with_patient_split(liver_task, tmp_path):
    out = tmp_path / "out"
    folder, changed, counts = prepare_msd("Task03_Liver", liver_task, out, fractions=(0.4, 0.3, 0.3), progress=False)
    assert changed and folder == out
    samples = scan_folder(out)
    expected = sorted(f"{c}_s{z:03d}" for c, zs in LESION_SLICES.items() for z in zs)
    assert [s.id for s in samples] == expected  # empty ratio 0: lesion slices only, junk files ignored
    assert counts["cases"] == 3 and counts["slices"] == 9
    img = png(out / "images" / "liver_1_s002.png")
    assert img.shape == (Y, X) and img.dtype == np.uint8  # rows = y
    assert img[1, :6].tolist() == [0, 0, 128, 166, 255, 255]  # liver window W400 L40 (the task default)
    mask = read_mask(out / "masks" / "liver_1_s002.png")
    want = np.zeros((Y, X), np.uint8)
    want[8:11, 12:16] = 1  # tumour (label 2) only; the liver (label 1) is background
    assert np.array_equal(mask, want)

    split = json.loads((out / "splits.json").read_text())
    patients = split["patients"]
    assert sorted(sum(patients.values(), [])) == sorted(LESION_SLICES) and all(len(v) == 1 for v in patients.values())
    for name, ids in split["splits"].items():  # every slice of a patient sits in that patient's split
        assert {i.rsplit("_s", 1)[0] for i in ids} == set(patients[name])
    listed, listed_splits = read_listing(out / "listing.csv")
    assert listed_splits == split["splits"] and {s.group for s in listed} == set(LESION_SLICES)

    # idempotent with the same options; other options are not silently mixed in
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    assert prepare_msd("Task03_Liver", liver_task, out, fractions=(0.4, 0.3, 0.3), progress=False)[1] is False
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == mtimes
    with pytest.raises(DataError, match="other options"):
        prepare_msd("Task03_Liver", liver_task, out, empty_ratio=1.0, progress=False)


def test_empty_slices_are_kept_at_the_ratio_and_seeded(liver_task, tmp_path):
    def kept(seed: int, ratio: float, name: str) -> set[str]:
        prepare_msd("Task03_Liver", liver_task, tmp_path / name, empty_ratio=ratio, seed=seed, progress=False)
        return {s.id for s in scan_folder(tmp_path / name)}

    lesion = {f"{c}_s{z:03d}" for c, zs in LESION_SLICES.items() for z in zs}
    a, b = kept(0, 1.0, "a"), kept(0, 1.0, "b")
    assert a == b and lesion < a and len(a) == 18  # one empty slice per lesion slice, 3 per case
    for sid in a - lesion:
        assert not read_mask(tmp_path / "a" / "masks" / f"{sid}.png").any()
    assert len(kept(0, 0.34, "c")) == 9 + 3  # round(0.34 * 3) = 1 per case
    assert len(kept(0, 5.0, "d")) == 24  # capped by the 5 empty slices each case has
    assert any(kept(s, 1.0, f"s{s}") != a for s in (1, 2, 3))  # the seed chooses which


def test_other_lesion_label_and_bad_label_are_named(liver_task, tmp_path):
    prepare_msd("Task03_Liver", liver_task, tmp_path / "liver", lesion_labels=(1,), progress=False)
    assert len(scan_folder(tmp_path / "liver")) == 3 * Z  # label 1 is in every slice
    with pytest.raises(DataError, match=r"dataset\.json: lesion label 7 is not one of its labels"):
        prepare_msd("Task03_Liver", liver_task, tmp_path / "x", lesion_labels=(7,), progress=False)


def test_brain_tumour_mr_channel_and_percentile_normalisation(tmp_path):
    root = tmp_path / "Task01_BrainTumour"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir(parents=True)
    rng = np.random.default_rng(1)
    for case in ("BRATS_001", "BRATS_002", "BRATS_003"):
        vol = np.zeros((16, 16, 4, 4), np.float32)
        vol[2:14, 2:14, :, :] = rng.uniform(100, 1000, size=(12, 12, 4, 4))
        vol[..., 2] *= 10  # channel 2 on another scale
        lab = np.zeros((16, 16, 4), np.uint8)
        lab[4:7, 4:7, 1], lab[8:10, 8:10, 1], lab[5:9, 5:9, 2] = 1, 3, 2  # edema, enhancing, non-enhancing
        nib.save(nib.Nifti1Image(vol, np.eye(4)), root / "imagesTr" / f"{case}.nii.gz")
        nib.save(nib.Nifti1Image(lab, np.eye(4)), root / "labelsTr" / f"{case}.nii.gz")
    (root / "dataset.json").write_text(json.dumps({
        "modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
        "labels": {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"}}))
    out, _, counts = prepare_msd("Task01_BrainTumour", root, tmp_path / "out", channel=2, progress=False)
    assert counts["slices"] == 6
    m = read_mask(out / "masks" / "BRATS_001_s001.png")
    assert m.sum() == 9 + 4  # labels 1 and 3 (all tumour labels are lesion)
    img = png(out / "images" / "BRATS_001_s001.png")
    flair_t1gd = np.asarray(nib.load(root / "imagesTr" / "BRATS_001.nii.gz").dataobj)[..., 2]
    lo, hi = np.percentile(flair_t1gd[flair_t1gd > 0], [0.5, 99.5])  # over the whole volume's non-zero voxels
    want = np.round((np.clip(flair_t1gd[:, :, 1], lo, hi) - lo) / (hi - lo) * 255).T
    want[flair_t1gd[:, :, 1].T == 0] = 0
    assert np.array_equal(img, want.astype(np.uint8)) and img[0, 0] == 0
    with pytest.raises(DataError, match="--channel 9 out of range"):
        prepare_msd("Task01_BrainTumour", root, tmp_path / "bad", channel=9, progress=False)


def test_prepare_msd_command(liver_task, tmp_path, capsys):
    from lesion_kd.cli import main

    args = ["data", "prepare-msd", "--task", "Task03_Liver", "--in", str(liver_task), "--out", str(tmp_path / "o"),
            "--lesion-label", "2", "--window-level", "40", "--window-width", "400", "--empty-ratio", "0.5",
            "--no-progress"]
    assert main(args) == 0
    assert "listing.csv" in capsys.readouterr().out
    assert main(args) == 0 and "nothing to do" in capsys.readouterr().out
    assert main(["data", "prepare-msd", "--task", "Task99_Mine", "--in", str(liver_task), "--out",
                 str(tmp_path / "p")]) == 1
    assert "--lesion-label" in capsys.readouterr().err
