"""Reading images and masks of any common format into one canonical form, with errors that name the file.

- ``read_image``: (H, W, 3) uint8 RGB. Gray is replicated, RGBA drops alpha, 16-bit (or float) images are
  min-max scaled to 8 bits. Formats: whatever Pillow reads (PNG, JPEG, BMP, TIFF, ...), ``.npy``, and 2D
  DICOM (``.dcm``) and NIfTI (``.nii``, ``.nii.gz``) through MONAI's readers (rows = image y, as in
  SimpleITK and MedSAM's preprocessing).
- ``read_mask``: (H, W) uint8 in {0, 1}. Accepts 0/1 and 0/255 masks (any two levels whose lower one is 0);
  anything else (grey levels, more than two values) is a :class:`DataError`, unless a threshold is given
  (``data.mask_threshold``): then any mask is binarised, lesion where its value is ``>= threshold``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import UserInputError
from ..io_utils import atomic_write_bytes

# ".nii.gz" has a double suffix: match names with ``name.lower().endswith(ext)``, never ``Path.suffix``.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp", ".npy", ".dcm", ".nii",
                    ".nii.gz")


def split_image_name(name: str) -> tuple[str, str] | None:
    """(id, extension) of an image file name, matching whole extensions ("x.nii.gz" -> ("x", ".nii.gz")),
    or None when the name has no image extension."""
    ext = next((e for e in IMAGE_EXTENSIONS if name.lower().endswith(e)), None)
    return (name[: -len(ext)], ext) if ext is not None else None


class DataError(UserInputError):
    """Bad input data; the message names the file and the problem."""


def _open_medical(path: Path) -> np.ndarray:
    """A 2D DICOM or NIfTI image as an (H, W) or (H, W, C) array, read with MONAI's readers."""
    name = path.name.lower()
    dicom = name.endswith(".dcm")
    import importlib
    import warnings

    backend = "pydicom" if dicom else "nibabel"
    try:  # MONAI imports these lazily and would fail only inside read(); ask first, for a clear message
        importlib.import_module(backend)
    except ImportError as e:
        raise ImportError(f"{path}: reading {'DICOM' if dicom else 'NIfTI'} needs {backend} "
                          f"(pip install {backend}; it is a dependency of lesion-kd)") from e
    from monai.data import NibabelReader, PydicomReader

    # swap_ij=False keeps DICOM's (rows, columns) order; NIfTI is stored (x, y) and is transposed below
    reader = PydicomReader(swap_ij=False) if dicom else NibabelReader()
    try:
        with warnings.catch_warnings():
            # a 2D secondary-capture DICOM has no patient geometry; the affine is not used here
            warnings.filterwarnings("ignore", message=".*ImageOrientationPatient.*")
            arr, _ = reader.get_data(reader.read(str(path)))
    except Exception as e:  # noqa: BLE001 - pydicom/nibabel raise many types for a broken file
        raise DataError(f"{path}: corrupt or unreadable {'DICOM' if dicom else 'NIfTI'} file ({e})") from e
    arr = np.asarray(arr)
    while arr.ndim > 2 and arr.shape[-1] == 1:  # (x, y, 1) NIfTI slices, (rows, cols, 1) DICOM
        arr = arr[..., 0]
    if not dicom and arr.ndim >= 2:
        arr = np.swapaxes(arr, 0, 1)  # NIfTI (x, y[, c]) -> (rows = y, columns = x[, c])
    if arr.ndim == 3 and arr.shape[2] not in (3, 4):
        raise DataError(f"{path}: a 3D volume of shape {arr.shape}; only 2D images are read here "
                        "(slice volumes with 'lesion-kd data prepare-msd')")
    if arr.ndim not in (2, 3):
        raise DataError(f"{path}: unsupported {'DICOM' if dicom else 'NIfTI'} shape {arr.shape} (expected a 2D image)")
    return arr


def _open_array(path: str | os.PathLike) -> np.ndarray:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    if path.name.lower().endswith((".dcm", ".nii", ".nii.gz")):
        return _open_medical(path)
    if path.suffix.lower() == ".npy":
        try:
            return np.load(path, allow_pickle=False)
        except Exception as e:  # noqa: BLE001 - any failure means the file is unreadable
            raise DataError(f"{path}: unreadable .npy file ({e})") from e
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("P", "PA", "LA", "CMYK", "YCbCr", "HSV", "1"):
                im = im.convert("RGBA" if im.mode in ("PA",) else ("L" if im.mode in ("LA", "1") else "RGB"))
            return np.asarray(im)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{path}: corrupt or unreadable image ({e})") from e


