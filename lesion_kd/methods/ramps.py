"""Loss-weight ramps shared by the semi-supervised methods."""

from __future__ import annotations

import math


def sigmoid_rampup(step: float, length: float) -> float:
    """exp(-5 (1 - t/T)^2) for t < T, then 1 (Laine & Aila 2017; the SSL4MIS ramp). ``length`` 0 gives 1."""
    if length <= 0:
        return 1.0
    t = min(max(step, 0.0), length) / length
    return float(math.exp(-5.0 * (1.0 - t) ** 2))
