"""Datasets (folder reader, registry), splits, weak/strong views, and ``LesionDataModule``.

The names below are imported on first use (module ``__getattr__``): ``LesionDataModule`` pulls in
Lightning and torch, which the reading helpers (``lesion_kd.data.io``, ``lesion_kd.data.prep``) and
the torch-free inference path (:mod:`lesion_kd.deploy.segment`) must not pay for.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .io import DataError, read_image, read_mask

if TYPE_CHECKING:
    from .datamodule import LesionDataModule
    from .folder import Sample, scan_folder
    from .transforms import AugmentationConfig

__all__ = ["AugmentationConfig", "DataError", "LesionDataModule", "Sample", "read_image", "read_mask", "scan_folder"]

_LAZY = {
    "LesionDataModule": ".datamodule",
    "Sample": ".folder",
    "scan_folder": ".folder",
    "AugmentationConfig": ".transforms",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
