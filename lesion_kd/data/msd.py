"""``prepare-msd``: a Medical Segmentation Decathlon task (3D NIfTI) as 2D lesion-segmentation slices.

Input: an MSD task folder (``dataset.json``, ``imagesTr/<case>.nii.gz``, ``labelsTr/<case>.nii.gz``; the
macOS ``._*`` files of the official tars are ignored). Output, in the suite's folder layout:

- ``images/<case>_s<slice>.png``: 8-bit gray axial slices, intensity-normalised as MedSAM preprocesses:
  CT clipped to the window ``[L - W/2, L + W/2]`` and scaled to 0-255; MR clipped to the 0.5-99.5
  percentiles of the volume's non-zero voxels and scaled, zero (background) voxels kept at 0;
- ``masks/<case>_s<slice>.png``: 255 where the label is one of the lesion labels (e.g. liver tumour = 2),
  0 elsewhere (the organ label is background);
- every slice with lesion (at least ``min_lesion_pixels``), plus slices without lesion at ``empty_ratio``
  per lesion slice of the same case (drawn with ``seed``);
- ``splits.json`` (train/val/test slice ids and the patients behind them) and ``listing.csv`` (image, mask,
  split, group = patient): the split is patient-level, so no patient's slices leak between train and test.
  Train on it with ``--data.dataset OUT/listing.csv`` (the listing's split column is used as it is).

Slices are taken along the volume's third axis and stored with rows = y (as SimpleITK, and so MedSAM,
read them). Distances measured on these slices (HD95) are in pixels, as in the paper's table.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from .folder import Sample
from .io import DataError, atomic_write_bytes, write_png
from .listing import grouped_split

log = logging.getLogger(__name__)
MANIFEST_NAME = "lesion_kd_manifest.json"
SOFT_TISSUE_WINDOW = (40.0, 400.0)  # (level, width): MedSAM's default CT window (abdomen)


@dataclass(frozen=True)
class MSDTask:
    """Per-task defaults: modality, which label values are lesion, CT window (level, width), MR channel."""

    modality: str
    lesion_labels: tuple[int, ...]
    window: tuple[float, float] | None = None
    channel: int = 0
    lesion: str = ""


# The MSD tasks that have a lesion label. Task02 Heart, 04 Hippocampus, 05 Prostate (zones) and 09 Spleen
# label organs only and are not listed (any task can still be prepared with explicit options).
MSD_TASKS: dict[str, MSDTask] = {
    "Task01_BrainTumour": MSDTask("MR", (1, 2, 3), None, 0, "glioma: edema 1, non-enhancing 2, enhancing 3; channel 0 = FLAIR"),
    "Task03_Liver": MSDTask("CT", (2,), SOFT_TISSUE_WINDOW, 0, "liver tumour (1 = liver)"),
    "Task06_Lung": MSDTask("CT", (1,), (-600.0, 1500.0), 0, "lung tumour (lung window)"),
    "Task07_Pancreas": MSDTask("CT", (2,), SOFT_TISSUE_WINDOW, 0, "pancreatic tumour/cyst (1 = pancreas)"),
    "Task08_HepaticVessel": MSDTask("CT", (2,), SOFT_TISSUE_WINDOW, 0, "liver tumour (1 = vessel)"),
    "Task10_Colon": MSDTask("CT", (1,), SOFT_TISSUE_WINDOW, 0, "colon cancer"),
}


def window_ct(x: np.ndarray, level: float, width: float) -> np.ndarray:
    """Clip to ``[level - width/2, level + width/2]`` and scale that range linearly to 0-255 (uint8)."""
    if width <= 0:
        raise ValueError(f"window width {width} must be positive")
    lo, hi = level - width / 2.0, level + width / 2.0
    y = (np.clip(x.astype(np.float64), lo, hi) - lo) / (hi - lo) * 255.0
    return np.round(y).astype(np.uint8)


def mr_bounds(volume: np.ndarray) -> tuple[float, float]:
    """The 0.5 and 99.5 percentiles of the non-zero voxels of one MR volume (channel)."""
    nz = volume[volume != 0]
    if nz.size == 0:
        return 0.0, 0.0
    lo, hi = np.percentile(nz, [0.5, 99.5])
    return float(lo), float(hi)


def normalize_mr(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Clip to ``[lo, hi]``, scale to 0-255 (uint8); voxels that are exactly 0 (outside the head) stay 0."""
    if hi <= lo:
        return np.zeros(x.shape, np.uint8)
    y = (np.clip(x.astype(np.float64), lo, hi) - lo) / (hi - lo) * 255.0
    y[x == 0] = 0
    return np.round(y).astype(np.uint8)


