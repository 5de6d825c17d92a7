"""Per-image segmentation metrics (on MONAI), aggregated over images.

Dice, IoU, HD95 and ASD (average symmetric surface distance) are computed per image on binary masks,
then averaged over images with their standard deviation (never pooled over the test set). Distances are
in pixels of the grid the masks live on (no spacing), as in the paper's Table 1.

Two 95th-percentile Hausdorff distances, both on the same boundary pixels (mask XOR its erosion by the
4-connected cross) and the same Euclidean distances (each boundary pixel of one mask to the nearest
boundary pixel of the other); they differ only in where the percentile is taken:

- ``hd95``: MONAI's ``compute_hausdorff_distance(percentile=95)`` (the suite's headline HD95): the 95th
  percentile of the prediction-to-truth distances and that of the truth-to-prediction distances, the
  larger of the two (directed max of per-direction percentiles).
- ``hd95_pooled``: MedPy's ``medpy.metric.binary.hd95`` (0.5.2), which SSL4MIS-derived code and so most
  semi-supervised papers' tables use: one 95th percentile of both directions' distances pooled together
  (``np.percentile(np.hstack((d_pred_to_truth, d_truth_to_pred)), 95)``). A percentile of the pooled
  distances lies between the two directions' percentiles (up to the linear interpolation), so it is at or,
  usually, below ``hd95``: compare published SSL4MIS-style HD95 with this one.

Empty masks, decided explicitly (MONAI returns nan/inf for them and a mean-aggregated HD95 then reports
0.0, a perfect score, for an empty prediction; MedPy raises); both HD95s follow the same rule:

==================  ==========  ===========================  =====================================
prediction / truth  Dice, IoU   HD95, HD95 pooled, ASD       why
==================  ==========  ===========================  =====================================
empty / empty       1, 1        0, 0, 0                      correctly found no lesion
empty / lesion      0, 0        diagonal                     missed lesion: the worst distance the image allows
lesion / empty      0, 0        diagonal                     a lesion invented where there is none
==================  ==========  ===========================  =====================================

``diagonal`` is the image diagonal sqrt(H^2 + W^2) in pixels.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch

# MONAI and scipy.ndimage are imported in the functions that use them: the methods import this module, and
# `lesion-kd fit --help` must not pay for MONAI (tests/test_imports.py).

# MONAI's own compute_hausdorff_distance/compute_average_surface_distance pass get_mask_edges an argument that
# MONAI itself deprecates (monai.metrics.utils, 1.5 to 1.7): a FutureWarning on every run, nothing a user can act on
warnings.filterwarnings("ignore", message=r"monai\.metrics\.utils get_mask_edges:always_return_as_numpy",
                        category=FutureWarning)

# hd95: MONAI's directed max of per-direction 95th percentiles; hd95_pooled: MedPy's 95th percentile of
# both directions pooled (see the module docstring)
METRICS = ("dice", "iou", "hd95", "asd", "hd95_pooled")


def hd95_pooled(pred: np.ndarray, target: np.ndarray) -> float:
    """MedPy 0.5.2's ``hd95(pred, target)`` (voxelspacing 1, connectivity 1) of two non-empty 2D masks.

    Written here, following ``medpy.metric.binary.hd95`` and ``__surface_distances`` step by step, because
    MONAI (the suite's metrics library) has only the per-direction percentile and MedPy itself pulls in
    SimpleITK. Boundary = mask XOR its erosion by the connectivity-1 structure (border value 0, as scipy's
    default); distances = scipy's Euclidean distance transform of the other mask's boundary complement, read
    at this mask's boundary pixels; one ``np.percentile(..., 95)`` (linear) over both directions.
    """
    p, t = np.asarray(pred, dtype=bool), np.asarray(target, dtype=bool)
    if not p.any() or not t.any():
        raise ValueError("hd95_pooled needs a non-empty prediction and truth (image_metrics decides the empty cases)")
    # crop to the union's bounding box plus a 1-pixel margin: the same boundaries (erosion outside the image
    # counts as background either way) and the same distances, on fewer pixels at original resolution
    rows, cols = np.nonzero(p | t)
    box = (slice(max(rows.min() - 1, 0), rows.max() + 2), slice(max(cols.min() - 1, 0), cols.max() + 2))
    p, t = p[box], t[box]
    from scipy.ndimage import binary_erosion, distance_transform_edt, generate_binary_structure

    footprint = generate_binary_structure(2, 1)
    p_border = p ^ binary_erosion(p, structure=footprint, iterations=1)
    t_border = t ^ binary_erosion(t, structure=footprint, iterations=1)
    d_pt = distance_transform_edt(~t_border)[p_border]
    d_tp = distance_transform_edt(~p_border)[t_border]
    return float(np.percentile(np.hstack((d_pt, d_tp)), 95))


def image_metrics(pred: np.ndarray | torch.Tensor, target: np.ndarray | torch.Tensor) -> dict[str, float]:
    """Metrics of one binary prediction (H, W) against its ground truth (H, W): ``dice``, ``iou``, ``hd95``
    (MONAI: directed max of per-direction 95th percentiles), ``asd`` and ``hd95_pooled`` (MedPy: one 95th
    percentile of both directions pooled), distances in pixels."""
    p = torch.as_tensor(np.asarray(pred) > 0 if not isinstance(pred, torch.Tensor) else pred > 0)
    t = torch.as_tensor(np.asarray(target) > 0 if not isinstance(target, torch.Tensor) else target > 0)
    if p.shape != t.shape or p.ndim != 2:
        raise ValueError(f"prediction {tuple(p.shape)} and target {tuple(t.shape)} must be the same (H, W)")
    h, w = t.shape
    diag = math.hypot(h, w)
    p_any, t_any = bool(p.any()), bool(t.any())
    if not p_any and not t_any:
        return {"dice": 1.0, "iou": 1.0, "hd95": 0.0, "asd": 0.0, "hd95_pooled": 0.0}
    if not p_any or not t_any:
        return {"dice": 0.0, "iou": 0.0, "hd95": diag, "asd": diag, "hd95_pooled": diag}
    from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance, compute_iou
    from monai.metrics.meandice import compute_dice

    # MONAI wants one-hot (B, C, H, W); background excluded.
    y_pred = p[None, None].float()
    y = t[None, None].float()
    return {
        "dice": float(compute_dice(y_pred, y, include_background=True)[0, 0]),
        "iou": float(compute_iou(y_pred, y, include_background=True)[0, 0]),
        "hd95": float(compute_hausdorff_distance(y_pred, y, include_background=True, percentile=95)[0, 0]),
        "asd": float(compute_average_surface_distance(y_pred, y, include_background=True, symmetric=True)[0, 0]),
        "hd95_pooled": hd95_pooled(p.cpu().numpy(), t.cpu().numpy()),
    }


def summarize(per_image: dict[str, dict[str, float]], resolution: str = "model") -> dict:
    """``{"dice": {"mean", "std"}, ..., "n_images", "resolution", "per_image"}`` over the images given, one
    ``{"mean", "std"}`` per metric of :data:`METRICS` (``hd95`` MONAI's, ``hd95_pooled`` MedPy's)."""
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
