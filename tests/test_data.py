"""Folder datasets, the registry's splits, labeled fractions, weak/strong views and bad input."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import disk_image
from PIL import Image

from lesion_kd.data import DataError, LesionDataModule
from lesion_kd.data.catalogue import DATASETS, _busi_splits, _kvasir_splits
from lesion_kd.data.datasets import to_tensor
from lesion_kd.data.geometry import coordinate_map, fit_affine, warp_to_view
from lesion_kd.data.transforms import AugmentationConfig, ViewPairTransform

REPO = Path(__file__).resolve().parents[1]


def dm_for(root, **kw):
    args = dict(dataset=str(root), image_size=32, labeled_fraction=0.5, labeled_batch_size=2,
                unlabeled_batch_size=2, eval_batch_size=4, num_workers=0)
    args.update(kw)
    return LesionDataModule(**args)


# ------------------------------------------------------------------------------------- registry splits
def test_kvasir_splits_are_the_standard_ones(data_dir):
    root = data_dir / "Kvasir-SEG"
    samples = DATASETS["kvasir-seg"].samples(root, False)
    splits = _kvasir_splits(root, samples, False)
    pranet = sorted((root / "splits" / "pranet_test.txt").read_text().split())
    assert splits["test"] == pranet
    assert (len(splits["train"]), len(splits["val"]), len(splits["test"])) == (810, 90, 100)
    assert not set(splits["val"]) & set(splits["test"]) and not set(splits["train"]) & set(splits["val"])


def test_committed_split_files_match_the_rules(data_dir):
    for name, folder in (("kvasir-seg", "Kvasir-SEG"), ("busi", "BUSI")):
        stored = json.loads((REPO / "experiments" / "splits" / f"{name}_v1.json").read_text())["splits"]
        root = data_dir / folder
        spec = DATASETS[name]
        assert stored == spec.splits(root, spec.samples(root, False), False)


def test_busi_split_is_stratified_70_10_20(data_dir):
    root = data_dir / "BUSI"
    samples = DATASETS["busi"].samples(root, False)
    assert len(samples) == 647 and {s.group for s in samples} == {"benign", "malignant"}
    splits = _busi_splits(root, samples, False)
    group = {s.id: s.group for s in samples}
    for split, frac in (("train", 0.7), ("val", 0.1), ("test", 0.2)):
        for cat, total in (("benign", 437), ("malignant", 210)):
            n = sum(group[i] == cat for i in splits[split])
            assert abs(n - frac * total) <= 1, (split, cat, n)
    with_normal = DATASETS["busi"].samples(root, True)
    assert len(with_normal) == 780


# --------------------------------------------------------------------------------------- user folders
def test_user_folder_gets_a_seeded_split_beside_the_run(folder_dataset, tmp_path):
    before = sorted(p.name for p in folder_dataset.rglob("*"))
    dm = dm_for(folder_dataset, run_dir=str(tmp_path / "run"))
    dm.setup()
    rec = json.loads((tmp_path / "run" / "split.json").read_text())
    assert sorted(rec["labeled"] + rec["unlabeled"] + rec["val"] + rec["test"]) == [f"case{i:03d}" for i in range(12)]
    assert sorted(p.name for p in folder_dataset.rglob("*")) == before  # nothing written into the data folder
    dm2 = dm_for(folder_dataset, run_dir=str(tmp_path / "run2"))
    dm2.setup()
    assert [s.id for s in dm2.labeled] == [s.id for s in dm.labeled]


def test_labeled_fraction_is_deterministic_by_seed_and_disjoint(folder_dataset):
    a, b, c = (dm_for(folder_dataset, label_seed=s, max_train_images=None) for s in (0, 0, 1))
    for d in (a, b, c):
        d.setup()
    ids = lambda d: sorted(s.id for s in d.labeled)  # noqa: E731
    assert ids(a) == ids(b) and not set(ids(a)) & {s.id for s in a.unlabeled}
    assert len(a.labeled) == round(0.5 * len(a.splits["train"]))
    assert ids(a) != ids(c) or len(a.splits["train"]) < 3


# ------------------------------------------------------------------------------------------ bad input
def test_missing_mask_is_named(folder_dataset):
    os.remove(folder_dataset / "masks" / "case003.png")
    with pytest.raises(DataError, match=r"case003\.png: no mask for this image"):
        dm_for(folder_dataset).setup()


def test_mask_size_mismatch_is_named(folder_dataset):
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(folder_dataset / "masks" / "case004.png")
    with pytest.raises(DataError, match=r"case004\.png: mask is 10x10 .* but its image"):
        dm_for(folder_dataset).setup()


def test_mask_with_grey_levels_is_named(folder_dataset):
    m = np.zeros((48, 64), np.uint8)
    m[:5, :5], m[10:20, 10:20] = 100, 255
    Image.fromarray(m).save(folder_dataset / "masks" / "case000.png")
    with pytest.raises(DataError, match=r"case000\.png: mask has values"):
        dm_for(folder_dataset).setup()


def test_corrupt_image_is_named_or_skipped_and_counted(folder_dataset):
    (folder_dataset / "images" / "case005.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"case005\.png: corrupt or unreadable"):
        dm_for(folder_dataset).setup()
    dm = dm_for(folder_dataset, on_bad_sample="skip")
    with pytest.warns(UserWarning, match="skipped 1 bad sample"):
        dm.setup()
    assert len(dm.bad_samples) == 1 and "case005" in dm.bad_samples[0]
    assert "case005" not in {s.id for split in dm.splits.values() for s in split}


def test_empty_folder_and_unknown_dataset_are_named(tmp_path):
    (tmp_path / "empty" / "images").mkdir(parents=True)
    (tmp_path / "empty" / "masks").mkdir()
    with pytest.raises(DataError, match=r"empty.images: empty folder"):
        dm_for(tmp_path / "empty").setup()
    with pytest.raises(DataError, match=r"data.dataset='no-such-set': neither a known dataset"):
        LesionDataModule(dataset="no-such-set").setup()


def test_impossible_options_are_refused_with_their_name(folder_dataset):
    with pytest.raises(ValueError, match="data.labeled_fraction=0"):
        LesionDataModule(dataset=str(folder_dataset), labeled_fraction=0)
    with pytest.raises(ValueError, match="data.image_size=100"):
        LesionDataModule(dataset=str(folder_dataset), image_size=100)
    with pytest.raises(ValueError, match="data.labeled_batch_size=8 is larger than the labeled set"):
        dm_for(folder_dataset, labeled_batch_size=8).setup()


# ------------------------------------------------------------------------------------------------ views
def test_fit_affine_recovers_a_known_geometry():
    h = w = 32
    coords = torch.from_numpy(coordinate_map(h, w)).permute(2, 0, 1)[None]
    theta = torch.tensor([[[0.0, -1.0, 0.0], [1.0, 0.0, 0.0]]])  # rot90
    warped = warp_to_view(coords, theta).permute(0, 2, 3, 1)[0].numpy()
    assert np.allclose(fit_affine(warped), theta[0].numpy(), atol=1e-5)


def test_view_geometry_maps_the_canonical_image_onto_the_view():
    img, mask = disk_image(64, 64, seed=3, cx=0.3, cy=0.6, r=0.2)
    tf = ViewPairTransform(AugmentationConfig(flip=0.5, rot90=1.0, affine=1.0))
    tf.set_seed(0)
    for _ in range(6):
        weak, strong, vmask, theta = tf(img, mask)
        warped = warp_to_view(to_tensor(img)[None], torch.from_numpy(theta)[None])[0]
        wmask = warp_to_view(torch.from_numpy(mask).float()[None, None], torch.from_numpy(theta)[None])[0, 0]
        inner = np.s_[8:-8, 8:-8]
        # the canonical image resampled with theta equals the weak view (up to interpolation)
        assert (warped - to_tensor(weak)).abs()[:, 8:-8, 8:-8].mean() < 0.03
        assert ((wmask > 0.5).numpy()[inner] == (vmask > 0)[inner]).mean() > 0.98
        assert strong.shape == weak.shape and vmask.shape == mask.shape


def test_train_batches_pair_views_of_labeled_and_unlabeled(folder_dataset):
    class Method:
        uses_unlabeled = True

    class T:
        lightning_module = Method()
        log_dir = None
        is_global_zero = True

    dm = dm_for(folder_dataset)
    dm.trainer = T()
    dm.setup()
    batch, _, _ = next(iter(dm.train_dataloader()))
    lab, unl = batch["labeled"], batch["unlabeled"]
    assert lab["image_weak"].shape == lab["image_strong"].shape == (2, 3, 32, 32)
    assert lab["theta"].shape == (2, 2, 3) and lab["mask"].shape == (2, 32, 32)
    assert not set(lab["id"]) & set(unl["id"])
    assert set(unl["id"]) <= {s.id for s in dm.unlabeled}
