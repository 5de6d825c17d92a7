"""``lesion-kd demo``: the method against its own recipe without the teacher, end to end, in minutes.

On Kvasir-SEG (from ``$LESION_KD_DATA`` or ``--data_dir``), with the demo profile
(``experiments/profile/demo.yaml``: a subset of the training split, a short budget):

1. fills the teacher's embedding cache for the images the method trains on (LiteMedSAM; the ``hybrid`` encoder,
   about 2x faster than the default, unless ``$LESION_KD_TEACHER_ENCODER`` says otherwise), with a progress bar;
2. trains SemiKD+ (``experiments/method/semikd_plus.yaml``: the paper's method plus the teacher's
   pseudo-labels; here the read-out head's own labels, ``pl_refine: none``, to stay within 15 minutes) and
   ``semikd_sup`` (the same student, recipe, views, split and budget, without the teacher) side by side, one
   thread each, printing a status line per run as they go;
3. tests both on the 100 standard Kvasir-SEG test images and prints their Dice and HD95 beside each other, the
   paired per-image difference (``lesion-kd compare``), and writes ``overlay.png``: test images with the
   ground truth and both students' masks.

Everything lands under ``--out`` (default ``runs/demo``); an interrupted demo resumes its runs (``--ckpt_path
last``) where they stopped.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RUNS = {  # name -> method config; the first is the method
    "semikd_plus": "experiments/method/semikd_plus.yaml",
    "semikd_sup": "experiments/method/semikd_sup.yaml",
}
LABELS = {"semikd_plus": "SemiKD+ (teacher: LiteMedSAM)", "semikd_sup": "semikd_sup (same recipe, no teacher)"}


def _configs(method_cfg: str, profile: str) -> list[str]:
    return ["--config", str(ROOT / "experiments/data/kvasir-seg.yaml"), "--config", str(ROOT / method_cfg),
            "--config", str(ROOT / profile)]


# SemiKD+ in the demo keeps the read-out head's own labels: the box refinement's frame cache (one more encoder run
# per unlabeled image, about 4 min for the demo's 270) would take the demo past 15 minutes
OVERRIDES = {"semikd_plus": ["--model.init_args.pl_refine", "none"]}


def _fit_command(name: str, out: Path, profile: str) -> list[str]:
    return [sys.executable, "-m", "lesion_kd.cli", "fit", *_configs(RUNS[name], profile), *OVERRIDES.get(name, []),
            "--trainer.default_root_dir", str(out / name), "--results_root", str(out / "results"),
            "--ckpt_path", "last"]


def _result_dir(out: Path, name: str) -> Path | None:
    found = sorted((out / "results").glob(f"kvasir-seg/{name}-*/metrics.json"))
    return found[0].parent if found else None


def _last_status(log: Path) -> str:
    """The run's newest ``[train]``/``[val]``/``[test]`` progress line (``ProgressLines``), else its newest line."""
    if not log.is_file():
        return "starting"
    lines = [ln.strip() for ln in log.read_text(errors="replace").replace("\r", "\n").splitlines() if ln.strip()]
    tagged = [ln for ln in lines if ln.startswith(("[train]", "[val]", "[test]"))]
    return (tagged or lines or ["starting"])[-1][:150]


def fill_cache(profile: str, threads: int) -> None:
    print(f"[demo] 1/3 teacher cache: LiteMedSAM embeddings of the training images ({threads} threads)", flush=True)
    import torch

    torch.set_num_threads(threads)
    from .cache_teacher import main as cache_main

    cache_main(_configs(RUNS["semikd_plus"], profile))


