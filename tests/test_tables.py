"""Results collection and Markdown tables: per-seed rows aggregated to mean +- std; the pooled HD95
(``hd95_pooled``) in the tables and in ``lesion-kd compare`` where recorded, a dash where not."""

import json
from pathlib import Path

import numpy as np
import pytest

from lesion_kd.reporting.tables import aggregate, collect, fmt_mean_std, markdown

REPO = Path(__file__).resolve().parents[1]


def write(root, dataset, cell, dice, hd95_pooled=None):
    d = root / dataset / cell
    d.mkdir(parents=True)
    doc = {k: {"mean": v, "std": 0.1} for k, v in (("dice", dice), ("iou", dice - 0.1), ("hd95", 20.0), ("asd", 5.0))}
    if hd95_pooled is not None:
        doc["hd95_pooled"] = {"mean": hd95_pooled, "std": 0.1}
    (d / "metrics.json").write_text(json.dumps({**doc, "n_images": 100}))


def test_seeds_are_aggregated_and_rendered(tmp_path):
    write(tmp_path, "kvasir-seg", "supervised-unet-10pct-seed0", 0.5)
    write(tmp_path, "kvasir-seg", "supervised-unet-10pct-seed1", 0.7)
    write(tmp_path, "kvasir-seg", "semikd-mamba_unet-20pct-seed0", 0.8)
    (tmp_path / "kvasir-seg" / "not-a-cell").mkdir()
    rows = collect(tmp_path)
    assert len(rows) == 3 and {r["labels"] for r in rows} == {0.1, 0.2}
    agg = aggregate(rows)
    sup = next(r for r in agg if r["method"] == "supervised")
    assert sup["seeds"] == 2 and abs(sup["dice_mean"] - 0.6) < 1e-9 and abs(sup["dice_std"] - 0.1) < 1e-9
    md = markdown(agg)
    assert "| kvasir-seg | 10% | supervised | unet | 60.00 +- 10.00 |" in md
    assert "| kvasir-seg | 20% | semikd | mamba_unet | 80.00 |" in md


def test_each_rows_per_seed_dice_is_kept_in_seed_order(tmp_path):
    for seed, dice in ((10, 0.6), (2, 0.7), (0, 0.5)):  # seed10 sorts before seed2 by name
        write(tmp_path, "busi", f"cps-unet-10pct-seed{seed}", dice)
    (row,) = aggregate(collect(tmp_path))
    assert row["seeds"] == 3 and row["dice_per_seed"] == [0.5, 0.7, 0.6]


# ------------------------------------------------------------------------------------------ hd95_pooled
def test_pooled_hd95_is_shown_where_every_seed_recorded_it_and_a_dash_where_not(tmp_path):
    write(tmp_path, "busi", "cps-unet-10pct-seed0", 0.5, hd95_pooled=18.0)
    write(tmp_path, "busi", "cps-unet-10pct-seed1", 0.7, hd95_pooled=16.0)
    write(tmp_path, "busi", "bcp-unet-10pct-seed0", 0.6, hd95_pooled=15.0)
    write(tmp_path, "busi", "bcp-unet-10pct-seed1", 0.6)  # tested before hd95_pooled was recorded
    write(tmp_path, "busi", "supervised-unet-10pct-seed0", 0.4)
    rows = collect(tmp_path)
    assert {r["hd95_pooled"] for r in rows} == {18.0, 16.0, 15.0, None}
    agg = {r["method"]: r for r in aggregate(rows)}
    assert agg["cps"]["hd95_pooled_mean"] == pytest.approx(17.0) and agg["cps"]["hd95_pooled_std"] == pytest.approx(1.0)
    # one seed without it: no mean over fewer seeds than the HD95 beside it
    assert agg["bcp"]["hd95_pooled_mean"] is None and agg["bcp"]["hd95_mean"] == pytest.approx(20.0)
    assert fmt_mean_std(agg["cps"], "hd95_pooled", 1) == "17.00 ± 1.00"
    assert fmt_mean_std(agg["bcp"], "hd95_pooled", 1) == fmt_mean_std(agg["supervised"], "hd95_pooled", 1) == "–"
    md = markdown(list(agg.values()))
    assert "| HD95 px | HD95 pooled px | ASD px |" in md
    assert "| busi | 10% | cps | unet | 60.00 +- 10.00 | 50.00 +- 10.00 | 20.00 +- 0.00 | 17.00 +- 1.00 | 5.00 +- 0.00 | 2 |" in md
    assert "| busi | 10% | supervised | unet | 40.00 | 30.00 | 20.00 | - | 5.00 | 1 |" in md


def test_committed_cells_without_pooled_hd95_render_a_dash():
    root = REPO / "experiments/results/profile-sensitivity/1200steps-128px"
    if not root.is_dir():
        pytest.skip("committed profile-sensitivity results not in this checkout")
    agg = aggregate(collect(root))
    assert agg and all(r["hd95_pooled_mean"] is None and r["hd95_mean"] > 0 for r in agg)
    assert all(line.split(" | ")[7] == "-" for line in markdown(agg).splitlines()[2:])


def cell_with_per_image(root, name, dice, hd95, hd95_pooled=None):
    """A finished cell whose per-image results have ``hd95_pooled`` only when it is given."""
    per_image = {f"img{i:03d}": {"dice": d, "iou": d, "hd95": h, "asd": h / 3}
                 for i, (d, h) in enumerate(zip(dice, hd95, strict=True))}
    if hd95_pooled is not None:
        for v, q in zip(per_image.values(), hd95_pooled, strict=True):
            v["hd95_pooled"] = q
    cell = root / "kvasir-seg" / name
    cell.mkdir(parents=True)
    (cell / "metrics.json").write_text(json.dumps({"per_image": per_image, "n_images": len(per_image)}))
    return cell


def test_compare_shows_the_pooled_hd95_difference_where_both_sides_recorded_it(tmp_path, capsys):
    from lesion_kd.commands.compare import main
    from lesion_kd.reporting.paired import compare_runs, load_per_image

    base = np.random.default_rng(9).uniform(0.3, 0.9, 40)
    n = base.size
    new = cell_with_per_image(tmp_path, "bcp-unet-10pct-seed0", base + 0.02, [8.0] * n, [6.5] * n)
    ref = cell_with_per_image(tmp_path, "supervised-unet-10pct-seed0", base, [10.0] * n, [9.0] * n)
    old = cell_with_per_image(tmp_path, "cps-unet-10pct-seed0", base, [10.0] * n)  # no hd95_pooled
    out = tmp_path / "cmp.json"
    assert main(["--runs", str(new), "--against", str(ref), "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "HD95  -2.00 px" in printed and "HD95 pooled (MedPy's, as SSL4MIS-derived papers)  -2.50 px" in printed
    doc = json.loads(out.read_text())
    assert doc["hd95_pooled_px"]["mean"] == pytest.approx(-2.5) and doc["hd95_px"]["mean"] == pytest.approx(-2.0)
    # one side without it: a dash, and null in the JSON, not a failure
    assert main(["--runs", str(new), "--against", str(old), "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "HD95  -2.00 px" in printed and "HD95 pooled  - (not in every metrics.json" in printed
    assert json.loads(out.read_text())["hd95_pooled_px"] is None
    data = load_per_image(tmp_path)
    row = compare_runs(data[("kvasir-seg", 0.1, "bcp", "unet")], data[("kvasir-seg", 0.1, "cps", "unet")])
    assert row["hd95_pooled_mean"] is None and row["hd95_mean"] == pytest.approx(-2.0)
