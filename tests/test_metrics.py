"""Per-image metrics, the empty-mask rules, and mean/std over images (never pooled)."""

import math

import numpy as np
import pytest

from lesion_kd.metrics import image_metrics, summarize


def square(h, w, y0, y1, x0, x1):
    m = np.zeros((h, w), np.uint8)
    m[y0:y1, x0:x1] = 1
    return m


def test_known_overlap_values():
    a, b = square(64, 64, 10, 30, 10, 30), square(64, 64, 12, 32, 10, 30)
    r = image_metrics(a, b)
    assert r["dice"] == pytest.approx(2 * 360 / 800)
    assert r["iou"] == pytest.approx(360 / 440)
    assert r["hd95"] == pytest.approx(2.0)
    assert 0 < r["asd"] <= 2.0


def test_perfect_prediction():
    a = square(32, 32, 4, 20, 4, 20)
    assert image_metrics(a, a) == {"dice": 1.0, "iou": 1.0, "hd95": 0.0, "asd": 0.0}


def test_empty_prediction_is_worst_distance_not_zero():
    gt = square(30, 40, 5, 10, 5, 10)
    r = image_metrics(np.zeros_like(gt), gt)
    assert r["dice"] == 0.0 and r["hd95"] == pytest.approx(math.hypot(30, 40)) and r["asd"] == r["hd95"]


def test_false_positive_on_empty_truth_and_both_empty():
    z = np.zeros((30, 40), np.uint8)
    fp = image_metrics(square(30, 40, 1, 3, 1, 3), z)
    assert fp["dice"] == 0.0 and fp["hd95"] == pytest.approx(50.0)
    assert image_metrics(z, z) == {"dice": 1.0, "iou": 1.0, "hd95": 0.0, "asd": 0.0}


def test_summary_averages_per_image_not_pooled():
    # one large perfect image and one small missed lesion: pooled Dice would be ~0.99, per-image mean 0.5
    big = square(64, 64, 0, 60, 0, 60)
    small = square(64, 64, 0, 2, 0, 2)
    per = {"a": image_metrics(big, big), "b": image_metrics(np.zeros_like(small), small)}
    s = summarize(per)
    assert s["dice"]["mean"] == pytest.approx(0.5) and s["dice"]["std"] == pytest.approx(0.5)
    assert s["n_images"] == 2 and s["resolution"] == "model" and set(s["per_image"]) == {"a", "b"}
