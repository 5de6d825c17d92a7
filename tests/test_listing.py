"""A user's own data: CSV listings (paths, split and group columns, bad rows named) and 2D DICOM/NIfTI
images read through MONAI's readers."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from helpers import disk_image
from PIL import Image

from lesion_kd.data import DataError, LesionDataModule, read_image, read_mask, scan_folder
from lesion_kd.data.listing import grouped_split, read_listing


def write_pairs(root: Path, patients: dict[str, int]) -> list[tuple[str, str, str]]:
    """Images under scans/<patient>/, masks under labels/<patient>/ (file names repeat across patients)."""
    rows = []
    for p, n in patients.items():
        for k in range(n):
            img, mask = disk_image(40, 48, seed=hash((p, k)) % 1000)
            (root / "scans" / p).mkdir(parents=True, exist_ok=True)
            (root / "labels" / p).mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(root / "scans" / p / f"img{k}.png")
            Image.fromarray(mask * 255).save(root / "labels" / p / f"img{k}.png")
            rows.append((f"scans/{p}/img{k}.png", f"labels/{p}/img{k}.png", p))
    return rows


def test_listing_with_split_and_group_columns(tmp_path):
    rows = write_pairs(tmp_path, {"p1": 2, "p2": 1, "p3": 1})
    split = {"p1": "train", "p2": "Validation", "p3": "test"}
    text = "Image,Mask,Split,Patient\n" + "".join(f"{i},{m},{split[p]},{p}\n" for i, m, p in rows) + "\n"
    (tmp_path / "data.csv").write_text(text)
    samples, splits = read_listing(tmp_path / "data.csv")
    assert [s.id for s in samples] == ["p1_img0", "p1_img1", "p2_img0", "p3_img0"]  # same names: folder prefix
    assert samples[0].image == tmp_path / "scans" / "p1" / "img0.png" and samples[0].mask.is_file()
    assert [s.group for s in samples] == ["p1", "p1", "p2", "p3"]
    assert splits == {"train": ["p1_img0", "p1_img1"], "val": ["p2_img0"], "test": ["p3_img0"]}


@pytest.mark.parametrize("line3,error", [
    ("scans/p1/missing.png,labels/p1/img0.png", r"data\.csv:3: image file .*missing\.png not found"),
    ("scans/p1/img1.png,", r"data\.csv:3: empty mask path"),
    ("scans/p1/img1.png,labels/p1/img1.png,holdout", r"data\.csv:3: unknown split 'holdout'"),
    ("scans/p1/img1.png,labels/p1/img1.png,test", r"data\.csv:3: group 'p1' is in test here but in train on line 2"),
    ("scans/p1/img0.png,labels/p1/img0.png,train", r"data\.csv:3: image .* already listed on line 2"),
    ("scans/p1/notes.txt,labels/p1/img1.png,train", r"data\.csv:3: image 'scans/p1/notes\.txt' is not an image file"),
])
def test_bad_row_is_named_with_file_and_line(tmp_path, line3, error):
    write_pairs(tmp_path, {"p1": 2})
    (tmp_path / "scans" / "p1" / "notes.txt").write_text("x")
    group = ",p1" if line3.count(",") == 2 else ""
    header = "image,mask,split,group" if group else "image,mask"
    first = "scans/p1/img0.png,labels/p1/img0.png" + (",train,p1" if group else "")
    (tmp_path / "data.csv").write_text(f"{header}\n{first}\n{line3}{group}\n")
    with pytest.raises(DataError, match=error):
        read_listing(tmp_path / "data.csv")


def test_listing_without_mask_column_is_refused_naming_the_columns(tmp_path):
    (tmp_path / "x.csv").write_text("path,label_file\na.png,b.png\n")
    with pytest.raises(DataError, match=r"x\.csv: no 'image' column in the header \(path, label_file\)"):
        read_listing(tmp_path / "x.csv")


def test_grouped_split_never_puts_a_patient_in_two_splits(tmp_path):
    rows = write_pairs(tmp_path, {f"p{k}": 1 + k % 3 for k in range(10)})
    (tmp_path / "data.csv").write_text("image,mask,group\n" + "".join(f"{i},{m},{p}\n" for i, m, p in rows))
    dm = LesionDataModule(dataset=str(tmp_path / "data.csv"), image_size=32)
    name, root, samples, splits, source = dm.resolve()
    assert name == "data" and "patient-grouped" in source and len(samples) == len(rows)
    group = {s.id: s.group for s in samples}
    owners = {}
    for split, ids in splits.items():
        assert ids, split
        for i in ids:
            assert owners.setdefault(group[i], split) == split  # no patient straddles splits
    assert sorted(sum(splits.values(), [])) == sorted(group)
    assert grouped_split(samples, (0.7, 0.1, 0.2), seed=0) == splits
    assert grouped_split(samples, (0.7, 0.1, 0.2), seed=1) != splits


def test_datamodule_trains_from_a_listing_with_its_split_column(tmp_path):
    rows = write_pairs(tmp_path, {"a": 4, "b": 1, "c": 1})
    split = {"a": "train", "b": "val", "c": "test"}
    (tmp_path / "mine.csv").write_text("image,mask,split\n" + "".join(f"{i},{m},{split[p]}\n" for i, m, p in rows))
    dm = LesionDataModule(dataset=str(tmp_path / "mine.csv"), image_size=32, labeled_fraction=0.5,
                          labeled_batch_size=2, num_workers=0, run_dir=str(tmp_path / "run"))
    dm.setup()
    assert [s.id for s in dm.splits["val"]] == ["b_img0"] and len(dm.labeled) == 2
    assert json.loads((tmp_path / "run" / "split.json").read_text())["source"].startswith("split column of")


# --------------------------------------------------------------------------------------- DICOM / NIfTI
def _write_dicom(path: Path, arr: np.ndarray) -> None:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = arr.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = arr.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)


def test_dicom_and_nifti_2d_images_read_in_row_major_order(tmp_path):
    arr = (np.arange(6 * 9).reshape(6, 9) * 100).astype(np.uint16)  # 6 rows, 9 columns, 16-bit
    _write_dicom(tmp_path / "a.dcm", arr)
    img = read_image(tmp_path / "a.dcm")
    assert img.shape == (6, 9, 3) and img[0, 0, 0] == 0 and img[-1, -1, 0] == 255
    assert np.array_equal(img[..., 0], np.round(arr / arr.max() * 255).astype(np.uint8))
    nib.save(nib.Nifti1Image(arr.T.astype(np.int16), np.eye(4)), tmp_path / "b.nii.gz")  # NIfTI stores (x, y)
    assert np.array_equal(read_image(tmp_path / "b.nii.gz"), img)
    mask = np.zeros((6, 9), np.uint8)
    mask[1:3, 2:7] = 1
    nib.save(nib.Nifti1Image(mask.T[..., None], np.eye(4)), tmp_path / "m.nii")  # (x, y, 1)
    assert np.array_equal(read_mask(tmp_path / "m.nii"), mask)
    nib.save(nib.Nifti1Image(np.zeros((9, 6, 5), np.int16), np.eye(4)), tmp_path / "vol.nii.gz")
    with pytest.raises(DataError, match=r"vol\.nii\.gz: a 3D volume"):
        read_image(tmp_path / "vol.nii.gz")
    (tmp_path / "bad.dcm").write_bytes(b"not a dicom")
    with pytest.raises(DataError, match=r"bad\.dcm: corrupt or unreadable DICOM"):
        read_image(tmp_path / "bad.dcm")


def test_folder_of_nii_gz_files_gets_ids_without_the_double_suffix(tmp_path):
    for d in ("images", "masks"):
        (tmp_path / "ds" / d).mkdir(parents=True)
    for k in range(2):
        img, mask = disk_image(12, 10, seed=k)
        nib.save(nib.Nifti1Image(img[..., 0].T.copy(), np.eye(4)), tmp_path / "ds" / "images" / f"case{k}.nii.gz")
        nib.save(nib.Nifti1Image(mask.T.copy(), np.eye(4)), tmp_path / "ds" / "masks" / f"case{k}_mask.nii.gz")
    samples = scan_folder(tmp_path / "ds")
    assert [s.id for s in samples] == ["case0", "case1"]
    assert read_mask(samples[1].mask).shape == read_image(samples[1].image).shape[:2] == (12, 10)
