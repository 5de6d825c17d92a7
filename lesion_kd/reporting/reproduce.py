"""``lesion-kd reproduce-table``: run every cell of a manifest that has no finished result, then write the
comparison table, the ablation table, the efficiency table, paired per-image comparisons and an HTML report.

    lesion-kd reproduce-table --profile smoke --out runs/reproduce/smoke/report     # CI: minutes
    lesion-kd reproduce-table --profile cpu --only dataset=kvasir-seg                # the real comparison
    lesion-kd reproduce-table --profile paper --gpus 0,1,2,3                         # 4 cells at a time

A manifest (``experiments/reproduce/<profile>.yaml``) names the training profile, the datasets, label
fractions, methods (a method config and its network) and seeds of the comparison table, the ablation rows
and the efficiency measurements. A cell is finished when ``<results>/<dataset>/<method>-<network>-<labels>pct-
seed<k>/`` holds its ``metrics.json`` (written last, atomically, by ``lesion-kd fit --results_root``), so
cells run by anyone before (other issues, earlier sittings) are reused, and a cell killed halfway is never
counted: it is run again with ``--ckpt_path last`` and continues from its last checkpoint.
"""

from __future__ import annotations

import inspect
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from ..commands import parser

REPO = Path(__file__).resolve().parents[2]
MANIFESTS = REPO / "experiments" / "reproduce"


class ManifestError(ValueError):
    """A manifest that cannot be run; the message names the file and the key."""


@dataclass(frozen=True)
class Cell:
    """One training run of the grid."""

    part: str  # "table" (Table 1 and the upper bound) or "ablation"
    dataset: str
    data_config: str
    labels: float
    method: str  # the method config's name = the results name (experiments/method/<method>.yaml)
    network: str
    seed: int
    override_network: bool = False
    requires: str = "any"  # "gpu": too slow for a CPU, run only on a --gpus slot (the manifest says why)

    @property
    def name(self) -> str:
        return f"{self.method}-{self.network}-{round(self.labels * 100)}pct-seed{self.seed}"

    @property
    def key(self) -> str:
        return f"{self.dataset}/{self.name}"


@dataclass
class Manifest:
    path: Path
    profile: str
    results: Path
    runs: Path
    out: Path
    cells: list[Cell]
    ablation: dict
    efficiency: dict
    fit_args: list[str] = field(default_factory=list)
    budget: str = ""
    # minutes one run of a method (or of "method-network") is projected to take, for the cells of methods with
    # no finished run to time yet (e.g. from benchmarks/bench_cells.py); the measured walls take precedence
    projected_minutes: dict[str, float] = field(default_factory=dict)
    # the methods every method is compared with, image by image, in paired.md (lesion_kd.reporting.paired)
    paired_references: list[str] = field(default_factory=lambda: ["supervised"])


def _default_network(method_config: Path) -> str:
    """The network a method config trains: its ``network`` init arg, else the class's default."""
    doc = yaml.safe_load(method_config.read_text())
    init = (doc.get("model") or {}).get("init_args") or {}
    if "network" in init:
        return str(init["network"])
    module, _, cls = doc["model"]["class_path"].rpartition(".")
    import importlib

    klass = getattr(importlib.import_module(module), cls)
    for c in klass.__mro__:  # the first class in the chain that declares the argument
        p = inspect.signature(c.__init__).parameters.get("network")
        if p is not None and p.default is not inspect.Parameter.empty:
            return str(p.default)
    return "unet"


def _resolve(path: str | os.PathLike) -> Path:
    p = Path(path)
    return p if p.is_absolute() else REPO / p


def manifest_path(profile: str) -> Path:
    """``--profile`` as given on a command line: a manifest name (``experiments/reproduce/NAME.yaml``) or a path."""
    return Path(profile) if profile.endswith((".yaml", ".yml")) else MANIFESTS / f"{profile}.yaml"


