"""The efficiency table: parameters, GFLOPs per 256x256 image, latency (batch 1) and throughput (batch B)
of the student, the reference U-Net and the teacher on this machine's CPU and, when present, its GPU.

Measurements are cached per machine in ``<results>/efficiency.json`` (they take a minute on a CPU), so a
second ``reproduce-table`` reuses them; delete the file to measure again. GPU columns measured on another
machine (``python -m lesion_kd.reporting.efficiency --out <results>`` there) are kept in
``<results>/efficiency_gpu.json`` and shown beside this machine's CPU columns when this one has no GPU.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

MODELS = {"student (mamba_unet)": ("model", "mamba_unet"), "U-Net (SSL4MIS)": ("model", "unet"),
          "teacher (LiteMedSAM image encoder)": ("teacher", "litemedsam")}


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine_summary() -> dict:
    """What a result was measured on."""
    doc = {"cpu": cpu_model(), "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
           "torch": torch.__version__}
    if torch.cuda.is_available():
        doc["gpu"] = torch.cuda.get_device_name(0)
    return doc


def _build(kind: str, name: str, size: int) -> tuple[torch.nn.Module, int]:
    """The network to time and its input side (the teacher's encoder sees its own input: 256 for LiteMedSAM,
    1024 for MedSAM)."""
    if kind == "model":
        from ..models import build_model

        return build_model(name).eval(), size
    from ..models import build_teacher

    teacher = build_teacher(name)
    return teacher.image_encoder.eval(), teacher.input_size


def _time(fn, x: torch.Tensor, repeats: int) -> float:
    """Median seconds of one call (after one warm-up call)."""
    with torch.inference_mode():
        fn(x)
        times = []
        for _ in range(repeats):
            if x.is_cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn(x)
            if x.is_cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(size: int = 256, batch: int = 8, repeats: int = 5, devices: list[str] | None = None) -> list[dict]:
    """One row per model: params (M), GFLOPs of one image at its input size, latency and throughput on each
    of ``devices`` (default: the CPU, and the GPU when there is one)."""
    rows = []
    devices = devices or ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for label, (kind, name) in MODELS.items():
        net, side = _build(kind, name, size)
        params = sum(p.numel() for p in net.parameters()) / 1e6
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            net(torch.randn(1, 3, side, side))
        row = {"model": label, "input": f"{side}x{side}", "params_m": round(params, 3),
               "gflops": round(counter.get_total_flops() / 1e9, 2)}
        for dev in devices:
            net = net.to(dev)
            b = batch if kind == "model" else max(1, batch // 4)
            row[f"{dev}_latency_ms"] = round(1e3 * _time(net, torch.randn(1, 3, side, side, device=dev), repeats), 2)
            row[f"{dev}_throughput"] = round(b / _time(net, torch.randn(b, 3, side, side, device=dev), repeats), 2)
        rows.append(row)
    return rows


def load_or_measure(results: Path, size: int = 256, batch: int = 8, repeats: int = 5) -> dict:
    """The cached measurement of this machine, else a new one (written atomically)."""
    from ..data.io import atomic_write_bytes

    path = results / "efficiency.json"
    machine = machine_summary()
    if path.is_file():
        doc = json.loads(path.read_text())
        if doc.get("machine", {}).get("cpu") == machine["cpu"] and doc.get("machine", {}).get("gpu") == machine.get("gpu"):
            return doc
    print(f"reproduce-table: measuring efficiency on {machine['cpu']}"
          + (f" + {machine['gpu']}" if "gpu" in machine else "") + " ...", flush=True)
    doc = {"machine": machine, "size": size, "batch": batch, "repeats": repeats,
           "rows": measure(size, batch, repeats)}
    results.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, (json.dumps(doc, indent=1) + "\n").encode())
    return doc


def load_gpu(results: Path) -> dict | None:
    """``<results>/efficiency_gpu.json`` (GPU columns measured on another machine), or None."""
    path = results / "efficiency_gpu.json"
    return json.loads(path.read_text()) if path.is_file() else None


def markdown(doc: dict, gpu_doc: dict | None = None) -> str:
    """The table; GPU columns from ``doc`` when its machine had a GPU, else from ``gpu_doc`` (measured on
    another machine, named in the caption), else none."""
    m = doc["machine"]
    if "gpu" in m:
        gpu_rows, gpu_note = {r["model"]: r for r in doc["rows"]}, f" GPU columns on its {m['gpu']}."
    elif gpu_doc is not None:
        g = gpu_doc["machine"]
        gpu_rows = {r["model"]: r for r in gpu_doc["rows"]}
        gpu_note = (f" GPU columns measured on another machine: {g['gpu']} (torch {g['torch']}, latency at batch 1,"
                    f" throughput at batch {gpu_doc['batch']}, median of {gpu_doc['repeats']} calls).")
    else:
        gpu_rows, gpu_note = {}, " No GPU on this machine, so no GPU columns."
    gpu = bool(gpu_rows)
    head = ("| model | input | params (M) | GFLOPs / image | CPU latency (ms, batch 1) | CPU throughput (img/s) |"
            + (" GPU latency (ms) | GPU throughput (img/s) |" if gpu else ""))
    lines = [f"Measured on {m['cpu']} ({m['cpu_cores']} cores, {m['torch_threads']} torch thread{'s' * (m['torch_threads'] != 1)}), torch "
             f"{m['torch']}: latency at batch 1, throughput at batch {doc['batch']} (teacher: batch "
             f"{max(1, doc['batch'] // 4)}), median of {doc['repeats']} calls." + gpu_note,
             "", head, "|---" * (6 + 2 * gpu) + "|"]
    for r in doc["rows"]:
        line = (f"| {r['model']} | {r['input']} | {r['params_m']:.3f} | {r['gflops']:.2f} | "
                f"{r['cpu_latency_ms']:.1f} | {r['cpu_throughput']:.1f} |")
        if gpu:
            g = gpu_rows.get(r["model"], {})
            line += (f" {g['cuda_latency_ms']:.2f} | {g['cuda_throughput']:.1f} |" if "cuda_latency_ms" in g
                     else " | |")
        lines.append(line)
    return "\n".join(lines) + "\n"


def main() -> None:
    """``--out DIR``: measure the GPU columns on this (GPU) machine into DIR/efficiency_gpu.json."""
    import argparse

    from ..data.io import atomic_write_bytes

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--out", type=Path, required=True, help="results folder (efficiency_gpu.json is written there)")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("lesion_kd.reporting.efficiency: no CUDA GPU on this machine (it measures the GPU columns)")
    doc = {"machine": machine_summary(), "size": args.size, "batch": args.batch, "repeats": args.repeats,
           "rows": measure(args.size, args.batch, args.repeats, devices=["cuda"])}
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(args.out / "efficiency_gpu.json", (json.dumps(doc, indent=1) + "\n").encode())
    for r in doc["rows"]:
        print(f"{r['model']}: {r['cuda_latency_ms']:.2f} ms (batch 1), {r['cuda_throughput']:.1f} img/s on {doc['machine']['gpu']}")
    print(f"wrote {args.out / 'efficiency_gpu.json'}")


if __name__ == "__main__":
    main()
