"""DDP correctness of the paper's method on the CPU (2 processes, gloo): both training streams are sharded,
validation metrics are per image gathered from both processes (not per-process means), files are written
once."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

METHOD = ["--config", "experiments/data/kvasir-seg.yaml", "--config", "experiments/method/semikd.yaml",
          "--config", "experiments/profile/smoke.yaml"]


def val_dice_logged(run: Path) -> list[float]:
    with (run / "metrics.csv").open(newline="") as f:
        return [float(r["val/dice"]) for r in csv.DictReader(f) if r.get("val/dice")]


def run_datamodule(run: Path, monkeypatch, data_dir: Path):
    """The run's data module (its data: section), set up in this process."""
    from lesion_kd.data import LesionDataModule

    monkeypatch.setenv("LESION_KD_DATA", str(data_dir))
    data_cfg = yaml.safe_load((run / "config.yaml").read_text())["data"]
    data_cfg.pop("augmentation", None)
    dm = LesionDataModule(**data_cfg)
    dm.setup()
    return dm


def per_image_val_dice(run: Path, dm) -> dict[str, float]:
    """Dice of every validation image, evaluated in this one process from the run's last checkpoint."""
    from lesion_kd.data.datasets import EvalDataset
    from lesion_kd.methods import SemiKDModule
    from lesion_kd.metrics import image_metrics

    ds = EvalDataset(dm.splits["val"], dm.hparams.image_size, dm.hparams.cache_dir)
    model = SemiKDModule.load_from_checkpoint(run / "checkpoints" / "last.ckpt", map_location="cpu").eval()
    out = {}
    with torch.no_grad():
        for item in ds:
            pred = torch.softmax(model(item["image"][None]).float(), dim=1).argmax(1)[0].numpy()
            out[item["id"]] = image_metrics(pred, item["mask"].numpy())["dice"]
    return out


def test_two_process_ddp_semikd_shards_both_streams_and_gathers_val_metrics(tmp_path, data_dir, monkeypatch):
    from helpers import lesion_kd, run_dir_of

    # 16 training images at 10%: 2 labeled, so 1 labeled + 2 unlabeled per process and step; 7 validation
    # images, so that DistributedSampler pads rank 1 with a copy of image 0 (4 + 4): a mean of per-process
    # means, or rank 0's own mean, then differs from the mean over the 7 images
    lesion_kd("fit", *METHOD, "--trainer.devices", "2", "--trainer.strategy", "ddp",
              "--data.labeled_batch_size", "1", "--data.unlabeled_batch_size", "2", "--data.max_val_images", "7",
              "--record_train_ids", "true", "--trainer.default_root_dir", str(tmp_path),
              "--trainer.precision", "32-true",  # re-evaluated below in fp32, image by image: same numbers
              env_extra={"LESION_KD_DATA": str(data_dir)}, timeout=900)
    run = run_dir_of(tmp_path)
    split = json.loads((run / "split.json").read_text())

    # samplers: each process trained on different images, in both streams
    seen = [json.loads((run / f"train_ids_rank{r}.json").read_text()) for r in (0, 1)]
    assert [s["rank"] for s in seen] == [0, 1] and all(s["world_size"] == 2 for s in seen)
    for stream in ("labeled", "unlabeled"):
        a, b = set(seen[0][stream]), set(seen[1][stream])
        assert a and b and not a & b, f"{stream}: both processes saw {a & b}"
        assert a | b <= set(split[stream]), f"{stream} ids outside the {stream} split"
    assert len(seen[0]["labeled"]) == 3 and len(seen[0]["unlabeled"]) == 6  # 3 steps x (1 + 2)

    # metrics: the logged val Dice is the mean over all 7 validation images, as one process computes it
    (logged,) = val_dice_logged(run)
    dm = run_datamodule(run, monkeypatch, data_dir)
    dice = per_image_val_dice(run, dm)
    assert sorted(dice) == sorted(split["val"]) and len(dice) == 7
    ids = split["val"]
    true_mean = float(np.mean([dice[i] for i in ids]))
    assert logged == pytest.approx(true_mean, abs=1e-6)
    # the check can tell: what per-process averaging would have logged differs
    shards = [ids[0::2], [*ids[1::2], ids[0]]]  # DistributedSampler(shuffle=False) with padding
    per_rank = [float(np.mean([dice[i] for i in s])) for s in shards]
    assert abs(np.mean(per_rank) - true_mean) > 1e-4 and abs(per_rank[0] - true_mean) > 1e-4
    assert json.loads((run / "metrics.json").read_text())["n_images"] == 8  # the test split, gathered

    # the teacher cache (filled by both processes, disjoint shares, then a barrier) holds every training image
    from lesion_kd.teacher_cache import TeacherEmbeddingCache

    cache = TeacherEmbeddingCache(None, "litemedsam", None, dm.dataset_name)
    assert all(cache.is_valid(s) for s in dm.labeled + dm.unlabeled)

    # rank 0 alone writes: one run directory, one best + last checkpoint, one config
    assert [p.name for p in (tmp_path / "lightning_logs").iterdir()] == ["version_0"]
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert len(ckpts) == 2 and ckpts[0].startswith("best-") and ckpts[1] == "last.ckpt"