def load_manifest(path: str | os.PathLike) -> Manifest:
    """Read and check a manifest: every referenced config exists, every list is well-formed."""
    path = Path(path)
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in MANIFESTS.glob("*.yaml")))
        raise ManifestError(f"{path}: no such manifest (profiles: {known})")
    doc = yaml.safe_load(path.read_text()) or {}

    def need(key: str, kind: type):
        if key not in doc:
            raise ManifestError(f"{path}: missing key {key!r}")
        if not isinstance(doc[key], kind):
            raise ManifestError(f"{path}: {key!r} must be a {kind.__name__}, got {doc[key]!r}")
        return doc[key]

    def config(kind: str, name: str) -> Path:
        p = REPO / "experiments" / kind / f"{name}.yaml"
        if not p.is_file():
            raise ManifestError(f"{path}: {kind} config {name!r} not found ({p})")
        return p

    unknown = set(doc) - {"profile", "results", "runs", "out", "datasets", "seeds", "table", "ablation",
                          "efficiency", "fit_args", "budget", "projected_minutes", "paired_references"}
    if unknown:
        raise ManifestError(f"{path}: unknown keys {sorted(unknown)}")
    profile = need("profile", str)
    config("profile", profile)
    datasets = need("datasets", list)
    seeds = need("seeds", list)
    if not seeds or not all(isinstance(s, int) for s in seeds):
        raise ManifestError(f"{path}: 'seeds' must be a non-empty list of integers")
    cells: list[Cell] = []

    def seed_list(where: str, value, default: list) -> list:
        if value is None:
            return default
        if not isinstance(value, list) or not value or not all(isinstance(s, int) for s in value):
            raise ManifestError(f"{path}: {where} 'seeds' must be a non-empty list of integers, got {value!r}")
        return value

    def add(part: str, dataset: str, labels: float, entry: dict | str, group_seeds: list) -> None:
        entry = {"method": entry} if isinstance(entry, str) else entry
        if not isinstance(entry, dict) or "method" not in entry:
            raise ManifestError(f"{path}: a method entry must be a name or {{method: NAME, network: NET}}, got {entry!r}")
        unknown = set(entry) - {"method", "network", "seeds", "requires"}
        if unknown:
            raise ManifestError(f"{path}: method entry {entry['method']!r}: unknown keys {sorted(unknown)} "
                                "(known: method, network, seeds, requires)")
        requires = entry.get("requires", "any")
        if requires not in ("any", "gpu"):
            raise ManifestError(f"{path}: method entry {entry['method']!r}: requires must be 'any' or 'gpu', got {requires!r}")
        if not 0 < float(labels) <= 1:
            raise ManifestError(f"{path}: label fraction {labels} must be in (0, 1]")
        mcfg = config("method", entry["method"])
        network = entry.get("network") or _default_network(mcfg)
        for seed in seed_list(f"method entry {entry['method']!r}", entry.get("seeds"), group_seeds):
            cells.append(Cell(part, dataset, str(config("data", dataset).relative_to(REPO)), float(labels),
                              entry["method"], network, int(seed), override_network="network" in entry,
                              requires=requires))

    table = need("table", dict)
    for i, group in enumerate(table.get("groups", [])):
        unknown = set(group) - {"datasets", "labels", "methods", "seeds"}
        if unknown:
            raise ManifestError(f"{path}: table group {i}: unknown keys {sorted(unknown)}")
        group_seeds = seed_list(f"table group {i}:", group.get("seeds"), seeds)
        for dataset in group.get("datasets", datasets):
            for labels in group["labels"]:
                for entry in group["methods"]:
                    add("table", dataset, labels, entry, group_seeds)
    ablation = doc.get("ablation") or {}
    for row in ablation.get("rows", []):
        add("ablation", ablation["dataset"], ablation["labels"], row, seed_list("ablation", ablation.get("seeds"), seeds))
    projected = doc.get("projected_minutes") or {}
    if not isinstance(projected, dict):
        raise ManifestError(f"{path}: 'projected_minutes' must map a method (or method-network) to minutes, got {projected!r}")
    names = {c.method for c in cells} | {f"{c.method}-{c.network}" for c in cells}
    for k, v in projected.items():
        if k not in names:
            raise ManifestError(f"{path}: projected_minutes: {k!r} is no method (or method-network) of the grid")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
            raise ManifestError(f"{path}: projected_minutes: {k!r} must be a positive number of minutes, got {v!r}")
    references = doc.get("paired_references", ["supervised"])
    if not isinstance(references, list) or not all(isinstance(r, str) for r in references):
        raise ManifestError(f"{path}: 'paired_references' must be a list of method names, got {references!r}")
    for r in references:  # a method the grid does not run (here) just gives no rows; a typo is an error
        config("method", r)
    unique: dict[str, Cell] = {}
    for c in cells:  # the full method is both a table row and an ablation row: one run
        unique.setdefault(c.key, c)
    return Manifest(path=path, profile=profile, results=_resolve(doc.get("results", f"runs/reproduce/{path.stem}/results")),
                    runs=_resolve(doc.get("runs", f"runs/reproduce/{path.stem}/runs")),
                    out=_resolve(doc.get("out", f"runs/reproduce/{path.stem}/report")), cells=list(unique.values()),
                    ablation=ablation, efficiency=doc.get("efficiency") or {}, fit_args=[str(a) for a in doc.get("fit_args", [])],
                    budget=str(doc.get("budget", "")), projected_minutes={k: float(v) for k, v in projected.items()},
                    paired_references=references)


