"""The report of ``reproduce-table`` (lesion_kd/reporting/report.py): it leads with the headline (the method against
its supervised-only student and the best baseline, paired), then the figures, then the tables, with no absolute
path anywhere; every finished cell keeps its predicted masks of the grid's images at test time (1-bit PNGs beside
its metrics.json, lesion_kd/viz.py) and the grid draws them, falling back to a checkpoint, and leaving out (with a
note) a cell that has neither; one validation-curve figure per dataset."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import REPO, lesion_kd, method_config_args
from PIL import Image

from lesion_kd.reporting.manifest import load_manifest
from lesion_kd.viz import kept_prediction_ids, mask_png, prediction_filename, read_mask_png

# the smoke grid of the report's roles: the method, its supervised-only student, the teacher's read-out, a baseline
CELLS = {"semikd": "semikd-mamba_unet-10pct-seed0", "semikd_sup": "semikd_sup-mamba_unet-10pct-seed0",
         "teacher": "teacher-litemedsam-10pct-seed0", "mean_teacher": "mean_teacher-unet-10pct-seed0"}


def test_kept_ids_depend_on_the_test_ids_alone_and_masks_round_trip(tmp_path):
    ids = [f"img{i:03d}" for i in range(40)]
    kept = kept_prediction_ids(ids)
    assert len(kept) == 16 and set(kept) <= set(ids)
    assert kept_prediction_ids(list(reversed(ids)) + ids[:5]) == kept  # order and repeats do not matter
    assert kept_prediction_ids(ids, k=4) == kept[:4]  # fewer kept: the first of the same order
    assert prediction_filename("a/b c.jpg") == "a_b_c.jpg.png"
    mask = np.zeros((160, 160), np.uint8)
    mask[30:90, 40:100] = 1
    (tmp_path / "m.png").write_bytes(mask_png(mask))
    assert Image.open(tmp_path / "m.png").mode == "1" and (tmp_path / "m.png").stat().st_size < 400
    assert (read_mask_png(tmp_path / "m.png") == (mask > 0)).all()
    Image.fromarray(mask * 255).save(tmp_path / "old.png")  # as earlier reports wrote them (qualitative/)
    assert (read_mask_png(tmp_path / "old.png") == (mask > 0)).all()


@pytest.fixture(scope="module")
def smoke_cells(tmp_path_factory, data_dir) -> Path:
    """Four smoke cells (3 training steps at 64 x 64, 8 test images) published under ``<tmp>/results``, their runs
    (and checkpoints) under ``<tmp>/fits``."""
    tmp = tmp_path_factory.mktemp("report")
    env = {"LESION_KD_DATA": str(data_dir), "LESION_KD_CACHE": str(tmp_path_factory.getbasetemp() / "cache")}
    for method in CELLS:
        lesion_kd("fit", *method_config_args(method), "--trainer.default_root_dir", str(tmp / "fits" / method),
                  "--results_root", str(tmp / "results"), env_extra=env, timeout=900)
    return tmp


@pytest.mark.slow
def test_each_finished_cell_keeps_its_predicted_masks_of_the_grid_images(smoke_cells):
    from lesion_kd.data.prep import load_canonical
    from lesion_kd.metrics import image_metrics
    from lesion_kd.reporting.report import _test_samples

    for method, name in CELLS.items():
        cell = smoke_cells / "results/kvasir-seg" / name
        per_image = json.loads((cell / "metrics.json").read_text())["per_image"]
        kept = kept_prediction_ids(per_image)
        assert sorted(p.name for p in (cell / "predictions").iterdir()) == sorted(prediction_filename(i) for i in kept)
        samples, size, cache = _test_samples(cell / "config.yaml")
        for i in kept:
            png = cell / "predictions" / prediction_filename(i)
            assert Image.open(png).mode == "1" and Image.open(png).size == (size, size), (method, i)
            target = load_canonical(samples[i], size, cache).mask
            # the kept mask is the one the test scored
            assert image_metrics(read_mask_png(png).astype(np.uint8), target)["dice"] == pytest.approx(
                per_image[i]["dice"], abs=1e-6), (method, i)


def _manifest(tmp: Path, methods: list[str], seeds: tuple[int, ...] = (0,)) -> Path:
    doc = yaml.safe_load((REPO / "experiments/reproduce/smoke.yaml").read_text())
    doc.update(results=str(tmp / "results"), runs=str(tmp / "no-runs"), out=str(tmp / "report"), ablation={},
               table={"groups": [{"labels": [0.1], "methods": methods, "seeds": list(seeds)}]},
               paired_references=["supervised", "semikd_sup"])
    path = tmp / "manifest.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _no_efficiency_measurement(results: Path) -> None:
    from lesion_kd.reporting.efficiency import machine_summary

    (results / "efficiency.json").write_text(json.dumps({"machine": machine_summary(), "size": 64, "batch": 2,
                                                         "repeats": 1, "rows": []}))


@pytest.mark.slow
def test_report_leads_with_the_headline_and_draws_the_kept_masks(smoke_cells, tmp_path):
    from lesion_kd.reporting import report

    tmp = tmp_path / "copy"
    shutil.copytree(smoke_cells / "results", tmp / "results")
    results = tmp / "results/kvasir-seg"
    # a cell finished before masks were kept: the teacher's read-out (its network reads no image, so no checkpoint
    # helps either) is left out of the grid with a note; semikd_sup's masks come back from its checkpoint
    shutil.rmtree(results / CELLS["teacher"] / "predictions")
    shutil.rmtree(results / CELLS["semikd_sup"] / "predictions")
    _no_efficiency_measurement(tmp / "results")
    m = load_manifest(_manifest(tmp, list(CELLS)))
    report.write_outputs(m)

    assert sorted(p.name for p in (results / CELLS["semikd_sup"] / "predictions").iterdir()) == sorted(
        p.name for p in (results / CELLS["semikd"] / "predictions").iterdir())  # kept now, as a test run keeps them
    page = (tmp / "report/report.html").read_text()
    text = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", page)
    # no absolute path: not the repository's, the home folder's, the temporary folder's
    for bad in ("/work/", str(Path.home()) + "/", "/tmp/", str(tmp_path), str(REPO)):
        assert bad not in text, bad
    # the headline first (its own table), then the figures, then the tables; the method's rows highlighted
    head, figures, tables = (text.index(s) for s in ("<section id='headline'>", "<section id='figures'>",
                                                     "<section id='tables'>"))
    assert head < figures < tables and head < text.index("<table>") and tables < text.index("<table>")
    headline = text[head:figures]
    assert "<b>SemiKD</b>" in headline and "against its supervised-only student" in headline
    assert "SemiKD, L_sup only (Mamba student)" in headline and "Wilcoxon p" in headline and "95% CI" in headline
    assert "Mean Teacher (U-Net)" in headline  # the only baseline: the best one
    assert "<tr class='method'><td>semikd</td>" in text[tables:]
    assert "n/a" not in text
    # the grid: the method, its student and the baseline from their kept masks; the teacher left out, with why
    cap = re.search(r"Qualitative examples: Kvasir-SEG</h3><figure>.*?<figcaption>(.*?)</figcaption>", text, re.S)
    assert cap and "Left out: Teacher read-out (no finished cell kept its predicted masks" in cap.group(1)
    foci = report.focus_rows(report._cells_rows(m, "table")[0])
    grid = report.choose_grid(m, foci[0])
    assert [(role, cell.method) for role, cell, _, _ in grid.columns] == [
        ("method", "semikd"), ("sup", "semikd_sup"), ("baseline", "mean_teacher")]
    assert all(p.parent.name == "predictions" for *_, masks in grid.columns for p in masks.values())
    assert 2 <= len(grid.ids) <= report.GRID_ROWS and grid.left_out == [
        ("teacher", "no finished cell kept its predicted masks, and no checkpoint is here")]
    # one validation-curve figure per dataset, of the method, its student and the best baseline
    assert (tmp / "report/figures/curves-kvasir-seg.png").read_bytes().startswith(b"\x89PNG")
    assert (tmp / "report/figures/qualitative-kvasir-seg.png").read_bytes().startswith(b"\x89PNG")
    ((_, lines),) = report.key_curve_panels(m, foci)
    assert [(role, row["method"]) for role, row, _ in lines] == [
        ("method", "semikd"), ("sup", "semikd_sup"), ("baseline", "mean_teacher")]
    # the cells not run yet: last, folded
    assert "<details>" not in text  # all four finished here


def _fake_cell(results: Path, name: str, dice: list[float], curve: dict[int, float] | None = None) -> None:
    ids = [f"img{i:03d}" for i in range(len(dice))]
    per_image = {i: {"dice": d, "iou": d, "hd95": 5.0, "asd": 2.0} for i, d in zip(ids, dice, strict=True)}
    doc = {k: {"mean": float(np.mean([v[k] for v in per_image.values()])), "std": 0.0}
           for k in ("dice", "iou", "hd95", "asd")}
    cell = results / "kvasir-seg" / name
    cell.mkdir(parents=True)
    (cell / "metrics.json").write_text(json.dumps({**doc, "n_images": len(ids), "per_image": per_image}))
    if curve:
        (cell / "metrics.csv").write_text("epoch,step,val/dice\n" + "".join(f"0,{s},{v}\n" for s, v in curve.items()))


def test_headline_pairs_the_method_with_its_student_and_the_best_baseline(tmp_path):
    """Results only (no images, no training): the headline's comparisons, the choice of the method (SemiKD+ where
    it has finished cells), the best baseline, the curve panels; the cells not run yet folded at the end; no
    absolute path, and the grid says why it is missing instead of drawing n/a tiles."""
    from lesion_kd.reporting import report

    rng = np.random.default_rng(0)
    base = rng.uniform(0.4, 0.8, 30)
    methods = ["semikd", "semikd_plus", "semikd_sup", "mean_teacher", "urpc", "teacher"]
    m = load_manifest(_manifest(tmp_path, methods, seeds=(0, 1)))
    res = tmp_path / "results"
    for seed in (0, 1):
        _fake_cell(res, f"semikd_plus-mamba_unet-10pct-seed{seed}", list(base + 0.10), {250: 0.5, 500: 0.7 + seed / 100})
        _fake_cell(res, f"semikd_sup-mamba_unet-10pct-seed{seed}", list(base), {250: 0.4, 500: 0.6})
    _fake_cell(res, "semikd-mamba_unet-10pct-seed0", list(base + 0.05))
    _fake_cell(res, "mean_teacher-unet-10pct-seed0", list(base + 0.02), {250: 0.3, 500: 0.62})
    _fake_cell(res, "urpc-unet-10pct-seed0", list(base - 0.05), {250: 0.3, 500: 0.5})
    _no_efficiency_measurement(res)
    agg = report._cells_rows(m, "table")[0]
    (f,) = report.focus_rows(agg)
    assert (f.method["method"], f.method["seeds"], f.sup["method"], f.baseline["method"], f.teacher) == (
        "semikd_plus", 2, "semikd_sup", "mean_teacher", None)
    (c,) = report.headline_comparisons(m, [f])
    assert c["vs_sup"]["dice_mean"] == pytest.approx(10.0) and c["vs_sup"]["dice_ci_low"] > 9
    assert c["vs_baseline"]["dice_mean"] == pytest.approx(8.0) and c["vs_baseline"]["seeds"] == 2
    ((_, lines),) = report.key_curve_panels(m, [f])
    assert [(role, len(seeds)) for role, _, seeds in lines] == [("method", 2), ("sup", 2), ("baseline", 1)]
    assert report.key_curves_figure(m, [f]).startswith(b"\x89PNG")

    report.write_outputs(m)  # no config.yaml, no images: the grid says so
    page = (tmp_path / "report/report.html").read_text()
    text = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", page)
    assert str(tmp_path) not in text and "/tmp/" not in text and "/work/" not in text
    headline = text[text.index("<section id='headline'>"): text.index("<section id='figures'>")]
    assert "<b>SemiKD+</b>" in headline and "<td class='up'><b>+10.00</b> points" in headline
    assert "<td class='up'><b>+8.00</b> points" in headline and "Mean Teacher (U-Net): " in headline
    assert "<th>the teacher's own read-out</th>" in headline and "not run yet</span></td></tr>" in headline
    assert "n/a" not in text
    assert text.index("<section id='headline'>") < text.index("<table>")
    # the cells not run yet (the teacher's read-out, the second seed of three rows): listed last, folded
    details = text[text.index("<details>"):]
    assert "Not run yet: 5 cells" in details and "teacher-litemedsam-seed0, teacher-litemedsam-seed1" in details
    assert text.index("<section id='tables'>") < text.index("<details>")
    assert (tmp_path / "report/figures/curves-kvasir-seg.png").is_file()


def test_no_abs_paths_keeps_relative_text():
    from lesion_kd.reporting.report import no_abs_paths

    text = (f"{REPO}/runs/reproduce/cpu and {Path.home()}/x/y.png and /tmp/pytest-1/results/kvasir-seg/cell: "
            "no checkpoint; L_sup / L_map, Dice/IoU, experiments/results/cpu, 10% / 20%")
    out = no_abs_paths(text)
    assert out.startswith("runs/reproduce/cpu and ") and "/tmp/" not in out and str(Path.home()) + "/" not in out
    assert "…/cell: no checkpoint; L_sup / L_map, Dice/IoU, experiments/results/cpu, 10% / 20%" in out
