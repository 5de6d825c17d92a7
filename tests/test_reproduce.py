"""``reproduce-table``: the smoke manifest end to end through ``make reproduce-table`` on real Kvasir-SEG data (all
six outputs; a second invocation runs nothing), a cell killed mid-run is not reported and is resumed, the report
renders in headless Chromium with its tables and images, and manifest mistakes are named."""

from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers import REPO

from lesion_kd.reporting.manifest import ManifestError, load_manifest, select

OUTPUTS = ("table.md", "table.csv", "ablation.md", "efficiency.md", "paired.md", "report.html")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def manifest(tmp: Path, **changes) -> Path:
    doc = yaml.safe_load((REPO / "experiments/reproduce/smoke.yaml").read_text())
    doc.update(results=str(tmp / "results"), runs=str(tmp / "runs"), out=str(tmp / "report"), **changes)
    path = tmp / "manifest.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def make_reproduce(path: Path, data_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "LESION_KD_DATA": str(data_dir)}
    proc = subprocess.run(["make", "-s", "reproduce-table", f"PROFILE={path}", f"REPRODUCE_ARGS={' '.join(extra)}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, data_dir) -> tuple[Path, subprocess.CompletedProcess]:
    tmp = tmp_path_factory.mktemp("reproduce")
    path = manifest(tmp)
    return tmp, make_reproduce(path, data_dir)


@pytest.mark.slow
def test_smoke_manifest_writes_every_output(smoke):
    tmp, proc = smoke
    assert "6 cells, 0 finished, 6 to run" in proc.stdout
    for name in OUTPUTS:
        assert (tmp / "report" / name).stat().st_size > 0, name
    rows = list(csv.DictReader((tmp / "report/table.csv").open()))
    assert list(rows[0]) == ["dataset", "labels", "method", "network", "dice_mean", "dice_std", "iou_mean", "iou_std",
                             "hd95_mean", "hd95_std", "asd_mean", "asd_std", "seeds"]
    cells = {(r["method"], r["network"], float(r["labels"])) for r in rows}
    assert cells == {("supervised", "unet", 0.1), ("supervised", "mamba_unet", 0.1), ("mean_teacher", "unet", 0.1),
                     ("semikd", "mamba_unet", 0.1), ("supervised", "unet", 1.0)}
    assert all(0 <= float(r["dice_mean"]) <= 1 and r["seeds"] == "1" for r in rows)
    ablation = (tmp / "report/ablation.md").read_text()
    assert "| semikd_sup | L_sup only |" in ablation and "| semikd | L_sup + L_pckd + L_dss" in ablation
    eff = (tmp / "report/efficiency.md").read_text()
    assert "| student (mamba_unet) | 64x64 | 1.334 |" in eff and "teacher (LiteMedSAM" in eff
    assert "the paper's Table 1" in (tmp / "report/table.md").read_text()
    pairs = (tmp / "report/paired.md").read_text()  # the smoke grid's references: supervised, semikd_sup
    for row in ("| mean_teacher | unet | supervised | 1 | ", "| semikd | mamba_unet | supervised | 1 | ",
                "| semikd | mamba_unet | semikd_sup | 1 | ", "| semikd_sup | mamba_unet | supervised | 1 | "):
        assert row in pairs, row
    side = pairs.split("## Side by side")[1].split("## Every comparison")[0]  # one row per method, its 10% difference
    assert "| Mean Teacher | U-Net | " in side and "| supervised | U-Net | " in side and "(the reference)" in side
    page = (tmp / "report/report.html").read_text()
    # the validation curves and the qualitative grid of Kvasir-SEG, test Dice, the paired forest plot, every curve
    assert page.count("data:image/png;base64,") == 5 and "<table>" in page and "http" not in page.split("<body>")[0]
    assert "<td><b>SemiKD (the paper&#x27;s method)</b></td>" in page and "**" not in page  # Markdown bold as HTML
    assert page.index("<section id='headline'>") < page.index("<table>")  # the answer before the tables
    # every cell kept its masks of the grid's images, so the grid shows the method and the best baseline
    assert len(list((tmp / "results/kvasir-seg/semikd-mamba_unet-10pct-seed0/predictions").glob("*.png"))) == 8
    assert "Qualitative examples: Kvasir-SEG</h3><figure>" in page


@pytest.mark.slow
def test_second_invocation_finds_every_cell_done(smoke, data_dir):
    tmp, _ = smoke
    results = sorted((tmp / "results").rglob("metrics.json"))
    before = {p: p.stat().st_mtime_ns for p in results}
    t0 = time.monotonic()
    proc = make_reproduce(tmp / "manifest.yaml", data_dir)
    print(f"second invocation: {time.monotonic() - t0:.1f} s")
    assert "6 cells, 6 finished, 0 to run" in proc.stdout and "running" not in proc.stdout
    assert {p: p.stat().st_mtime_ns for p in results} == before  # nothing retrained or republished


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="Chromium not installed (CI installs Debian's chromium)")
def test_report_renders_in_headless_chromium_with_tables_and_images(smoke, tmp_path):
    tmp, _ = smoke
    url = (tmp / "report/report.html").as_uri()
    dom = subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'p1'}", "--virtual-time-budget=10000",
                          "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
    assert 'data-images-loaded="5"' in dom  # the five figures decoded after load
    assert dom.count("<table>") >= 4 and "semikd" in dom and "Qualitative examples" in dom and "Paired comparisons" in dom
    shot = tmp_path / "report.png"
    subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'p2'}", "--window-size=1280,2400",
                    f"--screenshot={shot}", url], capture_output=True, timeout=120, check=True)
    import numpy as np
    from PIL import Image

    img = np.asarray(Image.open(shot).convert("L"))
    assert img.shape == (2400, 1280) and img.std() > 20  # a page with content, not a blank or error page


