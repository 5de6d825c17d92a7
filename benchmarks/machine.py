"""What the benchmark scripts print about the machine they ran on (imported as a sibling module: the
scripts run as ``python benchmarks/<script>.py``, which puts this folder on ``sys.path``). The same
description as the efficiency table of ``reproduce-table``."""

from __future__ import annotations

import os
import time

from lesion_kd.reporting.efficiency import cpu_model

__all__ = ["cpu_model", "print_machine_header"]


def print_machine_header() -> None:
    """torch version and threads, the CPU, the load average before the run, the OpenMP settings and the time."""
    import torch

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, CPU: {cpu_model()}")
    print(f"load average before: {tuple(round(x, 2) for x in os.getloadavg())}")
    print(
        "OMP_WAIT_POLICY=" + os.environ.get("OMP_WAIT_POLICY", "(unset)")
        + ", OMP_NUM_THREADS=" + os.environ.get("OMP_NUM_THREADS", "(unset)")
        + f", {time.strftime('%Y-%m-%d %H:%M %Z')}"
    )
