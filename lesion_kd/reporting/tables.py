"""Collect finished results (``<root>/<dataset>/<method>-<network>-<labels>pct-seed<k>/metrics.json``, folders
named by :class:`lesion_kd.results_name.CellName`) into rows, and render them as Markdown with mean +- std over
seeds.

Metrics (:mod:`lesion_kd.metrics`): ``dice``, ``iou``, ``hd95`` (MONAI's: the larger of the two directions'
95th-percentile boundary distances), ``asd``, and ``hd95_pooled`` (MedPy's ``hd95``, as SSL4MIS-derived papers
report it: one 95th percentile over both directions' distances pooled). ``hd95_pooled`` is recorded by runs
tested after it was added; a cell whose ``metrics.json`` lacks it has None there, and a row aggregated over
seeds has it only when every seed has it (rendered as a dash otherwise)."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from ..results_name import CellName

METRIC_KEYS = ("dice", "iou", "hd95", "asd")  # in every metrics.json
OPTIONAL_KEYS = ("hd95_pooled",)  # only in metrics.json written since they were added: None where absent


def collect(root: str | Path, keep: set[tuple] | None = None) -> list[dict]:
    """One row per finished cell: dataset, method, network, labels (fraction), seed, and the metric means
    (``hd95_pooled`` None where the cell's metrics.json lacks it). ``keep``: only the cells whose (dataset,
    method, network, labels, seed) is in it (a manifest's cells)."""
    rows = []
    for metrics in sorted(Path(root).glob("*/*/metrics.json")):
        cell = CellName.match(metrics.parent.name)
        if cell is None:
            continue
        key = (metrics.parent.parent.name, cell.method, cell.network, cell.labels, cell.seed)
        if keep is not None and key not in keep:
            continue
        doc = json.loads(metrics.read_text())
        rows.append({
            "dataset": metrics.parent.parent.name, "method": cell.method, "network": cell.network,
            "labels": cell.labels, "seed": cell.seed,
            **{k: doc[k]["mean"] for k in METRIC_KEYS},
            **{k: (doc.get(k) or {}).get("mean") for k in OPTIONAL_KEYS}, "n_images": doc["n_images"],
        })
    return rows


def aggregate(rows: list[dict]) -> list[dict]:
    """Mean and std over seeds of each (dataset, labels, method, network), and its per-seed Dice
    (``dice_per_seed``, in seed order). ``hd95_pooled_mean``/``_std`` are None unless every seed has it (a mean
    over fewer seeds than the HD95 beside it would not compare)."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["dataset"], r["labels"], r["method"], r["network"])].append(r)
    out = []
    for (dataset, labels, method, network), rs in sorted(groups.items()):
        row = {"dataset": dataset, "labels": labels, "method": method, "network": network, "seeds": len(rs),
               "dice_per_seed": [r["dice"] for r in sorted(rs, key=lambda r: r["seed"])]}
        for k in METRIC_KEYS + OPTIONAL_KEYS:
            if any(r.get(k) is None for r in rs):
                row[f"{k}_mean"] = row[f"{k}_std"] = None
                continue
            v = np.array([r[k] for r in rs])
            row[f"{k}_mean"], row[f"{k}_std"] = float(v.mean()), float(v.std())
        out.append(row)
    return out


def fmt_mean_std(r: dict, k: str, scale: float) -> str:
    """An aggregated row's metric ``k`` as ``mean`` or ``mean ± std`` (more than one seed), times ``scale``; a
    dash where the row lacks it (``hd95_pooled`` of cells tested before it was recorded)."""
    if r.get(f"{k}_mean") is None:
        return "–"
    s = f"{r[f'{k}_mean'] * scale:.2f}"
    return s + (f" ± {r[f'{k}_std'] * scale:.2f}" if r["seeds"] > 1 else "")


def markdown(agg: list[dict]) -> str:
    """Dice and IoU in %, distances in pixels; std over seeds shown when there is more than one seed. HD95 is
    MONAI's (directed max of per-direction 95th percentiles), HD95 pooled MedPy's (one 95th percentile of both
    directions pooled, as SSL4MIS-derived tables): a dash where the cells did not record it."""
    def fmt(r: dict, k: str, scale: float, digits: int) -> str:
        if r.get(f"{k}_mean") is None:
            return "-"
        s = f"{r[f'{k}_mean'] * scale:.{digits}f}"
        return s + (f" +- {r[f'{k}_std'] * scale:.{digits}f}" if r["seeds"] > 1 else "")

    lines = ["| dataset | labels | method | network | Dice % | IoU % | HD95 px | HD95 pooled px | ASD px | seeds |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in agg:
        lines.append(f"| {r['dataset']} | {r['labels'] * 100:.0f}% | {r['method']} | {r['network']} | "
                     f"{fmt(r, 'dice', 100, 2)} | {fmt(r, 'iou', 100, 2)} | {fmt(r, 'hd95', 1, 2)} | "
                     f"{fmt(r, 'hd95_pooled', 1, 2)} | {fmt(r, 'asd', 1, 2)} | {r['seeds']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # python -m lesion_kd.reporting.tables experiments/results/cpu
    import sys

    print(markdown(aggregate(collect(sys.argv[1] if len(sys.argv) > 1 else "experiments/results/cpu"))))