@dataclass
class MSDOptions:
    """Everything that determines the output (recorded in the manifest; a rerun with the same is a no-op)."""

    task: str
    modality: str
    lesion_labels: tuple[int, ...]
    window: tuple[float, float] | None
    channel: int
    empty_ratio: float
    min_lesion_pixels: int
    seed: int
    fractions: tuple[float, float, float]


def _nifti_name(p: Path) -> str:
    return p.name[: -len(".nii.gz")] if p.name.endswith(".nii.gz") else p.name[: -len(".nii")]


def _cases(in_dir: Path) -> list[tuple[str, Path, Path]]:
    images_dir, labels_dir = in_dir / "imagesTr", in_dir / "labelsTr"
    for d in (images_dir, labels_dir):
        if not d.is_dir():
            raise DataError(f"{in_dir}: no {d.name}/ folder (expected an MSD task: dataset.json, imagesTr/, labelsTr/)")
    cases = []
    for p in sorted(images_dir.iterdir()):
        # the official MSD tars carry macOS '._<case>.nii.gz' resource forks: not images
        if p.name.startswith(".") or not p.name.endswith((".nii.gz", ".nii")):
            continue
        label = labels_dir / p.name
        if not label.is_file():
            raise DataError(f"{p}: no label volume {label}")
        cases.append((_nifti_name(p), p, label))
    if not cases:
        raise DataError(f"{images_dir}: no .nii.gz volumes")
    return cases


def _read_dataset_json(in_dir: Path) -> dict:
    path = in_dir / "dataset.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: unreadable JSON ({e})") from e


def resolve_options(task: str, in_dir: Path, lesion_labels: tuple[int, ...] | None = None,
                    window: tuple[float, float] | None = None, channel: int | None = None,
                    empty_ratio: float = 0.0, min_lesion_pixels: int = 1, seed: int = 0,
                    fractions: tuple[float, float, float] = (0.7, 0.1, 0.2)) -> MSDOptions:
    """Per-task defaults from :data:`MSD_TASKS`, overridden by explicit options, checked against dataset.json."""
    meta = _read_dataset_json(in_dir)
    known = {k.lower(): k for k in MSD_TASKS}
    spec = MSD_TASKS.get(known.get(task.lower(), ""))
    modality_names = [str(v) for v in (meta.get("modality") or {}).values()]
    if spec is None:
        if lesion_labels is None:
            raise DataError(f"--task {task}: not in the table of MSD lesion tasks ({', '.join(MSD_TASKS)}); "
                            "give --lesion-label (and for CT --window-level/--window-width)")
        modality = "CT" if any(m.upper() == "CT" for m in modality_names) else "MR"
        spec = MSDTask(modality, lesion_labels, SOFT_TISSUE_WINDOW if modality == "CT" else None)
        if modality == "CT" and window is None:
            log.warning("%s: CT task without a default window; using soft tissue L%.0f W%.0f", task, *SOFT_TISSUE_WINDOW)
    labels = tuple(lesion_labels) if lesion_labels else spec.lesion_labels
    names = meta.get("labels") or {}
    if names:
        unknown = [k for k in labels if str(k) not in {str(key) for key in names}]
        if unknown:
            raise DataError(f"{in_dir / 'dataset.json'}: lesion label {unknown[0]} is not one of its labels "
                            f"({', '.join(f'{k}={v}' for k, v in names.items())})")
    if 0 in labels:
        raise DataError("--lesion-label 0 is the background")
    if empty_ratio < 0:
        raise ValueError(f"--empty-ratio {empty_ratio}: must be >= 0")
    if abs(sum(fractions) - 1.0) > 1e-6 or any(f < 0 for f in fractions):
        raise ValueError(f"--split-fractions {fractions}: must be three non-negative numbers summing to 1")
    return MSDOptions(
        task=task, modality=spec.modality, lesion_labels=labels,
        window=(tuple(window) if window else spec.window) if spec.modality == "CT" else None,  # type: ignore[arg-type]
        channel=spec.channel if channel is None else channel, empty_ratio=float(empty_ratio),
        min_lesion_pixels=int(min_lesion_pixels), seed=int(seed), fractions=tuple(fractions),  # type: ignore[arg-type]
    )


