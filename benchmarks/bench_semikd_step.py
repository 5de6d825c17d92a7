"""Training-step cost of the paper's method vs the supervised student (issue 5 target: at most 4x).

Same process, same threads, same labeled batch: the full SemiKDModule step (labeled + unlabeled weak
views, unlabeled strong views, L_sup + L_pckd + L_dss, teacher embeddings from the cache, i.e. (B, 256, 64,
64) float16 tensors warped onto the views) against the supervised student's step (labeled weak views,
L_sup). Forward + backward + AdamW step, median of N steps after warm-up.

    python benchmarks/bench_semikd_step.py [--size 256] [--batch 8] [--steps 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from machine import cpu_model

from lesion_kd.methods import SemiKDModule, Supervised
from lesion_kd.methods.base import relax_deterministic_fill


def make_batch(b: int, size: int) -> dict:
    def part(labeled: bool) -> dict:
        return {
            "image_weak": torch.rand(b, 3, size, size), "image_strong": torch.rand(b, 3, size, size),
            "mask": (torch.rand(b, size, size) > 0.8).long() if labeled else torch.zeros(b, size, size, dtype=torch.long),
            "theta": torch.eye(2, 3).repeat(b, 1, 1), "teacher_emb": torch.randn(b, 256, 64, 64).half(),
            "index": torch.arange(b), "id": [str(i) for i in range(b)],
        }

    return {"labeled": part(True), "unlabeled": part(False)}


def time_steps(module, batch: dict, steps: int, precision: str) -> float:
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-3)
    module.train()
    times = []
    for i in range(steps + 2):
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = module.training_step(batch, i)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i >= 2:
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8, help="labeled (and unlabeled) batch size")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--kd-grid", default="teacher,student",
                    help="comma-separated SemiKDModule(kd_grid=...) values to time (issue 29: student)")
    ap.add_argument("--nan-fill", action="store_true",
                    help="keep torch's NaN fill of uninitialised memory under deterministic algorithms (before issue 29)")
    args = ap.parse_args()
    # as the cells run: trainer.deterministic=true, and the suite's relax_deterministic_fill() at fit start
    torch.use_deterministic_algorithms(True)
    if not args.nan_fill:
        relax_deterministic_fill()
    torch.manual_seed(0)
    batch = make_batch(args.batch, args.size)
    sup = Supervised(network="mamba_unet")
    grids = args.kd_grid.split(",")
    fulls = {g: SemiKDModule(network="mamba_unet", ramp_fraction=0.0, kd_grid=g) for g in grids}
    import warnings

    warnings.filterwarnings("ignore", message=".*self.log.*")
    t_sup = time_steps(sup, batch, args.steps, args.precision)
    t_full = {g: time_steps(m, batch, args.steps, args.precision) for g, m in fulls.items()}
    t_sup_after = time_steps(sup, batch, args.steps, args.precision)  # the machine's state did not drift
    print(f"# {time.strftime('%Y-%m-%d %H:%M')}  {cpu_model()}  torch {torch.__version__}  "
          f"threads {torch.get_num_threads()}  OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}  "
          f"load {os.getloadavg()[0]:.2f}  deterministic, NaN fill {'on' if args.nan_fill else 'off'}")
    print(f"| step ({args.batch} labeled + {args.batch} unlabeled, {args.size}x{args.size}, "
          f"{args.precision}) | seconds | ratio |")
    print("|---|---|---|")
    print(f"| supervised student (labeled weak views only) | {t_sup:.3f} | 1.00 |")
    for g, t in t_full.items():
        where = "64x64 teacher grid" if g == "teacher" else "student's grid"
        print(f"| SemiKD full (L_sup + L_pckd + L_dss, cache on), kd_grid={g} ({where}) | {t:.3f} | {t / t_sup:.2f} |")
    print(f"| supervised student, timed again after the SemiKD steps | {t_sup_after:.3f} | 1.00 |")


if __name__ == "__main__":
    main()