def to_uint8_rgb(arr: np.ndarray, name: str = "image") -> np.ndarray:
    """Any (H, W), (H, W, 1|3|4) array of any numeric dtype -> (H, W, 3) uint8."""
    if arr.ndim == 3 and arr.shape[2] in (1, 3, 4):
        arr = arr[..., :3] if arr.shape[2] >= 3 else arr[..., 0]
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise DataError(f"{name}: unsupported image shape {arr.shape} (expected H x W, or H x W x 1/3/4)")
    if arr.dtype == np.uint8:
        return np.ascontiguousarray(arr)
    a = arr.astype(np.float64)
    if not np.isfinite(a).all():
        raise DataError(f"{name}: image contains NaN or infinite values")
    lo, hi = float(a.min()), float(a.max())
    scaled = (a - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(a)
    return np.ascontiguousarray(np.round(scaled).astype(np.uint8))


def read_image(path: str | os.PathLike) -> np.ndarray:
    """(H, W, 3) uint8 RGB image; raises :class:`DataError` naming ``path`` when it cannot."""
    return to_uint8_rgb(_open_array(path), str(path))


def read_mask(path: str | os.PathLike, threshold: float | None = None) -> np.ndarray:
    """(H, W) uint8 {0, 1} mask.

    Without ``threshold``: from a 0/1 or 0/255 (or 0/K) two-level mask file; grey levels (JPEG noise) are a
    :class:`DataError` naming the file. With ``threshold`` (``data.mask_threshold``): lesion where the value is
    ``>= threshold`` (on the file's own scale: 0-255 for 8-bit files, 0-65535 for 16-bit ones); a colour mask
    is reduced to its luma first (0.299 R + 0.587 G + 0.114 B, as Pillow's ``convert("L")``), so slightly
    differing channels of a colour JPEG are no error.
    """
    arr = _open_array(path)
    if threshold is not None:
        if arr.ndim == 3:
            arr = arr[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114]) if arr.shape[2] >= 3 else arr[..., 0]
        if arr.ndim != 2:
            raise DataError(f"{path}: unsupported mask shape {arr.shape}")
        return (arr >= threshold).astype(np.uint8)
    if arr.ndim == 3:
        if arr.shape[2] == 4:
            arr = arr[..., :3]
        if not all(np.array_equal(arr[..., 0], arr[..., c]) for c in range(1, arr.shape[2])):
            raise DataError(f"{path}: mask has differing colour channels; expected a single-channel 0/1 or 0/255 mask "
                            "(or set data.mask_threshold T to binarise it at >= T)")
        arr = arr[..., 0]
    if arr.ndim != 2:
        raise DataError(f"{path}: unsupported mask shape {arr.shape}")
    values = np.unique(arr)
    if len(values) > 2 or (len(values) == 2 and values[0] != 0) or (len(values) == 1 and values[0] not in (0, 1, 255)):
        shown = ", ".join(str(v) for v in values[:6]) + (", ..." if len(values) > 6 else "")
        raise DataError(
            f"{path}: mask has values {{{shown}}}; expected two levels (0/1 or 0/255). "
            "For grey-level or JPEG-compressed masks set data.mask_threshold T (lesion where the value is >= T, "
            "e.g. 128 for 0-255 masks)."
        )
    return (arr > 0).astype(np.uint8)


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(H, W) of an image file without decoding its pixels (header only for Pillow formats)."""
    path = Path(path)
    if path.name.lower().endswith((".npy", ".dcm", ".nii", ".nii.gz")):  # no cheap header path for these
        return tuple(_open_array(path).shape[:2])  # type: ignore[return-value]
    try:
        with Image.open(path) as im:
            w, h = im.size
            return h, w
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(f"{path}: corrupt or unreadable image ({e})") from e


def write_png(path: str | os.PathLike, arr: np.ndarray) -> None:
    """Atomically write a uint8 array as PNG."""
    import io

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