def _load_case(image: Path, label: Path, opts: MSDOptions) -> tuple[np.ndarray, np.ndarray]:
    """(image volume (X, Y, Z) of the chosen channel, label volume (X, Y, Z) int)."""
    import nibabel as nib  # a dependency; imported here so that importing the package stays light

    try:
        img = np.asanyarray(nib.load(str(image)).dataobj)
        lab = np.asanyarray(nib.load(str(label)).dataobj)
    except Exception as e:  # noqa: BLE001 - nibabel raises many types for a broken file
        raise DataError(f"{image}: unreadable NIfTI pair ({e})") from e
    if img.ndim == 4:  # multi-channel MR (BrainTumour: FLAIR, T1w, T1gd, T2w)
        if not 0 <= opts.channel < img.shape[3]:
            raise DataError(f"{image}: --channel {opts.channel} out of range (the volume has {img.shape[3]} channels)")
        img = img[..., opts.channel]
    if img.ndim != 3 or lab.ndim != 3:
        raise DataError(f"{image}: expected 3D volumes, got image {img.shape} and label {lab.shape}")
    if img.shape != lab.shape:
        raise DataError(f"{label}: label volume {lab.shape} does not match its image {image} {img.shape}")
    return img, np.rint(lab).astype(np.int32)


def _normalizer(img: np.ndarray, opts: MSDOptions):
    if opts.modality == "CT":
        level, width = opts.window  # type: ignore[misc]
        return lambda s: window_ct(s, level, width)
    lo, hi = mr_bounds(img)
    return lambda s: normalize_mr(s, lo, hi)


def _manifest_matches(out: Path, opts: MSDOptions) -> bool:
    path = out / MANIFEST_NAME
    if not path.is_file():
        if out.exists() and any(out.iterdir()):
            raise DataError(f"{out}: not empty and not prepared by prepare-msd (no {MANIFEST_NAME}); choose another --out")
        return False
    try:
        stored = json.loads(path.read_text()).get("options")
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: unreadable manifest ({e}); delete {out} and prepare again") from e
    if stored == json.loads(json.dumps(asdict(opts))):
        return True
    raise DataError(f"{out}: already prepared with other options ({stored}); choose another --out, or --force to replace it")


