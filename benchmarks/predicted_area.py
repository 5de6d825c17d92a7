"""Predicted lesion area of trained students on one category of BUSI images (a diagnostic, not a timing).

For each checkpoint (any method's; the plain student is loaded without teacher or training code), the
first N images of the category (``metadata.csv`` order) are resized to SIZE x SIZE and segmented; printed:
the mean predicted lesion area (softmax lesion probability averaged over pixels and images) and the
largest weight that L_dss's class-balanced consistency (``lesion_kd.losses.dss``, soft balancing) would
give one pixel of that batch. Used for the BUSI failure of SemiKD (README, "Results so far"):

    python benchmarks/predicted_area.py runs/reproduce/cpu/busi/*-mamba_unet-10pct-seed0/lightning_logs/version_0/checkpoints/best*.ckpt
"""

from __future__ import annotations

import argparse
import csv
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lesion_kd.methods.semikd import load_student


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoints", nargs="+")
    ap.add_argument("--root", default=os.path.join(os.environ.get("LESION_KD_DATA", "../shared/datasets"), "BUSI"))
    ap.add_argument("--category", action="append", help="normal, benign, malignant (default: all three)")
    ap.add_argument("-n", type=int, default=8, help="images per category")
    ap.add_argument("--size", type=int, default=160)
    args = ap.parse_args()
    root = Path(args.root)
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
