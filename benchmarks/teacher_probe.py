"""How much the frozen teacher's features know about the lesion, per dataset (a diagnostic, not a timing).

A linear probe (one 1x1 convolution, 256 -> 1, logistic loss) is fitted on the cached LiteMedSAM embeddings
of the labeled images of a split (the 10% that SemiKD trains L_sup on) and scored on the other training
images (the unlabeled ones, whose masks the method never sees): Dice of the probe's mask at the
embedding's 64x64 grid, per image, averaged. The same probe on the image's own RGB, down-sampled to 64x64,
is the floor. A teacher whose features separate the lesion linearly gives the student's L_map / L_resp
something to copy; one that does not, little. Used for the Kvasir-SEG / BUSI gap of the method (README,
"Results so far"). Reads the teacher cache filled by training (``lesion-kd cache-teacher``); nothing is
trained but the probe (a few seconds per dataset, one thread):

    OMP_NUM_THREADS=1 python benchmarks/teacher_probe.py --dataset kvasir-seg --dataset busi
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from lesion_kd.data.datamodule import LesionDataModule
from lesion_kd.data.io import read_image, read_mask
from lesion_kd.teacher_cache import TeacherEmbeddingCache


def _grid(arr: np.ndarray, size: int, mode: str) -> torch.Tensor:
    """(C, size, size) float tensor of an (H, W[, C]) array resized to the embedding grid: the cache's entry is
    aligned with the full extent of the image, so a plain resize puts both on the same grid."""
    t = torch.from_numpy(arr).float()
    t = t.permute(2, 0, 1) if t.ndim == 3 else t[None]
    return F.interpolate(t[None], size=(size, size), mode=mode, **({"antialias": True} if mode == "bilinear" else {}))[0]


def _load(samples, cache: TeacherEmbeddingCache, desc: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    feats, rgbs, masks = [], [], []
    for s in tqdm(samples, desc=desc, unit="img", leave=False):
        feats.append(cache.get(s).float())
        rgbs.append(_grid(read_image(s.image) / 255.0, 64, "bilinear"))
        masks.append((_grid((read_mask(s.mask) > 0).astype(np.float32), 64, "area") >= 0.5).float())
    return torch.stack(feats), torch.stack(rgbs), torch.stack(masks)


def _standardise(train: torch.Tensor, test: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mu, sd = train.mean((0, 2, 3), keepdim=True), train.std((0, 2, 3), keepdim=True) + 1e-6
    return (train - mu) / sd, (test - mu) / sd


def probe_dice(x_train, y_train, x_test, y_test, steps: int = 300) -> float:
    """Per-image mean Dice (empty prediction and empty mask: 1) of a linear probe fitted with class-balanced
    logistic loss (full batch, Adam)."""
    x_train, x_test = _standardise(x_train, x_test)
    head = torch.nn.Conv2d(x_train.shape[1], 1, 1)
    opt = torch.optim.Adam(head.parameters(), lr=0.05)
    pos = y_train.mean().clamp(1e-3, 1 - 1e-3)
    for _ in range(steps):
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(head(x_train), y_train, pos_weight=(1 - pos) / pos)
        loss.backward()
        opt.step()
    with torch.no_grad():
        pred = (head(x_test) > 0).float()
    inter, total = (pred * y_test).sum((1, 2, 3)), (pred + y_test).sum((1, 2, 3))
    return torch.where(total > 0, 2 * inter / total.clamp_min(1), torch.ones_like(total)).mean().item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", action="append", help="kvasir-seg, busi (default: both)")
    ap.add_argument("--labeled-fraction", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0, help="the label seed (which training images are labeled)")
    args = ap.parse_args()
    torch.manual_seed(0)
    for name in args.dataset or ["kvasir-seg", "busi"]:
        dm = LesionDataModule(dataset=name, labeled_fraction=args.labeled_fraction, label_seed=args.seed,
                              num_workers=0)
        dm.setup()
        cache = TeacherEmbeddingCache(dataset=dm.dataset_name)
        missing = [s.id for s in dm.labeled + dm.unlabeled if not cache.is_valid(s)]
        if missing:
            raise SystemExit(f"{name}: {len(missing)} training images have no cached teacher embedding in {cache.dir} "
                             f"(e.g. {missing[0]}); fill it with 'lesion-kd cache-teacher' or one SemiKD run")
        f_lab, rgb_lab, y_lab = _load(dm.labeled, cache, f"{name} labeled")
        f_un, rgb_un, y_un = _load(dm.unlabeled, cache, f"{name} unlabeled")
        teacher = probe_dice(f_lab, y_lab, f_un, y_un)
        rgb = probe_dice(rgb_lab, y_lab, rgb_un, y_un)
        print(f"{name}: linear probe fitted on {len(dm.labeled)} labeled images, Dice on the {len(dm.unlabeled)} "
              f"unlabeled ones at 64x64: teacher embedding {100 * teacher:.2f} %, RGB {100 * rgb:.2f} %; "
              f"lesion area {100 * y_un.mean():.1f} % of the pixels", flush=True)


if __name__ == "__main__":
    main()
