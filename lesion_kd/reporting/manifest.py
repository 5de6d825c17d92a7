"""A ``reproduce-table`` manifest (``experiments/reproduce/<profile>.yaml``): its cells, and where each cell's
results live.

A manifest names the training profile, the datasets, label fractions, methods (a method config and its network)
and seeds of the comparison table, the ablation rows and the efficiency measurements. A cell is finished when
``<results>/<dataset>/<method>-<network>-<labels>pct-seed<k>/`` holds its ``metrics.json`` (written last,
atomically, by ``lesion-kd fit --results_root``). Read by the runner (:mod:`lesion_kd.commands.reproduce`), the
report (:mod:`.report`) and the README's generated blocks (:mod:`.readme`); it imports none of them.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..results_name import CellName

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
        return CellName.of(self.method, self.network, self.labels, self.seed).folder

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


def cell_args(m: Manifest, cell: Cell) -> list[str]:
    """What defines a cell's training, as ``lesion-kd fit`` arguments: data, method and profile configs, the
    label fraction and, when the manifest overrides it, the network (the seed is the caller's)."""
    args = ["--config", cell.data_config, "--config", f"experiments/method/{cell.method}.yaml",
            "--config", f"experiments/profile/{m.profile}.yaml", "--data.labeled_fraction", str(cell.labels)]
    return args + (["--model.network", cell.network] if cell.override_network else [])
