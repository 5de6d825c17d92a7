"""Per-image metrics, the empty-mask rules, the two HD95 definitions, and mean/std over images (never pooled)."""

import math

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from lesion_kd.metrics import METRICS, hd95_pooled, image_metrics, summarize

PERFECT = {"dice": 1.0, "iou": 1.0, "hd95": 0.0, "asd": 0.0, "hd95_pooled": 0.0}


def square(h, w, y0, y1, x0, x1):
    m = np.zeros((h, w), np.uint8)
    m[y0:y1, x0:x1] = 1
    return m


def test_known_overlap_values():
    a, b = square(64, 64, 10, 30, 10, 30), square(64, 64, 12, 32, 10, 30)
    r = image_metrics(a, b)
    assert r["dice"] == pytest.approx(2 * 360 / 800)
    assert r["iou"] == pytest.approx(360 / 440)
    assert r["hd95"] == pytest.approx(2.0) and r["hd95_pooled"] == pytest.approx(2.0)
    assert 0 < r["asd"] <= 2.0


def test_perfect_prediction():
    a = square(32, 32, 4, 20, 4, 20)
    assert image_metrics(a, a) == PERFECT


def test_empty_prediction_is_worst_distance_not_zero():
    gt = square(30, 40, 5, 10, 5, 10)
    r = image_metrics(np.zeros_like(gt), gt)
    assert r["dice"] == 0.0 and r["hd95"] == pytest.approx(math.hypot(30, 40))
    assert r["asd"] == r["hd95_pooled"] == r["hd95"]


def test_false_positive_on_empty_truth_and_both_empty():
    z = np.zeros((30, 40), np.uint8)
    fp = image_metrics(square(30, 40, 1, 3, 1, 3), z)
    assert fp["dice"] == 0.0 and fp["hd95"] == fp["hd95_pooled"] == fp["asd"] == pytest.approx(50.0)
    assert image_metrics(z, z) == PERFECT
    # the empty cases are image_metrics' to decide; the pooled distance alone refuses them (MedPy raises too)
    with pytest.raises(ValueError, match="non-empty"):
        hd95_pooled(z, square(30, 40, 1, 3, 1, 3))


def test_summary_averages_per_image_not_pooled():
    # one large perfect image and one small missed lesion: pooled Dice would be ~0.99, per-image mean 0.5
    big = square(64, 64, 0, 60, 0, 60)
    small = square(64, 64, 0, 2, 0, 2)
    per = {"a": image_metrics(big, big), "b": image_metrics(np.zeros_like(small), small)}
    s = summarize(per)
    assert s["dice"]["mean"] == pytest.approx(0.5) and s["dice"]["std"] == pytest.approx(0.5)
    assert set(METRICS) <= set(s) and s["hd95_pooled"]["mean"] == pytest.approx(math.hypot(64, 64) / 2)
    assert s["n_images"] == 2 and s["resolution"] == "model" and set(s["per_image"]) == {"a", "b"}


def test_the_two_hd95_definitions_on_a_hand_computed_case():
    # truth: the 3x3 square rows 2-4, cols 2-4; prediction: the same square plus one stray pixel at (3, 9).
    # Boundary = mask XOR its erosion by the 4-connected cross: the square's centre (3, 3) has its 4
    # neighbours inside, so it is interior; the square's boundary is its 8 outer pixels, the stray pixel is
    # its own boundary. Prediction boundary: 9 pixels, truth boundary: 8.
    #   prediction -> truth: the 8 ring pixels lie on the truth's ring (0); (3, 9) is 5 from (3, 4): [0]*8 + [5]
    #   truth -> prediction: every truth ring pixel is a prediction ring pixel: [0]*8
    # np.percentile / torch.quantile, linear: the 95th percentile of n sorted values sits at 0.95 * (n - 1).
    #   hd95 (MONAI, per direction then max): pred->truth 0.95 * 8 = 7.6 -> 0 + 0.6 * (5 - 0) = 3.0;
    #        truth->pred 0; max(3.0, 0) = 3.0
    #   hd95_pooled (MedPy, 17 values pooled: sixteen 0s and one 5): 0.95 * 16 = 15.2 -> 0 + 0.2 * 5 = 1.0
    truth = square(7, 12, 2, 5, 2, 5)
    pred = truth.copy()
    pred[3, 9] = 1
    for a, b in ((pred, truth), (truth, pred)):  # both definitions are symmetric in their arguments
        r = image_metrics(a, b)
        assert r["hd95"] == pytest.approx(3.0) and r["hd95_pooled"] == pytest.approx(1.0)
        assert r["dice"] == pytest.approx(2 * 9 / (10 + 9))
    assert hd95_pooled(pred, truth) == pytest.approx(1.0)


def test_pooled_hd95_reads_the_same_boundary_distances_as_monai():
    # an independent path to the same distances: MONAI's own boundary extraction and distance transform
    # (what the suite's hd95 and asd read), pooled and percentiled as MedPy does; blobs touching the image
    # edge included (outside the image counts as background in both)
    from monai.metrics.utils import get_edge_surface_distance

    rng = np.random.default_rng(0)
    checked = 0
    while checked < 20:
        h, w = rng.integers(12, 60, 2)
        a, b = (gaussian_filter(rng.standard_normal((h, w)), rng.uniform(1, 4)) > rng.uniform(0, 0.3) for _ in "ab")
        if not a.any() or not b.any():
            continue
        _, (d_ab, d_ba), _ = get_edge_surface_distance(torch.as_tensor(a), torch.as_tensor(b), symmetric=True)
        r = image_metrics(a, b)
        assert r["hd95_pooled"] == pytest.approx(float(np.percentile(np.hstack((d_ab.numpy(), d_ba.numpy())), 95)), abs=1e-5)
        # the suite's hd95 is the larger per-direction percentile, at or above the pooled one
        assert r["hd95"] == pytest.approx(max(float(np.percentile(d.numpy(), 95)) for d in (d_ab, d_ba)), abs=1e-4)
        assert r["hd95_pooled"] <= r["hd95"] + 1e-4
        checked += 1
