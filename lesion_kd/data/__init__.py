"""Datasets (folder reader, registry), splits, weak/strong views, and ``LesionDataModule``."""

from .datamodule import LesionDataModule
from .folder import Sample, scan_folder
from .io import DataError, read_image, read_mask
from .transforms import AugmentationConfig

__all__ = ["AugmentationConfig", "DataError", "LesionDataModule", "Sample", "read_image", "read_mask", "scan_folder"]
