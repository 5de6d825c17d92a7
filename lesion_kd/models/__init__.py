"""Networks only (no training logic): the reference U-Net, the Mamba student, CPC-SAM's SAM-LoRA network,
the MedSAM teachers, and loading the plain network of any method's checkpoint (``load_student``).

``build_model(name)`` / ``build_teacher(name)`` look them up by name; importing this package registers them all.
"""

from . import (
    mamba_unet,  # noqa: F401  (registers "mamba_unet")
    readout,  # noqa: F401  (registers "litemedsam": the head of the teacher's read-out)
    sam_lora,  # noqa: F401  (registers "sam_lora")
    teacher,  # noqa: F401  (registers "litemedsam", "medsam")
    unet,  # noqa: F401  (registers "unet")
)
from .loading import load_student
from .registry import build_model, build_teacher, list_models, list_teachers, register_model, register_teacher
from .scan import selective_scan

__all__ = [
    "build_model",
    "build_teacher",
    "list_models",
    "list_teachers",
    "load_student",
    "register_model",
    "register_teacher",
    "selective_scan",
]
