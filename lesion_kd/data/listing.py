"""A user's own data listed in a CSV file, for images that are not laid out as ``images/`` + ``masks/``.

Columns (a header row is required; extra columns are ignored)::

    image,mask,split,group
    scans/p01/a.png,labels/p01/a.png,train,p01
    scans/p02/b.dcm,labels/p02/b.nii.gz,test,p02

- ``image`` and ``mask``: paths relative to the CSV file's folder (or absolute), any format that
  :func:`lesion_kd.data.io.read_image` reads (PNG, JPEG, BMP, TIFF, ``.npy``, ``.dcm``, ``.nii[.gz]``).
- ``split`` (optional): ``train``, ``val`` or ``test`` on every row; without it the data module draws a
  seeded split.
- ``group`` (optional, also ``patient``/``patient_id``/``subject``): the patient (or any unit whose images
  must stay together); a drawn split then keeps every group within one split (:func:`grouped_split`), and a
  given split column may not put one group in two splits.
- ``id`` (optional): the sample id; by default the image file name without its extension (all prefixed by
  their folder name when two images share a file name, e.g. ``p01/a.png`` and ``p02/a.png``).

Point ``data.dataset`` (or ``data.root``) at the ``.csv`` file to train on it. Errors name the file and row.
"""

from __future__ import annotations

import csv
import os
import random
from pathlib import Path

from .folder import Sample
from .io import IMAGE_EXTENSIONS, DataError
from .registry import random_split

COLUMNS = {
    "image": ("image", "image_path", "img", "image_file"),
    "mask": ("mask", "mask_path", "label", "label_path", "seg", "segmentation", "mask_file"),
    "split": ("split", "subset", "set"),
    "group": ("group", "patient", "patient_id", "subject", "subject_id"),
    "id": ("id", "sample_id"),
}
SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
               "test": "test", "testing": "test"}


def image_extension(name: str) -> str | None:
    """The image extension of a file name (``.nii.gz`` as a whole), or None if it is not an image."""
    low = name.lower()
    return next((e for e in sorted(IMAGE_EXTENSIONS, key=len, reverse=True) if low.endswith(e)), None)


def _columns(fieldnames: list[str] | None, path: Path) -> dict[str, str]:
    """Map our column roles to the CSV's header names (case-insensitive, aliases allowed)."""
    if not fieldnames:
        raise DataError(f"{path}: empty CSV file (expected a header row: image,mask[,split][,group])")
    lower = {f.strip().lower(): f for f in fieldnames if f is not None}
    found = {}
    for role, names in COLUMNS.items():
        hit = next((lower[n] for n in names if n in lower), None)
        if hit is not None:
            found[role] = hit
    for role in ("image", "mask"):
        if role not in found:
            raise DataError(f"{path}: no {role!r} column in the header ({', '.join(fieldnames)}); expected "
                            f"columns image,mask[,split][,group] (aliases for {role}: {', '.join(COLUMNS[role])})")
    return found


def _resolve(cell: str, base: Path, path: Path, line: int, role: str) -> Path:
    cell = cell.strip()
    if not cell:
        raise DataError(f"{path}:{line}: empty {role} path")
    p = Path(cell).expanduser()
    p = p if p.is_absolute() else base / p
    if image_extension(p.name) is None:
        raise DataError(f"{path}:{line}: {role} {cell!r} is not an image file (extensions: {', '.join(IMAGE_EXTENSIONS)})")
    if not p.is_file():
        raise DataError(f"{path}:{line}: {role} file {p} not found (paths are relative to {base})")
    return p


