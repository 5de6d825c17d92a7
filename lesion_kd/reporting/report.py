"""The outputs of ``reproduce-table``: ``table.md``/``table.csv`` (the paper's Table 1 shape), ``ablation.md``,
``efficiency.md``, ``paired.md`` (each method against its supervised-only run, image by image) and a
self-contained ``report.html`` (figures embedded as PNGs, also written to ``figures/``), from the finished cells
of a manifest.

The page leads with the answer: per dataset, the method (SemiKD+ where it has finished cells, else the paper's
SemiKD) against its supervised-only student and against the best baseline of the same label fraction, as
paired per-image Dice differences with their 95% bootstrap interval and Wilcoxon p (:mod:`.paired`); then the
figures (validation curves of those three, a qualitative grid drawn from the masks each cell kept at test time,
test Dice, the paired forest plot, every training curve), then the tables, with the method's rows
highlighted; the cells not run yet come last, folded. No absolute path reaches the page."""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..data.io import atomic_write_bytes
from ..viz import kept_prediction_ids, mask_png, prediction_filename, read_mask_png
from . import efficiency, paired
from .manifest import REPO, Cell, Manifest, cell_dir, cell_keys, is_finished, read_timing
from .readme import NETWORK_NAMES, method_label, paired_summary  # shared with the README
from .tables import aggregate, collect
from .tables import fmt_mean_std as _fmt

CSV_COLUMNS = ["dataset", "labels", "method", "network", "dice_mean", "dice_std", "iou_mean", "iou_std",
               "hd95_mean", "hd95_std", "asd_mean", "asd_std", "seeds"]

# docs/paper.md: the paper's Table 1 (MSD lesion task, not our datasets): (method, labels) -> (Dice %, HD px)
PAPER_TABLE1 = [
    ("U-Net (supervised)", "100%", "80.28", "15.24"), ("U-Net (supervised)", "10%", "64.48", "20.53"),
    ("U-Net (supervised)", "20%", "66.01", "19.31"), ("UA-MT", "10% / 20%", "70.12 / 72.29", "17.65 / 16.18"),
    ("SemiSAM-MT", "10% / 20%", "72.47 / 74.88", "15.34 / 13.97"), ("SASSNet", "10% / 20%", "70.04 / 71.61", "19.58 / 17.66"),
    ("URPC", "10% / 20%", "67.43 / 70.07", "18.01 / 15.26"), ("MC-Net+", "10% / 20%", "72.89 / 73.27", "15.52 / 13.86"),
    ("BCP", "10% / 20%", "81.48 / 82.21", "14.01 / 13.57"), ("CauSSL", "10% / 20%", "80.18 / 81.93", "14.25 / 13.87"),
    ("BaPC", "10% / 20%", "80.29 / 81.47", "13.96 / 13.08"), ("CPC-SAM", "10% / 20%", "81.73 / 83.68", "12.16 / 11.59"),
    ("Paper's method", "10% / 20%", "83.46 / 85.65", "13.60 / 12.34"),
]
ABLATION_ROWS = {"semikd_sup": "L_sup only", "semikd_featkd": "L_sup + plain feature KD (FitNets)",
                 "semikd_map": "L_sup + L_map", "semikd_pckd": "L_sup + L_pckd", "semikd_dss": "L_sup + L_dss",
                 "semikd": "L_sup + L_pckd + L_dss (full method)", "semikd_pl": "L_sup + L_pl (teacher pseudo-labels)",
                 "semikd_plus": "L_sup + L_pckd + L_dss + L_pl (SemiKD+)"}
# the method at its best (SemiKD+, the teacher's pseudo-labels added), else the paper's reconstruction: the
# headline's, the curves' and the grid's first row; highlighted in every table and figure
METHODS = ("semikd_plus", "semikd")
SUP_ONLY = "semikd_sup"  # the method's own recipe with L_sup only: its supervised-only student
TEACHER = "teacher"  # the frozen teacher's own read-out (a head on its embeddings)
DATASET_NAMES = {"kvasir-seg": "Kvasir-SEG", "busi": "BUSI"}
GRID_ROWS = 4  # test images per qualitative grid: the easiest, the hardest and two between
ROLE_COLOURS = {"method": "#c44e52", "sup": "#dd8452", "baseline": "#4c72b0", "teacher": "#8172b3"}
GT_COLOUR, PRED_COLOUR = "#00e5ff", "#ffe600"  # cyan (dashed) and yellow: apart on colonoscopy and ultrasound


def _is_baseline(method: str) -> bool:
    """A method the table compares SemiKD with (not SemiKD, its variants or the teacher's read-out)."""
    return not method.startswith("semikd") and method != TEACHER


def _ds_name(dataset: str) -> str:
    return DATASET_NAMES.get(dataset, dataset)


def _net_name(network: str) -> str:
    return NETWORK_NAMES.get(network, (network,))[0]


def _short(method: str) -> str:
    """A method's display name without its parenthesised gloss: ``SemiKD+``, ``SemiKD``, ``MC-Net+``."""
    return re.sub(r"\s*\(.*\)$", "", method_label(method)) if method != SUP_ONLY else "SemiKD, L_sup only"


_ABS = re.compile(r"(?<![\w.~])/(?:[\w.+@-]+/)+")


def no_abs_paths(text: str) -> str:
    """``text`` with every absolute path made relative: the repository's prefix dropped, the home folder as ``~``,
    any other absolute folder as ``…/`` (what the page prints must not depend on the machine it was made on)."""
    text = text.replace(str(REPO) + "/", "").replace(str(REPO), ".")
    home = str(Path.home())
    if len(home) > 1:
        text = text.replace(home + "/", "~/")
    return _ABS.sub("…/", text)


@dataclass
class Focus:
    """The rows the headline, the curves and the grid set side by side at one (dataset, labels): the method,
    its supervised-only student, the best baseline (highest mean test Dice) and the teacher's read-out (aggregated
    table rows, None where not finished)."""

    dataset: str
    labels: float
    method: dict
    sup: dict | None
    baseline: dict | None
    teacher: dict | None

    def roles(self) -> list[tuple[str, dict]]:
        """(role, row) of the rows present, in the order the grid and the curves show them."""
        return [(k, r) for k, r in (("teacher", self.teacher), ("method", self.method), ("sup", self.sup),
                                     ("baseline", self.baseline)) if r is not None]


