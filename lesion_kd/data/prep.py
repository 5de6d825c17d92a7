"""Decode, validate and resize every image once; keep the canonical (model-size) copy in a cache.

Kvasir-SEG's JPEGs are up to 1920x1072: decoding them at every step would cost more than a small
network's training step on two CPU cores. So at set-up each used sample is read, checked (readable,
mask present, same size, two levels, or binarised at ``data.mask_threshold``) and squashed to ``size x size`` (the *canonical image*, the frame of
reference of all view geometry), then stored as an ``.npz`` under the cache directory, keyed by the source
files' size and modification time. Later runs only read the small files. Nothing is written into the
dataset folder.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import warnings
import zipfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from .folder import Sample
from .io import DataError, atomic_write_bytes, read_image, read_mask

log = logging.getLogger(__name__)
CACHE_ENV = "LESION_KD_CACHE"


def cache_root(explicit: str | os.PathLike | None = None) -> Path:
    """Cache directory: ``explicit``, else ``$LESION_KD_CACHE``, else ``~/.cache/lesion_kd``."""
    return Path(explicit or os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "lesion_kd").expanduser()


def _stamp(path: Path | None) -> str:
    if path is None:
        return "none"
    st = path.stat()
    return f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"


def entry_path(root: Path, sample: Sample, size: int) -> Path:
    # a thresholded mask (data.mask_threshold) is another mask: its own entry (none: the keys of before)
    thr = "" if sample.mask is None or sample.mask_threshold is None else f"|t{float(sample.mask_threshold)!r}"
    key = hashlib.sha1(f"{_stamp(sample.image)}|{_stamp(sample.mask)}|{size}|v1{thr}".encode()).hexdigest()[:20]
    return root / "prep" / f"{size}" / key[:2] / f"{key}.npz"


def resize_image(img: np.ndarray, size: int) -> np.ndarray:
    """Squash (H, W, 3) uint8 to (size, size, 3) (area interpolation when shrinking)."""
    import cv2

    interp = cv2.INTER_AREA if min(img.shape[:2]) > size else cv2.INTER_LINEAR
    return cv2.resize(img, (size, size), interpolation=interp)


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """Squash an (H, W) {0,1} mask to (size, size) by thresholding its area-averaged value at 0.5."""
    import cv2

    m = cv2.resize(mask.astype(np.float32), (size, size), interpolation=cv2.INTER_AREA if min(mask.shape) > size else cv2.INTER_LINEAR)
    return (m >= 0.5).astype(np.uint8)


def load_and_check(sample: Sample) -> tuple[np.ndarray, np.ndarray | None]:
    """Read a sample's image and mask; :class:`DataError` naming the file for any problem."""
    img = read_image(sample.image)
    mask = None
    if sample.mask is not None:
        mask = read_mask(sample.mask, sample.mask_threshold)
        if mask.shape != img.shape[:2]:
            raise DataError(
                f"{sample.mask}: mask is {mask.shape[1]}x{mask.shape[0]} (WxH) but its image "
                f"{sample.image.name} is {img.shape[1]}x{img.shape[0]}"
            )
    return img, mask


@dataclass
class Canonical:
    """A sample at model size: image (S, S, 3) uint8, mask (S, S) uint8 {0,1} or None, original (H, W)."""

    image: np.ndarray
    mask: np.ndarray | None
    orig_hw: tuple[int, int]


def _prepare_one(args: tuple[Sample, int, str]) -> tuple[str, str | None]:
    sample, size, out = args
    try:
        img, mask = load_and_check(sample)
    except DataError as e:
        return sample.id, str(e)
    arrays = {"image": resize_image(img, size), "orig_hw": np.array(img.shape[:2], dtype=np.int32)}
    if mask is not None:
        arrays["mask"] = resize_mask(mask, size)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(out, buf.getvalue())
    return sample.id, None


def prepare_samples(
    samples: list[Sample], size: int, cache_dir: str | os.PathLike | None = None, on_bad_sample: str = "error",
    workers: int = 0, desc: str = "preparing images",
) -> tuple[list[Sample], list[str]]:
    """Make sure every sample has a canonical cache entry; return (good samples, problems).

    With ``on_bad_sample="error"`` the first bad sample raises its :class:`DataError` (before any
    training); with ``"skip"`` bad samples are dropped with a warning and their messages returned.
    """
    root = cache_root(cache_dir)
    todo = [(s, size, str(entry_path(root, s, size))) for s in samples]
    todo = [t for t in todo if not Path(t[2]).is_file()]
    problems: dict[str, str] = {}
    if todo:
        it = (
            ProcessPoolExecutor(workers).map(_prepare_one, todo, chunksize=8) if workers > 1 and len(todo) > 32
            else map(_prepare_one, todo)
        )
        for sid, err in tqdm(it, total=len(todo), desc=desc, disable=len(todo) < 50):
            if err is not None:
                if on_bad_sample == "error":
                    raise DataError(err)
                problems[sid] = err
    if problems:
        warnings.warn(f"skipped {len(problems)} bad sample(s); first: {next(iter(problems.values()))}", stacklevel=2)
    return [s for s in samples if s.id not in problems], list(problems.values())


def load_canonical(sample: Sample, size: int, cache_dir: str | os.PathLike | None = None) -> Canonical:
    """Read a prepared sample, preparing it again when its entry is missing or damaged (truncated, garbled,
    not a zip, a member missing): a damaged entry is rebuilt from the source files with a warning naming it."""
    path = entry_path(cache_root(cache_dir), sample, size)
    for attempt in range(2):
        try:
            with np.load(path) as z:
                return Canonical(z["image"], z["mask"] if "mask" in z else None, tuple(int(v) for v in z["orig_hw"]))
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
            if attempt:
                raise DataError(f"{path}: unreadable cache entry for {sample.image} ({e})") from e
            if path.is_file():
                warnings.warn(f"{path}: damaged cache entry for {sample.image} ({type(e).__name__}: {e}); rebuilt",
                              RuntimeWarning, stacklevel=2)
            _, err = _prepare_one((sample, size, str(path)))
            if err:
                raise DataError(err) from None
    raise AssertionError("unreachable")
