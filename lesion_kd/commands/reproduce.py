"""``lesion-kd reproduce-table``: run every cell of a manifest that has no finished result, then write the
comparison table, the ablation table, the efficiency table, paired per-image comparisons and an HTML report.

    lesion-kd reproduce-table --profile smoke --out runs/reproduce/smoke/report     # CI: minutes
    lesion-kd reproduce-table --profile cpu --only dataset=kvasir-seg                # the real comparison
    lesion-kd reproduce-table --profile paper --gpus 0,1,2,3                         # 4 cells at a time

A manifest (``experiments/reproduce/<profile>.yaml``) names the training profile, the datasets, label
fractions, methods (a method config and its network) and seeds of the comparison table, the ablation rows
and the efficiency measurements. A cell is finished when ``<results>/<dataset>/<method>-<network>-<labels>pct-
seed<k>/`` holds its ``metrics.json`` (written last, atomically, by ``lesion-kd fit --results_root``), so
cells run by anyone before (for other issues, in earlier sessions) are reused, and a cell killed halfway is never
counted: it is run again with ``--ckpt_path last`` and continues from its last checkpoint.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from ..reporting.manifest import (
    REPO,
    Cell,
    Manifest,
    ManifestError,
    cell_args,
    cell_dir,
    is_finished,
    load_manifest,
    manifest_path,
    read_timing,
    select,
)
from ..reporting.report import write_outputs
from . import parser


def projection(m: Manifest, todo: list[Cell], slots: int) -> str:
    """How long the unfinished cells will take: the median wall-clock of the finished cells of the same method
    and network (over datasets, label fractions and seeds; a resumed run's wall covers only its last part, so
    it is left out), else the manifest's ``projected_minutes``; cells with neither are named, not guessed."""
    walls: dict[tuple[str, str], list[float]] = {}
    for c in m.cells:
        if is_finished(m, c) and (t := read_timing(m, c)) and not t.get("resumed"):
            walls.setdefault((c.method, c.network), []).append(t["wall_s"])
    measured, projected, unknown = [], [], {}
    for c in todo:
        if (c.method, c.network) in walls:
            measured.append(statistics.median(walls[(c.method, c.network)]))
        elif (minutes := m.projected_minutes.get(f"{c.method}-{c.network}", m.projected_minutes.get(c.method))):
            projected.append(60 * minutes)
        else:
            k = f"{c.method}-{c.network}" + (" on a GPU" if c.requires == "gpu" else "")
            unknown[k] = unknown.get(k, 0) + 1
    parts = []
    if measured or projected:
        total = sum(measured) + sum(projected)
        how = " + ".join([f"{len(measured)} timed by their method's finished runs"] * bool(measured)
                         + [f"{len(projected)} by the manifest's projected_minutes"] * bool(projected))
        resuming = any(any((m.runs / c.dataset / c.name).glob("**/last.ckpt")) for c in todo)
        parts.append(f"about {total / 3600:.1f} h of runs ({how}), {total / slots / 3600:.1f} h with {slots} at a time"
                     + ("; less for the cells resuming from a checkpoint" if resuming else ""))
    if unknown:
        parts.append("not timed: " + ", ".join(f"{k} ({n} cell{'s' if n > 1 else ''})" for k, n in unknown.items()))
    return "; ".join(parts)


def fit_command(m: Manifest, cell: Cell, gpu: str | None = None) -> list[str]:
    """The cell's ``lesion-kd fit`` command; on a GPU slot (``--gpus``) it trains on that GPU whatever the
    profile's accelerator, with deterministic algorithms relaxed to a warning (several CUDA backward kernels
    used here, e.g. grid_sample and bilinear up-sampling, have no deterministic version)."""
    cmd = [sys.executable, "-m", "lesion_kd.cli", "fit", *cell_args(m, cell), "--seed_everything", str(cell.seed),
           "--trainer.default_root_dir", str(m.runs / cell.dataset / cell.name),
           "--results_root", str(m.results), "--ckpt_path", "last", "--trainer.enable_progress_bar", "false"]
    if gpu is not None:
        cmd += ["--trainer.accelerator", "gpu", "--trainer.devices", "1", "--trainer.deterministic", "warn"]
    return cmd + m.fit_args


