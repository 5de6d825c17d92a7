"""Trained students shipped inside the package, usable by name: ``lesion-kd segment --model kvasir-seg``.

Each model is three files in this folder: ``<name>.pt`` (the weights: a minimal lesion-kd checkpoint, the
student's ``net.*`` tensors in float16 where that is lossless enough, plus the hyper-parameters that
rebuild it; loadable by :func:`lesion_kd.models.loading.load_student`, ``lesion-kd segment`` and
``lesion-kd export --ckpt``), ``<name>.md`` (its model card) and an entry of ``index.json`` (the card's facts,
machine-readable: what this module and ``lesion-kd segment --list-models`` read). Both the card and the
index entry are written by :mod:`lesion_kd.pretrained.build` from the training run, never by hand.

Standard library only (json, pathlib): listing and resolving names imports neither torch nor numpy.
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path
from typing import Any

__all__ = [
    "INDEX_NAME",
    "PRETRAINED_DIR",
    "UnknownModelError",
    "format_table",
    "get_model",
    "list_models",
    "model_card_path",
    "model_path",
    "names",
    "resolve_model",
    "verify_sha256",
]

PRETRAINED_DIR = Path(__file__).resolve().parent
INDEX_NAME = "index.json"


class UnknownModelError(ValueError):
    """A ``--model`` value that is neither an existing file nor the name of a shipped model."""


@lru_cache(maxsize=1)
def _index(path: str) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def list_models() -> list[dict[str, Any]]:
    """The shipped models' index entries, in index order (empty when the package ships none)."""
    path = PRETRAINED_DIR / INDEX_NAME
    if not path.is_file():
        return []
    return list(_index(str(path)).get("models", []))


def names() -> list[str]:
    return [m["name"] for m in list_models()]


def get_model(name: str) -> dict[str, Any]:
    """The index entry of the shipped model ``name``; :class:`UnknownModelError` listing the shipped names."""
    for m in list_models():
        if m["name"] == name:
            return m
    shipped = ", ".join(names()) or "none"
    raise UnknownModelError(f"--model {name}: not a file, and not the name of a shipped model (shipped: {shipped}; "
                            "lesion-kd segment --list-models describes them)")


def model_path(name: str) -> Path:
    """The weights file of the shipped model ``name``."""
    return PRETRAINED_DIR / get_model(name)["file"]


def model_card_path(name: str) -> Path:
    """The Markdown model card of the shipped model ``name``."""
    return PRETRAINED_DIR / get_model(name)["card"]


def resolve_model(value: str) -> Path:
    """What a ``--model`` value names: an existing file as given, else a shipped model's weights file.

    A file always wins over a shipped name (a file called ``kvasir-seg`` in the working directory is that
    file). Raises :class:`UnknownModelError` (a ValueError) naming the shipped models when it is neither.
    """
    path = Path(value).expanduser()
    if path.is_file():
        return path
    if path.exists():
        raise FileNotFoundError(f"--model {value}: not a file")
    weights = model_path(value)
    if not weights.is_file():  # a broken install: the index without its weights
        raise FileNotFoundError(f"--model {value}: the shipped weights {weights} are missing from this installation")
    return weights


def verify_sha256(name: str) -> bool:
    """True when the shipped weights of ``name`` hash to the index's sha256."""
    entry = get_model(name)
    digest = hashlib.sha256((PRETRAINED_DIR / entry["file"]).read_bytes()).hexdigest()
    return digest == entry["sha256"]


def format_table(models: list[dict[str, Any]] | None = None) -> str:
    """The ``--list-models`` table: name, dataset, test Dice and HD95, input size, file size, licence note."""
    models = list_models() if models is None else models
    if not models:
        return "no pretrained models are shipped with this installation"
    header = ("name", "dataset", "test Dice", "HD95 px", "input", "size", "licence / terms")
    rows = []
    for m in models:
        t = m["test"]
        rows.append((m["name"], m["dataset_title"], f"{100 * t['dice']:.2f}", f"{t['hd95']:.1f}",
                     f"{m['image_size']}x{m['image_size']}", f"{m['bytes'] / 1e6:.1f} MB", m["licence"]["short"]))
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:-1], widths, strict=True)) + "  " + r[-1] for r in [header, *rows]]
    lines.append("")
    lines.append("Research use only, not a medical device. Test Dice/HD95: the model's test split at its input size "
                 "(model cards: " + str(PRETRAINED_DIR) + "/<name>.md).")
    return "\n".join(lines)
