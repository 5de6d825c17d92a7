"""The README's results table is generated from the finished cells of a manifest (make readme-results)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from lesion_kd.reporting.manifest import REPO, load_manifest
from lesion_kd.reporting.readme import (
    BEGIN,
    END,
    PAIRED_BEGIN,
    PAIRED_END,
    ReadmeError,
    main,
    paired_summary,
    results_table,
    splice,
)


def _manifest(tmp: Path) -> Path:
    doc = {"profile": "cpu", "results": str(tmp / "results"), "runs": str(tmp / "runs"), "out": str(tmp / "out"),
           "datasets": ["kvasir-seg"], "seeds": [0],
           "table": {"groups": [{"labels": [0.1], "methods": [{"method": "supervised", "network": "mamba_unet"},
                                                             "mean_teacher"]},
                                {"labels": [0.1], "seeds": [0, 1], "methods": ["semikd"]}]}}
    path = tmp / "m.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _finish(results: Path, cell: str, dice: float, wall: float | None = None) -> None:
    d = results / "kvasir-seg" / cell
    d.mkdir(parents=True)
    (d / "metrics.json").write_text(json.dumps({k: {"mean": v} for k, v in
                                                {"dice": dice, "iou": dice - 0.1, "hd95": 40.0, "asd": 10.0}.items()}
                                               | {"n_images": 100}))
    if wall is not None:
        (d / "timing.json").write_text(json.dumps({"wall_s": wall}))


def test_rows_show_finished_cells_with_mean_std_wall_and_command(tmp_path):
    m = load_manifest(_manifest(tmp_path))
    _finish(m.results, "supervised-mamba_unet-10pct-seed0", 0.55, wall=600)
    _finish(m.results, "semikd-mamba_unet-10pct-seed0", 0.66, wall=3000)
    _finish(m.results, "semikd-mamba_unet-10pct-seed1", 0.62, wall=3600)
    _finish(m.results, "unlisted-unet-10pct-seed0", 0.9)  # not in the manifest: not a row
    _finish(m.results, "mean_teacher-unet-10pct-seed0", 0.58, wall=60)
    timing = m.results / "kvasir-seg/mean_teacher-unet-10pct-seed0/timing.json"
    timing.write_text(json.dumps({"wall_s": 60, "resumed": True}))  # only the last part of the run: no minutes
    lines = results_table(m).splitlines()
    assert len(lines) == 5  # header, rule, three rows
    sup, mt, full = lines[2], lines[3], lines[4]
    assert "Mean Teacher" in mt and "| 1 | resumed |" in mt
    assert "| supervised |" in sup and "| 55.00 |" in sup and "| 10 min |" in sup
    assert "--model.network mamba_unet" in sup and "--seed_everything" not in sup
    assert "SemiKD" in full and "64.00 ± 2.00" in full and "| 2 | 55 min |" in full
    assert "--config experiments/method/semikd.yaml --config experiments/profile/cpu.yaml" in full
    assert "--data.labeled_fraction 0.1 --seed_everything {0,1}`" in full
    assert "unlisted" not in "\n".join(lines)


def test_a_cell_trained_on_a_lent_gpu_from_the_carried_data_says_so(tmp_path):
    m = load_manifest(_manifest(tmp_path))
    _finish(m.results, "supervised-mamba_unet-10pct-seed0", 0.55, wall=600)
    _finish(m.results, "mean_teacher-unet-10pct-seed0", 0.58)
    d = m.results / "kvasir-seg/mean_teacher-unet-10pct-seed0"
    (d / "timing.json").write_text(json.dumps({"wall_s": 480, "machine": {"gpu": "NVIDIA H100 80GB HBM3"}}))
    assert "‡" not in results_table(m)  # the GPU's minutes are named, but no carried-data mark yet
    assert "| 8 min on NVIDIA H100 80GB HBM3 |" in results_table(m)
    (d / "carried_data.txt").write_text("trained on a lent GPU from .devcarry/data")
    lines = results_table(m).splitlines()
    sup, mt = lines[2], lines[3]
    assert "| 10 min |" in sup and "‡" not in sup
    assert "| 8 min on NVIDIA H100 80GB HBM3‡ |" in mt
    assert lines[-1].startswith("‡ trained and tested on a lent GPU") and "carried_data.txt" in lines[-1]


def test_splice_replaces_only_the_marked_block_and_names_a_readme_without_markers(tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\nbefore\n{BEGIN}\nold table\n{END}\nafter\n")
    assert splice(readme, "| new |\n")
    assert readme.read_text() == f"# title\n\nbefore\n{BEGIN}\n| new |\n{END}\nafter\n"
    assert not splice(readme, "| new |\n")  # already current: file untouched
    bad = tmp_path / "OTHER.md"
    bad.write_text("no markers\n")
    with pytest.raises(ReadmeError, match="OTHER.md: needs the markers"):
        splice(bad, "| x |\n")
    assert main(["--profile", str(_manifest(tmp_path)), "--readme", str(bad)]) == 2
    assert "OTHER.md: needs the markers" in capsys.readouterr().err


def test_the_committed_readme_table_is_current():
    """README.md shows exactly what experiments/results/cpu holds (regenerate: make readme-results)."""
    text = (REPO / "README.md").read_text()
    block = text[text.index(BEGIN) + len(BEGIN) + 1: text.index(END)]
    assert block == results_table(load_manifest(REPO / "experiments/reproduce/cpu.yaml"))


def test_rows_trained_with_a_superseded_loss_form_are_marked(tmp_path):
    from lesion_kd.reporting.readme import superseded_losses

    def cell(name, class_path, **init):
        d = tmp_path / name
        d.mkdir()
        (d / "config.yaml").write_text(yaml.safe_dump({"model": {"class_path": class_path, "init_args": init}}))
        return d

    semikd = "lesion_kd.methods.SemiKDModule"
    current = {"map_centered": True, "dss_balance_area": "labeled", "contrast_form": "softplus", "gamma2": 10.0}
    # configs from before the options existed: every old form
    assert superseded_losses(cell("old", semikd, kd_mode="pckd")) == [
        "uncentred L_map", "batch-balanced consistency", "unbounded contrast", "alignment weighted 0.1"]
    assert superseded_losses(cell("weak", semikd, **{**current, "gamma2": 0.1})) == ["alignment weighted 0.1"]
    assert superseded_losses(cell("weak-off", semikd, **{**current, "gamma2": 0.1, "use_alignment": False})) == []
    assert superseded_losses(cell("map", semikd, kd_mode="map", use_dss=False, map_centered=False)) == ["uncentred L_map"]
    assert superseded_losses(cell("batch", semikd, **{**current, "dss_balance_area": "batch"})) == [
        "batch-balanced consistency"]
    assert superseded_losses(cell("log", semikd, **{**current, "contrast_form": "log"})) == ["unbounded contrast"]
    assert superseded_losses(cell("log-off", semikd, **{**current, "contrast_form": "log", "use_contrast": False})) == []
    assert superseded_losses(cell("new", semikd, kd_mode="pckd", **current)) == []
    assert superseded_losses(cell("featkd", semikd, kd_mode="featkd", use_dss=False)) == []
    assert superseded_losses(cell("sup", "lesion_kd.methods.Supervised")) == []
    assert superseded_losses(tmp_path / "missing") == []


def _manifest_two_fractions(tmp: Path) -> Path:
    doc = {"profile": "cpu", "results": str(tmp / "results"), "runs": str(tmp / "runs"), "out": str(tmp / "out"),
           "datasets": ["kvasir-seg"], "seeds": [0],
           "table": {"groups": [{"labels": [0.1, 0.2], "methods": ["supervised", "mean_teacher", "cps"]},
                                {"labels": [0.1], "seeds": [0, 1], "methods": [{"method": "supervised",
                                                                                  "network": "unet"}]},
                                {"labels": [1.0], "methods": ["supervised"]}]}}
    path = tmp / "m.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_the_paired_summary_sets_each_fraction_beside_its_difference_from_supervised_only(tmp_path, capsys):
    import numpy as np
    from helpers import write_cell

    m = load_manifest(_manifest_two_fractions(tmp_path))
    base = np.random.default_rng(0).uniform(0.3, 0.8, 60)
    gain = np.random.default_rng(1).uniform(0.02, 0.06, base.size)
    noise = np.random.default_rng(2).normal(0, 0.05, base.size)
    noise -= noise.mean()
    root = m.results
    write_cell(root, "supervised-unet-10pct-seed0", list(base - 0.01))
    write_cell(root, "supervised-unet-10pct-seed1", list(base + 0.01))  # mean run: base
    write_cell(root, "mean_teacher-unet-10pct-seed0", list(base + gain))  # a gain on every image
    write_cell(root, "cps-unet-10pct-seed0", list(base + noise))  # noise around 0
    write_cell(root, "supervised-unet-20pct-seed0", list(base))
    write_cell(root, "mean_teacher-unet-20pct-seed0", list(base - gain))  # a loss on every image
    write_cell(root, "supervised-unet-100pct-seed0", list(base + 0.1))  # nothing to compare: no 100% column
    text = paired_summary(m)
    head, rule, sup, mt, cps = text.strip().splitlines()
    assert head.startswith("| kvasir-seg: method | network | 10%: Dice % | 10%: ΔDice vs supervised-only")
    assert "100%" not in head and "20%: Dice %" in head and rule == "|---|---|---|---|---|---|"
    assert sup.startswith("| supervised | U-Net | ") and f"{base.mean() * 100:.2f} ± 1.00 (2 seeds) | (the reference) |" in sup
    g = gain.mean() * 100
    assert f"| **+{g:.2f} [" in mt and "p < 0.001**" in mt and f"| **-{g:.2f} [" in mt  # bold: interval excludes 0
    assert "| +0.00 [-" in cps and "**" not in cps and cps.endswith("|  |  |")  # no 20% cell: blank
    # main splices the block where the README has its markers (and only the results table where it has not)
    readme = tmp_path / "README.md"
    readme.write_text(f"{BEGIN}\n{END}\ntext\n{PAIRED_BEGIN}\nold\n{PAIRED_END}\n")
    assert main(["--profile", str(_manifest_two_fractions(tmp_path)), "--readme", str(readme)]) == 0
    assert readme.read_text().split(PAIRED_BEGIN)[1] == "\n" + text + PAIRED_END + "\n"
    assert "paired summary updated" in capsys.readouterr().out


def test_the_committed_readme_paired_summary_is_current():
    text = (REPO / "README.md").read_text()
    block = text[text.index(PAIRED_BEGIN) + len(PAIRED_BEGIN) + 1: text.index(PAIRED_END)]
    assert block == paired_summary(load_manifest(REPO / "experiments/reproduce/cpu.yaml"))
