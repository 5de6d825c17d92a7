"""The Mamba student vs. the reference 1.9 M U-Net on CPU: parameters, GFLOPs per 256x256 image,
inference and training throughput at batch 8, measured in one process with the same threads.

Run: .venv/bin/python benchmarks/bench_student.py [--size 256] [--batch 8] [--rounds 5]
Prints a markdown table. The two models are measured in alternating rounds (student, U-Net,
student, ...) and the median is reported, so that a change in machine load hits both alike.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F
from machine import print_machine_header
from torch.utils.flop_counter import FlopCounterMode

from lesion_kd.models import build_model

MODELS = {"mamba_unet (student)": "mamba_unet", "unet (SSL4MIS)": "unet"}


def gflops(model: torch.nn.Module, size: int) -> float:
    """Forward FLOPs of one (1, 3, size, size) image as torch.utils.flop_counter counts them, in G."""
    model.eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randn(1, 3, size, size))
    return counter.get_total_flops() / 1e9


def infer_seconds(model: torch.nn.Module, x: torch.Tensor, iters: int) -> float:
    model.eval()
    with torch.no_grad():
        t0 = time.perf_counter()
        for _ in range(iters):
            model(x)
    return (time.perf_counter() - t0) / iters


def train_seconds(model, opt, x: torch.Tensor, y: torch.Tensor, iters: int) -> float:
    model.train()
    t0 = time.perf_counter()
    for _ in range(iters):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return (time.perf_counter() - t0) / iters


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=5, help="alternating measurement rounds (median reported)")
    p.add_argument("--infer-iters", type=int, default=2, help="inference batches per round")
    p.add_argument("--train-iters", type=int, default=1, help="training steps per round")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    print_machine_header()
    print(
        f"input {args.batch}x3x{args.size}x{args.size}, float32; median of {args.rounds} alternating rounds "
        f"({args.infer_iters} inference batches, {args.train_iters} AdamW training steps each) after a warm-up\n"
    )

    torch.manual_seed(0)
    models = {label: build_model(name) for label, name in MODELS.items()}
    opts = {label: torch.optim.AdamW(m.parameters(), lr=1e-3) for label, m in models.items()}
    x = torch.randn(args.batch, 3, args.size, args.size)
    y = torch.randint(0, 2, (args.batch, args.size, args.size))

    stats = {}
    for label, m in models.items():
        stats[label] = {
            "params": sum(p.numel() for p in m.parameters()) / 1e6,
            "gflops": gflops(m, 256),
            "infer": [],
            "train": [],
        }
        infer_seconds(m, x, 1)  # warm-up: allocator, oneDNN primitives
        train_seconds(m, opts[label], x, y, 1)
    for _ in range(args.rounds):
        for label, m in models.items():
            stats[label]["infer"].append(infer_seconds(m, x, args.infer_iters))
            stats[label]["train"].append(train_seconds(m, opts[label], x, y, args.train_iters))

    print("| model | parameters (M) | GFLOPs (256x256) | inference img/s | training img/s |")
    print("|---|---|---|---|---|")
    thr = {}
    for label, s in stats.items():
        inf = args.batch / statistics.median(s["infer"])
        trn = args.batch / statistics.median(s["train"])
        thr[label] = (inf, trn)
        print(f"| {label} | {s['params']:.3f} | {s['gflops']:.2f} | {inf:.1f} | {trn:.1f} |")
    (si, st), (ui, ut) = thr["mamba_unet (student)"], thr["unet (SSL4MIS)"]
    print(f"\nstudent / U-Net: inference {si / ui:.2f}x, training {st / ut:.2f}x")
    print(f"load average after: {tuple(round(v, 2) for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