def run_cells(m: Manifest, cells: list[Cell], gpus: list[str], jobs: int) -> list[dict]:
    """Run the unfinished cells, ``jobs`` at a time (one per listed GPU when --gpus is given)."""
    todo = [c for c in cells if not is_finished(m, c)]
    done = len(cells) - len(todo)
    need_gpu = [] if gpus else [c for c in todo if c.requires == "gpu"]
    todo = [c for c in todo if c not in need_gpu]
    print(f"reproduce-table: {len(cells)} cells, {done} finished, {len(todo)} to run "
          f"({m.path.relative_to(REPO) if m.path.is_relative_to(REPO) else m.path})", flush=True)
    if todo and (text := projection(m, todo, len(gpus) or max(1, jobs))):
        print(f"reproduce-table: {text}", flush=True)
    if need_gpu:
        print(f"reproduce-table: {len(need_gpu)} cell(s) need a GPU and are left for a run with --gpus: "
              + ", ".join(c.key for c in need_gpu), flush=True)
    slots = gpus or [None] * max(1, jobs)  # a GPU id listed twice gives that GPU two cells at a time
    running: dict[subprocess.Popen, tuple[Cell, int, float, Path, bool]] = {}
    failures: list[dict] = []
    queue = list(todo)
    walls: list[float] = []
    n = 0
    while queue or running:
        while queue and len(running) < len(slots):
            slot = min(set(range(len(slots))) - {v[1] for v in running.values()})
            cell, gpu = queue.pop(0), slots[slot]
            n += 1
            run_dir = m.runs / cell.dataset / cell.name
            run_dir.mkdir(parents=True, exist_ok=True)
            log = run_dir / "fit.log"
            env = {**os.environ, **({"CUDA_VISIBLE_DEVICES": gpu} if gpu is not None else {})}
            if len(slots) > 1 and "OMP_NUM_THREADS" not in os.environ:  # parallel cells share the cores
                env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // len(slots)))
            where = f" on GPU {gpu}" if gpu is not None else ""
            print(f"[{done + n}/{len(cells)}] {cell.key}{where}: running (log: {log})", flush=True)
            resumed = any(run_dir.glob("**/last.ckpt"))  # then this invocation's wall is only the rest of the run
            with open(log, "a") as fh:
                proc = subprocess.Popen(fit_command(m, cell, gpu), cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT)
            running[proc] = (cell, slot, time.monotonic(), log, resumed)
        time.sleep(0.5)
        for proc in [p for p in running if p.poll() is not None]:
            cell, _, t0, log, resumed = running.pop(proc)
            wall = time.monotonic() - t0
            if proc.returncode == 0 and is_finished(m, cell):
                _write_timing(m, cell, wall, resumed)
                dice = json.loads((cell_dir(m, cell) / "metrics.json").read_text())["dice"]["mean"]
                walls.append(wall)
                left = (len(queue) + len(running)) * sum(walls) / len(walls) / len(slots)
                print(f"  {cell.key}: done in {wall / 60:.1f} min, test Dice {dice:.4f}; "
                      f"{len(queue) + len(running)} cell(s) left, about {left / 60:.0f} min at this pace", flush=True)
            else:
                tail = log.read_text(errors="replace").splitlines()[-15:]
                failures.append({"cell": cell.key, "returncode": proc.returncode, "log": str(log)})
                if proc.returncode == 143:  # lesion-kd's exit status after a SIGTERM checkpoint
                    print(f"  {cell.key}: stopped by SIGTERM; its checkpoint resumes it at the next invocation "
                          f"(log: {log})", flush=True)
                    continue
                print(f"  {cell.key}: FAILED (exit {proc.returncode}); last lines of {log}:\n    "
                      + "\n    ".join(tail), flush=True)
    return failures


def _write_timing(m: Manifest, cell: Cell, wall: float, resumed: bool = False) -> None:
    """``timing.json``: the wall-clock of the invocation that finished the cell; ``resumed``: it continued
    from a checkpoint of an earlier (interrupted) invocation, so ``wall_s`` covers only the rest of the run."""
    from ..data.io import atomic_write_bytes
    from ..reporting.efficiency import machine_summary

    doc = {"wall_s": round(wall, 1), "machine": machine_summary(), "profile": m.profile}
    if resumed:
        doc["resumed"] = True
    atomic_write_bytes(cell_dir(m, cell) / "timing.json", (json.dumps(doc, indent=1) + "\n").encode())


def main(argv: list[str]) -> int:
    p = parser("lesion-kd reproduce-table", __doc__)
    p.add_argument("--profile", default="smoke",
                   help="manifest experiments/reproduce/<PROFILE>.yaml (smoke, cpu, paper) or a path to a manifest")
    p.add_argument("--out", default=None, help="folder for table.md, table.csv, ablation.md, efficiency.md, "
                                               "paired.md, report.html (default: the manifest's 'out')")
    p.add_argument("--only", action="append", default=[], metavar="KEY=VALUE",
                   help="run only the matching cells (repeatable; KEY: part, dataset, labels, method, network, "
                        "seed; VALUE may list several, comma-separated); the tables show every finished cell")
    p.add_argument("--gpus", default="", help="comma-separated GPU ids: one cell runs on each at a time (list an "
                                              "id twice to run two cells on that GPU: --gpus 0,0,0,0)")
    p.add_argument("--jobs", type=int, default=1,
                   help="cells at a time without --gpus; the cores are split between them (OMP_NUM_THREADS). On a "
                        "2-core CPU, --jobs 2 (one thread each) finishes the grid about twice as fast as --jobs 1")
    p.add_argument("--report-only", action="store_true", help="run nothing: tables and report from finished cells")
    p.add_argument("--dry-run", action="store_true", help="list the cells and their commands, run nothing")
    args = p.parse_args(argv)
    try:
        m = load_manifest(manifest_path(args.profile))
        cells = select(m.cells, args.only)
    except ManifestError as e:
        print(f"lesion-kd reproduce-table: {e}", file=sys.stderr)
        return 2
    if args.out:
        m.out = Path(args.out).resolve()
    gpus = [g for g in args.gpus.split(",") if g]
    if args.dry_run:
        for c in cells:
            state = "finished" if is_finished(m, c) else "to run" + (" on a GPU (--gpus)" if c.requires == "gpu" else "")
            print(f"{c.key} [{c.part}] ({state}):\n  {' '.join(fit_command(m, c, '0' if c.requires == 'gpu' else None))}")
        todo = [c for c in cells if not is_finished(m, c)]
        print(f"dry run: {len(cells)} cells, {len(cells) - len(todo)} finished, {len(todo)} to run"
              + (f"; {projection(m, todo, len(gpus) or max(1, args.jobs))}" if todo else ""))
        return 0
    t0 = time.monotonic()
    failures = [] if args.report_only else run_cells(m, cells, gpus, args.jobs)
    outputs = write_outputs(m)
    print(f"reproduce-table: wrote {', '.join(str(o) for o in outputs)} in {time.monotonic() - t0:.0f} s", flush=True)
    if failures:
        print(f"reproduce-table: {len(failures)} cell(s) failed: " + ", ".join(f["cell"] for f in failures),
              file=sys.stderr)
        return 1
    return 0


__all__ = ["fit_command", "main", "projection", "run_cells"]