def focus_rows(agg: list[dict], datasets: list[str] | None = None) -> list[Focus]:
    """One :class:`Focus` per (dataset, labels) where the method (``METHODS``, first with a finished cell) has a
    row; datasets in the given order (then any other), label fractions ascending."""
    groups: dict[tuple[str, float], list[dict]] = defaultdict(list)
    for r in agg:
        groups[(r["dataset"], r["labels"])].append(r)
    order = list(dict.fromkeys([*(datasets or []), *sorted({r["dataset"] for r in agg})]))
    out = []
    for ds, lab in sorted(groups, key=lambda k: (order.index(k[0]), k[1])):
        rows = groups[(ds, lab)]
        method = next((r for name in METHODS for r in sorted(rows, key=lambda r: -r["dice_mean"])
                       if r["method"] == name), None)
        if method is None:
            continue
        sup = next((r for r in rows if r["method"] == SUP_ONLY and r["network"] == method["network"]), None)
        base = max((r for r in rows if _is_baseline(r["method"])), key=lambda r: r["dice_mean"], default=None)
        teacher = max((r for r in rows if r["method"] == TEACHER), key=lambda r: r["dice_mean"], default=None)
        out.append(Focus(ds, lab, method, sup, base, teacher))
    return out


def headline_comparisons(m: Manifest, foci: list[Focus]) -> list[dict]:
    """Per focus, the method against its supervised-only student (``vs_sup``) and against the best baseline
    (``vs_baseline``): ``paired.compare_runs`` of the per-image results of all their finished seeds (None
    where a side is missing or fewer than 2 images are shared)."""
    keep = cell_keys(m.cells)
    data = {k: kept for k, runs in paired.load_per_image(m.results).items()
            if (kept := {s: v for s, v in runs.items() if (k[0], k[2], k[3], k[1], s) in keep})}

    def runs(row: dict | None) -> dict:
        return data.get((row["dataset"], row["labels"], row["method"], row["network"]), {}) if row else {}

    out = []
    for f in foci:
        mine = runs(f.method)
        vs = {name: (paired.compare_runs(mine, other) if mine and (other := runs(row)) else None)
              for name, row in (("vs_sup", f.sup), ("vs_baseline", f.baseline))}
        out.append({"focus": f, **vs})
    return out


def _row_text(row: dict) -> str:
    return _fmt(row, "dice", 100) + f" ({row['seeds']} seed{'s' if row['seeds'] > 1 else ''})"


def _diff_html(cmp: dict | None, row: dict | None, what: str) -> str:
    """One comparison of the headline: the difference, its interval and p, green/red where the interval
    excludes 0, and the other side's own Dice below."""
    if row is None:
        return f"<td class='na'>no finished cell of {html.escape(what)} here yet</td>"
    other = (f"<br><small>{html.escape(_short(row['method']))} ({html.escape(_net_name(row['network']))}): "
             f"{html.escape(_row_text(row))}</small>")
    if cmp is None:
        return f"<td class='na'>no per-image results to pair{other}</td>"
    clear = (cmp["dice_ci_low"] > 0 or cmp["dice_ci_high"] < 0) and cmp["dice_p"] < 0.05  # as the forest plot
    cls = ("up" if cmp["dice_mean"] > 0 else "down") if clear else "flat"
    seeds = paired.seeds_text(cmp)
    return (f"<td class='{cls}'><b>{cmp['dice_mean']:+.2f}</b> points [95% CI {cmp['dice_ci_low']:+.2f}, "
            f"{cmp['dice_ci_high']:+.2f}], Wilcoxon {html.escape(paired.p_phrase(cmp['dice_p']))}; wins "
            f"{cmp['wins'] * 100:.0f}% of {cmp['images']} images, {seeds} seed{'s' if seeds != '1' else ''}"
            f"{other}</td>")


def headline_html(m: Manifest, comps: list[dict]) -> str:
    """The report's first section: per dataset, one row per label fraction."""
    parts = ["<section id='headline'><h2>Headline: the method against its supervised-only student and the best "
             "baseline</h2>",
             "<p class='lead'>Test Dice in %, mean ± std over seeds. Each difference is per test image (the method "
             "minus the other, each side averaged over its seeds first), with its 95% bootstrap interval over the "
             "images and the two-sided Wilcoxon signed-rank p (not corrected for the number of comparisons; "
             "<code>paired.md</code>). Green: the method is better, the interval excludes 0 and p < 0.05; red: "
             "worse, likewise; grey: neither. The best baseline is the row of the same label fraction with the highest mean test Dice, "
             "whatever its network.</p>"]
    if not comps:
        return "\n".join(parts + ["<p>No finished cell of the method yet.</p></section>"])
    planned = {(c.dataset, c.labels, c.method) for c in m.cells}
    for ds in dict.fromkeys(c["focus"].dataset for c in comps):
        parts += [f"<h3>{html.escape(_ds_name(ds))}</h3>",
                  "<table class='headline'><thead><tr><th>labels</th><th>the method: test Dice %</th>"
                  "<th>against its supervised-only student</th><th>against the best baseline</th>"
                  "<th>the teacher's own read-out</th></tr></thead><tbody>"]
        notes = []
        for c in (c for c in comps if c["focus"].dataset == ds):
            f = c["focus"]
            teacher = (f"{html.escape(_row_text(f.teacher))}" if f.teacher else "<span class='na'>not run yet</span>")
            parts.append(f"<tr class='method'><td>{f.labels * 100:.0f}%</td><td><b>{html.escape(_short(f.method['method']))}"
                         f"</b> ({html.escape(_net_name(f.method['network']))})<br>{html.escape(_row_text(f.method))}</td>"
                         + _diff_html(c["vs_sup"], f.sup, f"{_short(SUP_ONLY)} ({SUP_ONLY})")
                         + _diff_html(c["vs_baseline"], f.baseline, "a baseline") + f"<td>{teacher}</td></tr>")
            if f.method["method"] != METHODS[0] and (ds, f.labels, METHODS[0]) in planned:
                notes.append(f"{f.labels * 100:.0f}%")
        parts.append("</tbody></table>")
        if notes:
            parts.append(f"<p class='note'>{html.escape(_short(METHODS[0]))} ({METHODS[0]}) has no finished cell yet at "
                         f"{', '.join(notes)} labels: the paper's reconstruction, {html.escape(_short(METHODS[1]))}, "
                         "stands in.</p>")
    return "\n".join(parts + ["</section>"])


