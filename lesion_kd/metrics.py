"""Per-image segmentation metrics (on MONAI), aggregated over images.

Dice, IoU, HD95 and ASD (average symmetric surface distance) are computed per image on binary masks,
then averaged over images with their standard deviation (never pooled over the test set). Distances are
in pixels of the grid the masks live on (no spacing), as in the paper's Table 1.

Empty masks, decided explicitly (MONAI returns nan/inf for them and a mean-aggregated HD95 then reports
0.0, a perfect score, for an empty prediction):

==================  ==========  ==========  =====================================
prediction / truth  Dice, IoU   HD95, ASD   why
==================  ==========  ==========  =====================================
empty / empty       1, 1        0, 0        correctly found no lesion
empty / lesion      0, 0        diagonal    missed lesion: the worst distance the image allows
lesion / empty      0, 0        diagonal    a lesion invented where there is none
==================  ==========  ==========  =====================================

``diagonal`` is the image diagonal sqrt(H^2 + W^2) in pixels.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance, compute_iou
from monai.metrics.meandice import compute_dice

METRICS = ("dice", "iou", "hd95", "asd")


def image_metrics(pred: np.ndarray | torch.Tensor, target: np.ndarray | torch.Tensor) -> dict[str, float]:
    """Metrics of one binary prediction (H, W) against its ground truth (H, W)."""
    p = torch.as_tensor(np.asarray(pred) > 0 if not isinstance(pred, torch.Tensor) else pred > 0)
    t = torch.as_tensor(np.asarray(target) > 0 if not isinstance(target, torch.Tensor) else target > 0)
    if p.shape != t.shape or p.ndim != 2:
        raise ValueError(f"prediction {tuple(p.shape)} and target {tuple(t.shape)} must be the same (H, W)")
    h, w = t.shape
    diag = math.hypot(h, w)
    p_any, t_any = bool(p.any()), bool(t.any())
    if not p_any and not t_any:
        return {"dice": 1.0, "iou": 1.0, "hd95": 0.0, "asd": 0.0}
    if not p_any or not t_any:
        return {"dice": 0.0, "iou": 0.0, "hd95": diag, "asd": diag}
    # MONAI wants one-hot (B, C, H, W); background excluded.
    y_pred = p[None, None].float()
    y = t[None, None].float()
    return {
        "dice": float(compute_dice(y_pred, y, include_background=True)[0, 0]),
        "iou": float(compute_iou(y_pred, y, include_background=True)[0, 0]),
        "hd95": float(compute_hausdorff_distance(y_pred, y, include_background=True, percentile=95)[0, 0]),
        "asd": float(compute_average_surface_distance(y_pred, y, include_background=True, symmetric=True)[0, 0]),
    }


def summarize(per_image: dict[str, dict[str, float]], resolution: str = "model") -> dict:
    """``{"dice": {"mean", "std"}, ..., "n_images", "resolution", "per_image"}`` over the images given."""
    if not per_image:
        raise ValueError("no images to summarise")
    out: dict = {}
    for m in METRICS:
        vals = np.array([v[m] for v in per_image.values()], dtype=np.float64)
        out[m] = {"mean": float(vals.mean()), "std": float(vals.std())}
    out["n_images"] = len(per_image)
    out["resolution"] = resolution
    out["per_image"] = {k: per_image[k] for k in sorted(per_image)}
    return out
