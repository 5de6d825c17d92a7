"""Predicted lesion area of trained students on one category of BUSI images (a diagnostic, not a timing).

For each checkpoint (any method's; the plain student is loaded without teacher or training code), the
first N images of the category (``metadata.csv`` order) are resized to SIZE x SIZE and segmented; printed:
the mean predicted lesion area (softmax lesion probability averaged over pixels and images) and the
largest weight that L_dss's class-balanced consistency (``lesion_kd.losses.dss``, soft balancing) would
give one pixel of that batch. Used for the BUSI failure of SemiKD (README, "Results so far"):

    python benchmarks/predicted_area.py runs/reproduce/cpu/busi/*-mamba_unet-10pct-seed0/lightning_logs/version_0/checkpoints/best*.ckpt

With ``--test-of METRICS_JSON`` (a finished cell's ``metrics.json``) it takes the first N images of that
cell's test set instead, with their masks, and prints the predicted lesion area (pixels with probability
> 0.5) against the ground truth's, and the false-positive and false-negative shares of the pixels (the
Kvasir-SEG seed-2 failure of SemiKD: README, "Results so far"):

    python benchmarks/predicted_area.py -n 40 --root ../shared/datasets/Kvasir-SEG \
        --test-of experiments/results/cpu/kvasir-seg/semikd-mamba_unet-10pct-seed2/metrics.json \
        runs/reproduce/cpu/kvasir-seg/semikd-mamba_unet-10pct-seed2/lightning_logs/version_0/checkpoints/*.ckpt

With ``--unlabeled-of SPLIT_JSON`` (a run's ``split.json``) it takes the run's unlabeled training images, whose
masks training never sees, and prints the same plus the Dice of the checkpoint's argmax labels, whole and
reduced to the largest component (BCP's pseudo-labels): how good the pseudo-labels it would give are.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lesion_kd.metrics import image_metrics
from lesion_kd.models.loading import load_student


def _load(path: Path, size: int, rgb: bool) -> np.ndarray:
    return np.array(Image.open(path).convert("RGB" if rgb else "L").resize((size, size)))


def _dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """Mean per-image Dice of (N, H, W) masks, by the suite's own metric (``lesion_kd.metrics``)."""
    return float(np.mean([image_metrics(p, g)["dice"] for p, g in zip(pred, gt, strict=True)]))


def split_areas(args, root: Path) -> None:
    """``--test-of`` / ``--unlabeled-of``: images with masks; area, false positives/negatives and Dice."""
    from lesion_kd.methods.components import largest_component

    if args.test_of:
        ids, what = list(json.loads(Path(args.test_of).read_text())["per_image"])[: args.n], f"test images of {args.test_of}"
    else:  # the unlabeled training images of a run: what a pseudo-labelling method trains on
        ids, what = json.loads(Path(args.unlabeled_of).read_text())["unlabeled"][: args.n], f"unlabeled images of {args.unlabeled_of}"
    images = {p.stem: p for p in (root / "images").iterdir()}
    masks = {p.stem: p for p in (root / "masks").iterdir()}
    x = torch.stack([torch.from_numpy(_load(images[i], args.size, True)).permute(2, 0, 1).float() / 255 for i in ids])
    gt = np.stack([_load(masks[i], args.size, False) > 127 for i in ids])
    print(f"{len(ids)} {what} at {args.size}x{args.size}: ground-truth lesion area {gt.mean():.4f}")
    for ck in args.checkpoints:
        with torch.no_grad():
            labels = load_student(ck).eval()(x).float().argmax(1)
        pred, lcc = labels.numpy() == 1, largest_component(labels).numpy() == 1
        print(f"{ck}: predicted lesion area {pred.mean():.4f}, false positives {(pred & ~gt).mean():.4f}, "
              f"false negatives {(~pred & gt).mean():.4f} of the pixels; Dice {_dice(pred, gt):.4f} "
              f"(largest component only, BCP's pseudo-label: {_dice(lcc, gt):.4f})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoints", nargs="+")
    ap.add_argument("--root", default=os.path.join(os.environ.get("LESION_KD_DATA", "../shared/datasets"), "BUSI"))
    ap.add_argument("--category", action="append", help="normal, benign, malignant (default: all three)")
    ap.add_argument("-n", type=int, default=8, help="images per category")
    ap.add_argument("--size", type=int, default=160)
    ap.add_argument("--test-of", help="a finished cell's metrics.json: use its test images (with masks) instead")
    ap.add_argument("--unlabeled-of", help="a run's split.json: use its unlabeled training images (with their "
                    "masks, hidden from training) instead: how good the pseudo-labels a checkpoint gives are")
    args = ap.parse_args()
    root = Path(args.root)
    if args.test_of or args.unlabeled_of:
        return split_areas(args, root)
    meta = list(csv.DictReader(open(root / "metadata.csv")))
    for ck in args.checkpoints:
        net = load_student(ck).eval()
        for cat in args.category or ["normal", "benign", "malignant"]:
            ids = [m["id"] for m in meta if m["category"] == cat][: args.n]
            x = torch.stack([torch.from_numpy(np.array(Image.open(root / "images" / f"{i}.png").convert("RGB")
                                                         .resize((args.size, args.size)))).permute(2, 0, 1).float() / 255
                             for i in ids])
            with torch.no_grad():
                q = torch.softmax(net(x).float(), 1)
            area = q.mean(dim=(0, 2, 3))
            w = (q / (q.shape[1] * area + 1e-6).view(1, -1, 1, 1)).sum(1)
            print(f"{ck}: {cat} ({len(ids)} images): predicted lesion area {area[1]:.4f}, "
                  f"largest class-balancing weight {w.max():.1f}")


if __name__ == "__main__":
    main()
