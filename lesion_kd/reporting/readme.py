"""The README's results table, generated from a manifest's finished cells (``make readme-results``).

Each row is one (dataset, labels, method, network) of the manifest with at least one finished seed: the test
metrics (mean ± std over seeds), the wall-clock time of one run (``timing.json``, mean over seeds) and the
``lesion-kd fit`` command that reproduces it. The rows replace whatever stands between the two markers
``<!-- results:begin -->`` and ``<!-- results:end -->`` in the README, so the README never drifts from
``experiments/results/<profile>/``. A second block, between ``<!-- paired:begin -->`` and
``<!-- paired:end -->`` where the README has it, sets each method's Dice at every label fraction beside its
paired difference from supervised-only (``paired.md``, one column pair per fraction):

    python -m lesion_kd.reporting.readme --profile cpu --readme README.md
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

from ..data.io import atomic_write_bytes
from . import paired
from .manifest import (
    Cell,
    Manifest,
    ManifestError,
    cell_args,
    cell_dir,
    cell_keys,
    load_manifest,
    manifest_path,
    read_timing,
)
from .tables import aggregate, collect
from .tables import fmt_mean_std as _fmt

BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
PAIRED_BEGIN, PAIRED_END = "<!-- paired:begin -->", "<!-- paired:end -->"

PAPERS_METHOD = "semikd"  # set in bold in the README's tables


@functools.cache
def _display_names() -> dict[str, str]:
    from ..methods import display_names  # the method classes' display_name (torch and Lightning load here)

    return display_names()


def method_label(method: str, bold: bool = False) -> str:
    """A method's name in the tables (the class's ``display_name``; an unknown method by its results name), the
    paper's method in Markdown bold when ``bold``."""
    name = _display_names().get(method, method)
    return f"**{name}**" if bold and method == PAPERS_METHOD else name


NETWORK_NAMES = {"mamba_unet": ("Mamba student", "student (mamba_unet)"), "unet": ("U-Net", "U-Net (SSL4MIS)"),
                 "sam_lora": ("LiteMedSAM + LoRA", None)}


class ReadmeError(ValueError):
    """The README cannot be updated (markers missing or out of order); the message names the file."""


def _network(network: str, efficiency: dict) -> str:
    """``Mamba student (1.33 M)``: the parameter count from the efficiency table when it was measured."""
    label, eff_name = NETWORK_NAMES.get(network, (network, None))
    for row in efficiency.get("rows", []) if eff_name else []:
        if row.get("model") == eff_name:
            return f"{label} ({row['params_m']:.2f} M)"
    return label


SUPERSEDED_NOTE = ("† trained with a loss form since replaced as the default: method.md's uncentred L_map (collapses "
                   "the student's deepest feature to one direction: `benchmarks/feature_collapse.py`), or its L_dss "
                   "balanced by the unlabeled batch's own areas / with the unbounded -log contrast (both made BUSI dip: "
                   "`experiments/results/diagnostics/`), or its distribution alignment weighted gamma2 = 0.1 (too "
                   "weak to hold the lesion area: the lesion class spreads); rerun such a cell with the current "
                   "defaults to replace it.")

# written beside a cell's metrics by benchmarks/gpu_session.sh: the cell trained on the carried copy of the data
CARRIED_DATA = "carried_data.txt"
CARRIED_NOTE = ("‡ trained and tested on a lent GPU from the copy of the dataset that `benchmarks/gpu_carry.py` "
                "carries there (images at the model size, 160x160, as JPEG quality 95; masks lossless; LiteMedSAM's "
                "weights rounded to float16): the cell's `carried_data.txt` says so beside its metrics.")


