"""Weak/strong view pairs (albumentations) with each view's geometry recorded as a 2x3 affine.

The weak pipeline is geometric (flips, rot90, small affine); the strong view is the weak view passed
through a photometric pipeline (colour jitter, blur, noise, cutout), so both views share one geometry and
one mask (albumentations' ``additional_targets`` would give both images identical parameters, so it
cannot make two different views). The geometry is recovered exactly by pushing a map of canonical
pixel coordinates through the same weak transform and fitting the affine (see ``geometry.fit_affine``),
so any geometric albumentations pipeline a user configures keeps correct bookkeeping.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .geometry import coordinate_map, fit_affine

if TYPE_CHECKING:  # albumentations is imported where a pipeline is built: `lesion-kd fit --help` does not load it
    import albumentations as A


@dataclass
class AugmentationConfig:
    """Strength of the weak and strong views.

    Args:
        flip: probability of each of the horizontal and vertical flips.
        rot90: probability of a random multiple-of-90-degree rotation.
        affine: probability of the small affine below.
        rotate: maximum rotation in degrees of the small affine.
        scale: maximum relative scale change of the small affine (0.1 = 0.9x to 1.1x).
        translate: maximum shift as a fraction of the image side.
        color_jitter: probability of brightness/contrast/saturation/hue jitter in the strong view.
        blur: probability of a Gaussian blur in the strong view.
        noise: probability of Gaussian noise in the strong view.
        cutout: probability of 1-3 cut-out rectangles in the strong view.
    """

    flip: float = 0.5
    rot90: float = 0.5
    affine: float = 0.5
    rotate: float = 15.0
    scale: float = 0.1
    translate: float = 0.05
    color_jitter: float = 0.8
    blur: float = 0.3
    noise: float = 0.3
    cutout: float = 0.5


def weak_pipeline(cfg: AugmentationConfig) -> A.Compose:
    import albumentations as A
    import cv2

    return A.Compose(
        [
            A.HorizontalFlip(p=cfg.flip),
            A.VerticalFlip(p=cfg.flip),
            A.RandomRotate90(p=cfg.rot90),
            A.Affine(
                scale=(1 - cfg.scale, 1 + cfg.scale), rotate=(-cfg.rotate, cfg.rotate),
                translate_percent=(-cfg.translate, cfg.translate), border_mode=cv2.BORDER_CONSTANT,
                fill=0, fill_mask=0, p=cfg.affine,
            ),
        ],
        additional_targets={"coords": "image"},
        seed=None,
    )


def strong_pipeline(cfg: AugmentationConfig) -> A.Compose:
    import albumentations as A

    return A.Compose(
        [
            A.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1, p=cfg.color_jitter),
            A.GaussianBlur(blur_limit=(3, 7), p=cfg.blur),
            A.GaussNoise(std_range=(0.02, 0.1), p=cfg.noise),
            A.CoarseDropout(num_holes_range=(1, 3), hole_height_range=(0.1, 0.3), hole_width_range=(0.1, 0.3), fill=0, p=cfg.cutout),
        ]
    )


class ViewPairTransform:
    """(image (S,S,3) uint8, mask (S,S) uint8) -> weak image, strong image, mask, theta (2, 3).

    ``theta`` maps view coordinates to canonical coordinates (``affine_grid`` convention).
    """

    def __init__(self, cfg: AugmentationConfig | None = None) -> None:
        self.cfg = cfg or AugmentationConfig()
        self.weak = weak_pipeline(self.cfg)
        self.strong = strong_pipeline(self.cfg)

    def set_seed(self, seed: int) -> None:
        """Seed albumentations' own generators (called once per data-loader worker)."""
        self.weak.set_random_seed(seed)
        self.strong.set_random_seed(seed + 1)

    def __call__(self, image: np.ndarray, mask: np.ndarray | None):
        h, w = image.shape[:2]
        m = mask if mask is not None else np.zeros((h, w), np.uint8)
        out = self.weak(image=image, mask=m, coords=coordinate_map(h, w))
        theta = fit_affine(out["coords"])
        strong = self.strong(image=out["image"])["image"]
        return out["image"], strong, out["mask"], theta