def _cells_rows(m: Manifest, part: str) -> tuple[list[dict], list[Cell]]:
    """Aggregated rows of the manifest's finished cells of a part, and its unfinished cells."""
    wanted = [c for c in m.cells if c.part == part or (part == "ablation" and c.method in m.ablation.get("rows", [])
                                                         and c.dataset == m.ablation.get("dataset")
                                                         and c.labels == float(m.ablation.get("labels", -1)))]
    return aggregate(collect(m.results, keep=cell_keys(wanted))), [c for c in wanted if not is_finished(m, c)]


def table_markdown(m: Manifest, agg: list[dict], missing: list[Cell]) -> str:
    """``table.md``: the run's wall-clock and budget, the tables, the cells not run yet, the paper's Table 1."""
    lines = [f"# Comparison table ({m.profile} profile)", "", *_run_details_md(m), *_table_rows_md(m, agg)]
    lines += _missing_md(missing)
    return "\n".join(lines + _paper_md()) + "\n"


def _run_details_md(m: Manifest) -> list[str]:
    lines = []
    total, machines, resumed = _wall_clock(m, [c for c in m.cells if c.part == "table"])
    if total:
        lines += [f"Wall-clock time of the finished table cells: {total / 3600:.2f} h on {', '.join(sorted(machines))} "
                  "(sum over cells, as run" + (f"; {resumed} resumed cell(s) count only their last invocation" if resumed
                                               else "") + ").", ""]
    if m.budget:
        lines += [f"Budget: {m.budget}", ""]
    return lines