def superseded_losses(run_dir: Path) -> list[str]:
    """The superseded SemiKD loss forms a finished cell's resolved config trained with (empty: none). Configs
    written before an option existed lack its key and had its old behaviour."""
    import yaml

    cfg = run_dir / "config.yaml"
    if not cfg.is_file():
        return []
    model = (yaml.safe_load(cfg.read_text()) or {}).get("model") or {}
    init = model.get("init_args") or {}
    if not str(model.get("class_path", "")).endswith("SemiKDModule"):
        return []
    found = []
    if init.get("kd_mode", "pckd") in ("pckd", "map") and not init.get("map_centered", False):
        found.append("uncentred L_map")
    if init.get("use_dss", True):
        if init.get("use_consistency", True) and init.get("dss_balance_area", "batch") == "batch":
            found.append("batch-balanced consistency")
        if init.get("use_contrast", True) and init.get("contrast_form", "log") == "log":
            found.append("unbounded contrast")
        if init.get("use_alignment", True) and float(init.get("gamma2", 0.1)) == 0.1:
            found.append("alignment weighted 0.1")
    return found


def fit_command(m: Manifest, cell: Cell, seeds: list[int]) -> str:
    """The ``lesion-kd fit`` command of a row: the cell's own arguments, without reproduce-table's bookkeeping."""
    cmd = "lesion-kd fit " + " ".join(cell_args(m, cell))
    if seeds != [0]:
        cmd += " --seed_everything " + ("{" + ",".join(map(str, seeds)) + "}" if len(seeds) > 1 else str(seeds[0]))
    return f"`{cmd}`"


