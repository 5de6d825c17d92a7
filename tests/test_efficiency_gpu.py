"""The efficiency table's GPU columns: from this machine's GPU, or from efficiency_gpu.json measured on a
GPU machine (named in the caption), or absent (said so)."""

from __future__ import annotations

import json

from lesion_kd.reporting import efficiency

CPU_DOC = {"machine": {"cpu": "Xeon", "cpu_cores": 2, "torch_threads": 2, "torch": "2.14.1"}, "batch": 8, "repeats": 5,
           "rows": [{"model": "student (mamba_unet)", "input": "256x256", "params_m": 1.334, "gflops": 0.7,
                     "cpu_latency_ms": 120.0, "cpu_throughput": 9.0},
                    {"model": "U-Net (SSL4MIS)", "input": "256x256", "params_m": 1.81, "gflops": 2.5,
                     "cpu_latency_ms": 80.0, "cpu_throughput": 14.0}]}
GPU_DOC = {"machine": {"cpu": "EPYC", "gpu": "NVIDIA H200", "torch": "2.11.0+cu130"}, "batch": 8, "repeats": 20,
           "rows": [{"model": "student (mamba_unet)", "input": "256x256", "cuda_latency_ms": 3.25, "cuda_throughput": 900.5}]}


def test_gpu_columns_come_from_the_gpu_machines_file_when_this_machine_has_none(tmp_path):
    assert efficiency.load_gpu(tmp_path) is None
    plain = efficiency.markdown(CPU_DOC, efficiency.load_gpu(tmp_path))
    assert "No GPU on this machine, so no GPU columns" in plain and "GPU latency" not in plain
    (tmp_path / "efficiency_gpu.json").write_text(json.dumps(GPU_DOC))
    md = efficiency.markdown(CPU_DOC, efficiency.load_gpu(tmp_path))
    assert "GPU columns measured on another machine: NVIDIA H200 (torch 2.11.0+cu130, latency at batch 1" in md
    assert "Xeon (2 cores, 2 torch threads), torch 2.14.1: latency" in md  # each machine's torch beside it
    lines = md.splitlines()
    assert lines[2].endswith("GPU latency (ms) | GPU throughput (img/s) |") and lines[3].count("|---") == 8
    assert lines[4].endswith("| 120.0 | 9.0 | 3.25 | 900.5 |")
    assert lines[5].endswith("| 80.0 | 14.0 | | |")  # not measured there: left blank


def test_this_machines_gpu_wins_over_the_file():
    own = {**CPU_DOC, "machine": {**CPU_DOC["machine"], "gpu": "NVIDIA A100"},
           "rows": [{**r, "cuda_latency_ms": 1.0, "cuda_throughput": 2.0} for r in CPU_DOC["rows"]]}
    md = efficiency.markdown(own, GPU_DOC)
    assert " GPU columns on its NVIDIA A100." in md and "H200" not in md and md.splitlines()[5].endswith("| 1.00 | 2.0 |")