def train(out: Path, profile: str, jobs: int) -> None:
    print(f"[demo] 2/3 training {' and '.join(RUNS)} ({jobs} at a time, one thread each); logs: "
          f"{', '.join(str(out / n / 'fit.log') for n in RUNS)}", flush=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    pending = [n for n in RUNS if _result_dir(out, n) is None]
    for n in RUNS:
        if n not in pending:
            print(f"[demo]   {n}: already finished ({_result_dir(out, n)})", flush=True)
    running: dict[str, tuple[subprocess.Popen, Path]] = {}
    failed: list[str] = []
    shown: dict[str, str] = {}
    t0 = time.monotonic()
    while pending or running:
        while pending and len(running) < jobs:
            name = pending.pop(0)
            (out / name).mkdir(parents=True, exist_ok=True)
            log = out / name / "fit.log"
            with open(log, "ab") as fh:
                proc = subprocess.Popen(_fit_command(name, out, profile), stdout=fh, stderr=subprocess.STDOUT,
                                        env=env, cwd=ROOT)
            running[name] = (proc, log)
        time.sleep(2)
        for name, (proc, log) in list(running.items()):
            if proc.poll() is not None:
                del running[name]
                state = "done" if proc.returncode == 0 else f"FAILED (exit {proc.returncode}; see {log})"
                print(f"[demo]   {name}: {state} after {(time.monotonic() - t0) / 60:.1f} min", flush=True)
                if proc.returncode:
                    failed.append(name)
        if running and int(time.monotonic() - t0) % 30 < 2:  # every 30 s, each run's status when it changed
            for name, (_, log) in running.items():
                status = _last_status(log)
                if status != shown.get(name):
                    shown[name] = status
                    print(f"[demo]   {name}: {status}", flush=True)
    if failed:
        raise SystemExit(f"lesion-kd demo: {', '.join(failed)} failed; see the fit.log named above")


def report(out: Path) -> None:
    import json

    from .compare import compare, p_phrase

    print("[demo] 3/3 results on the Kvasir-SEG test images", flush=True)
    dirs = {n: _result_dir(out, n) for n in RUNS}
    rows = []
    for n, d in dirs.items():
        m = json.loads((d / "metrics.json").read_text())
        rows.append((LABELS[n], 100 * m["dice"]["mean"], m["hd95"]["mean"]))
    w = max(len(r[0]) for r in rows)
    print(f"  {'':{w}}  test Dice   HD95 px")
    for label, dice, hd in rows:
        print(f"  {label:{w}}  {dice:8.2f}   {hd:7.2f}")
    method, ref = list(RUNS)
    cmp = compare([str(dirs[method])], [str(dirs[ref])])
    d = cmp["dice_points"]
    print(f"  paired over {cmp['images']} images ({method} minus {ref}): Dice {d['mean']:+.2f} points, 95% CI "
          f"[{d['ci_low']:+.2f}, {d['ci_high']:+.2f}], Wilcoxon {p_phrase(d['p'])}; higher on {cmp['wins'] * 100:.0f}% "
          f"of the images")
    print(f"  same comparison later: lesion-kd compare --runs {dirs[method]} --against {dirs[ref]}")
    path = overlay_figure(out, dirs)
    if path is not None:
        print(f"  overlay picture: {path}")


def overlay_figure(out: Path, dirs: dict[str, Path], rows: int = 4) -> Path | None:
    """Test images (columns: image with ground truth, then each student's mask) from the kept predictions."""
    import cv2
    import numpy as np

    from ..data.io import read_image, read_mask
    from ..io_utils import atomic_write_bytes
    from ..viz import overlay, read_mask_png

    data = Path(os.environ.get("LESION_KD_DATA", "")) / "Kvasir-SEG"
    kept = sorted((dirs[next(iter(RUNS))] / "predictions").glob("*.png"))[:rows]
    if not kept or not data.is_dir():
        return None
    tiles = []
    for png in kept:
        sid = png.stem
        (img_path,) = [p for p in (data / "images").glob(f"{sid}.*")][:1] or [None]
        if img_path is None:
            return None
        masks = {n: read_mask_png(d / "predictions" / png.name) for n, d in dirs.items()}
        size = next(iter(masks.values())).shape
        img = cv2.resize(read_image(img_path), (size[1], size[0]), interpolation=cv2.INTER_AREA)
        gt = cv2.resize(read_mask(data / "masks" / f"{sid}.png").astype(np.uint8), (size[1], size[0]),
                        interpolation=cv2.INTER_NEAREST)
        row = [overlay(img, gt, color=(0, 255, 255))] + [overlay(img, masks[n], color=(255, 220, 0)) for n in RUNS]
        tiles.append(np.concatenate([cv2.resize(t, (256, 256), interpolation=cv2.INTER_NEAREST) for t in row], axis=1))
    grid = np.concatenate(tiles, axis=0)
    header = np.full((28, grid.shape[1], 3), 255, np.uint8)
    for i, text in enumerate(["ground truth", *RUNS]):
        cv2.putText(header, text, (8 + 256 * i, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 0, 0), 1, cv2.LINE_AA)
    ok, buf = cv2.imencode(".png", cv2.cvtColor(np.concatenate([header, grid]), cv2.COLOR_RGB2BGR))
    path = out / "overlay.png"
    atomic_write_bytes(path, buf.tobytes())
    return path


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="lesion-kd demo", description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/demo"), help="where the runs, results and overlay.png go")
    ap.add_argument("--profile", default="experiments/profile/demo.yaml",
                    help="the budget (relative to the repository): image size, subset, steps")
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time (one thread each)")
    args = ap.parse_args(argv)
    if not (ROOT / args.profile).is_file():
        ap.error(f"--profile {args.profile}: no such file under {ROOT}")
    data = os.environ.get("LESION_KD_DATA")
    if not data or not (Path(data) / "Kvasir-SEG" / "images").is_dir():
        print("lesion-kd demo: error: set LESION_KD_DATA to the folder that holds Kvasir-SEG/ "
              "(lesion-kd data download kvasir-seg fetches it)", file=sys.stderr)
        return 2
    os.environ.setdefault("LESION_KD_TEACHER_ENCODER", "hybrid")
    t0 = time.monotonic()
    fill_cache(args.profile, threads=max(1, args.jobs))
    train(args.out.resolve(), args.profile, args.jobs)
    report(args.out.resolve())
    print(f"[demo] done in {(time.monotonic() - t0) / 60:.1f} min", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