def results_table(m: Manifest) -> str:
    """The Markdown table of every finished (dataset, labels, method, network) of the manifest."""
    by_group: dict[tuple, list[Cell]] = {}
    for c in m.cells:
        by_group.setdefault((c.dataset, c.labels, c.method, c.network), []).append(c)
    rows = [r for r in collect(m.results) if (r["dataset"], r["labels"], r["method"], r["network"]) in by_group]
    finished = {(r["dataset"], r["labels"], r["method"], r["network"], r["seed"]) for r in rows}
    datasets = list(dict.fromkeys(c.dataset for c in m.cells))
    order = list(by_group)
    agg = sorted(aggregate(rows), key=lambda r: (datasets.index(r["dataset"]), r["labels"],
                                                 order.index((r["dataset"], r["labels"], r["method"], r["network"]))))
    eff = m.results / "efficiency.json"
    efficiency = json.loads(eff.read_text()) if eff.is_file() else {}
    lines = ["| dataset | labels | method | network (parameters) | Dice % | IoU % | HD95 px | ASD px | seeds | "
             "wall per run | command |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    marked = carried = False
    for r in agg:
        cells = [c for c in by_group[(r["dataset"], r["labels"], r["method"], r["network"])]
                 if (c.dataset, c.labels, c.method, c.network, c.seed) in finished]
        timings = [t for c in cells if (t := read_timing(m, c))]
        whole = [t["wall_s"] for t in timings if not t.get("resumed")]  # a resumed run's wall is only its last part
        wall = f"{sum(whole) / len(whole) / 60:.0f} min" if whole else ("resumed" if timings else "")
        gpus = sorted({g for t in timings if (g := (t.get("machine") or {}).get("gpu"))})
        if gpus and wall:  # trained on a lent GPU: its minutes are not the two-core machine's
            wall += " on " + ", ".join(gpus)
        if any((cell_dir(m, c) / CARRIED_DATA).is_file() for c in cells):
            wall += "‡"
            carried = True
        dagger = "†" if any(superseded_losses(cell_dir(m, c)) for c in cells) else ""
        marked |= bool(dagger)
        lines.append(
            f"| {r['dataset']} | {r['labels'] * 100:.0f}% | {method_label(r['method'], bold=True)}{dagger} | "
            f"{_network(r['network'], efficiency)} | {_fmt(r, 'dice', 100)} | {_fmt(r, 'iou', 100)} | {_fmt(r, 'hd95', 1)} | "
            f"{_fmt(r, 'asd', 1)} | {r['seeds']} | {wall} | {fit_command(m, cells[0], sorted(c.seed for c in cells))} |")
    notes = ([SUPERSEDED_NOTE] if marked else []) + ([CARRIED_NOTE] if carried else [])
    return "\n".join(lines + [x for n in notes for x in ("", n)]) + "\n"


def paired_summary(m: Manifest, rows: list[dict] | None = None) -> str:
    """Per dataset, each Table-1 method's test Dice at every label fraction beside its paired difference from the
    manifest's first paired reference (supervised-only) of the same network, each side over all its seeds: mean
    per-image Dice difference in points, its 95% bootstrap interval and Wilcoxon p (``paired.comparisons``).
    Bold: the interval excludes 0. Fractions with nothing to compare (the 100% upper bound) are left out.
    ``rows``: ``paired.comparisons`` of the manifest's cells when already computed (else computed here)."""
    ref = m.paired_references[0]
    cells = [c for c in m.cells if c.part == "table"]
    keys = cell_keys(cells)
    if rows is None:
        rows = paired.comparisons(m.results, [ref], keep=keys)
    pairs = {(r["dataset"], r["labels"], r["method"], r["network"]): r for r in rows if r["reference"] == ref}
    dice = {(r["dataset"], r["labels"], r["method"], r["network"]): r for r in aggregate(collect(m.results, keep=keys))}
    reference = f"{method_label(ref, bold=True)}-only"
    out = []
    for dataset in dict.fromkeys(c.dataset for c in cells):
        fractions = sorted({k[1] for k in pairs if k[0] == dataset})
        if not fractions:
            continue
        order = [k for k in dict.fromkeys((c.method, c.network) for c in cells if c.dataset == dataset)
                 if any((dataset, f, *k) in dice for f in fractions)]
        head = " | ".join(f"{f * 100:.0f}%: Dice % | {f * 100:.0f}%: ΔDice vs {reference} [95% CI], p" for f in fractions)
        out += [f"| {dataset}: method | network | {head} |", "|---|---|" + "---|---|" * len(fractions)]
        for method, network in order:
            parts = []
            for f in fractions:
                d, p = dice.get((dataset, f, method, network)), pairs.get((dataset, f, method, network))
                parts.append(_fmt(d, "dice", 100) + (f" ({d['seeds']} seeds)" if d["seeds"] > 1 else "") if d else "")
                if method == ref and d:
                    parts.append("(the reference)")
                elif p:
                    text = (f"{p['dice_mean']:+.2f} [{p['dice_ci_low']:+.2f}, {p['dice_ci_high']:+.2f}], "
                            f"{paired.p_phrase(p['dice_p'])}")
                    parts.append(f"**{text}**" if p["dice_ci_low"] > 0 or p["dice_ci_high"] < 0 else text)
                else:
                    parts.append("")
            name = method_label(method, bold=True)
            out.append(f"| {name} | {_network(network, {})} | " + " | ".join(parts) + " |")
        out.append("")
    return "\n".join(out) if out else "No pair of finished cells to compare yet.\n"


def splice(readme: Path, table: str, begin: str = BEGIN, end: str = END) -> bool:
    """Replace the text between the markers ``begin`` and ``end`` of ``readme`` with ``table``; True when the
    file changed."""
    text = readme.read_text()
    b, e = text.find(begin), text.find(end)
    if b < 0 or e < 0 or e < b:
        raise ReadmeError(f"{readme}: needs the markers {begin} and {end} (in this order) around the generated table")
    new = text[: b + len(begin)] + "\n" + table + text[e:]
    if new == text:
        return False
    atomic_write_bytes(readme, new.encode())
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lesion_kd.reporting.readme", description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="cpu", help="manifest name (experiments/reproduce/NAME.yaml) or path")
    ap.add_argument("--readme", type=Path, default=None, help="README to update in place (default: print the table)")
    args = ap.parse_args(argv)
    try:
        m = load_manifest(manifest_path(args.profile))
        table = results_table(m)
    except ManifestError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.readme is None:
        sys.stdout.write(table + "\n" + paired_summary(m))
        return 0
    try:
        changed = splice(args.readme, table)
        print(f"{args.readme}: results table {'updated' if changed else 'already current'} "
              f"({table.count(chr(10)) - 2} rows)")
        if PAIRED_BEGIN in args.readme.read_text():  # the side-by-side block is optional
            changed = splice(args.readme, paired_summary(m), PAIRED_BEGIN, PAIRED_END)
            print(f"{args.readme}: paired summary {'updated' if changed else 'already current'}")
    except ReadmeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
