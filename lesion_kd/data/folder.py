"""A lesion dataset on disk: ``images/<id>.<ext>`` and ``masks/<id>[<suffix>].<ext>``, matched by file stem.

A mask is found under the image's id alone or with one of :data:`MASK_SUFFIXES` (``<id>_mask.png``, ISIC's
``<id>_segmentation.png``, PH2's ``<id>_lesion.bmp``), with any image extension.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .io import IMAGE_EXTENSIONS, DataError, split_image_name

#: what may follow an image's id in its mask's file name (besides nothing): common mask-naming conventions
MASK_SUFFIXES = ("_mask", "_segmentation", "_lesion")


def mask_name_patterns() -> str:
    """The accepted mask names, for messages: ``<id>.<ext>, <id>_mask.<ext>, ...``."""
    return ", ".join(f"<id>{s}.<ext>" for s in ("", *MASK_SUFFIXES))


@dataclass(frozen=True)
class Sample:
    """One image of a dataset. ``mask`` is None for unlabeled images; ``group`` stratifies splits;
    ``mask_threshold`` (``data.mask_threshold``) binarises a grey-level mask at ``>= mask_threshold``
    (None: the mask must have two levels already, see :func:`lesion_kd.data.io.read_mask`)."""

    id: str
    image: Path
    mask: Path | None = None
    group: str | None = None
    mask_threshold: float | None = None


def _index(folder: Path) -> dict[str, Path]:
    """``{file stem: path}`` of the image files of ``folder``; two files of one stem are an error."""
    files: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        # match whole suffixes, not Path.suffix: "x.nii.gz" has the extension ".nii.gz" and the id "x"
        parts = split_image_name(p.name)
        if p.name.startswith(".") or not p.is_file() or parts is None:
            continue
        stem = parts[0]
        if stem in files:
            raise DataError(f"{folder}: two files share the id {stem!r}: {files[stem].name} and {p.name}")
        files[stem] = p
    return files


def _match_masks(images: dict[str, Path], by_stem: dict[str, Path], mask_dir: Path) -> dict[str, Path]:
    """``{image id: mask path}``: each image's mask under its id or its id with a suffix of MASK_SUFFIXES."""
    masks: dict[str, Path] = {}
    for i in images:
        found = [by_stem[i + s] for s in ("", *MASK_SUFFIXES) if i + s in by_stem]
        if len(found) > 1:
            raise DataError(f"{mask_dir}: two masks for the image {images[i].name}: "
                            f"{' and '.join(p.name for p in found)}")
        if found:
            masks[i] = found[0]
    return masks


def _found_masks(mask_dir: Path, unmatched: list[Path], limit: int = 3) -> str:
    """What ``mask_dir`` holds, for the missing-mask message: a few of its files none of the images took."""
    names = [p.name for p in unmatched] or sorted(p.name for p in mask_dir.iterdir() if not p.name.startswith("."))
    if not names:
        return f"{mask_dir} holds no files"
    shown = ", ".join(names[:limit]) + (", ..." if len(names) > limit else "")
    which = "files no image matched" if unmatched else "files"
    return f"{mask_dir} holds {len(names)} {which}: {shown}"


def scan_folder(root: str | Path, require_masks: bool = True, skipped: list[str] | None = None) -> list[Sample]:
    """List the samples of ``root`` (a folder with ``images/`` and ``masks/``), sorted by id.

    Raises :class:`DataError` naming the folder or file for a missing folder, an empty folder, an image
    without a mask (when ``require_masks``; the message lists the accepted mask names and a few files that
    ``masks/`` does hold) or a mask without an image. Given a ``skipped`` list (``data.on_bad_sample=skip``),
    an image without a mask is left out and its message appended there instead, and a mask without an image
    is ignored the same way.
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
    orphans: list[Path] = []
    if mask_dir.is_dir():
        by_stem = _index(mask_dir)
        masks = _match_masks(images, by_stem, mask_dir)
        taken = set(masks.values())
        orphans = [p for p in by_stem.values() if p not in taken]
    elif require_masks:
        raise DataError(f"{root}: no masks/ folder (expected images/ and masks/)")
    if require_masks:
        missing = [i for i in images if i not in masks]
        if skipped is not None:
            skipped += [f"{images[i]}: no mask for this image in {mask_dir}" for i in missing]
            skipped += [f"{p}: mask without an image in {img_dir}" for p in orphans]
            images = {i: p for i, p in images.items() if i not in set(missing)}
            if not images:
                raise DataError(f"{img_dir}: no image has a mask in {mask_dir} (mask names accepted: "
                                f"{mask_name_patterns()}; {_found_masks(mask_dir, orphans)})")
        elif missing:
            raise DataError(
                f"{img_dir / images[missing[0]].name}: no mask for this image in {mask_dir} "
                f"({len(missing)} image(s) without a mask). Mask names accepted: {mask_name_patterns()} "
                f"(<id> = {missing[0]!r}; <ext> any image extension); {_found_masks(mask_dir, orphans)}"
            )
        elif orphans:
            raise DataError(f"{orphans[0]}: mask without an image in {img_dir}")
    return [Sample(id=i, image=images[i], mask=masks.get(i)) for i in sorted(images)]
