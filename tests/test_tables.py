"""Results collection and Markdown tables: per-seed rows aggregated to mean +- std."""

import json

from lesion_kd.reporting.tables import aggregate, collect, markdown


def write(root, dataset, cell, dice):
    d = root / dataset / cell
    d.mkdir(parents=True)
    doc = {k: {"mean": v, "std": 0.1} for k, v in (("dice", dice), ("iou", dice - 0.1), ("hd95", 20.0), ("asd", 5.0))}
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
