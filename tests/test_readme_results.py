"""The results blocks of the README and docs/results.md are generated from the finished cells of a manifest
(make readme-results)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from lesion_kd.reporting.manifest import REPO, load_manifest
from lesion_kd.reporting.readme import (
    BEGIN,
    BLOCKS,
    DEFAULT_FILES,
    END,
    HEADLINE_BEGIN,
    HEADLINE_END,
    PAIRED_BEGIN,
    PAIRED_END,
    ReadmeError,
    headline_table,
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


# which committed file holds which generated block (regenerate them all: make readme-results)
COMMITTED_BLOCKS = [("README.md", "headline"), ("docs/results.md", "results"), ("docs/results.md", "paired")]


@pytest.fixture(scope="module")
def cpu_manifest():
    return load_manifest(REPO / "experiments/reproduce/cpu.yaml")


@pytest.mark.parametrize(("path", "name"), COMMITTED_BLOCKS)
def test_the_committed_blocks_are_current(path, name, cpu_manifest):
    """README.md and docs/results.md show exactly what experiments/results/cpu holds (make readme-results)."""
    begin, end, make = BLOCKS[name]
    text = (REPO / path).read_text()
    assert text.count(begin) == 1 and text.count(end) == 1, f"{path}: the {name} markers, once each"
    block = text[text.index(begin) + len(begin) + 1: text.index(end)]
    assert block == make(cpu_manifest), f"{path}: the {name} block is stale: run make readme-results"


def test_make_readme_results_rewrites_every_file_that_holds_a_block():
    recipe = (REPO / "Makefile").read_text().split("\nreadme-results:", 1)[1].split("\n\n", 1)[0]
    assert "lesion_kd.reporting.readme" in recipe
    assert set(DEFAULT_FILES) == {path for path, _ in COMMITTED_BLOCKS}
    for path in DEFAULT_FILES:
        assert f" {path}" in recipe, f"make readme-results does not rewrite {path}"


def test_the_readme_stays_short():
    """Issue 31: the README says what the suite is, how to set it up and run it, and the headline table; the
    results narrative lives in docs/results.md."""
    text = (REPO / "README.md").read_text()
    assert len(text.encode()) <= 12_000
    assert BEGIN not in text and PAIRED_BEGIN not in text  # the long tables live in docs/results.md


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
    assert "paired block updated" in capsys.readouterr().out


def test_the_headline_table_sets_each_method_beside_every_dataset_and_fraction(tmp_path):
    m = load_manifest(_manifest_two_fractions(tmp_path))
    assert headline_table(m) == "No finished cell yet.\n"
    _finish(m.results, "supervised-unet-10pct-seed0", 0.55)
    _finish(m.results, "supervised-unet-10pct-seed1", 0.65)
    _finish(m.results, "cps-unet-20pct-seed0", 0.7)
    _finish(m.results, "supervised-unet-100pct-seed0", 0.8)
    _finish(m.results, "mean_teacher-unet-10pct-seed0", 0.6)
    (m.results / "kvasir-seg/mean_teacher-unet-10pct-seed0/carried_data.txt").write_text("carried")
    _finish(m.results, "unlisted-unet-10pct-seed0", 0.9)  # not in the manifest: not a row
    head, rule, sup, mt, cps, _, note = headline_table(m).splitlines()
    assert head == "| method | network (parameters) | kvasir-seg 10% | kvasir-seg 20% | kvasir-seg 100% |"
    assert rule == "|---|---|---|---|---|"
    assert sup == "| supervised | U-Net | 60.00 ± 5.00 (40.0) |  | 80.00 (40.0) |"  # two seeds: mean ± std
    assert mt == "| Mean Teacher‡ | U-Net | 60.00 (40.0) |  |  |"
    assert cps == "| CPS | U-Net |  | 70.00 (40.0) |  |"
    assert "cpu profile" in note and "docs/results.md" in note and "‡ trained on a lent GPU" in note
    assert "†" not in note


def _two_files(tmp: Path) -> tuple[Path, Path]:
    readme, results = tmp / "README.md", tmp / "results.md"
    readme.write_text(f"# t\n{HEADLINE_BEGIN}\nold\n{HEADLINE_END}\ntail\n")
    results.write_text(f"a\n{BEGIN}\nold\n{END}\nb\n{PAIRED_BEGIN}\nold\n{PAIRED_END}\nc\n")
    return readme, results


def test_main_rewrites_every_block_of_every_file_and_check_reports_stale_ones(tmp_path, capsys):
    manifest = str(_manifest(tmp_path))
    m = load_manifest(Path(manifest))
    _finish(m.results, "semikd-mamba_unet-10pct-seed0", 0.66, wall=3000)
    readme, results = _two_files(tmp_path)
    args = ["--profile", manifest, "--readme", str(readme), str(results)]
    assert main(args + ["--check"]) == 1  # stale, and nothing written
    out, err = capsys.readouterr()
    assert f"{readme}: headline block stale" in out and "run make readme-results" in err
    assert "old" in readme.read_text()
    assert main(args) == 0
    assert readme.read_text() == f"# t\n{HEADLINE_BEGIN}\n{headline_table(m)}{HEADLINE_END}\ntail\n"
    assert results.read_text() == (f"a\n{BEGIN}\n{results_table(m)}{END}\nb\n{PAIRED_BEGIN}\n{paired_summary(m)}"
                                   f"{PAIRED_END}\nc\n")
    capsys.readouterr()
    assert main(args + ["--check"]) == 0
    assert "stale" not in capsys.readouterr().out


def test_a_file_with_a_marker_twice_or_missing_is_refused_unchanged(tmp_path, capsys):
    manifest = str(_manifest(tmp_path))
    readme, results = _two_files(tmp_path)
    results.write_text(results.read_text() + f"{BEGIN}\n")  # a second begin marker
    before = readme.read_text()
    assert main(["--profile", manifest, "--readme", str(readme), str(results)]) == 2  # README checked first
    assert "results.md: the markers <!-- results:begin -->" in capsys.readouterr().err
    assert readme.read_text() == before
    readme.write_text(f"{HEADLINE_BEGIN}\nno end\n")
    assert main(["--profile", manifest, "--readme", str(readme)]) == 2
    assert "needs the markers <!-- headline:begin --> and <!-- headline:end -->" in capsys.readouterr().err
    assert main(["--profile", manifest, "--readme", str(tmp_path / "missing.md")]) == 2
    assert "missing.md: no such file" in capsys.readouterr().err


def test_a_rows_command_sets_an_option_its_method_config_changed_since_the_cell_trained(tmp_path):
    # semikd.yaml moved to kd_grid: student (issue 29); cells trained before (no kd_grid in their resolved config:
    # the 64x64 path) reproduce only with the earlier value on their command line
    from lesion_kd.reporting.readme import trained_overrides

    method = tmp_path / "semikd.yaml"
    method.write_text(yaml.safe_dump({"model": {"init_args": {"kd_grid": "student", "lr": 0.001}}}))
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"model": {"init_args": {"lr": 0.001}}}))
    assert trained_overrides(run, method) == ["--model.init_args.kd_grid", "teacher"]
    (run / "config.yaml").write_text(yaml.safe_dump({"model": {"init_args": {"kd_grid": "student"}}}))
    assert trained_overrides(run, method) == []  # trained as the config says today
    method.write_text(yaml.safe_dump({"model": {"init_args": {"lr": 0.001}}}))
    assert trained_overrides(run, method) == []  # a config that does not set the option: its commands unchanged
    assert trained_overrides(tmp_path / "missing", method) == []
