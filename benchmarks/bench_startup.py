"""Start-up of the ``lesion-kd`` command (issue 29, item 4): the seconds of ``lesion-kd fit --help`` and the time
from launching a smoke fit to its first training step.

    .venv/bin/python benchmarks/bench_startup.py [--repeat 5] [--fit-repeat 3] [--no-fit] [--repo DIR]
                                                 [--compare OLD_CHECKOUT] [--json out.json]

Every figure is a fresh Python process (``python -m lesion_kd.cli``, the entry point's code path), timed from
launch: wall seconds, and for the commands that end by themselves also the CPU seconds (user + system) the
process used, which the machine's load disturbs less. The best of ``--repeat`` runs is the figure, the median is
shown beside it. Timed:

- ``fit --help``, built by LightningCLI every time (``LESION_KD_HELP_CACHE=0``);
- ``fit --help`` from the help cache (lesion_kd/help_cache.py), in a fresh cache folder: the first run builds
  and keeps the text, the next ones print it;
- ``import lightning.pytorch.cli`` alone: the floor every Lightning command pays whatever the suite does;
- a smoke fit (the supervised U-Net on Kvasir-SEG, ``experiments/profile/smoke.yaml``, $LESION_KD_DATA), after
  one untimed run that fills a temporary data cache: launch to the first training step (when Lightning first
  calls ``on_train_batch_start``, a callback given with ``--trainer.callbacks+=``), and the whole fit.

``--repo DIR`` times another checkout with this interpreter; ``--compare OLD`` times OLD (e.g. a ``git worktree``
of an older commit) and ``--repo`` in turns, run by run, so that both see the same load. The load average is
printed with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
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


def timed(cmd: list[str], cwd: Path, env: dict) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one run of ``cmd``."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


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
    p.add_argument("--compare", type=Path, default=None, help="an older checkout, timed in turns with --repo")
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args(argv)
    repos = {"new": args.repo.resolve()}
    if args.compare:
        repos = {"old": args.compare.resolve(), **repos}
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    out: dict = {"repos": {k: str(v) for k, v in repos.items()}, "load_before": load()}
    print(f"{', '.join(f'{k}: {v}' for k, v in repos.items())}; {out['load_before']}", flush=True)
    help_cmd = [sys.executable, "-m", "lesion_kd.cli", "fit", "--help"]
    times: dict[tuple[str, str], list[tuple[float, float]]] = {}

    def add(what: str, name: str, value) -> None:
        times.setdefault((what, name), []).append(value)

    with tempfile.TemporaryDirectory(prefix="bench_startup_") as tmp:
        help_env = {name: {**env, "LESION_KD_CACHE": str(Path(tmp) / f"help-{name}")} for name in repos}
        for name, repo in repos.items():  # the cached help's first run: builds and keeps the text
            add("fit --help, cached: first run", name, timed(help_cmd, repo, help_env[name]))
        for _ in range(args.repeat):
            for name, repo in repos.items():
                # built: the help cache off, LightningCLI builds the text every time
                add("fit --help, built", name, timed(help_cmd, repo, {**env, "LESION_KD_HELP_CACHE": "0"}))
                add("fit --help, cached", name, timed(help_cmd, repo, help_env[name]))
            add("import lightning.pytorch.cli", "-", timed([sys.executable, "-c", "import lightning.pytorch.cli"],
                                                           REPO, env))
        if not args.no_fit:
            fit_env = {**env, "LESION_KD_CACHE": str(Path(tmp) / "data-cache")}
            first_step(next(iter(repos.values())), fit_env, Path(tmp) / "warmup")  # fills the data cache: untimed
            for i in range(args.fit_repeat):
                for name, repo in repos.items():
                    first, total = first_step(repo, fit_env, Path(tmp) / f"{name}-run{i}")
                    add("smoke fit: launch to first step", name, (first, float("nan")))
                    add("smoke fit: whole (3 steps, validate, test)", name, (total, float("nan")))

    out["figures"] = []
    print(f"{'what':<44} {'checkout':<8} {'wall best':>9} {'median':>7} {'CPU best':>9} {'median':>7}")
    for (what, name), runs in times.items():
        wall, cpu = [w for w, _ in runs], [c for _, c in runs if c == c]
        row = {"what": what, "checkout": name, "wall": summary(wall), **({"cpu": summary(cpu)} if cpu else {})}
        out["figures"].append(row)
        cpu_text = f"{min(cpu):>9.2f} {statistics.median(cpu):>7.2f}" if cpu else f"{'':>9} {'':>7}"
        print(f"{what:<44} {name:<8} {min(wall):>9.2f} {statistics.median(wall):>7.2f} {cpu_text}")
    out["load_after"] = load()
    print(out["load_after"])
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
