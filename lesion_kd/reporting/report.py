"""The outputs of ``reproduce-table``: ``table.md``/``table.csv`` (the paper's Table 1 shape), ``ablation.md``,
``efficiency.md``, ``paired.md`` (each method against its supervised-only run, image by image) and a
self-contained ``report.html`` (tables, training curves and a qualitative grid as
embedded PNGs, also written to ``figures/``), from the finished cells of a manifest."""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import re
from collections import defaultdict
from pathlib import Path

import numpy as np

from ..data.io import atomic_write_bytes
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
QUALITATIVE_ROWS = 6


def _cells_rows(m: Manifest, part: str) -> tuple[list[dict], list[Cell]]:
    """Aggregated rows of the manifest's finished cells of a part, and its unfinished cells."""
    wanted = [c for c in m.cells if c.part == part or (part == "ablation" and c.method in m.ablation.get("rows", [])
                                                         and c.dataset == m.ablation.get("dataset")
                                                         and c.labels == float(m.ablation.get("labels", -1)))]
    return aggregate(collect(m.results, keep=cell_keys(wanted))), [c for c in wanted if not is_finished(m, c)]


def table_markdown(m: Manifest, agg: list[dict], missing: list[Cell]) -> str:
    lines = [f"# Comparison table ({m.profile} profile)", ""]
    total, machines, resumed = _wall_clock(m, [c for c in m.cells if c.part == "table"])
    if total:
        lines += [f"Wall-clock time of the finished table cells: {total / 3600:.2f} h on {', '.join(sorted(machines))} "
                  "(sum over cells, as run" + (f"; {resumed} resumed cell(s) count only their last invocation" if resumed
                                               else "") + ").", ""]
    if m.budget:
        lines += [f"Budget: {m.budget}", ""]
    lines += ["Dice and IoU in %, HD95 and ASD in pixels of the evaluation grid; per-image mean over the test split, "
              "then mean ± std over seeds.", ""]
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
    if missing:
        lines += [f"Not run yet ({len(missing)} cells):", ""] + [f"- {g}: {', '.join(names)}" for g, names in _grouped(missing)] + [""]
    lines += ["## For reference: the paper's Table 1 (its own dataset, the MSD lesion task; not comparable number for "
              "number)", "", "| method | labels | Dice % | HD px |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in PAPER_TABLE1]
    return "\n".join(lines) + "\n"


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
        colours = ["#c44e52" if r["method"] == "semikd" else "#8c8c8c" if r["method"] == "supervised" else "#4c72b0"
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
    axes[-1, 0].set_xlabel("test Dice % (grey: supervised only; red: the paper's method; dots: each seed's run)")
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
            colour = "#c44e52" if r["method"] == "semikd" else "#4c72b0"
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


def qualitative_figure(m: Manifest, cells: list[Cell]) -> tuple[bytes | None, list[str]]:
    """Image, ground truth and each method's prediction for the same test images of the first table group
    (dataset, labels): the easiest, middle and hardest images by mean Dice over the methods shown."""
    from PIL import Image

    from ..data.prep import load_canonical
    from ..models.loading import load_student

    notes: list[str] = []
    done = [c for c in cells if is_finished(m, c)]
    if not done:
        return None, notes
    ds, lab = done[0].dataset, done[0].labels
    shown = [c for c in done if (c.dataset, c.labels) == (ds, lab)]
    # a row whose network segments no image (the teacher's read-out head reads teacher embeddings) has nothing to
    # draw here, and it must not move which images the other rows' kept predictions are of
    notes += [f"{c.key}: not drawn (its network reads teacher embeddings, not images)" for c in shown
              if not _reads_images(c.network)]
    shown = [c for c in shown if _reads_images(c.network)]
    seen: set[tuple[str, str]] = set()
    shown = [c for c in shown if (c.method, c.network) not in seen and not seen.add((c.method, c.network))]
    per_image = [json.loads((cell_dir(m, c) / "metrics.json").read_text())["per_image"] for c in shown]
    common = sorted(set.intersection(*(set(p) for p in per_image)))
    if not common:
        return None, notes
    mean = {i: float(np.mean([p[i]["dice"] for p in per_image])) for i in common}
    ranked = sorted(common, key=lambda i: -mean[i])
    k = QUALITATIVE_ROWS // 3
    mid = len(ranked) // 2
    ids = list(dict.fromkeys(ranked[:k] + ranked[mid - k // 2: mid - k // 2 + k] + ranked[-k:]))
    from ..data.io import DataError

    try:
        samples, size, cache_dir = _test_samples(cell_dir(m, shown[0]) / "config.yaml")
    except DataError as e:  # the tables need only the results; the pictures need the images
        return None, [f"qualitative examples need the test images: {e}"]
    preds: dict[str, dict[str, np.ndarray]] = {}
    for c in shown:
        qdir = cell_dir(m, c) / "qualitative"
        missing = [i for i in ids if not (qdir / f"{i}.png").is_file()]
        ckpt = _best_checkpoint(m, c) if missing else None
        if missing and ckpt is not None:
            import torch

            try:
                net = load_student(str(ckpt))
            except Exception as e:  # noqa: BLE001 - a method whose network is not a plain student: say so
                notes.append(f"{c.key}: no predictions ({type(e).__name__}: {str(e)[:120]})")
                net = None
            masks = None
            if net is not None:
                x = torch.stack([torch.from_numpy(load_canonical(samples[i], size, cache_dir).image).permute(2, 0, 1)
                                 .float().div(255) for i in missing])
                try:
                    with torch.inference_mode():
                        masks = net(x).argmax(1).to(torch.uint8).numpy()
                except ValueError as e:  # a network that reads no image (the teacher's read-out head): say so
                    notes.append(f"{c.key}: no predictions ({str(e)[:120]})")
            if masks is not None:
                qdir.mkdir(parents=True, exist_ok=True)
                for i, mk in zip(missing, masks, strict=True):
                    buf = io.BytesIO()
                    Image.fromarray(mk * 255).save(buf, format="PNG", optimize=True)
                    atomic_write_bytes(qdir / f"{i}.png", buf.getvalue())
        elif missing:
            notes.append(f"{c.key}: no predictions (its checkpoint is not under {m.runs})")
        preds[c.key] = {i: np.array(Image.open(qdir / f"{i}.png")) > 0 for i in ids if (qdir / f"{i}.png").is_file()}
    plt = _plt()
    cols = 2 + len(shown)
    fig, axes = plt.subplots(len(ids), cols, figsize=(2.2 * cols, 2.2 * len(ids)), squeeze=False)
    for r, i in enumerate(ids):
        canon = load_canonical(samples[i], size, cache_dir)
        panels = [("image", canon.image, None), ("ground truth", canon.image, canon.mask > 0)]
        panels += [(f"{c.method}\n({c.network})", canon.image, preds[c.key].get(i)) for c in shown]
        for col, (title, img, mk) in enumerate(panels):
            ax = axes[r][col]
            ax.imshow(img)
            if mk is not None:
                ax.contour(mk, levels=[0.5], colors="#00ff66" if title == "ground truth" else "#ff3300", linewidths=1)
            elif col > 1:
                ax.text(0.5, 0.5, "n/a", ha="center", va="center", transform=ax.transAxes, color="white")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(title, fontsize=9)
        axes[r][0].set_ylabel(f"{i[:12]}\nmean Dice {mean[i]:.2f}", fontsize=8)
    fig.suptitle(f"{ds}, {lab * 100:.0f}% labels: easiest to hardest test images (mean Dice over the methods)",
                 fontsize=8)
    return _png(fig, dpi=80), notes  # many small panels: the page stays light


# ----------------------------------------------------------------------------------------------- HTML
def _bold(text: str) -> str:
    """Markdown's ``**bold**`` as ``<b>bold</b>`` (in already escaped text)."""
    return re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", text)


def _md_table_to_html(md: str) -> str:
    """The Markdown of these tables (headings, paragraphs, pipe tables) as HTML."""
    out, rows = [], []

    def flush() -> None:
        if rows:
            head, body = rows[0], [r for r in rows[2:]]
            out.append("<table><thead><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in head) + "</tr></thead><tbody>"
                       + "".join("<tr>" + "".join(f"<td>{_bold(html.escape(c))}</td>" for c in r) + "</tr>" for r in body)
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


def report_html(m: Manifest, sections: list[tuple[str, str]], figures: list[tuple[str, bytes | None, str]]) -> str:
    css = ("body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;color:#222}"
           "table{border-collapse:collapse;margin:0.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 8px;"
           "font-size:13px;text-align:left}th{background:#f0f3f8}img{max-width:100%;border:1px solid #ddd}"
           "figure{margin:1em 0}figcaption{font-size:13px;color:#555}")
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>lesion-kd: reproduce-table ({m.profile})</title>"
             f"<style>{css}</style></head><body>", f"<h1>lesion-kd comparison report: {html.escape(m.profile)} profile</h1>"]
    for _, md in sections:
        parts.append(_md_table_to_html(md))
    for title, png, caption in figures:
        if png is None:
            parts.append(f"<h2>{html.escape(title)}</h2><p>nothing to show yet. {html.escape(caption)}</p>")
            continue
        data = base64.b64encode(png).decode()
        parts.append(f"<h2>{html.escape(title)}</h2><figure><img alt='{html.escape(title)}' "
                     f"src='data:image/png;base64,{data}'><figcaption>{html.escape(caption)}</figcaption></figure>")
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
    qual, notes = qualitative_figure(m, table_cells)
    figures = [("Test Dice per method", dice_figure(table_agg), "mean ± std over seeds"),
               ("Training curves", curves_figure(m, table_cells + [c for c in m.cells if c.part == "ablation"]),
                "validation Dice during training, from each cell's metrics.csv: the mean over a method's seeds, "
                "their range shaded"),
               ("Paired comparisons", paired_figure(pairs),
                "each method against the supervised-only run of its network (and the manifest's other references) "
                "on the same test images and seeds: paired.md"),
               ("Qualitative examples", qual, "green: ground truth; red: prediction. " + " ".join(notes))]
    paths = []
    for name, text in texts.items():
        atomic_write_bytes(out / name, text.encode())
        paths.append(out / name)
    (out / "figures").mkdir(exist_ok=True)
    for (_title, png, _), name in zip(figures, ("dice.png", "curves.png", "paired.png", "qualitative.png"), strict=True):
        if png is not None:
            atomic_write_bytes(out / "figures" / name, png)
    page = report_html(m, [(k, v) for k, v in texts.items() if k.endswith(".md")], figures)
    atomic_write_bytes(out / "report.html", page.encode())
    paths.append(out / "report.html")
    return paths
