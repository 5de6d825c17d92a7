"""Shared fixtures: the real datasets (read-only, from $LESION_KD_DATA or ../shared/datasets) and small
synthetic folder datasets that tests write themselves."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def real_data_dir() -> Path | None:
    for cand in (os.environ.get("LESION_KD_DATA"), REPO.parent / "shared" / "datasets"):
        if cand and (Path(cand) / "Kvasir-SEG" / "images").is_dir():
            return Path(cand)
    return None


@pytest.fixture(scope="session")
def data_dir() -> Path:
    d = real_data_dir()
    if d is None:
        pytest.skip("real datasets not found: set LESION_KD_DATA to the folder holding Kvasir-SEG/ and BUSI/")
    return d


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Every test caches under one session temp dir, never in the user's ~/.cache."""
    monkeypatch.setenv("LESION_KD_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


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


@pytest.fixture
def folder_dataset(tmp_path) -> Path:
    return make_folder_dataset(tmp_path / "mydata")
