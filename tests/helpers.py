"""Plain helpers shared by several test files: constants, builders of tiny inputs and the ``lesion-kd`` command
runner. Fixtures live in conftest.py; no test module imports another (tests/test_test_layout.py checks it).
tests/ is on sys.path (pytest's rootdir-relative import of conftest.py puts it there), so ``from helpers
import ...`` works from any test file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------- the real datasets
def real_data_dir() -> Path | None:
    for cand in (os.environ.get("LESION_KD_DATA"), REPO.parent / "shared" / "datasets"):
        if cand and (Path(cand) / "Kvasir-SEG" / "images").is_dir():
            return Path(cand)
    return None


# ------------------------------------------------------------------------------ synthetic folder data
def disk_image(h: int, w: int, seed: int = 0, cy: float = 0.5, cx: float = 0.5, r: float = 0.25):
    """A bright disk on a textured background: (image (h, w, 3) uint8, mask (h, w) uint8 {0,1})."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    mask = ((yy - cy * h) ** 2 + (xx - cx * w) ** 2 <= (r * min(h, w)) ** 2).astype(np.uint8)
    img = rng.integers(20, 90, size=(h, w, 3)).astype(np.uint8)
    img[mask > 0] = rng.integers(180, 250, size=(int(mask.sum()), 3)).astype(np.uint8)
    return img, mask