def select(cells: list[Cell], only: list[str]) -> list[Cell]:
    """Keep the cells matching every ``key=value[,value...]`` filter (keys: part, dataset, labels, method,
    network, seed)."""
    keep = cells
    for f in only:
        key, sep, values = f.partition("=")
        if not sep or key not in {"part", "dataset", "labels", "method", "network", "seed"}:
            raise ManifestError(f"--only {f!r}: expected KEY=VALUE with KEY one of part, dataset, labels, method, "
                                "network, seed")
        allowed = values.split(",")
        keep = [c for c in keep if str(getattr(c, key)) in allowed
                or (key == "labels" and any(float(v) == c.labels for v in allowed if _is_float(v)))]
    return keep


def _is_float(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def cell_dir(m: Manifest, cell: Cell) -> Path:
    return m.results / cell.dataset / cell.name


def cell_keys(cells: list[Cell]) -> set[tuple]:
    """(dataset, method, network, labels, seed) of each cell: how results are matched to a manifest's cells."""
    return {(c.dataset, c.method, c.network, c.labels, c.seed) for c in cells}


def is_finished(m: Manifest, cell: Cell) -> bool:
    """metrics.json is the last file a finished run publishes (atomically): its presence means done."""
    return (cell_dir(m, cell) / "metrics.json").is_file()


def read_timing(m: Manifest, cell: Cell) -> dict | None:
    """The cell's ``timing.json`` (written by :func:`_write_timing`), or None when it has none."""
    t = cell_dir(m, cell) / "timing.json"
    return json.loads(t.read_text()) if t.is_file() else None


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


def cell_args(m: Manifest, cell: Cell) -> list[str]:
    """What defines a cell's training, as ``lesion-kd fit`` arguments: data, method and profile configs, the
    label fraction and, when the manifest overrides it, the network (the seed is the caller's)."""
    args = ["--config", cell.data_config, "--config", f"experiments/method/{cell.method}.yaml",
            "--config", f"experiments/profile/{m.profile}.yaml", "--data.labeled_fraction", str(cell.labels)]
    return args + (["--model.network", cell.network] if cell.override_network else [])


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
    from .efficiency import machine_summary

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
    # imported now, not after hours of training: code updated meanwhile (a `git pull` during a long run) must
    # not meet this process's older Manifest (report imports this module, so not at the top)
    from .report import write_outputs

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


__all__ = ["Cell", "Manifest", "ManifestError", "asdict", "is_finished", "load_manifest", "main", "select"]
