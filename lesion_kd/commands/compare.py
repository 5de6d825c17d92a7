"""``lesion-kd compare``: is one model better than another on the same test images, beyond noise?

    lesion-kd compare --runs results/kvasir-seg/semikd-mamba_unet-10pct-seed{0,1,2} \\
                      --against results/kvasir-seg/supervised-mamba_unet-10pct-seed{0,1,2}

Each argument is a ``metrics.json`` written by ``lesion-kd test`` (or the folder holding it), with per-image
results; several are seeds, each side averaged over its own seeds per image (one run against a three-seed
reference: ``--runs A --against B0 B1 B2``). Prints the mean per-image Dice difference (points) and HD95
difference (pixels; MONAI's HD95, the larger of the two directions' 95th percentiles, and, where every result
recorded it, the pooled HD95 of SSL4MIS-derived papers, MedPy's one 95th percentile of both directions) with
95% bootstrap intervals, the Wilcoxon signed-rank p-values and the share of images
won (:mod:`lesion_kd.reporting.paired`, the statistics of ``reproduce-table``'s ``paired.md``); ``--json
FILE`` also writes them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..data.io import atomic_write_bytes
from ..reporting.paired import compare_runs, p_phrase, seeds_text
from . import parser


class CompareError(ValueError):
    """An input that cannot be compared; the message names the file."""


def load_run(path: str | Path) -> tuple[dict[str, dict[str, float]], str]:
    """Per-image results of one test run (``metrics.json`` or a folder holding it) and the grid its distances
    were measured on (``resolution``: ``model`` or ``original``)."""
    p = Path(path)
    if p.is_dir():
        p = p / "metrics.json"
    if not p.is_file():
        raise CompareError(f"{p}: no such file (give a metrics.json written by `lesion-kd test`, or its folder)")
    try:
        doc = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise CompareError(f"{p}: not JSON ({e})") from e
    per_image = doc.get("per_image") if isinstance(doc, dict) else None
    if not per_image:
        raise CompareError(f"{p}: no per-image results ('per_image'): was it written by `lesion-kd test`?")
    return per_image, str(doc.get("resolution", "model"))


def compare(runs: list[str | Path], against: list[str | Path]) -> dict:
    """Paired comparison of ``runs`` (seeds) with ``against`` (its seeds), on the test images all of them have."""
    if not runs or not against:
        raise CompareError(f"--runs and --against must each name at least one result: got {len(runs)} and {len(against)}")
    loaded = [load_run(p) for p in [*runs, *against]]
    grids = {res for _, res in loaded}
    if len(grids) > 1:  # HD95 in pixels of different grids is not comparable
        raise CompareError(f"the results were measured at different resolutions ({', '.join(sorted(grids))}): "
                           "compare metrics.json files with each other, or metrics_original_resolution.json files with each other")
    a = {i: loaded[i][0] for i in range(len(runs))}
    b = {i: loaded[len(runs) + i][0] for i in range(len(against))}
    first = b[0]
    for path, (per_image, _) in zip([*runs, *against], loaded, strict=True):
        if not set(first) & set(per_image):
            raise CompareError(f"{against[0]} and {path}: no test image in common: not the same test set")
    row = compare_runs(a, b)
    if row is None:
        raise CompareError("a paired comparison needs at least 2 test images in common")
    keys = ("mean", "ci_low", "ci_high", "p")
    return {"seeds": row["seeds"], "reference_seeds": row["reference_seeds"], "images": row["images"], "wins": row["wins"],
            "dice_points": {k: row[f"dice_{k}"] for k in keys}, "hd95_px": {k: row[f"hd95_{k}"] for k in keys},
            # None when a result lacks hd95_pooled (tested before it was recorded)
            "hd95_pooled_px": {k: row[f"hd95_pooled_{k}"] for k in keys} if row["hd95_pooled_mean"] is not None else None}


def main(argv: list[str] | None = None) -> int:
    ap = parser("lesion-kd compare", __doc__)
    ap.add_argument("--runs", nargs="+", required=True, metavar="RESULT",
                    help="the model's test results (metrics.json or its folder), one per seed")
    ap.add_argument("--against", nargs="+", required=True, metavar="RESULT",
                    help="the reference's test results, one per seed (as many as it has)")
    ap.add_argument("--json", type=Path, default=None, metavar="FILE", help="also write the comparison as JSON")
    args = ap.parse_args(argv)
    try:
        out = compare(args.runs, args.against)
    except (CompareError, ValueError) as e:
        print(f"lesion-kd compare: {e}", file=sys.stderr)
        return 2
    d, h = out["dice_points"], out["hd95_px"]
    print(f"{out['images']} test images, {seeds_text(out, 'against')} seed(s), per-image differences (runs minus against; "
          "each averaged over its seeds first):")
    print(f"  Dice  {d['mean']:+.2f} points, 95% CI [{d['ci_low']:+.2f}, {d['ci_high']:+.2f}], Wilcoxon {p_phrase(d['p'])}; "
          f"higher on {out['wins'] * 100:.0f}% of the images")
    print(f"  HD95  {h['mean']:+.2f} px (negative: closer boundaries), 95% CI [{h['ci_low']:+.2f}, {h['ci_high']:+.2f}], "
          f"Wilcoxon {p_phrase(h['p'])}")
    if (q := out["hd95_pooled_px"]) is not None:
        print(f"  HD95 pooled (MedPy's, as SSL4MIS-derived papers)  {q['mean']:+.2f} px, 95% CI [{q['ci_low']:+.2f}, "
              f"{q['ci_high']:+.2f}], Wilcoxon {p_phrase(q['p'])}")
    else:
        print("  HD95 pooled  - (not in every metrics.json: results tested before hd95_pooled was recorded)")
    if args.json:
        atomic_write_bytes(args.json, (json.dumps(out, indent=1) + "\n").encode())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
