"""View geometry: each augmented view records a 2x3 affine ``theta`` in normalised coordinates.

Convention (that of ``torch.nn.functional.affine_grid`` with ``align_corners=False``): for a pixel of the
*view* at normalised position (x_v, y_v) in [-1, 1] (pixel centres at (2j+1)/W - 1), the pixel of the
*canonical* image (the resized, un-augmented image) that it shows is ``theta @ [x_v, y_v, 1]``. So any
map aligned with the canonical image (a cached teacher embedding, a label map) is brought onto the view
with :func:`warp_to_view`.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

IDENTITY = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=np.float32)


def pixel_centres(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Normalised x and y coordinates (align_corners=False) of every pixel centre, each (h, w)."""
    xs = (2 * np.arange(w, dtype=np.float32) + 1) / w - 1
    ys = (2 * np.arange(h, dtype=np.float32) + 1) / h - 1
    return np.meshgrid(xs, ys)


def coordinate_map(h: int, w: int, offset: float = 2.0) -> np.ndarray:
    """(h, w, 2) float32 map of canonical pixel-centre coordinates shifted by ``offset``.

    The shift keeps every valid coordinate >= 1 so that a zero border fill marks pixels that came from
    outside the canonical image.
    """
    gx, gy = pixel_centres(h, w)
    return np.stack([gx + offset, gy + offset], axis=-1).astype(np.float32)


def fit_affine(warped: np.ndarray, offset: float = 2.0, erode: int = 2) -> np.ndarray:
    """Recover ``theta`` (2, 3) from a coordinate map that went through a geometric augmentation.

    Least squares over the pixels whose source lay inside the canonical image (eroded by ``erode``
    pixels so that bilinear blending with the border fill is excluded). Exact for any affine transform,
    since bilinear interpolation of a linear function is exact.
    """
    h, w = warped.shape[:2]
    valid = (warped[..., 0] >= offset - 1.0) & (warped[..., 1] >= offset - 1.0)
    if erode > 0:
        v = valid.copy()
        for dy in range(-erode, erode + 1):
            for dx in range(-erode, erode + 1):
                v &= np.roll(np.roll(valid, dy, 0), dx, 1)
        v[:erode] = v[-erode:] = False
        v[:, :erode] = v[:, -erode:] = False
        valid = v if v.sum() >= 3 else valid
    gx, gy = pixel_centres(h, w)
    step = max(1, int(np.sqrt(valid.sum() / 4096)))  # a few thousand points are plenty
    sel = np.zeros_like(valid)
    sel[::step, ::step] = True
    sel &= valid
    if sel.sum() < 3:
        raise ValueError("augmentation left fewer than 3 pixels inside the image; cannot recover its geometry")
    A = np.stack([gx[sel], gy[sel], np.ones(sel.sum(), np.float32)], axis=1).astype(np.float64)
    src = (warped[sel] - offset).astype(np.float64)
    theta, *_ = np.linalg.lstsq(A, src, rcond=None)
    return theta.T.astype(np.float32)


def warp_to_view(canonical: torch.Tensor, theta: torch.Tensor, size: tuple[int, int] | None = None,
                 mode: str = "bilinear") -> torch.Tensor:
    """Bring canonical-aligned maps (B, C, h, w) onto the views described by ``theta`` (B, 2, 3).

    Returns (B, C, *size) (default: the input's h, w); locations outside the canonical image are 0.
    """
    if size is None:
        size = tuple(canonical.shape[-2:])
    grid = F.affine_grid(theta.to(canonical.dtype), [canonical.shape[0], canonical.shape[1], *size], align_corners=False)
    return F.grid_sample(canonical, grid, mode=mode, padding_mode="zeros", align_corners=False)
