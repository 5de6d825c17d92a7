"""lesion-kd: semi-supervised 2D lesion segmentation with a frozen MedSAM teacher and a Mamba student."""

__version__ = "0.1.0"