@pytest.mark.slow
def test_a_cell_killed_mid_run_is_not_reported_and_is_resumed(tmp_path, data_dir):
    # one cell, long enough to be killed between two of its checkpoints
    path = manifest(tmp_path, table={"groups": [{"labels": [0.1], "methods": [{"method": "supervised", "network": "unet"}]}]},
                    ablation={}, fit_args=["--trainer.max_steps", "60", "--trainer.val_check_interval", "30",
                                           "--checkpoint.last_every_n_steps", "5"])
    env = {**os.environ, "LESION_KD_DATA": str(data_dir), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "lesion_kd.cli", "reproduce-table", "--profile", str(path)], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    cell = tmp_path / "runs/kvasir-seg/supervised-unet-10pct-seed0"
    deadline = time.time() + 300
    while not (list(cell.rglob("last.ckpt")) and "at step 10" in _read(cell / "fit.log")):
        assert time.time() < deadline and proc.poll() is None, _read(cell / "fit.log")[-3000:]
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the runner and its training process
    proc.wait(timeout=60)
    assert not (tmp_path / "results/kvasir-seg/supervised-unet-10pct-seed0/metrics.json").exists()

    out = subprocess.run([sys.executable, "-m", "lesion_kd.cli", "reproduce-table", "--profile", str(path),
                          "--report-only"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "- kvasir-seg, 10% labels: supervised-unet-seed0" in (tmp_path / "report/table.md").read_text()
    assert len(list(csv.DictReader((tmp_path / "report/table.csv").open()))) == 0

    out = subprocess.run([sys.executable, "-m", "lesion_kd.cli", "reproduce-table", "--profile", str(path)], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "1 cells, 0 finished, 1 to run" in out.stdout
    assert "--ckpt_path last: resuming" in _read(cell / "fit.log")
    assert (tmp_path / "results/kvasir-seg/supervised-unet-10pct-seed0/metrics.json").is_file()
    assert len(list(csv.DictReader((tmp_path / "report/table.csv").open()))) == 1


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.is_file() else ""


def test_manifest_mistakes_are_named(tmp_path):
    with pytest.raises(ManifestError, match="method config 'no_such_method' not found"):
        load_manifest(manifest(tmp_path, table={"groups": [{"labels": [0.1], "methods": ["no_such_method"]}]}))
    with pytest.raises(ManifestError, match=r"label fraction 1.5 must be in \(0, 1\]"):
        load_manifest(manifest(tmp_path, table={"groups": [{"labels": [1.5], "methods": ["supervised"]}]}))
    with pytest.raises(ManifestError, match="unknown keys \\['sedes'\\]"):
        load_manifest(manifest(tmp_path, sedes=[0]))
    with pytest.raises(ManifestError, match="no such manifest"):
        load_manifest(tmp_path / "nope.yaml")
    with pytest.raises(ManifestError, match="method config 'supervized' not found"):
        load_manifest(manifest(tmp_path, paired_references=["supervized"]))
    with pytest.raises(ManifestError, match="'paired_references' must be a list of method names"):
        load_manifest(manifest(tmp_path, paired_references="supervised"))
    assert load_manifest(manifest(tmp_path)).paired_references == ["supervised", "semikd_sup"]


def test_group_and_ablation_seeds_override_the_manifest_seeds(tmp_path):
    groups = [{"labels": [0.1], "methods": ["supervised"]},
              {"labels": [0.1], "seeds": [0, 3], "methods": ["mean_teacher", {"method": "supervised", "seeds": [5]}]}]
    m = load_manifest(manifest(tmp_path, seeds=[0], table={"groups": groups},
                               ablation={"dataset": "kvasir-seg", "labels": 0.1, "seeds": [1, 2], "rows": ["semikd_sup"]}))
    seeds = {(c.method, c.seed) for c in m.cells}
    assert seeds == {("supervised", 0), ("supervised", 5), ("mean_teacher", 0), ("mean_teacher", 3),
                     ("semikd_sup", 1), ("semikd_sup", 2)}
    with pytest.raises(ManifestError, match="table group 0: 'seeds' must be a non-empty list of integers"):
        load_manifest(manifest(tmp_path, table={"groups": [{"labels": [0.1], "seeds": [], "methods": ["supervised"]}]}))
    with pytest.raises(ManifestError, match=r"table group 0: unknown keys \['seed'\]"):
        load_manifest(manifest(tmp_path, table={"groups": [{"labels": [0.1], "seed": [1], "methods": ["supervised"]}]}))


def test_grid_expands_and_filters():
    m = load_manifest(REPO / "experiments/reproduce/cpu.yaml")
    keys = {c.key for c in m.cells}
    assert "kvasir-seg/semikd-mamba_unet-20pct-seed0" in keys and "busi/supervised-unet-100pct-seed0" in keys
    assert "kvasir-seg/semikd_featkd-mamba_unet-10pct-seed0" in keys
    # the full method is a table row, an ablation row and a 3-seed row at Kvasir-SEG 10%: one cell per seed
    full10 = [c for c in m.cells if c.method == "semikd" and c.dataset == "kvasir-seg" and c.labels == 0.1]
    assert sorted(c.seed for c in full10) == [0, 1, 2]
    # and at BUSI 10% (with the supervised-only student), but not at BUSI 20%
    busi10 = [(c.method, c.seed) for c in m.cells if c.dataset == "busi" and c.labels == 0.1 and c.network == "mamba_unet"]
    assert sorted(busi10) == [(method, seed) for method in ("semikd", "semikd_plus", "semikd_sup", "supervised")
                              for seed in (0, 1, 2)]
    # issue 28: SemiKD+, its supervised student and the teacher's read-out on both datasets and fractions, 3 seeds
    for method, network in (("semikd_plus", "mamba_unet"), ("semikd_sup", "mamba_unet"), ("teacher", "litemedsam")):
        cells = {(c.dataset, c.labels, c.seed) for c in m.cells if c.method == method and c.network == network}
        assert cells >= {(d, f, s) for d in ("kvasir-seg", "busi") for f in (0.1, 0.2) for s in (0, 1, 2)}, method
    assert [c.seed for c in m.cells if c.method == "semikd" and c.dataset == "busi" and c.labels == 0.2] == [0]
    kv = select(m.cells, ["dataset=kvasir-seg", "part=table", "labels=0.1,0.2"])
    assert kv and all(c.dataset == "kvasir-seg" and c.labels in (0.1, 0.2) and c.part == "table" for c in kv)
    with pytest.raises(ManifestError, match="--only"):
        select(m.cells, ["colour=red"])


@pytest.mark.parametrize("gpus", [["0", "1"], ["0", "0"]])
def test_cells_run_one_per_gpu_slot_at_a_time(tmp_path, monkeypatch, gpus):
    """The scheduler with --gpus 0,1 (and 0,0: two cells sharing GPU 0): three cells, never more than two at
    once, the first two at the same time on the listed GPUs, the third when a slot is free."""
    import json

    from lesion_kd.commands import reproduce

    m = load_manifest(manifest(tmp_path))
    cells = [c for c in m.cells if c.part == "table"][:3]

    def fake_fit(m, cell, gpu=None):  # stands in for 'lesion-kd fit': records its GPU and time span, publishes metrics.json
        out = reproduce.cell_dir(m, cell)
        script = ("import json, os, time, pathlib; t0 = time.time(); time.sleep(1.0); "
                  f"p = pathlib.Path({str(out)!r}); p.mkdir(parents=True, exist_ok=True); "
                  "(p / 'span.json').write_text(json.dumps([os.environ.get('CUDA_VISIBLE_DEVICES'), t0, time.time()])); "
                  "(p / 'metrics.json').write_text(json.dumps({'dice': {'mean': 0.5}}))")
        return [sys.executable, "-c", script]

    monkeypatch.setattr(reproduce, "fit_command", fake_fit)
    monkeypatch.setattr(reproduce, "_write_timing", lambda *a: None)
    assert reproduce.run_cells(m, cells, gpus=gpus, jobs=1) == []
    spans = [json.loads((reproduce.cell_dir(m, c) / "span.json").read_text()) for c in cells]
    assert sorted(s[0] for s in spans[:2]) == sorted(gpus) and spans[2][0] in gpus
    assert max(s[1] for s in spans[:2]) < min(s[2] for s in spans[:2])  # the first two overlap
    for t in [s[1] for s in spans] + [s[2] for s in spans]:
        assert sum(s[1] <= t < s[2] for s in spans) <= 2
    assert min(s[2] for s in spans[:2]) <= spans[2][1]  # the third waited for a free GPU


def test_gpu_only_cells_wait_for_a_gpu_and_run_on_it(tmp_path, monkeypatch, capsys):
    """A cell marked ``requires: gpu`` is left out (and named) without --gpus; with --gpus its fit command
    trains on the GPU slot whatever the profile's accelerator."""
    from lesion_kd.commands import reproduce

    groups = [{"labels": [0.1], "methods": ["supervised", {"method": "mean_teacher", "requires": "gpu"}]}]
    m = load_manifest(manifest(tmp_path, table={"groups": groups}))
    gpu_cell = next(c for c in m.cells if c.method == "mean_teacher")
    assert gpu_cell.requires == "gpu" and all(c.requires == "any" for c in m.cells if c is not gpu_cell)
    ran = []
    monkeypatch.setattr(reproduce, "fit_command", lambda m, cell, gpu=None: ran.append((cell.method, gpu)) or
                        [sys.executable, "-c", "pass"])
    reproduce.run_cells(m, m.cells, gpus=[], jobs=1)
    out = capsys.readouterr().out
    assert ("mean_teacher", None) not in ran and ("supervised", None) in ran
    assert "1 cell(s) need a GPU" in out and gpu_cell.key in out
    ran.clear()
    reproduce.run_cells(m, [gpu_cell], gpus=["3"], jobs=1)
    assert ran == [("mean_teacher", "3")]
    monkeypatch.undo()
    cmd = reproduce.fit_command(m, gpu_cell, "3")
    assert cmd[cmd.index("--trainer.accelerator") + 1] == "gpu" and "--trainer.devices" in cmd
    assert "--trainer.accelerator" not in reproduce.fit_command(m, gpu_cell)
    with pytest.raises(ManifestError, match="requires must be 'any' or 'gpu'"):
        load_manifest(manifest(tmp_path, table={"groups": [{"labels": [0.1], "methods": [
            {"method": "supervised", "requires": "tpu"}]}]}))
    with pytest.raises(ManifestError, match=r"unknown keys \['gpus'\]"):
        load_manifest(manifest(tmp_path, table={"groups": [{"labels": [0.1], "methods": [
            {"method": "supervised", "gpus": 1}]}]}))


def test_time_left_comes_from_finished_runs_then_the_manifests_projection(tmp_path):
    """The time the unfinished cells will take: a method's finished, whole runs give it (median); a resumed
    run's wall (only its last part) does not; methods with no timed run use ``projected_minutes``; the rest are
    named as not timed, never guessed."""
    import json

    from lesion_kd.commands import reproduce

    groups = [{"labels": [0.1, 0.2], "seeds": [0, 1], "methods": ["supervised", "mean_teacher", "cps"]}]
    m = load_manifest(manifest(tmp_path, table={"groups": groups}, ablation={}, projected_minutes={"mean_teacher": 30}))

    def finish(cell, wall_s, resumed=False):
        d = reproduce.cell_dir(m, cell)
        d.mkdir(parents=True)
        (d / "metrics.json").write_text(json.dumps({"dice": {"mean": 0.5}}))
        (d / "timing.json").write_text(json.dumps({"wall_s": wall_s, **({"resumed": True} if resumed else {})}))

    sup = [c for c in m.cells if c.method == "supervised"]
    mt = [c for c in m.cells if c.method == "mean_teacher"]
    finish(sup[0], 600)
    finish(sup[1], 1800)
    finish(sup[2], 60, resumed=True)  # the last 1 min of an interrupted run: not a run's length
    finish(mt[0], 30, resumed=True)  # so Mean Teacher keeps the manifest's projection
    todo = [c for c in m.cells if not reproduce.is_finished(m, c)]
    assert len(todo) == 1 + 3 + 4
    text = reproduce.projection(m, todo, slots=2)
    # 1 supervised cell at the median 1200 s + 3 Mean Teacher cells at 30 min = 6600 s = 1.83 h; 2 at a time
    assert "about 1.8 h of runs (1 timed by their method's finished runs + 3 by the manifest's projected_minutes)" in text
    assert "0.9 h with 2 at a time" in text
    assert "not timed: cps-unet (4 cells)" in text
    with pytest.raises(ManifestError, match="projected_minutes: 'nope' is no method"):
        load_manifest(manifest(tmp_path, projected_minutes={"nope": 3}))
    with pytest.raises(ManifestError, match="projected_minutes: 'supervised' must be a positive number"):
        load_manifest(manifest(tmp_path, projected_minutes={"supervised": -1}))


def test_training_curves_average_seeds_and_give_the_ablation_its_own_panel(tmp_path):
    """The report's curves: one line per method and network with its seeds together (mean, range shaded), the
    SemiKD ablation variants in a panel of their own with the full method, cells without a log left out."""
    import json

    from lesion_kd.commands import reproduce
    from lesion_kd.reporting import report

    groups = [{"labels": [0.1], "seeds": [0, 1], "methods": ["supervised", "semikd"]}]
    ablation = {"dataset": "kvasir-seg", "labels": 0.1, "rows": ["semikd_sup", "semikd_dss", "semikd"]}
    m = load_manifest(manifest(tmp_path, table={"groups": groups}, ablation=ablation))

    def finish(cell, dice_by_step):
        d = reproduce.cell_dir(m, cell)
        d.mkdir(parents=True)
        (d / "metrics.json").write_text(json.dumps({"dice": {"mean": 0.5}}))
        if dice_by_step:
            rows = ["epoch,step,train/loss,val/dice", "0,10,0.5,"] + [f"0,{s},,{v}" for s, v in dice_by_step.items()]
            (d / "metrics.csv").write_text("\n".join(rows) + "\n")

    by = {(c.method, c.seed): c for c in m.cells}
    finish(by["semikd", 0], {249: 0.4, 499: 0.6})
    finish(by["semikd", 1], {249: 0.2, 499: 0.5})
    finish(by["supervised", 0], {249: 0.3, 499: 0.35})
    finish(by["supervised", 1], {})  # finished, but no log: not a curve
    finish(by["semikd_dss", 0], {249: 0.45, 499: 0.55})
    panels = report.curve_panels(m, list(m.cells))
    assert list(panels) == ["kvasir-seg, 10% labels", "kvasir-seg, 10% labels: SemiKD ablation"]
    main, abl = panels.values()
    assert set(main) == {"supervised (unet)", "semikd (mamba_unet)"} and len(main["supervised (unet)"]) == 1
    assert main["semikd (mamba_unet)"] == [[(249, 0.4), (499, 0.6)], [(249, 0.2), (499, 0.5)]]
    assert set(abl) == {"semikd_dss (mamba_unet)", "semikd (mamba_unet)"}  # semikd_sup has no finished cell
    png = report.curves_figure(m, list(m.cells))
    assert png is not None and png.startswith(b"\x89PNG")