def read_listing(csv_path: str | os.PathLike) -> tuple[list[Sample], dict[str, list[str]] | None]:
    """Samples of a CSV listing, and its train/val/test ids when it has a split column (else None).

    Nothing but the file's existence is checked here (no pixels are read); a missing file, an unknown
    split name, a duplicate id or a group in two splits is a :class:`DataError` naming the CSV row.
    """
    path = Path(csv_path).expanduser()
    if not path.is_file():
        raise DataError(f"{path}: CSV listing not found")
    base = path.parent
    rows: list[tuple[int, Path, Path, str, str, str]] = []  # line, image, mask, split, group, id
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:  # utf-8-sig: spreadsheets write a BOM
            reader = csv.DictReader(f)
            cols = _columns(reader.fieldnames, path)
            for row in reader:
                line = reader.line_num
                if not any((v or "").strip() for v in row.values() if isinstance(v, str)):
                    continue  # blank line
                cell = {role: (row.get(col) or "").strip() for role, col in cols.items()}
                image = _resolve(cell["image"], base, path, line, "image")
                mask = _resolve(cell["mask"], base, path, line, "mask")
                rows.append((line, image, mask, cell.get("split", ""), cell.get("group", ""), cell.get("id", "")))
    except (UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{path}: not a readable CSV file ({e})") from e
    if not rows:
        raise DataError(f"{path}: no rows (expected one image,mask pair per row)")

    seen_images: dict[Path, int] = {}
    for line, image, *_ in rows:
        if image in seen_images:
            raise DataError(f"{path}:{line}: image {image} is already listed on line {seen_images[image]}")
        seen_images[image] = line
    ids = _ids(rows, path)
    samples = [Sample(id=sid, image=image, mask=mask, group=group or None)
               for (_, image, mask, _, group, _), sid in zip(rows, ids, strict=True)]
    return samples, _splits(rows, ids, path, "split" in cols)


def _ids(rows, path: Path) -> list[str]:
    explicit = [r[5] for r in rows]
    if any(explicit):
        missing = next((r[0] for r in rows if not r[5]), None)
        if missing is not None:
            raise DataError(f"{path}:{missing}: empty id (when the id column is used, every row needs one)")
        ids = explicit
    else:
        stems = [r[1].name[: -len(image_extension(r[1].name) or "")] for r in rows]
        # images named alike in different folders (p01/a.png, p02/a.png): every id gets its folder name
        clash = len(set(stems)) < len(stems)
        ids = [f"{r[1].parent.name}_{s}" if clash else s for r, s in zip(rows, stems, strict=True)]
    first: dict[str, int] = {}
    for r, sid in zip(rows, ids, strict=True):
        if sid in first:
            raise DataError(f"{path}:{r[0]}: id {sid!r} is also the id of line {first[sid]}; add an 'id' column "
                            "with unique ids")
        first[sid] = r[0]
    return ids


def _splits(rows, ids: list[str], path: Path, has_column: bool) -> dict[str, list[str]] | None:
    values = [r[3] for r in rows]
    if not has_column or not any(values):
        return None
    out: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    group_split: dict[str, tuple[str, int]] = {}
    for r, sid in zip(rows, ids, strict=True):
        line, value, group = r[0], r[3], r[4]
        if not value:
            raise DataError(f"{path}:{line}: empty split (the split column must be filled on every row, or on none)")
        split = SPLIT_NAMES.get(value.lower())
        if split is None:
            raise DataError(f"{path}:{line}: unknown split {value!r} (expected train, val or test)")
        if group:
            if group in group_split and group_split[group][0] != split:
                other, other_line = group_split[group]
                raise DataError(f"{path}:{line}: group {group!r} is in {split} here but in {other} on line "
                                f"{other_line}: one patient's images would leak between splits")
            group_split.setdefault(group, (split, line))
        out[split].append(sid)
    return {k: sorted(v) for k, v in out.items()}


def grouped_split(samples: list[Sample], fractions: tuple[float, float, float] = (0.7, 0.1, 0.2),
                  seed: int = 0) -> dict[str, list[str]]:
    """Seeded train/val/test split that keeps each ``group`` (patient) whole.

    Groups are shuffled by ``seed``; test and val first get one group each (when there are enough groups
    and their fraction is positive), then every further group goes to the split furthest below its share
    of the images. A sample without a group is a group of its own.
    """
    if abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"split fractions {fractions} must sum to 1")
    groups: dict[str, list[str]] = {}
    for s in samples:
        groups.setdefault(s.group if s.group else f"\0{s.id}", []).append(s.id)
    keys = sorted(groups)
    random.Random(seed).shuffle(keys)
    names = ("train", "val", "test")
    target = {n: f * len(samples) for n, f in zip(names, fractions, strict=True)}
    out: dict[str, list[str]] = {n: [] for n in names}
    seeded = [n for n in ("test", "val") if target[n] > 0]
    if len(keys) < len(seeded) + (1 if target["train"] > 0 else 0):
        seeded = []  # too few groups to give every split one: fall back to shares alone
    for key, name in zip(keys, seeded, strict=False):
        out[name] += groups[key]
    for key in keys[len(seeded):]:
        name = max(names, key=lambda n: (target[n] - len(out[n]), -names.index(n)))
        out[name] += groups[key]
    return {n: sorted(v) for n, v in out.items()}


def split_listing(samples: list[Sample], fractions: tuple[float, float, float], seed: int) -> dict[str, list[str]]:
    """A drawn split for a listing without a split column: patient-grouped when it has groups."""
    if any(s.group for s in samples):
        return grouped_split(samples, fractions, seed)
    return random_split(samples, fractions, seed)
