"""LightningModules: one shared base (``SegmentationModule``) and one file per method."""

from .base import SegmentationModule
from .semikd import SemiKDModule, load_student
from .supervised import Supervised

__all__ = ["SegmentationModule", "SemiKDModule", "Supervised", "load_student"]