def _table_rows_md(m: Manifest, agg: list[dict]) -> list[str]:
    lines = ["Dice and IoU in %, HD95 and ASD in pixels of the evaluation grid; per-image mean over the test split, "
             "then mean ± std over seeds. HD95 is MONAI's: the larger of the two directed 95th percentiles of the "
             "boundary distances (prediction to truth, truth to prediction). Most semi-supervised papers report "
             "MedPy's `hd95`, one 95th percentile over both directions pooled, which is at or below it; runs tested "
             "since it was added also record that one as `hd95_pooled` in metrics.json.", ""]
    by_ds: dict[str, list[dict]] = defaultdict(list)
    for r in agg:
        by_ds[r["dataset"]].append(r)
    for ds, rows in by_ds.items():
        lines += [f"## {ds}", "", "| method | network | labels | Dice % | HD95 px | IoU % | ASD px | seeds |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in sorted(rows, key=lambda r: (r["labels"], _order(m, r["method"], r["network"]))):
            lines.append(f"| {r['method']} | {r['network']} | {r['labels'] * 100:.0f}% | {_fmt(r, 'dice', 100)} | "
                         f"{_fmt(r, 'hd95', 1)} | {_fmt(r, 'iou', 100)} | {_fmt(r, 'asd', 1)} | {r['seeds']} |")
        lines.append("")
    return lines


def _missing_md(missing: list[Cell]) -> list[str]:
    if not missing:
        return []
    return [f"Not run yet ({len(missing)} cells):", ""] + [f"- {g}: {', '.join(names)}" for g, names in _grouped(missing)] + [""]


def _paper_md() -> list[str]:
    lines = ["## For reference: the paper's Table 1 (its own dataset, the MSD lesion task; not comparable number for "
             "number)", "", "| method | labels | Dice % | HD px |", "|---|---|---|---|"]
    return lines + [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in PAPER_TABLE1]


def _grouped(cells: list[Cell]) -> list[tuple[str, list[str]]]:
    """Unfinished cells by dataset and label fraction: ("kvasir-seg, 10%", ["mean_teacher-unet-seed0", ...])."""
    groups: dict[str, list[str]] = defaultdict(list)
    for c in cells:
        groups[f"{c.dataset}, {c.labels * 100:.0f}% labels"].append(
            f"{c.method}-{c.network}-seed{c.seed}" + (" (needs a GPU: --gpus)" if c.requires == "gpu" else ""))
    return list(groups.items())


def _order(m: Manifest, method: str, network: str) -> int:
    for i, c in enumerate(m.cells):
        if c.method == method and c.network == network:
            return i
    return len(m.cells)


def _wall_clock(m: Manifest, cells: list[Cell]) -> tuple[float, set[str], int]:
    """Summed wall-clock of the cells' timing.json, their machines, and how many were resumed (their wall
    covers only the invocation that finished them)."""
    total, machines, resumed = 0.0, set(), 0
    for c in cells:
        if doc := read_timing(m, c):
            total += doc["wall_s"]
            resumed += bool(doc.get("resumed"))
            machines.add(f"{doc['machine']['cpu']}" + (f" + {doc['machine']['gpu']}" if "gpu" in doc["machine"] else ""))
    return total, machines, resumed


def table_csv(agg: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in agg:
        w.writerow({**r, "labels": round(r["labels"], 4)})
    return buf.getvalue()


def ablation_markdown(m: Manifest, agg: list[dict], missing: list[Cell]) -> str:
    a = m.ablation
    lines = [f"# Ablation ({a.get('dataset')}, {float(a.get('labels', 0)) * 100:.0f}% labels, {m.profile} profile)", "",
             "| row | losses | Dice % | HD95 px | IoU % | ASD px | seeds |", "|---|---|---|---|---|---|---|"]
    by_method = {r["method"]: r for r in agg}
    for row in a.get("rows", []):
        r = by_method.get(row)
        if r is None:
            lines.append(f"| {row} | {ABLATION_ROWS.get(row, '')} | not run yet | | | | 0 |")
        else:
            lines.append(f"| {row} | {ABLATION_ROWS.get(row, '')} | {_fmt(r, 'dice', 100)} | {_fmt(r, 'hd95', 1)} | "
                         f"{_fmt(r, 'iou', 100)} | {_fmt(r, 'asd', 1)} | {r['seeds']} |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------- figures
def _png(fig, dpi: int = 110) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def dice_figure(agg: list[dict]) -> bytes | None:
    """Test Dice of every finished table row: one panel per (dataset, labels), stacked, each as tall as its rows,
    bars sorted best first and labelled with their value (mean ± std over seeds, each seed's run a dot on its
    bar); supervised-only rows grey, the paper's method highlighted, so where each method stands against
    supervised-only, and how far one seed moves it, reads at a glance."""
    if not agg:
        return None
    plt = _plt()
    groups: dict[tuple[str, float], list[dict]] = defaultdict(list)
    for r in agg:
        groups[(r["dataset"], r["labels"])].append(r)
    sizes = [len(groups[g]) for g in sorted(groups)]
    fig, axes = plt.subplots(len(groups), 1, figsize=(8.5, 0.9 * len(groups) + 0.32 * sum(sizes)), squeeze=False,
                             gridspec_kw={"height_ratios": [n + 1.5 for n in sizes]}, sharex=True)
    for ax, (ds, lab) in zip(axes[:, 0], sorted(groups), strict=True):
        rows = sorted(groups[(ds, lab)], key=lambda r: -r["dice_mean"])
        names = [f"{method_label(r['method'])} · "
                 f"{NETWORK_NAMES.get(r['network'], (r['network'],))[0]}" for r in rows]
        colours = ["#c44e52" if r["method"] in METHODS else "#8c8c8c" if r["method"] == "supervised" else "#4c72b0"
                   for r in rows]
        y = np.arange(len(rows))
        means = [100 * r["dice_mean"] for r in rows]
        ax.barh(y, means, xerr=[100 * r["dice_std"] for r in rows], color=colours, height=0.7)
        for yi, r, v in zip(y, rows, means, strict=True):
            seeds = [100 * d for d in r.get("dice_per_seed", [])]
            if len(seeds) > 1:
                ax.plot(seeds, [yi] * len(seeds), "o", ms=3.5, mfc="white", mec="black", mew=0.8)
            txt = f"{v:.1f}" + (f" ± {100 * r['dice_std']:.1f}" if r.get("seeds", 1) > 1 else "")
            right = max([v + 100 * r["dice_std"], *seeds])
            ax.text(right + 1.8, yi, txt, va="center", fontsize=8)  # clear of the error bar and the seeds' dots
        ax.set_yticks(y, names, fontsize=8)
        ax.invert_yaxis()
        ax.set_title(f"{ds}, {lab * 100:.0f}% labels", fontsize=10, loc="left")
        ax.set_xlim(0, 100)
    axes[-1, 0].set_xlabel("test Dice % (grey: supervised only; red: the method, SemiKD and SemiKD+; dots: each "
                           "seed's run)")
    fig.tight_layout()
    return _png(fig)


def paired_figure(rows: list[dict]) -> bytes | None:
    """A forest plot of ``paired.comparisons``: per (dataset, labels, reference) panel, each method's mean
    per-image Dice difference with its 95% bootstrap interval, a line at 0 (no difference); filled where the
    interval excludes 0 and the Wilcoxon p < 0.05, open otherwise. Whether a row's gain over supervised-only
    is more than noise on these test images reads off the plot."""
    if not rows:
        return None
    plt = _plt()
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["dataset"], r["labels"], r["reference"])].append(r)
    keys = sorted(groups)
    sizes = [len(groups[k]) for k in keys]
    fig, axes = plt.subplots(len(keys), 1, figsize=(11, 0.9 * len(keys) + 0.3 * sum(sizes)), squeeze=False,
                             gridspec_kw={"height_ratios": [n + 1.5 for n in sizes]}, sharex=True)
    for ax, key in zip(axes[:, 0], keys, strict=True):
        rs = sorted(groups[key], key=lambda r: -r["dice_mean"])
        y = np.arange(len(rs))
        for yi, r in zip(y, rs, strict=True):
            clear = (r["dice_ci_low"] > 0 or r["dice_ci_high"] < 0) and r["dice_p"] < 0.05
            colour = "#c44e52" if r["method"] in METHODS else "#4c72b0"
            ax.plot([r["dice_ci_low"], r["dice_ci_high"]], [yi, yi], color=colour, lw=2)
            ax.plot(r["dice_mean"], yi, "o", color=colour, mfc=colour if clear else "white", ms=6)
            seeds = paired.seeds_text(r) + " seed" + ("s" if r["seeds"] > 1 or r.get("reference_seeds", 1) > 1 else "")
            # right of the panel, clear of the intervals
            ax.text(1.01, yi, f"{r['dice_mean']:+.1f} [{r['dice_ci_low']:+.1f}, {r['dice_ci_high']:+.1f}], "
                    f"{paired.p_phrase(r['dice_p'])}, {seeds}",
                    va="center", fontsize=7, transform=ax.get_yaxis_transform())
        ax.axvline(0, color="#555", lw=1, ls="--")
        names = [f"{method_label(r['method'])} · "
                 f"{NETWORK_NAMES.get(r['network'], (r['network'],))[0]}" for r in rs]
        ax.set_yticks(y, names, fontsize=8)
        ax.invert_yaxis()
        ref = "supervised only" if key[2] == "supervised" else method_label(key[2])
        ax.set_title(f"{key[0]}, {key[1] * 100:.0f}% labels: against {ref} (same network)", fontsize=10, loc="left")
    lo = min(r["dice_ci_low"] for r in rows)
    hi = max(r["dice_ci_high"] for r in rows)
    axes[-1, 0].set_xlim(min(lo - 1, -5), max(hi + 1, 5))
    axes[-1, 0].set_xlabel("per-image test Dice difference (points), 95% bootstrap interval; "
                           "filled: excludes 0 and Wilcoxon p < 0.05")
    fig.tight_layout()
    return _png(fig)


def val_dice_series(m: Manifest, c: Cell) -> list[tuple[int, float]]:
    """(step, validation Dice) of a finished cell, from its metrics.csv (empty: none logged)."""
    path = cell_dir(m, c) / "metrics.csv"
    if not path.is_file() and is_finished(m, c):  # published before results carried the log: its run's
        run = _run_dir(m, c)
        path = run / "metrics.csv" if run else path
    if not path.is_file():
        return []
    with path.open() as fh:
        return sorted({int(float(r["step"])): float(r["val/dice"]) for r in csv.DictReader(fh)
                       if r.get("val/dice")}.items())


def curve_panels(m: Manifest, cells: list[Cell]) -> dict[str, dict[str, list[list[tuple[int, float]]]]]:
    """Panel title -> line label -> the validation curves of its seeds. One panel per (dataset, labels); the
    SemiKD ablation variants (``semikd_*``) get a panel of their own beside the full method, so the
    comparison of methods stays readable."""
    panels: dict[str, dict[str, list]] = {}
    ablated = {(c.dataset, c.labels) for c in cells if c.method.startswith("semikd_")}
    for c in sorted(cells, key=lambda c: (c.dataset, c.labels)):
        pts = val_dice_series(m, c)
        if not pts:
            continue
        where = f"{c.dataset}, {c.labels * 100:.0f}% labels"
        titles = [f"{where}: SemiKD ablation"] if c.method.startswith("semikd_") else [where]
        if c.method == "semikd" and (c.dataset, c.labels) in ablated:
            titles.append(f"{where}: SemiKD ablation")  # the full method is the ablation's last row too
        for t in titles:
            panels.setdefault(t, {}).setdefault(f"{c.method} ({c.network})", []).append(pts)
    return {t: v for t, v in panels.items() if v}


def curves_figure(m: Manifest, cells: list[Cell]) -> bytes | None:
    """Validation Dice against training step: per panel (:func:`curve_panels`), one line per method and
    network, the mean over its seeds with their range shaded."""
    panels = curve_panels(m, cells)
    if not panels:
        return None
    plt = _plt()
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.6 * cols, 3.9 * rows), squeeze=False)
    colors = plt.get_cmap("tab20").colors
    order = list(dict.fromkeys(label for lines in panels.values() for label in lines))  # one colour per line
    for ax, (title, lines) in zip(axes.flat, panels.items(), strict=False):
        for label, seeds in lines.items():
            steps = sorted(set.intersection(*(set(dict(s)) for s in seeds)))
            vals = np.array([[dict(s)[t] for t in steps] for s in seeds])
            i = order.index(label)
            color, style = colors[(2 * i) % 20 + (i // 10) % 2], "-" if i < 20 else "--"
            n = f", {len(seeds)} seeds" if len(seeds) > 1 else ""
            ax.plot(steps, vals.mean(0), style, marker="o", ms=3, color=color, label=f"{label}{n}")
            if len(seeds) > 1:
                ax.fill_between(steps, vals.min(0), vals.max(0), color=color, alpha=0.15, lw=0)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("training step")
        ax.set_ylabel("val Dice")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    return _png(fig)


def _run_dir(m: Manifest, c: Cell) -> Path | None:
    """The cell's run directory: under the manifest's runs folder, else the one its published config.yaml
    came from (cells run by hand with --results_root: the same config file, byte for byte)."""
    import yaml

    found = sorted((m.runs / c.dataset / c.name).glob("lightning_logs/version_*/config.yaml"),
                   key=lambda p: p.stat().st_mtime)
    if found:
        return found[-1].parent
    published = cell_dir(m, c) / "config.yaml"
    if not published.is_file():
        return None
    root = Path((yaml.safe_load(published.read_text()).get("trainer") or {}).get("default_root_dir") or "")
    root = root if root.is_absolute() else REPO / root  # relative to the repository, where runs start
    for cfg in root.glob("lightning_logs/version_*/config.yaml"):
        if cfg.read_bytes() == published.read_bytes():
            return cfg.parent
    return None


def _best_checkpoint(m: Manifest, c: Cell) -> Path | None:
    run = _run_dir(m, c)
    found = sorted(run.glob("checkpoints/best-*.ckpt"), key=lambda p: p.stat().st_mtime) if run else []
    return found[-1] if found else None


def _reads_images(network: str) -> bool:
    """Whether a registered network segments images (``models.readout.ReadoutHead`` reads teacher embeddings)."""
    from ..models import build_model

    return getattr(build_model(network), "reads_images", True)


def _test_samples(config_path: Path):
    """The test samples of a cell's data config and its model input size."""
    import yaml

    from ..data import LesionDataModule

    data = dict(yaml.safe_load(config_path.read_text())["data"])
    dm = LesionDataModule(**{k: v for k, v in data.items() if k not in ("class_path", "init_args")})
    dm.setup("test")
    return {s.id: s for s in dm.splits["test"]}, data["image_size"], data.get("cache_dir")


def key_curve_panels(m: Manifest, foci: list[Focus]) -> list[tuple[Focus, list[tuple[str, dict, list]]]]:
    """Per focus (label fraction) with a validation log: (focus, [(role, table row, the seeds' curves)]) for the
    method, its supervised-only student and the best baseline (the teacher's read-out left out)."""
    panels = []
    for f in foci:
        lines = []
        for role, row in f.roles():
            if role == "teacher":
                continue
            cells = [c for c in m.cells if (c.dataset, c.labels, c.method, c.network)
                     == (f.dataset, f.labels, row["method"], row["network"]) and is_finished(m, c)]
            seeds = [pts for c in cells if (pts := val_dice_series(m, c))]
            if seeds:
                lines.append((role, row, seeds))
        if lines:
            panels.append((f, lines))
    return panels


def key_curves_figure(m: Manifest, foci: list[Focus]) -> bytes | None:
    """Validation Dice against training step of one dataset's foci (:func:`key_curve_panels`, one panel per label
    fraction), each line the mean over its finished seeds with their range shaded."""
    panels = key_curve_panels(m, foci)
    if not panels:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 4.0), squeeze=False)
    names = {"method": "the method", "sup": "its supervised-only student", "baseline": "the best baseline"}
    for ax, (f, lines) in zip(axes[0], panels, strict=True):
        for role, row, seeds in lines:
            steps = sorted(set.intersection(*(set(dict(s)) for s in seeds)))
            if not steps:
                continue
            vals = 100 * np.array([[dict(s)[t] for t in steps] for s in seeds])
            n = f", {len(seeds)} seeds" if len(seeds) > 1 else ", 1 seed"
            colour = ROLE_COLOURS[role]
            ax.plot(steps, vals.mean(0), "-", marker="o", ms=3.5, lw=2.2 if role == "method" else 1.6, color=colour,
                    label=f"{_short(row['method'])} ({_net_name(row['network'])}{n}): {names[role]}")
            if len(seeds) > 1:
                ax.fill_between(steps, vals.min(0), vals.max(0), color=colour, alpha=0.18, lw=0)
        ax.set_title(f"{_ds_name(f.dataset)}, {f.labels * 100:.0f}% labels", fontsize=11, loc="left")
        ax.set_xlabel("training step")
        ax.set_ylabel("validation Dice %")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return _png(fig)


