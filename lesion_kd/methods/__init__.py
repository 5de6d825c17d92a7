"""LightningModules: one shared base (``SegmentationModule``) and one file per method.

``load_student`` (the plain network of any method's checkpoint) lives in :mod:`lesion_kd.models.loading`; it is
re-exported here for the callers of ``lesion_kd.methods.load_student``.
"""

from ..models.loading import load_student
from .bapc import BaPC
from .base import SegmentationModule
from .bcp import BCP
from .caussl import CauSSL
from .cct import CCT
from .cpc_sam import CPCSAM
from .cps import CPS
from .damtn import DAMTN
from .mcnet_plus import MCNetPlus
from .mean_teacher import MeanTeacher
from .sassnet import SASSNet
from .semikd import SemiKDModule
from .semisam_mt import SemiSAMMT
from .supervised import Supervised
from .ua_mt import UAMT
from .urpc import URPC

__all__ = [
    "BCP",
    "BaPC",
    "CCT",
    "CauSSL",
    "CPCSAM",
    "CPS",
    "DAMTN",
    "MCNetPlus",
    "MeanTeacher",
    "SASSNet",
    "SegmentationModule",
    "SemiKDModule",
    "SemiSAMMT",
    "Supervised",
    "UAMT",
    "URPC",
    "load_student",
]
