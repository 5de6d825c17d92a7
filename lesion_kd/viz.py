"""Drawing predictions on images: numpy and OpenCV only (no torch), so that both ``lesion-kd predict`` (the
methods) and ``lesion-kd segment`` (the torch-free inference core, :mod:`lesion_kd.deploy.segment`) draw the
same overlay without either importing the other.

Also the predicted masks a finished cell keeps for the report's qualitative grid: at test time every cell writes
the masks of the same few test images (:func:`kept_prediction_ids`) as 1-bit PNGs at the evaluation size,
``predictions/<image id>.png`` beside its ``metrics.json`` (:func:`mask_png`, :func:`read_mask_png`), so the
report draws them on a clone that has no checkpoint."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np

__all__ = ["KEPT_PREDICTIONS", "kept_prediction_ids", "mask_png", "overlay", "prediction_filename", "read_mask_png"]

# how many test images of each cell keep their predicted mask (a few hundred bytes each at 160 x 160)
KEPT_PREDICTIONS = 16


def overlay(image: np.ndarray, mask: np.ndarray, color=(255, 64, 0), alpha: float = 0.45) -> np.ndarray:
    """(H, W, 3) uint8 image with a translucent ``mask`` (H, W) and its outline drawn on it (as ``lesion-kd predict``)."""
    out = image.astype(np.float32)
    m = mask > 0
    out[m] = (1 - alpha) * out[m] + alpha * np.array(color, np.float32)
    out = out.clip(0, 255).astype(np.uint8)
    import cv2

    contours, _ = cv2.findContours(m.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(out, contours, -1, color, max(1, round(min(mask.shape) / 200)))
    return out


def kept_prediction_ids(ids, k: int = KEPT_PREDICTIONS) -> list[str]:
    """The test images whose predicted masks a cell keeps: the ``k`` ids with the smallest SHA-1 digest of the id,
    in that order. A function of the test split's ids alone (not of the method, seed, label fraction, results or
    the order the ids come in), so every cell of a dataset keeps the same images and the grid can set them side
    by side."""
    return sorted(set(ids), key=lambda i: (hashlib.sha1(str(i).encode()).hexdigest(), str(i)))[:k]


def prediction_filename(image_id: str) -> str:
    """``<image id>.png``, any character other than letters, digits, ``.``, ``_`` and ``-`` as ``_``."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", str(image_id)) + ".png"


def mask_png(mask: np.ndarray) -> bytes:
    """A binary (H, W) mask (nonzero: lesion) as a 1-bit PNG."""
    import cv2

    ok, buf = cv2.imencode(".png", (np.asarray(mask) > 0).astype(np.uint8) * 255,
                           [cv2.IMWRITE_PNG_BILEVEL, 1, cv2.IMWRITE_PNG_COMPRESSION, 9])
    if not ok:
        raise ValueError(f"could not encode a mask of shape {np.shape(mask)} as PNG")
    return buf.tobytes()


def read_mask_png(path: str | Path) -> np.ndarray:
    """A kept mask (1-bit, or 8-bit 0/255 as the report once wrote them) as a bool (H, W) array."""
    import cv2

    arr = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if arr is None:
        raise ValueError(f"{path}: not a readable PNG")
    return arr > 0