def make_folder_dataset(root: Path, n: int = 12, sizes=((48, 64), (64, 64), (80, 56)), ext: str = ".png") -> Path:
    """Write ``n`` synthetic image/mask pairs of mixed sizes into ``root/images`` and ``root/masks``."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        h, w = sizes[i % len(sizes)]
        img, mask = disk_image(h, w, seed=i, cy=0.3 + 0.4 * (i % 3) / 2, cx=0.5)
        Image.fromarray(img).save(root / "images" / f"case{i:03d}{ext}")
        Image.fromarray(mask * 255).save(root / "masks" / f"case{i:03d}.png")
    return root


# ------------------------------------------------------------------------------ the lesion-kd command
# the supervised U-Net on Kvasir-SEG, smoke profile
BASE = ["--config", "experiments/data/kvasir-seg.yaml", "--config", "experiments/method/supervised.yaml",
        "--config", "experiments/profile/smoke.yaml"]


def lesion_kd(*args: str, env_extra: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``python -m lesion_kd.cli ARGS`` from the repository root; a non-zero exit fails with its output."""
    env = {**os.environ, **(env_extra or {})}
    proc = subprocess.run([sys.executable, "-m", "lesion_kd.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"lesion-kd {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def run_dir_of(root: Path) -> Path:
    """The one run directory (the folder of the one metrics.json) under ``root``."""
    (metrics,) = root.rglob("metrics.json")
    return metrics.parent


def method_config_args(method: str) -> list[str]:
    """--config arguments of a method (experiments/method/<method>.yaml) on Kvasir-SEG, smoke profile."""
    return ["--config", "experiments/data/kvasir-seg.yaml", "--config", f"experiments/method/{method}.yaml",
            "--config", "experiments/profile/smoke.yaml"]


# ------------------------------------------------------------------- tiny methods, batches and scenes
# a U-Net small enough for a training step in well under a second at 32 x 32
TINY = {"network": "unet", "network_kwargs": {"channels": [8, 16, 32, 64, 128]}}
# a SAM image encoder small enough to run in about half a second at 1024 x 1024
TINY_SAM = {"encoder_embed_dim": 32, "encoder_depth": 2, "encoder_num_heads": 2, "encoder_global_attn_indexes": ()}


def method_config(name: str) -> dict:
    """The ``model`` section of experiments/method/<name>.yaml."""
    return yaml.safe_load((REPO / "experiments" / "method" / f"{name}.yaml").read_text())["model"]


def view_geometries(n: int, crop: tuple[int, int, int, int]) -> dict:
    """name -> (theta, the same augmentation as an image operation on a canonical (B, C, n, n) map), for identity,
    hflip, rot90 and the crop ``(x0, y0, w, h)`` in cells: what a view's recorded geometry means, to check that
    something warped by ``theta`` (geometry.warp_to_view) is the canonical map moved by the augmentation."""
    x0, y0, w, h = crop
    return {
        "identity": (torch.eye(2, 3), lambda m: m),
        "hflip": (torch.tensor([[-1.0, 0, 0], [0, 1, 0]]), lambda m: m.flip(-1)),
        "rot90": (torch.tensor([[0.0, -1, 0], [1, 0, 0]]), lambda m: m.rot90(1, (-2, -1))),
        "crop": (torch.tensor([[w / n, 0, (2 * x0 + w) / n - 1], [0, h / n, (2 * y0 + h) / n - 1]]),
                 lambda m: m[..., y0 : y0 + h, x0 : x0 + w]),
    }


def batch(n_lab: int = 2, n_unl: int = 2, size: int = 32, seed: int = 0) -> dict:
    """A semi-supervised training batch: ``labeled`` and ``unlabeled`` parts of random images, one box lesion."""
    g = torch.Generator().manual_seed(seed)

    def part(n: int) -> dict:
        mask = torch.zeros(n, size, size, dtype=torch.long)
        mask[:, 8:20, 10:24] = 1
        return {"image_weak": torch.rand(n, 3, size, size, generator=g),
                "image_strong": torch.rand(n, 3, size, size, generator=g), "mask": mask,
                "index": torch.arange(n), "id": [f"x{i}" for i in range(n)]}

    return {"labeled": part(n_lab), "unlabeled": part(n_unl)}


def tiny(cls, **kw):
    """The method ``cls`` on the tiny U-Net (TINY), seeded; ``kw`` overrides its options."""
    torch.manual_seed(0)
    return cls(**{**TINY, **kw})


def disk_scene(h: int = 240, w: int = 320):
    """A bright disk on a textured background: image (1, 3, h, w) in [0, 1], mask (h, w), box (1, 4)."""
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    cx, cy, r = 0.55 * w, 0.45 * h, 0.18 * min(h, w) + 8
    disk = ((xx - cx) ** 2 + (yy - cy) ** 2 < r**2).float()
    texture = 0.3 + 0.1 * torch.sin(xx / 5.0) * torch.cos(yy / 7.0) + 0.05 * torch.rand(h, w, generator=g)
    image = (texture * (1 - disk) + 0.85 * disk).clamp(0, 1).expand(1, 3, h, w).contiguous()
    ys, xs = torch.nonzero(disk, as_tuple=True)
    box = torch.stack([xs.min(), ys.min(), xs.max(), ys.max()]).float()[None] + torch.tensor([[-5.0, -5.0, 5.0, 5.0]])
    return image, disk, box


def dice(prob, target) -> float:
    """Dice of ``prob > 0.5`` against a {0, 1} target (tensors)."""
    pred = (prob > 0.5).float()
    return float(2 * (pred * target).sum() / (pred.sum() + target.sum()).clamp_min(1))


# -------------------------------------------------------------------------------- per-image results
def write_cell(root: Path, name: str, dice: list[float], hd95: list[float] | None = None, dataset: str = "kvasir-seg",
               ids: list[str] | None = None) -> None:
    """A finished result cell ``root/dataset/name/metrics.json`` with the given per-image Dice and HD95."""
    ids = ids or [f"img{i:03d}" for i in range(len(dice))]
    hd95 = hd95 if hd95 is not None else [10.0] * len(dice)
    per_image = {i: {"dice": d, "iou": d, "hd95": h, "asd": h / 3} for i, d, h in zip(ids, dice, hd95, strict=True)}
    doc = {k: {"mean": float(np.mean([v[k] for v in per_image.values()])), "std": 0.0} for k in ("dice", "iou", "hd95", "asd")}
    cell = root / dataset / name
    cell.mkdir(parents=True)
    (cell / "metrics.json").write_text(json.dumps({**doc, "n_images": len(ids), "per_image": per_image}))
