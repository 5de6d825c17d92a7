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
from .teacher_readout import TeacherReadout
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
    "TeacherReadout",
    "UAMT",
    "URPC",
    "display_names",
    "load_student",
]


def display_names() -> dict[str, str]:
    """Each method's name in the README's and the report's tables, by its results name (the ``method`` of a
    result), variants included: ``{"mean_teacher": "Mean Teacher", "semikd_sup": "SemiKD ablation: L_sup only",
    ...}``. From the classes' ``display_name`` (a class that sets none, e.g. a subclass of another method, is
    named by its ``method_name``, never by its parent's name) and ``variant_display_names``."""
    out: dict[str, str] = {}
    for name in __all__:
        cls = globals().get(name)
        if isinstance(cls, type) and issubclass(cls, SegmentationModule) and cls is not SegmentationModule:
            out[cls.method_name] = cls.__dict__.get("display_name") or cls.method_name
            out.update(cls.__dict__.get("variant_display_names", {}))
    return out