def _kept_masks(cell: Path, ids) -> dict[str, Path]:
    """Image id -> the mask a finished cell kept of it: ``predictions/`` (written at test time), else
    ``qualitative/`` (written by earlier reports from a checkpoint, same format)."""
    out = {}
    for i in ids:
        for p in (cell / "predictions" / prediction_filename(i), cell / "qualitative" / f"{i}.png"):
            if p.is_file():
                out[i] = p
                break
    return out


def _masks_from_checkpoint(m: Manifest, c: Cell, per_image: dict, notes: list[str]) -> dict[str, Path]:
    """For a finished cell that kept no masks but whose best checkpoint is under the manifest's runs folder:
    predict the kept images (``viz.kept_prediction_ids``) and keep them in ``predictions/`` as a test run would."""
    ckpt = _best_checkpoint(m, c)
    if ckpt is None or not _reads_images(c.network):
        return {}
    import torch

    from ..data.io import DataError
    from ..data.prep import load_canonical
    from ..models.loading import load_student

    ids = kept_prediction_ids(per_image)
    try:
        samples, size, cache_dir = _test_samples(cell_dir(m, c) / "config.yaml")
        net = load_student(str(ckpt))
        x = torch.stack([torch.from_numpy(load_canonical(samples[i], size, cache_dir).image).permute(2, 0, 1)
                         .float().div(255) for i in ids])
        with torch.inference_mode():
            masks = net(x).argmax(1).numpy()
    except (DataError, KeyError, OSError, ValueError, RuntimeError) as e:  # say why, draw the others
        notes.append(f"{c.key}: no predictions from its checkpoint ({type(e).__name__}: {str(e)[:120]})")
        return {}
    for i, mk in zip(ids, masks, strict=True):
        atomic_write_bytes(cell_dir(m, c) / "predictions" / prediction_filename(i), mask_png(mk))
    return _kept_masks(cell_dir(m, c), ids)


