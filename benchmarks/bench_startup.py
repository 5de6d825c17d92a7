"""Start-up of the ``lesion-kd`` command (issue 29, item 4): the seconds of ``lesion-kd fit --help`` and the time
from launching a smoke fit to its first training step.

    .venv/bin/python benchmarks/bench_startup.py [--repeat 5] [--fit-repeat 3] [--no-fit] [--repo DIR] [--json out.json]

Every figure is a fresh Python process (``python -m lesion_kd.cli``, the entry point's code path), timed from
launch; the best of ``--repeat`` runs is the figure, the median is shown beside it (the machine's load makes
single runs noisy). ``fit --help`` is timed twice: built by LightningCLI every time (``LESION_KD_HELP_CACHE=0``),
and from the help cache (lesion_kd/help_cache.py) in a fresh cache folder: the first run, then the next ones. Also timed: ``import lightning.pytorch.cli`` alone, the floor every Lightning command pays
whatever the suite does. The smoke fit is the supervised U-Net on Kvasir-SEG with the smoke profile
(``experiments/profile/smoke.yaml``, $LESION_KD_DATA), after one untimed run that fills a temporary data cache;
its first step is when Lightning calls ``on_train_batch_start`` for the first time (a callback given with
``--trainer.callbacks+=``). ``--repo DIR`` times another checkout (e.g. a ``git worktree`` of an older commit)
with this interpreter. The load average is printed with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SMOKE = ["--config", "experiments/data/kvasir-seg.yaml", "--config", "experiments/method/supervised.yaml",
         "--config", "experiments/profile/smoke.yaml"]

# run in the child: the suite's own main(), with a callback that prints the wall clock at the first training step
FIRST_STEP_CHILD = """
import sys, time
from lightning.pytorch.callbacks import Callback

class FirstStepClock(Callback):
    seen = False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if not self.seen:
            self.seen = True
            print(f"FIRST_STEP_AT {time.time()!r}", file=sys.stderr, flush=True)

from lesion_kd.cli import main
sys.exit(main(sys.argv[1:] + ["--trainer.callbacks+=__main__.FirstStepClock"]))
"""


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f}, {five:.2f}, {fifteen:.2f} on {os.cpu_count()} CPUs"


def timed(cmd: list[str], cwd: Path, env: dict) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def first_step(repo: Path, env: dict, root: Path) -> tuple[float, float]:
    """(seconds from launch to the first training step, seconds of the whole fit) of one smoke fit."""
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-c", FIRST_STEP_CHILD, "fit", *SMOKE, "--trainer.default_root_dir",
                           str(root)], cwd=repo, env=env, capture_output=True, text=True)
    total = time.time() - t0
    if proc.returncode != 0:
        raise SystemExit(f"smoke fit failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    stamp = next(line for line in proc.stderr.splitlines() if line.startswith("FIRST_STEP_AT "))
    return float(stamp.split()[1]) - t0, total


def summary(xs: list[float]) -> dict:
    return {"best_s": round(min(xs), 2), "median_s": round(statistics.median(xs), 2), "runs_s": [round(x, 2) for x in xs]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=5, help="runs of `fit --help` and of the Lightning import (best counts)")
    p.add_argument("--fit-repeat", type=int, default=3, help="timed smoke fits, after one untimed warm-up")
    p.add_argument("--no-fit", action="store_true", help="time `fit --help` and the import only")
    p.add_argument("--repo", type=Path, default=REPO, help="the checkout to time (default: this one)")
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args(argv)
    repo = args.repo.resolve()
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    out: dict = {"repo": str(repo), "load_before": load()}
    print(f"{repo}: {out['load_before']}", flush=True)

    help_cmd = [sys.executable, "-m", "lesion_kd.cli", "fit", "--help"]
    # built: the help cache off (lesion_kd/help_cache.py), LightningCLI builds the text every time
    helps = [timed(help_cmd, repo, {**env, "LESION_KD_HELP_CACHE": "0"}) for _ in range(args.repeat)]
    out["fit_help"] = summary(helps)
    print(f"lesion-kd fit --help, built: best {min(helps):.2f} s, median {statistics.median(helps):.2f} s "
          f"({', '.join(f'{x:.2f}' for x in helps)})", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench_startup_help_") as tmp:
        env_help = {**env, "LESION_KD_CACHE": tmp}
        first = timed(help_cmd, repo, env_help)  # builds and keeps the text (or, before the cache existed, as above)
        again = [timed(help_cmd, repo, env_help) for _ in range(args.repeat)]
    out["fit_help_cached"] = {"first_s": round(first, 2), **summary(again)}
    print(f"lesion-kd fit --help, cached: first {first:.2f} s, then best {min(again):.2f} s, median "
          f"{statistics.median(again):.2f} s", flush=True)
    imports = [timed([sys.executable, "-c", "import lightning.pytorch.cli"], repo, env) for _ in range(args.repeat)]
    out["import_lightning_cli"] = summary(imports)
    print(f"import lightning.pytorch.cli (the floor): best {min(imports):.2f} s, median {statistics.median(imports):.2f} s",
          flush=True)

    if not args.no_fit:
        with tempfile.TemporaryDirectory(prefix="bench_startup_") as tmp:
            env_fit = {**env, "LESION_KD_CACHE": str(Path(tmp) / "cache")}
            first_step(repo, env_fit, Path(tmp) / "warmup")  # fills the data cache: not timed
            firsts, totals = [], []
            for i in range(args.fit_repeat):
                f, t = first_step(repo, env_fit, Path(tmp) / f"run{i}")
                firsts.append(f)
                totals.append(t)
        out["smoke_fit_first_step"] = summary(firsts)
        out["smoke_fit_total"] = summary(totals)
        print(f"smoke fit, launch to first training step: best {min(firsts):.2f} s, median "
              f"{statistics.median(firsts):.2f} s; whole fit (train 3 steps, validate, test): best {min(totals):.2f} s",
              flush=True)
    out["load_after"] = load()
    print(out["load_after"])
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
