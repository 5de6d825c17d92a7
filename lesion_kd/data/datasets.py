"""Torch datasets over prepared (canonical, model-size) samples."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .folder import Sample
from .io import read_image, split_image_name
from .prep import load_canonical, resize_image
from .transforms import ViewPairTransform


def to_tensor(img: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) float32 in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float().div_(255.0)


class ViewPairDataset(Dataset):
    """Training samples as a weak/strong pair of views.

    Item: ``image_weak``, ``image_strong`` (3, S, S) float in [0, 1]; ``mask`` (S, S) long in {0, 1} (the weak
    view's; zeros for unlabeled samples); ``theta`` (2, 3) view -> canonical affine; ``index``; ``id``.
    """

    def __init__(self, samples: list[Sample], size: int, transform: ViewPairTransform, cache_dir: str | None = None,
                 labeled: bool = True, extras: Callable[[Sample], dict] | None = None) -> None:
        self.samples, self.size, self.transform, self.cache_dir, self.labeled = samples, size, transform, cache_dir, labeled
        self.extras = extras  # per-sample additions (e.g. the cached teacher embedding), loaded in the workers
        self._seed: int | None = None

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        # key: an index, or (index, augmentation seed) from the training StreamSampler, which makes each
        # sample's augmentation a function of its stream position (exact resume, any worker count).
        # A bare index re-seeds albumentations' own generators from torch's per-process seed, which
        # Lightning's seed_everything(workers=True) makes distinct per worker and reproducible.
        i, seed = key if isinstance(key, tuple) else (key, torch.initial_seed() % 2**31)
        if isinstance(key, tuple) or seed != self._seed:
            self.transform.set_seed(seed)
            self._seed = seed
        c = load_canonical(self.samples[i], self.size, self.cache_dir)
        weak, strong, mask, theta = self.transform(c.image, c.mask if self.labeled else None)
        item = {
            "image_weak": to_tensor(weak),
            "image_strong": to_tensor(strong),
            "mask": torch.from_numpy(mask.astype(np.int64)),
            "theta": torch.from_numpy(theta),
            "index": i,
            "id": self.samples[i].id,
        }
        if self.extras is not None:
            item.update(self.extras(self.samples[i]))
        return item


class EvalDataset(Dataset):
    """Un-augmented samples at model size. Item: ``image`` (3, S, S), ``mask`` (S, S) long, ``index``, ``id``."""

    def __init__(self, samples: list[Sample], size: int, cache_dir: str | None = None) -> None:
        self.samples, self.size, self.cache_dir = samples, size, cache_dir

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        c = load_canonical(self.samples[i], self.size, self.cache_dir)
        mask = c.mask if c.mask is not None else np.zeros(c.image.shape[:2], np.uint8)
        return {"image": to_tensor(c.image), "mask": torch.from_numpy(mask.astype(np.int64)), "index": i,
                "id": self.samples[i].id}


class ImageFolderDataset(Dataset):
    """Any images (a folder or a list of files) for prediction: ``image`` (3, S, S), ``orig_hw``, ``path``, ``id``."""

    def __init__(self, paths: list[Path], size: int) -> None:
        self.paths, self.size = paths, size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict:
        img = read_image(self.paths[i])
        return {"image": to_tensor(resize_image(img, self.size)), "orig_hw": torch.tensor(img.shape[:2]),
                "path": os.fspath(self.paths[i]), "id": (split_image_name(self.paths[i].name) or (self.paths[i].stem,))[0],
                "index": i}
