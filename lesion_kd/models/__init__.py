"""Networks only (no training logic): the reference U-Net, the Mamba student, the MedSAM teachers.

``build_model(name)`` / ``build_teacher(name)`` look them up by name.
"""

from . import (
    mamba_unet,  # noqa: F401  (registers "mamba_unet")
    teacher,  # noqa: F401  (registers "litemedsam", "medsam")
    unet,  # noqa: F401  (registers "unet")
)
from .registry import build_model, build_teacher, list_models, list_teachers, register_model, register_teacher
from .scan import selective_scan

__all__ = [
    "build_model",
    "build_teacher",
    "list_models",
    "list_teachers",
    "register_model",
    "register_teacher",
    "selective_scan",
]
