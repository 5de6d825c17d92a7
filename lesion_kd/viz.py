"""Drawing predictions on images: numpy and OpenCV only (no torch), so that both ``lesion-kd predict`` (the
methods) and ``lesion-kd segment`` (the torch-free inference core, :mod:`lesion_kd.deploy.segment`) draw the
same overlay without either importing the other."""

from __future__ import annotations

import cv2
import numpy as np

__all__ = ["overlay"]


def overlay(image: np.ndarray, mask: np.ndarray, color=(255, 64, 0), alpha: float = 0.45) -> np.ndarray:
    """(H, W, 3) uint8 image with a translucent ``mask`` (H, W) and its outline drawn on it (as ``lesion-kd predict``)."""
    out = image.astype(np.float32)
    m = mask > 0
    out[m] = (1 - alpha) * out[m] + alpha * np.array(color, np.float32)
    out = out.clip(0, 255).astype(np.uint8)
    contours, _ = cv2.findContours(m.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(out, contours, -1, color, max(1, round(min(mask.shape) / 200)))
    return out
