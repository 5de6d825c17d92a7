"""The generated results blocks of the README and of docs/results.md (``make readme-results``).

Each block stands between a pair of markers and is rewritten from a manifest's finished cells
(``experiments/results/<profile>/``), so the documents never drift from the results:

- ``<!-- headline:begin -->`` ... ``<!-- headline:end -->`` (the README): one row per method and network of
  the manifest's table part, one column per dataset and label fraction, test Dice (and HD95).
- ``<!-- results:begin -->`` ... ``<!-- results:end -->`` (docs/results.md): one row per (dataset, labels,
  method, network) with at least one finished seed: the test metrics (mean ± std over seeds), the wall-clock
  time of one run (``timing.json``, mean over seeds) and the ``lesion-kd fit`` command that reproduces it.
- ``<!-- paired:begin -->`` ... ``<!-- paired:end -->`` (docs/results.md): each method's Dice at every label
  fraction beside its paired difference from supervised-only (``paired.md``, one column pair per fraction).

A file may hold any of the blocks (each pair once); a file given with none of them is an error. ``--check``
writes nothing and exits 1 when a block is stale:

    python -m lesion_kd.reporting.readme --profile cpu --readme README.md docs/results.md [--check]
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
    REPO,
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
HEADLINE_BEGIN, HEADLINE_END = "<!-- headline:begin -->", "<!-- headline:end -->"
# the files `make readme-results` rewrites (relative to the repository root)
DEFAULT_FILES = ("README.md", "docs/results.md")

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
                 "sam_lora": ("LiteMedSAM + LoRA", None), "litemedsam": ("LiteMedSAM (frozen)", None)}


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


def _model_config(path: Path) -> tuple[str, dict] | None:
    """(``model.class_path``, ``model.init_args``) of a config file (a cell's resolved ``config.yaml`` or a method
    config), or None when the file does not exist."""
    import yaml

    if not path.is_file():
        return None
    model = (yaml.safe_load(path.read_text()) or {}).get("model") or {}
    return str(model.get("class_path", "")), model.get("init_args") or {}


def superseded_losses(run_dir: Path) -> list[str]:
    """The superseded SemiKD loss forms a finished cell's resolved config trained with (empty: none). Configs
    written before an option existed lack its key and had its old behaviour."""
    model = _model_config(run_dir / "config.yaml")
    if model is None or not model[0].endswith("SemiKDModule"):
        return []
    init = model[1]
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


# method options whose value in a method config changed after cells were trained with the earlier one, with the
# value a resolved config without the key trained with: a row's command sets the value its cells trained with
# (docs/method.md, 4.9), so that it reproduces them
CHANGED_CONFIG_OPTIONS = {"kd_grid": "teacher"}


def trained_overrides(run_dir: Path, method_config: Path) -> list[str]:
    """``--model.init_args.KEY VALUE`` for each of ``CHANGED_CONFIG_OPTIONS`` whose value in the cell's resolved
    ``config.yaml`` differs from what ``method_config`` sets today (empty when they agree or either is missing)."""
    cell, method = _model_config(run_dir / "config.yaml"), _model_config(Path(method_config))
    if cell is None or method is None:
        return []
    trained, today = cell[1], method[1]
    out = []
    for key, before in CHANGED_CONFIG_OPTIONS.items():
        if key in today and trained.get(key, before) != today[key]:
            out += [f"--model.init_args.{key}", str(trained.get(key, before))]
    return out


def fit_command(m: Manifest, cell: Cell, seeds: list[int]) -> str:
    """The ``lesion-kd fit`` command of a row: the cell's own arguments, without reproduce-table's bookkeeping,
    plus the value of an option its method's config has changed since the cell was trained (``trained_overrides``)."""
    cmd = "lesion-kd fit " + " ".join(cell_args(m, cell) + trained_overrides(
        cell_dir(m, cell), REPO / "experiments" / "method" / f"{cell.method}.yaml"))
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


HEADLINE_NOTE = ("Test Dice % (HD95 px in brackets), {profile} profile, mean ± std over seeds where there are several; "
                 "the paper's method in bold. Every row with its IoU, ASD, seeds, wall time and `lesion-kd fit` "
                 "command, and each method against supervised-only image by image: `docs/results.md`.")
HEADLINE_MARKS = {"†": "† trained with a loss form since replaced as the default (`docs/results.md`).",
                  "‡": "‡ trained on a lent GPU from a carried copy of the data (`docs/results.md`)."}


