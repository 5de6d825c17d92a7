"""SemiKD's loss terms as separate, individually tested units (the supervised loss lives in the method base).

- ``pckd``: perturbation-consistent cross-architecture KD (``PCKDLoss``; its parts ``Projector``,
  ``feature_map_loss``, ``relation_loss``, ``FeaturePerturbation``, ``response_loss``; the ``FeatureKD`` ablation).
- ``dss``: distribution-based self-supervision (``DSSLoss``; its parts ``class_balanced_consistency``,
  ``DistributionAlignment``, ``contrast_loss``).
- ``pl``: the teacher's pseudo-labels, confidence-weighted (``pseudo_label_loss``; SemiKD+).
"""

from .dss import DistributionAlignment, DSSLoss, class_balanced_consistency, contrast_loss
from .pckd import (
    PCKD_MODES,
    PERTURBATION_KINDS,
    FeatureKD,
    FeaturePerturbation,
    PCKDLoss,
    PerturbationDraw,
    Projector,
    feature_map_loss,
    relation_loss,
    resize_features,
    response_loss,
)
from .pl import confidence_weights, pseudo_label_loss

__all__ = [
    "PCKD_MODES",
    "PERTURBATION_KINDS",
    "DSSLoss",
    "DistributionAlignment",
    "FeatureKD",
    "FeaturePerturbation",
    "PCKDLoss",
    "PerturbationDraw",
    "Projector",
    "class_balanced_consistency",
    "confidence_weights",
    "contrast_loss",
    "feature_map_loss",
    "pseudo_label_loss",
    "relation_loss",
    "resize_features",
    "response_loss",
]
