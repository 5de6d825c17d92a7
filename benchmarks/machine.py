"""What the benchmark scripts print about the machine they ran on (imported as a sibling module: the
scripts run as ``python benchmarks/<script>.py``, which puts this folder on ``sys.path``). The same
description as the efficiency table of ``reproduce-table``."""

from __future__ import annotations

from lesion_kd.reporting.efficiency import cpu_model

__all__ = ["cpu_model"]