@dataclass
class Grid:
    """A qualitative grid: its focus, its columns ((role, cell, per-image results, image id -> kept mask)), its
    rows (image ids, easiest first), the roles left out (role, why), and how many images every column kept."""

    focus: Focus
    columns: list[tuple[str, Cell, dict, dict[str, Path]]]
    ids: list[str]
    left_out: list[tuple[str, str]]
    shared: int = 0


def choose_grid(m: Manifest, f: Focus, notes: list[str] | None = None) -> Grid | None:
    """The columns and rows of a focus's grid, from the masks its cells kept: for each role one of its finished
    cells (the method first, then its supervised-only student, the best baseline, the teacher's read-out; a
    role whose cells kept masks of fewer than 2 of the images the others share is left out), the combination
    that shows the most roles, then the most images, then the lowest seeds; rows: ``GRID_ROWS`` of the shared
    images, spread from the easiest to the hardest by the columns' mean Dice."""
    import itertools

    notes = notes if notes is not None else []
    priority = {"method": 8, "sup": 4, "baseline": 2, "teacher": 1}
    options: dict[str, list] = {}
    for role, row in f.roles():
        cells = sorted((c for c in m.cells if (c.dataset, c.labels, c.method, c.network)
                        == (f.dataset, f.labels, row["method"], row["network"]) and is_finished(m, c)),
                       key=lambda c: c.seed)
        found = []
        for c in cells:
            per_image = json.loads((cell_dir(m, c) / "metrics.json").read_text()).get("per_image") or {}
            masks = _kept_masks(cell_dir(m, c), per_image) or _masks_from_checkpoint(m, c, per_image, notes)
            if masks:
                found.append((role, c, per_image, masks))
        options[role] = found
    roles = [r for r in priority if r in options]
    best, best_score = None, None
    for combo in itertools.product(*[[None, *options[r]] for r in roles]):
        chosen = [o for o in combo if o is not None]
        if not chosen:
            continue
        shared = set.intersection(*(set(o[3]) for o in chosen))
        if len(shared) < 2:
            continue
        score = (sum(priority[o[0]] for o in chosen), min(len(shared), GRID_ROWS), -sum(o[1].seed for o in chosen))
        if best_score is None or score > best_score:
            best, best_score = (chosen, shared), score
    left = [(role, "no finished cell kept its predicted masks, and no checkpoint is here")
            for role in roles if not options[role]]
    if best is None:
        return None
    chosen, shared = best
    left += [(o[0], "its kept masks are of other test images") for o in
             (options[r][0] for r in roles if options[r] and r not in {c[0] for c in chosen})]
    mean = {i: float(np.mean([o[2][i]["dice"] for o in chosen])) for i in shared}
    ranked = sorted(shared, key=lambda i: (-mean[i], i))
    picks = sorted({int(round(x)) for x in np.linspace(0, len(ranked) - 1, min(GRID_ROWS, len(ranked)))})
    order = {"teacher": 0, "method": 1, "sup": 2, "baseline": 3}
    return Grid(f, sorted(chosen, key=lambda o: order[o[0]]), [ranked[k] for k in picks], left, len(shared))


def grid_figure(m: Manifest, g: Grid) -> bytes | None:
    """Image, ground truth and each column's kept prediction of the grid's images: predictions filled and
    outlined in yellow, the ground truth outlined in dashed cyan on every panel, each panel's Dice in its corner."""
    from matplotlib.colors import ListedColormap
    from matplotlib.lines import Line2D

    from ..data.io import DataError
    from ..data.prep import load_canonical

    samples, size, cache_dir = _test_samples(cell_dir(m, g.columns[0][1]) / "config.yaml")
    try:
        canon = {i: load_canonical(samples[i], size, cache_dir) for i in g.ids}
    except (DataError, KeyError) as e:
        raise DataError(f"the grid's test images: {e}") from e
    plt = _plt()
    names = {"method": "the method", "sup": "its supervised-only student", "baseline": "the best baseline",
             "teacher": "the teacher's read-out"}
    cols = 2 + len(g.columns)
    fig, axes = plt.subplots(len(g.ids), cols, figsize=(2.55 * cols, 2.55 * len(g.ids) + 0.9), squeeze=False)
    fill = {c: ListedColormap([c]) for c in (GT_COLOUR, PRED_COLOUR)}
    rank = ["easiest"] + [""] * (len(g.ids) - 2) + ["hardest"] if len(g.ids) > 1 else [""]

    def draw(ax, img, mask, colour, style, lw, alpha):
        ax.imshow(img)
        if mask is not None and mask.any():
            ax.imshow(np.ma.masked_where(~mask, mask), cmap=fill[colour], alpha=alpha, interpolation="nearest")
            ax.contour(mask.astype(float), levels=[0.5], colors=colour, linewidths=lw, linestyles=style)

    for r, i in enumerate(g.ids):
        c = canon[i]
        gt = c.mask > 0 if c.mask is not None else None
        axes[r][0].imshow(c.image)
        draw(axes[r][1], c.image, gt, GT_COLOUR, "solid", 2.2, 0.3)
        for k, (_role, _cell, per_image, masks) in enumerate(g.columns):
            ax = axes[r][2 + k]
            pred = read_mask_png(masks[i])
            draw(ax, c.image, pred, PRED_COLOUR, "solid", 2.4, 0.25)
            if gt is not None and gt.any():
                ax.contour(gt.astype(float), levels=[0.5], colors=GT_COLOUR, linewidths=1.6, linestyles="dashed")
            ax.text(0.03, 0.04, f"Dice {per_image[i]['dice']:.2f}", transform=ax.transAxes, fontsize=10,
                    color="white", bbox={"facecolor": "black", "alpha": 0.65, "pad": 2, "lw": 0})
        mean = np.mean([col[2][i]["dice"] for col in g.columns])
        axes[r][0].set_ylabel((f"{rank[r]}\n" if rank[r] else "") + f"mean Dice {mean:.2f}", fontsize=10)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    titles = ["image", "ground truth"] + [
        f"{names[role]}\n{_short(cell.method)}\n{_net_name(cell.network)}, seed {cell.seed}"
        for role, cell, _, _ in g.columns]
    for k, t in enumerate(titles):
        colour = ROLE_COLOURS.get(g.columns[k - 2][0], "black") if k >= 2 else "black"
        axes[0][k].set_title(t, fontsize=9.5, color=colour, fontweight="bold" if k >= 2 and g.columns[k - 2][0]
                             == "method" else "normal")
    handles = [Line2D([], [], color=GT_COLOUR, lw=2, ls="--", label="ground truth (dashed cyan)"),
               Line2D([], [], color=PRED_COLOUR, lw=2.5, label="prediction (yellow, filled)")]
    fig.legend(handles=handles, loc="upper center", ncol=2, fontsize=10, frameon=False, bbox_to_anchor=(0.5, 1.0))
    fig.suptitle(f"{_ds_name(g.focus.dataset)}, {g.focus.labels * 100:.0f}% labels: test images from the easiest to "
                 "the hardest (mean Dice of the columns)", fontsize=11, y=1.035)
    fig.tight_layout()
    return _png(fig, dpi=90)