def headline_table(m: Manifest) -> str:
    """The README's one results table: a row per (method, network) of the manifest's table part with a finished
    cell, a column per (dataset, label fraction) with one, each cell the test Dice (mean ± std over its seeds)
    and the mean HD95; rows and columns in the manifest's order. Rows marked † / ‡ as in :func:`results_table`."""
    cells = [c for c in m.cells if c.part == "table"]
    keys = cell_keys(cells)
    rows_by_seed = collect(m.results, keep=keys)
    finished = {(r["dataset"], r["labels"], r["method"], r["network"], r["seed"]) for r in rows_by_seed}
    agg = {(r["dataset"], r["labels"], r["method"], r["network"]): r for r in aggregate(rows_by_seed)}
    if not agg:
        return "No finished cell yet.\n"
    datasets = list(dict.fromkeys(c.dataset for c in cells))
    columns = sorted({k[:2] for k in agg}, key=lambda k: (datasets.index(k[0]), k[1]))
    rows = [k for k in dict.fromkeys((c.method, c.network) for c in cells) if any((*col, *k) in agg for col in columns)]
    eff = m.results / "efficiency.json"
    efficiency = json.loads(eff.read_text()) if eff.is_file() else {}
    lines = ["| method | network (parameters) | " + " | ".join(f"{d} {f * 100:.0f}%" for d, f in columns) + " |",
             "|---|---|" + "---|" * len(columns)]
    used: set[str] = set()
    for method, network in rows:
        parts, marks = [], ""
        for col in columns:
            r = agg.get((*col, method, network))
            hd95 = f" ({r['hd95_mean']:.1f})" if r and r.get("hd95_mean") is not None else ""
            parts.append(_fmt(r, "dice", 100) + hd95 if r else "")
            done = [c for c in cells if (c.dataset, c.labels, c.method, c.network) == (*col, method, network)
                    and (c.dataset, c.labels, c.method, c.network, c.seed) in finished]
            if any(superseded_losses(cell_dir(m, c)) for c in done) and "†" not in marks:
                marks += "†"
            if any((cell_dir(m, c) / CARRIED_DATA).is_file() for c in done) and "‡" not in marks:
                marks += "‡"
        used |= set(marks)
        lines.append(f"| {method_label(method, bold=True)}{marks} | {_network(network, efficiency)} | "
                     + " | ".join(parts) + " |")
    notes = [HEADLINE_NOTE.format(profile=m.profile)] + [note for mark, note in HEADLINE_MARKS.items() if mark in used]
    return "\n".join(lines + ["", " ".join(notes)]) + "\n"


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


def spliced(text: str, block: str, begin: str, end: str, name: str = "README") -> str:
    """``text`` with what stands between the markers ``begin`` and ``end`` replaced by ``block``. Each marker
    must occur exactly once, ``begin`` first (a ReadmeError naming ``name`` otherwise)."""
    nb, ne = text.count(begin), text.count(end)
    b, e = text.find(begin), text.find(end)
    if nb == 0 or ne == 0 or e < b:
        raise ReadmeError(f"{name}: needs the markers {begin} and {end} (in this order) around the generated table")
    if nb > 1 or ne > 1:
        raise ReadmeError(f"{name}: the markers {begin} and {end} must occur once each (found {nb} and {ne})")
    return text[: b + len(begin)] + "\n" + block + text[e:]


def splice(readme: Path, table: str, begin: str = BEGIN, end: str = END) -> bool:
    """Replace the text between the markers ``begin`` and ``end`` of ``readme`` with ``table``; True when the
    file changed."""
    text = readme.read_text()
    new = spliced(text, table, begin, end, str(readme))
    if new == text:
        return False
    atomic_write_bytes(readme, new.encode())
    return True


# name -> (begin marker, end marker, generator): the blocks a document may hold
BLOCKS = {"headline": (HEADLINE_BEGIN, HEADLINE_END, headline_table),
          "results": (BEGIN, END, results_table),
          "paired": (PAIRED_BEGIN, PAIRED_END, paired_summary)}


def regenerate(path: Path, m: Manifest, generated: dict[str, str] | None = None) -> tuple[str, list[str]]:
    """``path``'s text with every block it holds markers for regenerated (each block made once per
    ``generated`` cache), and the names of the blocks that were stale. Writes nothing. A file with no block's
    markers, or with a marker missing, repeated or out of order, is a ReadmeError naming it."""
    generated = {} if generated is None else generated
    if not path.is_file():
        raise ReadmeError(f"{path}: no such file")
    text = path.read_text()
    present = [name for name, (begin, _, _) in BLOCKS.items() if begin in text]
    if not present:
        raise ReadmeError(f"{path}: needs the markers of at least one generated block ("
                          + ", ".join(f"{b} ... {e}" for b, e, _ in BLOCKS.values()) + ")")
    stale = []
    for name in present:
        begin, end, make = BLOCKS[name]
        if name not in generated:
            generated[name] = make(m)
        new = spliced(text, generated[name], begin, end, str(path))
        if new != text:
            stale.append(name)
        text = new
    return text, stale


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lesion_kd.reporting.readme", description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="cpu", help="manifest name (experiments/reproduce/NAME.yaml) or path")
    ap.add_argument("--readme", type=Path, nargs="+", default=None, metavar="FILE",
                    help="Markdown files to update in place, each in its marked blocks (make readme-results: "
                         f"{' '.join(DEFAULT_FILES)}); default: print the blocks")
    ap.add_argument("--check", action="store_true", help="write nothing; exit 1 when a block is stale")
    args = ap.parse_args(argv)
    try:
        m = load_manifest(manifest_path(args.profile))
        if args.readme is None:
            sys.stdout.write("\n".join(make(m) for _, _, make in BLOCKS.values()))
            return 0
        generated: dict[str, str] = {}
        # every file is checked and regenerated before any is written: an error leaves all of them as they were
        results = [(path, *regenerate(path, m, generated)) for path in args.readme]
    except (ManifestError, ReadmeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for path, text, stale in results:
        if stale and not args.check:
            atomic_write_bytes(path, text.encode())
        for name in (n for n, (b, _, _) in BLOCKS.items() if b in text):
            state = ("stale" if args.check else "updated") if name in stale else "already current"
            print(f"{path}: {name} block {state}")
    stale_files = [str(path) for path, _, stale in results if stale]
    if args.check and stale_files:
        print(f"error: stale generated blocks in {', '.join(stale_files)} (run make readme-results)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
