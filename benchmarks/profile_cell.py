"""Where a real cell's wall time goes: a short ``lesion-kd fit`` of a cpu-profile cell, timed by phase (issue 29).

Runs the cell exactly as ``reproduce-table`` would (same configs, data, cache, loaders, precision, threads), for
``--steps`` training steps and one validation, and prints the wall-clock seconds per training step spent in:

- **data wait**: the training loop waiting for the next batch (loader workers: decode, augmentation, cache read
  and checksum), measured between one batch's end and the next one's start;
- **forward** phases, by the module function they run in (exclusive of nested timed calls): the student's
  encoder and decoder, the teacher embeddings' warp onto the views, L_pckd, L_pl, L_dss, L_sup;
- **backward** and **optimizer** (Lightning's hooks around them);
- **validation**, per validation run, and the same amortised over the profile's ``val_check_interval``.

With ``--torch-profile N`` it also prints the torch profiler's top-N operators by self CPU time over the timed
steps. Run with one thread (``OMP_NUM_THREADS=1``), as the cells run::

    OMP_NUM_THREADS=1 python benchmarks/profile_cell.py --method semikd --steps 30
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import lightning.pytorch as pl
import torch

ROOT = Path(__file__).resolve().parents[1]


class PhaseTimer(pl.Callback):
    """Wall-clock seconds per phase; forward phases through wrapped module functions (exclusive of nesting)."""

    def __init__(self, skip: int = 3, torch_profile: int = 0, stack: bool = False, nan_fill: bool = False) -> None:
        self.skip, self.torch_profile, self.stack, self.nan_fill = skip, torch_profile, stack, nan_fill
        self.totals: dict[str, float] = defaultdict(float)
        self.steps = 0
        self.val_s: list[float] = []
        self._stack: list[list[float]] = []
        self._t: dict[str, float] = {}
        self.prof = None

    # -- wrapping: exclusive time of nested calls
    def _wrap(self, owner, attr: str, name: str) -> None:
        fn = getattr(owner, attr)

        @functools.wraps(fn)
        def timed(*a, **k):
            if not self._counting:
                return fn(*a, **k)
            self._stack.append([time.perf_counter(), 0.0])
            try:
                return fn(*a, **k)
            finally:
                start, child = self._stack.pop()
                dt = time.perf_counter() - start
                self.totals[name] += dt - child
                if self._stack:
                    self._stack[-1][1] += dt

        setattr(owner, attr, timed)

    def setup(self, trainer, module, stage) -> None:
        self._counting = False
        net = module.net
        self._wrap(net, "encode", "student encoder")
        self._wrap(net, "decode", "student decoder")
        self._wrap(module, "supervised_loss", "L_sup (loss)")
        for attr, name in [("_teacher_embeddings", "teacher embeddings (warp)"),
                           ("_kd_embeddings", "teacher embeddings (warp)"),  # kd_grid: student's pool + warp + resize
                           ("_pseudo_label_terms", "L_pl (head + loss)")]:
            if hasattr(module, attr):
                self._wrap(module, attr, name)
        for attr, name in [("pckd", "L_pckd (projector, perturbation, losses)"), ("dss", "L_dss (losses)")]:
            sub = getattr(module, attr, None)
            if sub is not None:
                self._wrap(sub, "forward", name)
        self._wrap(module, "training_step", "training_step (rest: logging, cat)")

    def on_train_start(self, trainer, module) -> None:
        if self.nan_fill:  # as before issue 29: the module's on_fit_start switched it off; switch it back on
            torch.utils.deterministic.fill_uninitialized_memory = True

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        now = time.perf_counter()
        self._counting = trainer.global_step >= self.skip
        if self._counting and "end" in self._t:
            self.totals["data wait (loader)"] += now - self._t["end"]
        if self._counting and self.torch_profile and self.prof is None:
            self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                               with_stack=self.stack)
            self.prof.__enter__()
        self._t["start"] = now

    def on_before_backward(self, trainer, module, loss) -> None:
        self._t["bwd"] = time.perf_counter()

    def on_after_backward(self, trainer, module) -> None:
        if self._counting:
            self.totals["backward"] += time.perf_counter() - self._t["bwd"]
        self._t["opt"] = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        if self._counting:
            self.totals["optimizer + hooks"] += now - self._t["opt"]
            self.totals["step total"] += now - self._t["start"]
            self.steps += 1
        self._t["end"] = now

    def on_validation_start(self, trainer, module) -> None:
        self._t["val"] = time.perf_counter()

    def on_validation_end(self, trainer, module) -> None:
        self.val_s.append(time.perf_counter() - self._t["val"])
        self._t.pop("end", None)  # the wait after a validation is not the loader's

    def on_train_end(self, trainer, module) -> None:
        if self.prof is not None:
            self.prof.__exit__(None, None, None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", default="semikd", help="experiments/method/<METHOD>.yaml")
    ap.add_argument("--dataset", default="kvasir-seg")
    ap.add_argument("--labels", type=float, default=0.1)
    ap.add_argument("--profile", default="cpu")
    ap.add_argument("--steps", type=int, default=30, help="timed training steps (after 3 warm-up steps)")
    ap.add_argument("--torch-profile", type=int, default=0, metavar="N", help="also print the top-N torch ops")
    ap.add_argument("--stack", action="store_true", help="with --torch-profile: group the ops by Python stack")
    ap.add_argument("--nan-fill", action="store_true",
                    help="keep torch's NaN fill of uninitialised memory under deterministic algorithms (before issue 29)")
    ap.add_argument("--out", default="runs/profile_cell")
    args, extra = ap.parse_known_args()
    from lesion_kd.lightning_cli import run_lightning

    timer = PhaseTimer(torch_profile=args.torch_profile, stack=args.stack, nan_fill=args.nan_fill)
    steps = args.steps + timer.skip
    import lesion_kd.lightning_cli as lc

    orig = lc.LesionCLI.instantiate_trainer

    def instantiate_trainer(self, **kwargs):
        trainer = orig(self, **kwargs)
        trainer.callbacks.append(timer)
        return trainer

    lc.LesionCLI.instantiate_trainer = instantiate_trainer
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):
        run_lightning(["fit", "--config", f"experiments/data/{args.dataset}.yaml",
                       "--config", f"experiments/method/{args.method}.yaml",
                       "--config", f"experiments/profile/{args.profile}.yaml",
                       "--data.labeled_fraction", str(args.labels), "--trainer.max_steps", str(steps),
                       "--trainer.val_check_interval", str(steps), "--trainer.default_root_dir", args.out,
                       "--test_after_fit", "false", *extra])
    wall = time.perf_counter() - t0
    n = max(timer.steps, 1)
    from machine import cpu_model

    print(f"# {time.strftime('%Y-%m-%d %H:%M')}  {cpu_model()}  torch {torch.__version__}  threads "
          f"{torch.get_num_threads()}  OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}  load "
          f"{os.getloadavg()[0]:.2f}  git {os.popen('git rev-parse --short HEAD').read().strip()}")
    print(f"# {args.method}, {args.dataset} {args.labels:g}, {args.profile} profile, {timer.steps} timed steps, "
          f"whole command {wall:.0f} s, NaN fill of uninitialised memory {'on' if args.nan_fill else 'off'}")
    print("| phase | s / step | share |")
    print("|---|---|---|")
    step = timer.totals["step total"] / n + timer.totals["data wait (loader)"] / n
    fwd = {k: v for k, v in timer.totals.items() if k not in ("step total", "data wait (loader)", "backward",
                                                              "optimizer + hooks")}
    rows = [("data wait (loader)", timer.totals["data wait (loader)"])]
    rows += sorted(fwd.items(), key=lambda kv: -kv[1])
    rows += [("backward", timer.totals["backward"]), ("optimizer + hooks", timer.totals["optimizer + hooks"])]
    for name, total in rows:
        print(f"| {name} | {total / n:.3f} | {100 * total / n / step:.1f}% |")
    print(f"| **training step, all phases** | **{step:.3f}** | 100% |")
    if timer.val_s:
        vci = 250  # the cpu profile's val_check_interval
        print(f"| validation (one run; per step at every {vci}) | {timer.val_s[-1]:.1f} s "
              f"({timer.val_s[-1] / vci:.3f}) | |")
    print(f"| projected 2000-step cell (steps + 8 validations) | {(2000 * step + 8 * timer.val_s[-1]) / 60:.1f} min | |"
          if timer.val_s else "")
    if timer.prof is not None:
        averages = timer.prof.key_averages(group_by_stack_n=8) if args.stack else timer.prof.key_averages()
        print(averages.table(sort_by="self_cpu_time_total", row_limit=args.torch_profile, max_name_column_width=60))
        if args.stack:  # which operators call the top ones (their parents in the trace)
            from collections import Counter

            events = timer.prof.events()
            top = sorted(averages, key=lambda e: -e.self_cpu_time_total)[:args.torch_profile]
            for key in [e.key for e in top]:
                parents = Counter()
                for ev in events:
                    if ev.name == key:
                        chain, q = [], ev.cpu_parent
                        while q is not None and len(chain) < 3:
                            chain.append(q.name)
                            q = q.cpu_parent
                        parents[" < ".join(chain) or "(top level)"] += ev.self_cpu_time_total
                print(key)
                for chain, us in parents.most_common(4):
                    print(f"    {us / 1e6 / n:.3f} s/step  {chain}")
            for ev in sorted(averages, key=lambda e: -e.self_cpu_time_total)[:args.torch_profile]:
                print(f"{ev.key}: {ev.self_cpu_time_total / 1e6 / n:.3f} s/step, {ev.count // n} calls/step")
                for frame in ev.stack[:8]:
                    print(f"    {frame}")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "benchmarks"))
    main()
