"""LightningModules: one shared base (``SegmentationModule``) and one file per method."""

from .base import SegmentationModule
from .supervised import Supervised

__all__ = ["SegmentationModule", "Supervised"]
