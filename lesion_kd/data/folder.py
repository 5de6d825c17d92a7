"""A lesion dataset on disk: ``images/<id>.<ext>`` and ``masks/<id>.<ext>``, matched by file stem."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .io import IMAGE_EXTENSIONS, DataError, split_image_name


@dataclass(frozen=True)
class Sample:
    """One image of a dataset. ``mask`` is None for unlabeled images; ``group`` stratifies splits."""

    id: str
    image: Path
    mask: Path | None = None
    group: str | None = None


def _index(folder: Path) -> dict[str, Path]:
    files: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        # match whole suffixes, not Path.suffix: "x.nii.gz" has the extension ".nii.gz" and the id "x"
        parts = split_image_name(p.name)
        if p.name.startswith(".") or not p.is_file() or parts is None:
            continue
        stem = parts[0]
        for suffix in ("_mask", "_segmentation"):  # common mask-naming conventions
            if folder.name == "masks" and stem.endswith(suffix):
                stem = stem[: -len(suffix)]
        if stem in files:
            raise DataError(f"{folder}: two files share the id {stem!r}: {files[stem].name} and {p.name}")
        files[stem] = p
    return files


def scan_folder(root: str | Path, require_masks: bool = True, skipped: list[str] | None = None) -> list[Sample]:
    """List the samples of ``root`` (a folder with ``images/`` and ``masks/``), sorted by id.

    Raises :class:`DataError` naming the folder or file for a missing folder, an empty folder, an image
    without a mask (when ``require_masks``) or a mask without an image. Given a ``skipped`` list
    (``data.on_bad_sample=skip``), an image without a mask is left out and its message appended there
    instead, and a mask without an image is ignored the same way.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: dataset folder not found")
    img_dir, mask_dir = root / "images", root / "masks"
    if not img_dir.is_dir():
        raise DataError(f"{root}: no images/ folder (expected images/ and masks/)")
    images = _index(img_dir)
    if not images:
        raise DataError(f"{img_dir}: empty folder (no image files with extensions {', '.join(IMAGE_EXTENSIONS)})")
    masks: dict[str, Path] = {}
    if mask_dir.is_dir():
        masks = _index(mask_dir)
    elif require_masks:
        raise DataError(f"{root}: no masks/ folder (expected images/ and masks/)")
    if require_masks:
        missing = [i for i in images if i not in masks]
        orphans = [m for m in masks if m not in images]
        if skipped is not None:
            skipped += [f"{images[i]}: no mask for this image in {mask_dir}" for i in missing]
            skipped += [f"{masks[m]}: mask without an image in {img_dir}" for m in orphans]
            images = {i: p for i, p in images.items() if i not in set(missing)}
            if not images:
                raise DataError(f"{img_dir}: no image has a mask in {mask_dir}")
        elif missing:
            raise DataError(
                f"{img_dir / images[missing[0]].name}: no mask for this image in {mask_dir} "
                f"({len(missing)} image(s) without a mask)"
            )
        elif orphans:
            raise DataError(f"{masks[orphans[0]]}: mask without an image in {img_dir}")
    return [Sample(id=i, image=images[i], mask=masks.get(i)) for i in sorted(images)]
