"""LightningModules: one shared base (``SegmentationModule``) and one file per method."""

from .base import SegmentationModule
from .bcp import BCP
from .cct import CCT
from .cps import CPS
from .mcnet_plus import MCNetPlus
from .mean_teacher import MeanTeacher
from .semikd import SemiKDModule, load_student
from .supervised import Supervised
from .ua_mt import UAMT
from .urpc import URPC

__all__ = [
    "BCP",
    "CCT",
    "CPS",
    "MCNetPlus",
    "MeanTeacher",
    "SegmentationModule",
    "SemiKDModule",
    "Supervised",
    "UAMT",
    "URPC",
    "load_student",
]
