"""Collapse of a trained student's deepest features (a diagnostic, not a timing).

For each checkpoint (any method's student, loaded without teacher or training code) and 16 images of its
dataset (Kvasir-SEG: the first 16 files; BUSI: 8 with a lesion, 8 normal), the deepest (and second
deepest) encoder feature maps are read, each pixel's C-vector is L2-normalised, and printed:

- direction coherence: the norm of the mean unit vector over all pixels of all images (1.000: every pixel
  points the same way; unrelated directions give about 0);
- PC1 share: the fraction of the (centred) unit vectors' variance on their first principal component;
- the mean per-pixel feature norm.

Used for the uncentred L_map's degenerate minimum (``lesion_kd.losses.pckd``):

    python benchmarks/feature_collapse.py runs/reproduce/cpu/busi/semikd-mamba_unet-10pct-seed0/lightning_logs/version_0/checkpoints/last.ckpt@busi
"""

from __future__ import annotations

import argparse
import csv
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from lesion_kd.models.loading import load_student


def images(root: Path, dataset: str, n: int = 16, size: int = 160) -> torch.Tensor:
    if dataset == "busi":
        meta = list(csv.DictReader(open(root / "BUSI" / "metadata.csv")))
        ids = [m["id"] for m in meta if m["category"] != "normal"][: n // 2]
        ids += [m["id"] for m in meta if m["category"] == "normal"][: n // 2]
        files = [root / "BUSI" / "images" / f"{i}.png" for i in ids]
    else:
        files = sorted((root / "Kvasir-SEG" / "images").iterdir())[:n]
    return torch.stack([torch.from_numpy(np.array(Image.open(f).convert("RGB").resize((size, size)))).permute(2, 0, 1)
                        .float() / 255 for f in files])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoints", nargs="+", help="CKPT@DATASET, DATASET one of kvasir-seg, busi")
    ap.add_argument("--root", type=Path, default=Path(os.environ.get("LESION_KD_DATA", "../shared/datasets")))
    args = ap.parse_args()
    for spec in args.checkpoints:
        ckpt, dataset = spec.rsplit("@", 1)
        net = load_student(ckpt).eval()
        with torch.no_grad():
            feats = net.encode(images(args.root, dataset))
        for k in (-1, -2):
            f = feats[k].float()
            v = F.normalize(f.flatten(2).transpose(1, 2).reshape(-1, f.shape[1]), dim=1)
            s = torch.linalg.svdvals(v - v.mean(0))
            print(f"{ckpt} ({dataset}) stage {k}: C={f.shape[1]} {tuple(f.shape[2:])}: direction coherence "
                  f"{v.mean(0).norm():.3f}, PC1 share {(s[0] ** 2 / (s ** 2).sum()):.3f}, "
                  f"mean per-pixel norm {f.norm(dim=1).mean():.1f}")


if __name__ == "__main__":
    main()
