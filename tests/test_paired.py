"""Paired per-image comparisons (lesion_kd.reporting.paired) on synthetic per-image results."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import write_cell

from lesion_kd.reporting import paired


def rng_dice(seed: int, n: int = 60) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0.2, 0.9, n)


def test_a_method_better_on_every_image_has_its_gain_inside_a_tight_interval_and_a_small_p(tmp_path):
    base = rng_dice(0)
    gain = np.random.default_rng(1).uniform(0.02, 0.06, base.size)  # 2-6 points on every image
    write_cell(tmp_path, "supervised-unet-10pct-seed0", list(base), [20.0] * base.size)
    write_cell(tmp_path, "mean_teacher-unet-10pct-seed0", list(base + gain), [15.0] * base.size)
    (row,) = paired.comparisons(tmp_path)
    assert (row["method"], row["reference"], row["seeds"], row["images"]) == ("mean_teacher", "supervised", 1, 60)
    assert row["dice_mean"] == pytest.approx(gain.mean() * 100)
    assert 2 < row["dice_ci_low"] < row["dice_mean"] < row["dice_ci_high"] < 6
    assert row["dice_p"] < 1e-6 and row["wins"] == 1.0
    assert row["hd95_mean"] == pytest.approx(-5.0) and row["hd95_ci_low"] == row["hd95_ci_high"] == pytest.approx(-5.0)


def test_noise_around_zero_is_not_a_gain(tmp_path):
    base = rng_dice(0, 200)
    noise = np.random.default_rng(2).normal(0, 0.05, base.size)
    noise -= noise.mean()  # exactly no gain on average
    write_cell(tmp_path, "supervised-unet-10pct-seed0", list(base))
    write_cell(tmp_path, "cps-unet-10pct-seed0", list(base + noise))
    (row,) = paired.comparisons(tmp_path)
    assert row["dice_mean"] == pytest.approx(0.0, abs=1e-9)
    assert row["dice_ci_low"] < 0 < row["dice_ci_high"] and row["dice_p"] > 0.2


def test_identical_runs_differ_by_zero_with_p_one(tmp_path):
    base = list(rng_dice(3))
    write_cell(tmp_path, "supervised-unet-10pct-seed0", base)
    write_cell(tmp_path, "ua_mt-unet-10pct-seed0", base)
    (row,) = paired.comparisons(tmp_path)
    assert row["dice_mean"] == 0 and row["dice_p"] == 1.0 and row["wins"] == 0.0


def test_each_side_is_averaged_over_all_its_seeds_on_the_images_every_seed_has(tmp_path):
    ids = ["a", "b", "c", "d"]
    write_cell(tmp_path, "supervised-mamba_unet-10pct-seed0", [0.5, 0.5, 0.5, 0.5], ids=ids)
    write_cell(tmp_path, "supervised-mamba_unet-10pct-seed1", [0.4, 0.4, 0.4, 0.4], ids=ids)
    write_cell(tmp_path, "supervised-mamba_unet-10pct-seed2", [0.0, 0.3, 0.6, 0.0], ids=ids)  # no method seed 2
    write_cell(tmp_path, "semikd-mamba_unet-10pct-seed0", [0.6, 0.7, 0.5, 0.9], ids=ids)
    write_cell(tmp_path, "semikd-mamba_unet-10pct-seed1", [0.6, 0.5, 0.4, 0.9], ids=["a", "b", "c", "e"])
    data = paired.load_per_image(tmp_path)
    d, seeds = paired.paired_differences(data[("kvasir-seg", 0.1, "semikd", "mamba_unet")],
                                         data[("kvasir-seg", 0.1, "supervised", "mamba_unet")], "dice")
    assert seeds == ([0, 1], [0, 1, 2])
    # images a, b, c (d is missing from the method's seed 1): method means 0.6, 0.6, 0.45; reference means
    # 0.3, 0.4, 0.5 (its seed 2 counts, though the method has no seed 2)
    np.testing.assert_allclose(d, [0.3, 0.2, -0.05])
    (row,) = paired.comparisons(tmp_path)
    assert (row["seeds"], row["reference_seeds"], row["images"]) == (2, 3, 3)
    assert row["dice_mean"] == pytest.approx(15.0)
    assert "| semikd | mamba_unet | supervised | 2 vs 3 | 3 |" in paired.markdown([row])


def test_with_the_same_seeds_it_is_the_mean_of_same_seed_differences(tmp_path):
    ids = ["a", "b", "c"]
    for s, (m, r) in enumerate((([0.6, 0.7, 0.2], [0.5, 0.5, 0.5]), ([0.9, 0.1, 0.4], [0.3, 0.6, 0.2]))):
        write_cell(tmp_path, f"supervised-unet-10pct-seed{s}", r, ids=ids)
        write_cell(tmp_path, f"cps-unet-10pct-seed{s}", m, ids=ids)
    data = paired.load_per_image(tmp_path)
    d, _ = paired.paired_differences(data[("kvasir-seg", 0.1, "cps", "unet")],
                                     data[("kvasir-seg", 0.1, "supervised", "unet")], "dice")
    np.testing.assert_allclose(d, [(0.1 + 0.6) / 2, (0.2 - 0.5) / 2, (-0.3 + 0.2) / 2])
    (row,) = paired.comparisons(tmp_path)
    assert "| cps | unet | supervised | 2 | 3 |" in paired.markdown([row])


def test_pairs_only_within_dataset_labels_and_network_and_references_one_way(tmp_path):
    base = rng_dice(4)
    for name in ("supervised-unet-10pct-seed0", "supervised-mamba_unet-10pct-seed0", "semikd_sup-mamba_unet-10pct-seed0",
                 "semikd-mamba_unet-10pct-seed0", "semikd-mamba_unet-20pct-seed0", "mean_teacher-unet-10pct-seed0"):
        write_cell(tmp_path, name, list(base + 0.01 * len(name) % 0.05))
    rows = paired.comparisons(tmp_path, ["supervised", "semikd_sup"])
    pairs = {(r["method"], r["network"], r["labels"], r["reference"]) for r in rows}
    assert pairs == {("mean_teacher", "unet", 0.1, "supervised"), ("semikd", "mamba_unet", 0.1, "supervised"),
                     ("semikd", "mamba_unet", 0.1, "semikd_sup"), ("semikd_sup", "mamba_unet", 0.1, "supervised")}
    # a manifest's cells only
    keep = {("kvasir-seg", "supervised", "unet", 0.1, 0), ("kvasir-seg", "mean_teacher", "unet", 0.1, 0)}
    assert [(r["method"], r["reference"]) for r in paired.comparisons(tmp_path, keep=keep)] == [("mean_teacher", "supervised")]


def test_markdown_shows_signed_differences_intervals_and_p_values(tmp_path):
    base = rng_dice(5)
    write_cell(tmp_path, "supervised-unet-10pct-seed0", list(base))
    write_cell(tmp_path, "bcp-unet-10pct-seed0", list(base - 0.03))
    md = paired.markdown(paired.comparisons(tmp_path), "cpu")
    assert md.startswith("# Paired comparisons on the same test images (cpu profile)")
    assert "| kvasir-seg | 10% | bcp | unet | supervised | 1 | 60 | -3.00 [-3.00, -3.00] | < 0.001 | 0% |" in md
    assert "No pair" in paired.markdown([])


def test_a_single_image_is_no_comparison():
    with pytest.raises(ValueError, match="at least 2 images"):
        paired.summarise(np.array([0.1]))


def test_the_forest_plot_draws_every_comparison(tmp_path):
    from lesion_kd.reporting.report import paired_figure

    base = rng_dice(6)
    write_cell(tmp_path, "supervised-unet-10pct-seed0", list(base))
    write_cell(tmp_path, "cct-unet-10pct-seed0", list(base - 0.05))
    write_cell(tmp_path, "supervised-unet-10pct-seed0", list(base), dataset="busi")
    write_cell(tmp_path, "cct-unet-10pct-seed0", list(base + 0.01), dataset="busi")
    png = paired_figure(paired.comparisons(tmp_path))
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert paired_figure([]) is None


# ------------------------------------------------------------------------------------------ lesion-kd compare
def test_compare_command_averages_each_side_over_its_seeds_and_writes_json(tmp_path, capsys):
    from lesion_kd.commands.compare import main

    base = rng_dice(7)
    for s, shift in enumerate((0.02, 0.04)):
        write_cell(tmp_path, f"supervised-unet-10pct-seed{s}", list(base))
        write_cell(tmp_path, f"bcp-unet-10pct-seed{s}", list(base + shift), [8.0] * base.size)
    cells = tmp_path / "kvasir-seg"
    out = tmp_path / "cmp.json"
    rc = main(["--runs", str(cells / "bcp-unet-10pct-seed0"), str(cells / "bcp-unet-10pct-seed1" / "metrics.json"),
               "--against", str(cells / "supervised-unet-10pct-seed0"), str(cells / "supervised-unet-10pct-seed1"),
               "--json", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "60 test images, 2 seed(s)" in printed and "Dice  +3.00 points" in printed and "HD95  -2.00 px" in printed
    doc = json.loads(out.read_text())
    assert doc["dice_points"]["mean"] == pytest.approx(3.0) and doc["wins"] == 1.0 and doc["seeds"] == 2


def test_compare_command_takes_one_run_against_a_three_seed_reference(tmp_path, capsys):
    from lesion_kd.commands.compare import main

    base = rng_dice(8)
    for s, shift in enumerate((0.0, 0.03, 0.06)):
        write_cell(tmp_path, f"supervised-unet-10pct-seed{s}", list(base - shift))
    write_cell(tmp_path, "cps-unet-10pct-seed0", list(base))
    cells = tmp_path / "kvasir-seg"
    rc = main(["--runs", str(cells / "cps-unet-10pct-seed0"),
               "--against", *(str(cells / f"supervised-unet-10pct-seed{s}") for s in range(3))])
    assert rc == 0
    printed = capsys.readouterr().out
    # against the reference's mean run (3 points under the method), not its seed 0 (level with it)
    assert "60 test images, 1 against 3 seed(s)" in printed and "Dice  +3.00 points" in printed


def test_compare_command_names_the_bad_input(tmp_path, capsys):
    from lesion_kd.commands.compare import main

    write_cell(tmp_path, "a-unet-10pct-seed0", [0.5, 0.6], ids=["x", "y"])
    write_cell(tmp_path, "b-unet-10pct-seed0", [0.5, 0.6], ids=["z", "w"])
    (tmp_path / "no_per_image.json").write_text(json.dumps({"dice": {"mean": 0.5}}))
    (tmp_path / "broken.json").write_text("{")
    original = json.loads((tmp_path / "kvasir-seg/a-unet-10pct-seed0/metrics.json").read_text())
    (tmp_path / "original.json").write_text(json.dumps({**original, "resolution": "original"}))
    cells = tmp_path / "kvasir-seg"
    cases = [
        (["--runs", str(cells / "a-unet-10pct-seed0"), "--against", str(tmp_path / "nope")], "nope: no such file"),
        (["--runs", str(cells / "a-unet-10pct-seed0"), "--against", str(tmp_path / "no_per_image.json")], "no per-image results"),
        (["--runs", str(tmp_path / "broken.json"), "--against", str(cells / "a-unet-10pct-seed0")], "broken.json: not JSON"),
        (["--runs", str(cells / "a-unet-10pct-seed0"), "--against", str(cells / "b-unet-10pct-seed0")], "no test image in common"),
        (["--runs", str(cells / "a-unet-10pct-seed0"), str(cells / "b-unet-10pct-seed0"), "--against",
          str(cells / "a-unet-10pct-seed0")], f"{cells / 'b-unet-10pct-seed0'}: no test image in common"),
        (["--runs", str(cells / "a-unet-10pct-seed0"), "--against", str(tmp_path / "original.json")],
         "measured at different resolutions (model, original)"),
    ]
    for argv, message in cases:
        assert main(argv) == 2
        assert message in capsys.readouterr().err, message
