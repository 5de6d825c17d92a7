"""Paired comparisons on the same test images: is a method's gain over a reference run more than noise?

A table row's mean Dice over ~100 test images moves by points from seed to seed, so two rows a few points
apart need a test that uses the pairing: both runs segmented the *same* images. For each method and each
reference method (by default ``supervised``) of the same dataset, label fraction and network, each averaged
over all of its finished seeds::

    d_i = 1/S sum_s Dice_method,s(image i) - 1/R sum_r Dice_reference,r(image i)     per test image i
    mean d, its 95% bootstrap confidence interval (percentile, 10 000 resamples of the images, seeded),
    the Wilcoxon signed-rank p-value of the d_i (two-sided), and the share of images the method wins

and the same for HD95 (lower is better: a negative difference is a gain), MONAI's directed max of the two
directions' 95th percentiles, and, where every result on both sides recorded it, for the pooled HD95
(``hd95_pooled``, MedPy's one 95th percentile of both directions, as SSL4MIS-derived papers). With the same
seeds on both sides this is the per-image difference of same-seed runs averaged over the seeds; a single-seed method
against a three-seed reference is measured against the reference's mean run, not against whichever of its
seeds shares the method's number. Statistics from ``scipy.stats`` (``bootstrap``, ``wilcoxon``); only the
pairing of per-image results is ours. The per-image values are those ``lesion-kd test`` wrote to each
cell's ``metrics.json`` (``per_image``). A p-value is per comparison, not corrected for the number of rows
compared. It measures the test images' noise, not the seeds': a single run's seed-to-seed spread is not in it.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np
from scipy import stats

from ..results_name import CellName

RESAMPLES = 10_000


def load_per_image(root: str | Path) -> dict[tuple, dict[int, dict[str, dict[str, float]]]]:
    """(dataset, labels, method, network) -> seed -> image id -> {"dice", "hd95", ...} for every finished cell
    under ``root`` whose ``metrics.json`` has per-image results."""
    out: dict[tuple, dict[int, dict]] = defaultdict(dict)
    for path in sorted(Path(root).glob("*/*/metrics.json")):
        cell = CellName.match(path.parent.name)
        if cell is None:
            continue
        per_image = json.loads(path.read_text()).get("per_image")
        if per_image:
            key = (path.parent.parent.name, cell.labels, cell.method, cell.network)
            out[key][cell.seed] = per_image
    return dict(out)


def paired_differences(
    runs: dict[int, dict[str, dict[str, float]]], reference: dict[int, dict[str, dict[str, float]]], metric: str
) -> tuple[np.ndarray, tuple[list[int], list[int]]]:
    """Per-image differences of ``metric``: ``runs`` averaged over its seeds minus ``reference`` averaged over
    its seeds, on the images every seed of both has (finite values only): (d (n_images,), (the runs'
    seeds, the reference's seeds))."""
    if not runs or not reference:
        return np.zeros(0), (sorted(runs), sorted(reference))
    sides = (runs, reference)
    images = sorted(set.intersection(*(set(side[s]) for side in sides for s in side)))
    a, b = (np.array([[side[s][i][metric] for i in images] for s in side], dtype=float) for side in sides)
    finite = np.isfinite(a).all(axis=0) & np.isfinite(b).all(axis=0)
    return (a.mean(axis=0) - b.mean(axis=0))[finite], (sorted(runs), sorted(reference))


def summarise(d: np.ndarray, seed: int = 0) -> dict:
    """Mean of paired differences ``d``, its 95% percentile-bootstrap interval, the two-sided Wilcoxon
    signed-rank p-value (1.0 when every difference is 0) and the share of positive differences."""
    if d.size < 2:
        raise ValueError(f"a paired comparison needs at least 2 images, got {d.size}")
    ci = stats.bootstrap((d,), np.mean, n_resamples=RESAMPLES, confidence_level=0.95, method="percentile",
                         rng=np.random.default_rng(seed)).confidence_interval
    p = 1.0 if not np.any(d) else float(stats.wilcoxon(d).pvalue)
    return {"mean": float(d.mean()), "ci_low": float(ci.low), "ci_high": float(ci.high), "p": p,
            "positive": float((d > 0).mean()), "n": int(d.size)}


def compare_runs(
    runs: dict[int, dict[str, dict[str, float]]], reference: dict[int, dict[str, dict[str, float]]]
) -> dict | None:
    """One paired comparison of ``runs`` with ``reference`` (seed -> image id -> metrics): how many seeds of each
    (``seeds``, ``reference_seeds``) and images were used, the share of images won on Dice (``wins``), and
    ``dice_``/``hd95_``/``hd95_pooled_`` ``mean``, ``ci_low``, ``ci_high``, ``p`` (Dice in points, HD95s in
    pixels; the ``hd95_pooled_`` ones None unless every image of every seed on both sides has ``hd95_pooled``,
    which results tested before it was recorded lack); None when fewer than 2 images are in common."""
    dice, (seeds, ref_seeds) = paired_differences(runs, reference, "dice")
    if dice.size < 2:
        return None
    hd95, _ = paired_differences(runs, reference, "hd95")
    ds, hs = summarise(dice * 100), summarise(hd95)
    keys = ("mean", "ci_low", "ci_high", "p")
    recorded = all("hd95_pooled" in m for side in (runs, reference) for per in side.values() for m in per.values())
    ps = summarise(paired_differences(runs, reference, "hd95_pooled")[0]) if recorded else dict.fromkeys(keys)
    return {"seeds": len(seeds), "reference_seeds": len(ref_seeds), "images": ds["n"], "wins": ds["positive"],
            **{f"dice_{k}": ds[k] for k in keys}, **{f"hd95_{k}": hs[k] for k in keys},
            **{f"hd95_pooled_{k}": ps[k] for k in keys}}


def comparisons(
    root: str | Path, references: tuple[str, ...] | list[str] = ("supervised",), keep: set[tuple] | None = None
) -> list[dict]:
    """Every (method, reference) pair of the same dataset, labels and network, each side over all its seeds: one row each
    with the Dice difference in points (``dice_*``), the HD95 difference in pixels (``hd95_*``) and the
    share of images the method wins on Dice (``wins``). A reference is compared only with the references
    listed before it (``supervised`` against ``semikd_sup``, not both ways round). ``keep``: only the cells
    whose (dataset, method, network, labels, seed) is in it (a manifest's cells)."""
    data = load_per_image(root)
    if keep is not None:
        data = {k: kept for k, runs in data.items()
                if (kept := {s: v for s, v in runs.items() if (k[0], k[2], k[3], k[1], s) in keep})}
    references = list(references)
    rows = []
    for (dataset, labels, method, network), runs in sorted(data.items()):
        for ref in references:
            if method in references and references.index(method) <= references.index(ref):
                continue
            if (dataset, labels, ref, network) not in data:
                continue
            if (row := compare_runs(runs, data[(dataset, labels, ref, network)])) is not None:
                rows.append({"dataset": dataset, "labels": labels, "method": method, "network": network,
                             "reference": ref, **row})
    return rows


def p_value_text(p: float) -> str:
    """A p-value as printed everywhere: ``< 0.001``, three decimals under 0.01, else two."""
    return "< 0.001" if p < 1e-3 else f"{p:.3f}" if p < 0.01 else f"{p:.2f}"


def p_phrase(p: float) -> str:
    """``p < 0.001`` or ``p = 0.45``."""
    text = p_value_text(p)
    return f"p {text}" if text.startswith("<") else f"p = {text}"


def seeds_text(row: dict, between: str = "vs") -> str:
    """``3`` where both sides have the same number of seeds, ``1 vs 3`` (method ``between`` reference) where
    they differ."""
    ref = row.get("reference_seeds", row["seeds"])
    return str(row["seeds"]) if ref == row["seeds"] else f"{row['seeds']} {between} {ref}"


def markdown(rows: list[dict], profile: str = "", summary: str = "") -> str:
    """The comparisons as a Markdown table, one row per (method, reference); ``summary`` (a Markdown table, e.g.
    ``readme.paired_summary``) goes before it under its own heading."""
    lines = [f"# Paired comparisons on the same test images{f' ({profile} profile)' if profile else ''}", "",
             "Each method against the supervised-only run of the same network (and other references the manifest "
             "names), on the same test images: the mean per-image difference (method minus reference, each averaged "
             "over its seeds first; seeds: the method's, and the reference's where it has other seeds), its 95% "
             "bootstrap interval over the "
             "images, the two-sided Wilcoxon signed-rank p-value (not corrected for the number of rows), and the "
             "share of images on which the method's Dice is higher. HD95: negative is better.", ""]
    if not rows:
        return "\n".join(lines + ["No pair of finished cells to compare yet.", ""])
    if summary:
        lines += ["## Side by side: each method's Dice and its difference from supervised-only", "",
                  "Bold: the 95% interval excludes 0.", "", summary.rstrip("\n"), "", "## Every comparison", ""]
    lines += ["| dataset | labels | method | network | against | seeds | images | ΔDice (points) [95% CI] | p | "
              "wins | ΔHD95 px [95% CI] | p |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['dataset']} | {r['labels'] * 100:.0f}% | {r['method']} | {r['network']} | {r['reference']} | "
            f"{seeds_text(r)} | {r['images']} | {r['dice_mean']:+.2f} [{r['dice_ci_low']:+.2f}, {r['dice_ci_high']:+.2f}] | "
            f"{p_value_text(r['dice_p'])} | {r['wins'] * 100:.0f}% | {r['hd95_mean']:+.2f} [{r['hd95_ci_low']:+.2f}, "
            f"{r['hd95_ci_high']:+.2f}] | {p_value_text(r['hd95_p'])} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # python -m lesion_kd.reporting.paired experiments/results/cpu [reference ...]
    import sys

    root = sys.argv[1] if len(sys.argv) > 1 else "experiments/results/cpu"
    refs = tuple(sys.argv[2:]) or ("supervised",)
    print(markdown(comparisons(root, refs)))