def qualitative_grids(m: Manifest, foci: list[Focus]) -> list[tuple[str, bytes | None, str]]:
    """One grid per dataset, at the label fraction whose grid shows the most roles (then images): (title, PNG,
    caption with its one-line note of what is left out and why)."""
    out = []
    for ds in dict.fromkeys(f.dataset for f in foci):
        notes: list[str] = []
        grids = [g for f in foci if f.dataset == ds and (g := choose_grid(m, f, notes))]
        title = f"Qualitative examples: {_ds_name(ds)}"
        if not grids:
            out.append((title, None, "no finished cell of this dataset kept its predicted masks (cells finished "
                        "before masks were kept at test time, and no checkpoint here). " + " ".join(notes)))
            continue
        g = max(grids, key=lambda g: (len(g.columns), len(g.ids), -g.focus.labels))
        try:
            png = grid_figure(m, g)
        except Exception as e:  # noqa: BLE001 - the tables need only the results; the pictures need the images
            out.append((title, None, f"the grid needs the test images: {type(e).__name__}: {str(e)[:200]}"))
            continue
        left = "; ".join(f"{names} ({why})" for why, names in _left_out_text(g).items())
        sources = {p.parent.name for *_, masks in g.columns for p in masks.values()}
        how = ("predictions/, written at test time" if sources == {"predictions"} else
               "qualitative/, written from their checkpoints by earlier reports" if sources == {"qualitative"} else
               "predictions/, written at test time, or qualitative/, written from a checkpoint by an earlier report")
        out.append((title, png, f"{g.focus.labels * 100:.0f}% labels. Each column: the predicted masks one finished "
                    f"cell kept beside its metrics.json ({how}). Rows: {len(g.ids)} of the {g.shared} test images "
                    "every column kept, from the easiest to the hardest by their mean Dice."
                    + (f" Left out: {left}." if left else "") + " " + " ".join(notes)))
    return out


def _left_out_text(g: Grid) -> dict[str, str]:
    why: dict[str, list[str]] = defaultdict(list)
    rows = dict(g.focus.roles())
    for role, reason in g.left_out:
        why[reason].append(_short(rows[role]["method"]))
    return {k: ", ".join(v) for k, v in why.items()}


# ----------------------------------------------------------------------------------------------- HTML
def _bold(text: str) -> str:
    """Markdown's ``**bold**`` as ``<b>bold</b>`` (in already escaped text)."""
    return re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", text)


def _md_table_to_html(md: str, highlight: set[str] = frozenset()) -> str:
    """The Markdown of these tables (headings, paragraphs, pipe tables) as HTML; a table row with a cell that
    reads one of ``highlight`` (Markdown bold aside) gets the class ``method``."""
    out, rows = [], []

    def flush() -> None:
        if rows:
            head, body = rows[0], [r for r in rows[2:]]
            out.append("<table><thead><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in head) + "</tr></thead><tbody>"
                       + "".join(("<tr class='method'>" if any(c.strip("*") in highlight for c in r) else "<tr>")
                                 + "".join(f"<td>{_bold(html.escape(c))}</td>" for c in r) + "</tr>" for r in body)
                       + "</tbody></table>")
            rows.clear()

    for line in md.splitlines():
        if line.startswith("|"):
            rows.append([c.strip() for c in line.strip("|").split("|")])
            continue
        flush()
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            out.append(f"<h{level + 1}>{html.escape(line.lstrip('#').strip())}</h{level + 1}>")
        elif line.strip():
            out.append(f"<p>{html.escape(line).replace('`', '')}</p>")
    flush()
    return "\n".join(out)


CSS = ("body{font-family:system-ui,sans-serif;max-width:1200px;margin:1.5em auto;color:#222;padding:0 1em}"
       "table{border-collapse:collapse;margin:0.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 8px;"
       "font-size:13px;text-align:left;vertical-align:top}th{background:#f0f3f8}img{max-width:100%;border:1px solid #ddd}"
       "figure{margin:0.5em 0 1.5em}figcaption{font-size:13px;color:#555}tr.method td{background:#fdecea}"
       "tr.method td:first-child{border-left:4px solid #c44e52}table.headline td{font-size:14px;padding:6px 10px}"
       "table.headline td.up{background:#e3f4e1}table.headline td.down{background:#fbe3e3}"
       "table.headline td.flat{background:#f6f6f6}td.na,.na{color:#888}p.lead{font-size:14px;color:#444}"
       "p.note{font-size:13px;color:#555}nav{font-size:13px;color:#555;margin-bottom:1em}"
       "details{margin:1em 0 2em}summary{cursor:pointer;font-weight:600}small{color:#555}h2{margin-top:1.6em}")


