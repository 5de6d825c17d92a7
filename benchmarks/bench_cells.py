"""Per-step training cost of every method of a reproduce manifest, and the projected wall-clock of its table.

Each method of the manifest's Kvasir-SEG 10% cells is trained through the real CLI (``lesion-kd fit`` with
the manifest's profile: same image size, batches, precision, data loading, teacher cache) twice, for
``--steps A,B`` steps without validation; the per-step cost is ``(t_B - t_A) / (B - A)``, so set-up (data
listing, teacher-cache check, model construction) cancels out. The projection multiplies it by the
profile's ``max_steps`` and adds the measured set-up; it leaves out validation (8 x 90 images in the cpu
profile, a few percent). Run it on an idle machine, or read the ratios to the supervised student.

    OMP_NUM_THREADS=1 python benchmarks/bench_cells.py [--profile cpu] [--steps 4,12] [--only cpc_sam]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from machine import cpu_model

from lesion_kd.reporting.manifest import REPO, cell_args, load_manifest, manifest_path


def timed_fit(m, cell, steps: int, root: Path) -> float:
    cmd = [sys.executable, "-m", "lesion_kd.cli", "fit", *cell_args(m, cell), "--trainer.max_steps", str(steps),
           "--trainer.val_check_interval", str(10 * steps), "--trainer.enable_progress_bar", "false",
           "--trainer.default_root_dir", str(root / f"{cell.method}-{steps}"), "--trainer.logger", "false",
           "--checkpoint.last_every_minutes", "null"]
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{cell.method}: fit failed\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="cpu", help="manifest name (experiments/reproduce/NAME.yaml) or path")
    ap.add_argument("--steps", default="4,12", help="the two run lengths A,B")
    ap.add_argument("--only", default="", help="comma-separated method names")
    args = ap.parse_args()
    a, b = (int(s) for s in args.steps.split(","))
    m = load_manifest(manifest_path(args.profile))
    max_steps = yaml.safe_load((REPO / f"experiments/profile/{m.profile}.yaml").read_text())["trainer"]["max_steps"]
    seen, cells = set(), []
    for c in m.cells:
        if c.dataset == "kvasir-seg" and c.labels == 0.1 and c.seed == m.cells[0].seed and (c.method, c.network) not in seen:
            if not args.only or c.method in args.only.split(","):
                seen.add((c.method, c.network))
                cells.append(c)
    print(f"# {time.strftime('%Y-%m-%d %H:%M')}  {cpu_model()}  OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}  "
          f"load {os.getloadavg()[0]:.2f}  profile {m.profile} ({max_steps} steps)  runs of {a} and {b} steps", flush=True)
    print("| method | network | s / step | set-up s | projected run (min) | ratio to the supervised student |")
    print("|---|---|---|---|---|---|", flush=True)
    base = None
    with tempfile.TemporaryDirectory() as tmp:
        for c in cells:
            t_a = timed_fit(m, c, a, Path(tmp))
            t_b = timed_fit(m, c, b, Path(tmp))
            per_step = max(t_b - t_a, 0.0) / (b - a)
            setup = max(t_a - a * per_step, 0.0)
            if c.method == "supervised" and c.network == "mamba_unet":
                base = per_step
            ratio = f"{per_step / base:.1f}" if base else ""
            print(f"| {c.method} | {c.network} | {per_step:.2f} | {setup:.0f} | {(setup + max_steps * per_step) / 60:.0f} | "
                  f"{ratio} |", flush=True)


if __name__ == "__main__":
    main()
