"""Name -> constructor registries for networks and teachers (timm's ``create_model`` idea, kept tiny).

Every segmentation network registered here follows one interface, which distillation and the
multi-decoder baselines rely on::

    feats = net.encode(x)        # list[Tensor], skip features, deepest last
    logits = net.decode(feats)   # (B, num_classes, H, W)
    net(x) == net.decode(net.encode(x))

and takes ``in_channels`` and ``num_classes`` keyword arguments.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch.nn as nn

_MODELS: dict[str, Callable[..., nn.Module]] = {}
_TEACHERS: dict[str, Callable[..., nn.Module]] = {}


def _register(table: dict[str, Callable[..., nn.Module]], kind: str, name: str):
    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in table:
            raise ValueError(f"{kind} {name!r} is registered twice")
        table[name] = fn
        return fn

    return deco


def register_model(name: str):
    """Decorator: register a segmentation network constructor under ``name``."""
    return _register(_MODELS, "network", name)


def register_teacher(name: str):
    """Decorator: register a frozen teacher constructor under ``name``."""
    return _register(_TEACHERS, "teacher", name)


def list_models() -> list[str]:
    return sorted(_MODELS)


def list_teachers() -> list[str]:
    return sorted(_TEACHERS)


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered segmentation network by name, e.g. ``build_model("unet", num_classes=2)``."""
    if name not in _MODELS:
        raise ValueError(f"unknown network {name!r}; registered networks: {', '.join(list_models())}")
    return _MODELS[name](**kwargs)


def build_teacher(name: str = "litemedsam", **kwargs: Any) -> nn.Module:
    """Build a registered frozen teacher by name, e.g. ``build_teacher("medsam", checkpoint=PATH)``."""
    if name not in _TEACHERS:
        raise ValueError(f"unknown teacher {name!r}; registered teachers: {', '.join(list_teachers())}")
    return _TEACHERS[name](**kwargs)