def prepare_msd(task: str, in_dir: str | os.PathLike, out_dir: str | os.PathLike,
                lesion_labels: tuple[int, ...] | None = None, window: tuple[float, float] | None = None,
                channel: int | None = None, empty_ratio: float = 0.0, min_lesion_pixels: int = 1, seed: int = 0,
                fractions: tuple[float, float, float] = (0.7, 0.1, 0.2), force: bool = False,
                progress: bool = True) -> tuple[Path, bool, dict]:
    """Slice an MSD task into ``out_dir``; returns (folder, whether anything was written, counts).

    Idempotent: a folder prepared with the same options is left alone (the manifest, written last, says
    so). ``empty_ratio`` slices without lesion are kept per lesion slice of each case (0 = lesion slices
    only); slices with fewer than ``min_lesion_pixels`` lesion pixels (but some) are dropped as ambiguous.
    """
    in_dir, out = Path(in_dir).expanduser(), Path(out_dir).expanduser()
    if not in_dir.is_dir():
        raise DataError(f"--in {in_dir}: folder not found")
    opts = resolve_options(task, in_dir, lesion_labels, window, channel, empty_ratio, min_lesion_pixels, seed, fractions)
    if not force and _manifest_matches(out, opts):
        return out, False, json.loads((out / MANIFEST_NAME).read_text()).get("counts", {})
    cases = _cases(in_dir)
    work = out.parent / f".{out.name}.lesion_kd-work"
    if work.exists():
        shutil.rmtree(work)  # left by an interrupted run of ours
    try:
        samples, info = [], {}
        for case, image, label in tqdm(cases, desc=f"slicing {task}", unit="case", disable=not progress):
            img, lab = _load_case(image, label, opts)
            fg = np.isin(lab, opts.lesion_labels)
            per_slice = fg.sum(axis=(0, 1))
            lesion = [z for z in range(fg.shape[2]) if per_slice[z] >= max(opts.min_lesion_pixels, 1)]
            empty = [z for z in range(fg.shape[2]) if per_slice[z] == 0]
            # seeded per case, so that a case's choice does not depend on the others
            rng = random.Random(f"{opts.seed}:{case}")
            n_empty = min(len(empty), round(opts.empty_ratio * len(lesion)))
            keep = sorted(lesion + rng.sample(empty, n_empty))
            norm = _normalizer(img, opts)
            for z in keep:
                sid = f"{case}_s{z:03d}"
                # (x, y) -> rows = y: the orientation SimpleITK (and so MedSAM) gives
                write_png(work / "images" / f"{sid}.png", np.ascontiguousarray(norm(img[:, :, z]).T))
                write_png(work / "masks" / f"{sid}.png", np.ascontiguousarray(fg[:, :, z].T.astype(np.uint8) * 255))
                samples.append(Sample(sid, work / "images" / f"{sid}.png", work / "masks" / f"{sid}.png", group=case))
                info[sid] = (case, z, int(per_slice[z]))
        if not samples:
            raise DataError(f"{in_dir}: no slice with lesion labels {opts.lesion_labels} in {len(cases)} case(s)")
        splits = grouped_split(samples, opts.fractions, opts.seed)
        split_of = {sid: name for name, ids in splits.items() for sid in ids}
        patients = {name: sorted({info[i][0] for i in ids}) for name, ids in splits.items()}
        _write_outputs(work, opts, samples, info, splits, split_of, patients, len(cases))
        counts = {"cases": len(cases), "slices": len(samples),
                  "lesion_slices": sum(info[s.id][2] > 0 for s in samples),
                  **{f"{k}_slices": len(v) for k, v in splits.items()},
                  **{f"{k}_patients": len(v) for k, v in patients.items()}}
        doc = {"tool": "lesion-kd data prepare-msd", "format": 1, "options": asdict(opts), "counts": counts,
               "source": str(in_dir)}
        atomic_write_bytes(work / MANIFEST_NAME, (json.dumps(doc, indent=1) + "\n").encode())  # last file written
        if out.exists():
            if not (out / MANIFEST_NAME).is_file() and any(out.iterdir()):
                raise DataError(f"{out}: not empty and not prepared by prepare-msd; refusing to replace it")
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(work, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out, True, counts


def _write_outputs(work: Path, opts: MSDOptions, samples: list[Sample], info: dict, splits: dict, split_of: dict,
                   patients: dict, n_cases: int) -> None:
    doc = {"version": 1, "task": opts.task, "seed": opts.seed, "fractions": list(opts.fractions),
           "level": "patient", "patients": patients, "splits": splits}
    atomic_write_bytes(work / "splits.json", (json.dumps(doc, indent=1) + "\n").encode())
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["image", "mask", "split", "group", "id", "slice", "fg_pixels"])
    for s in samples:
        case, z, fg = info[s.id]
        w.writerow([f"images/{s.id}.png", f"masks/{s.id}.png", split_of[s.id], case, s.id, z, fg])
    atomic_write_bytes(work / "listing.csv", buf.getvalue().encode())
    window = f"window L{opts.window[0]:g} W{opts.window[1]:g}" if opts.window else "0.5-99.5 percentile of non-zero voxels"
    text = (
        f"Dataset: Medical Segmentation Decathlon {opts.task}, 2D slices\n"
        f"Prepared by: lesion-kd data prepare-msd ({n_cases} cases, {len(samples)} slices)\n"
        f"Modality: {opts.modality} ({window}); lesion labels {list(opts.lesion_labels)}; channel {opts.channel}\n"
        f"Empty-slice ratio: {opts.empty_ratio} per lesion slice (seed {opts.seed}); split: patient-level "
        f"{list(opts.fractions)} in splits.json and listing.csv\n\n"
        "License: CC BY-SA 4.0 (http://medicaldecathlon.com)\n"
        "Cite: Antonelli M, et al. The Medical Segmentation Decathlon. Nat Commun 2022;13:4128; and Simpson AL, et al. "
        "A large annotated medical image dataset for the development and evaluation of segmentation algorithms. "
        "arXiv:1902.09063.\n"
    )
    atomic_write_bytes(work / "SOURCE.txt", text.encode())