def _figure_html(title: str, png: bytes | None, caption: str, level: int = 3) -> str:
    head = f"<h{level}>{html.escape(title)}</h{level}>"
    if png is None:
        return f"{head}<p class='na'>Nothing to show yet. {html.escape(no_abs_paths(caption))}</p>"
    data = base64.b64encode(png).decode()
    return (f"{head}<figure><img alt='{html.escape(title)}' src='data:image/png;base64,{data}'>"
            f"<figcaption>{html.escape(no_abs_paths(caption))}</figcaption></figure>")


def report_html(m: Manifest, headline: str, figures: list[tuple[str, bytes | None, str]], tables: list[str],
                missing: list[Cell]) -> str:
    """The page: the headline, the figures, the tables (``tables``: Markdown), the run's details and, folded, the
    cells not run yet."""
    highlight = set(METHODS) | {method_label(x) for x in METHODS}
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>lesion-kd: reproduce-table ({m.profile})</title>"
             f"<style>{CSS}</style></head><body>",
             f"<h1>lesion-kd comparison report: {html.escape(m.profile)} profile</h1>",
             "<nav>The method: SemiKD, a frozen LiteMedSAM teacher distilled into a 1.34 M-parameter Mamba student "
             "(SemiKD+ adds the teacher's pseudo-labels). Sections: <a href='#headline'>headline</a> · "
             "<a href='#figures'>figures</a> · <a href='#tables'>tables</a> · <a href='#details'>run details</a>"
             + (" · <a href='#not-run'>not run yet</a>" if missing else "") + "</nav>",
             no_abs_paths(headline), "<section id='figures'><h2>Figures</h2>"]
    parts += [_figure_html(title, png, caption) for title, png, caption in figures]
    parts.append("</section><section id='tables'><h2>Tables</h2><p class='note'>Highlighted: the method's rows "
                 "(SemiKD, SemiKD+).</p>")
    for md in tables:
        body = _md_table_to_html(no_abs_paths(md), highlight)
        parts.append(re.sub(r"<h(\d)>", lambda g: f"<h{min(6, int(g.group(1)) + 1)}>",
                            re.sub(r"</h(\d)>", lambda g: f"</h{min(6, int(g.group(1)) + 1)}>", body)))
    parts.append("</section><section id='details'><h2>Run details</h2>"
                 + _md_table_to_html(no_abs_paths("\n".join(_run_details_md(m)) or "No timing recorded.")) + "</section>")
    if missing:
        items = "".join(f"<li>{html.escape(g)}: {html.escape(', '.join(names))}</li>" for g, names in _grouped(missing))
        parts.append(f"<section id='not-run'><details><summary>Not run yet: {len(missing)} cells of the manifest "
                     f"(click to list)</summary><ul>{items}</ul></details></section>")
    # for headless checks: how many images decoded once the page has loaded
    parts.append("<script>window.addEventListener('load',()=>{document.body.dataset.imagesLoaded="
                 "[...document.images].filter(i=>i.complete&&i.naturalWidth>0).length;});</script></body></html>")
    return "\n".join(parts)


def write_outputs(m: Manifest) -> list[Path]:
    """Write the six outputs (and figures/*.png) to ``m.out``; returns their paths."""
    out = m.out
    out.mkdir(parents=True, exist_ok=True)
    table_agg, table_missing = _cells_rows(m, "table")
    abl_agg, abl_missing = _cells_rows(m, "ablation")
    eff = m.efficiency
    eff_doc = efficiency.load_or_measure(m.results, eff.get("size", 256), eff.get("batch", 8), eff.get("repeats", 5))
    texts = {"table.md": table_markdown(m, table_agg, table_missing), "table.csv": table_csv(table_agg),
             "ablation.md": ablation_markdown(m, abl_agg, abl_missing),
             "efficiency.md": f"# Efficiency\n\n{efficiency.markdown(eff_doc, efficiency.load_gpu(m.results))}",
             "paired.md": paired.markdown(pairs := paired.comparisons(m.results, m.paired_references, keep=cell_keys(m.cells)),
                                          m.profile, paired_summary(m, pairs))}
    table_cells = [c for c in m.cells if c.part == "table"]
    # the method and its supervised-only student may be ablation rows only (at the ablation's dataset and fraction)
    foci = focus_rows(aggregate(collect(m.results, keep=cell_keys(m.cells))), list(dict.fromkeys(c.dataset for c in m.cells)))
    figures: list[tuple[str, bytes | None, str, str]] = []
    for ds in dict.fromkeys(f.dataset for f in foci):
        mine = [f for f in foci if f.dataset == ds]
        figures.append((f"Validation Dice during training: {_ds_name(ds)}", key_curves_figure(m, mine),
                        "the method, its supervised-only student and the best baseline of each label fraction: "
                        "validation Dice against training step from each cell's metrics.csv, the mean over a "
                        "method's finished seeds with their range shaded", f"curves-{ds}.png"))
    figures += [(*g, f"qualitative-{_slug(g[0].split(': ')[-1])}.png") for g in qualitative_grids(m, foci)]
    figures += [("Test Dice per method", dice_figure(table_agg), "every finished table row: mean ± std over seeds, "
                 "each seed's run a dot; red: the method", "dice.png"),
                ("Paired comparisons", paired_figure(pairs),
                 "each method against the supervised-only run of its network (and the manifest's other references) "
                 "on the same test images and seeds: paired.md", "paired.png"),
                ("Every training curve", curves_figure(m, table_cells + [c for c in m.cells if c.part == "ablation"]),
                 "validation Dice during training of every finished cell, from its metrics.csv: the mean over a "
                 "method's seeds, their range shaded", "curves.png")]
    paths = []
    for name, text in texts.items():
        atomic_write_bytes(out / name, text.encode())
        paths.append(out / name)
    (out / "figures").mkdir(exist_ok=True)
    for _title, png, _caption, name in figures:
        if png is not None:
            atomic_write_bytes(out / "figures" / name, png)
    written = {name for _, png, _, name in figures if png is not None}
    for stale in (out / "figures").glob("*.png"):  # a figure this report no longer draws (renamed, or nothing to show)
        if stale.name not in written:
            stale.unlink()
    missing = list({c.key: c for c in table_missing + abl_missing}.values())
    tables = [f"# Comparison table ({m.profile} profile)\n\n" + "\n".join(_table_rows_md(m, table_agg) + _paper_md()),
              texts["ablation.md"], texts["paired.md"], texts["efficiency.md"]]
    page = report_html(m, headline_html(m, headline_comparisons(m, foci)), [f[:3] for f in figures], tables, missing)
    atomic_write_bytes(out / "report.html", page.encode())
    paths.append(out / "report.html")
    return paths


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
