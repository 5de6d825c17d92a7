"""The plain network of any method's checkpoint: what deployment, the report's qualitative grid and the
benchmarks load (no teacher, projector or training code, and nothing of :mod:`lesion_kd.methods`)."""

from __future__ import annotations

import pickle

import torch
import torch.nn as nn

from .registry import build_model

__all__ = ["load_student"]


def load_student(ckpt_path: str, map_location: str | torch.device = "cpu") -> nn.Module:
    """The plain student network of any method's checkpoint (no teacher, projector or training code).

    Loads with ``weights_only=True``: nothing pickled is executed. The network is built by the name the
    checkpoint's hyperparameters record (``network``), from the registry that ``import lesion_kd.models``
    fills with every network (SAM-LoRA included).
    """
    try:
        ckpt = torch.load(ckpt_path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"{ckpt_path}: refused: the file holds pickled objects beyond tensors and plain containers, whose "
            f"loading could run code ({str(e).splitlines()[0][:200]}). Load it only if you trust its source, "
            "and re-save its state_dict."
        ) from None
    hp = ckpt.get("hyper_parameters", {})
    net = build_model(hp.get("network", "unet"), in_channels=hp.get("in_channels", 3),
                      num_classes=hp.get("num_classes", 2), **(hp.get("network_kwargs") or {}))
    state = {k[len("net."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}
    net.load_state_dict(state, strict=True)
    return net.eval()
