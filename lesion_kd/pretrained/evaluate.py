"""The shipped models' own check: Dice of a student on named test images through ``lesion-kd segment``'s path.

Every image is read, squashed to the model's input size, segmented, and its softmax resized back to the
image's own size before the arg-max (:func:`lesion_kd.deploy.segment.predict_masks`, what ``segment``
writes); the mask is compared with the ground truth at that original resolution. Used by
:mod:`lesion_kd.pretrained.build` (the figure on each model card) and by tests/test_pretrained.py (which
recomputes it from the shipped weights).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["committed_test_ids", "dataset_samples", "dice", "fixed_eval_ids", "segment_dice"]

FIXED_EVAL_COUNT = 20
FIXED_EVAL_RULE = "the first 20 ids of the committed test split, sorted (experiments/splits/{split_file})"


def fixed_eval_ids(test_ids: Sequence[str], n: int = FIXED_EVAL_COUNT) -> list[str]:
    """The fixed images of a model card: the first ``n`` test ids, sorted as strings."""
    return sorted(test_ids)[:n]


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """Dice of two {0, 1} masks; 1.0 when both are empty."""
    p, g = pred.astype(bool), gt.astype(bool)
    denom = int(p.sum()) + int(g.sum())
    return 1.0 if denom == 0 else 2.0 * int((p & g).sum()) / denom


def dataset_samples(dataset: str, ids: Sequence[str], data_root: str | os.PathLike | None = None) -> list[Any]:
    """The :class:`~lesion_kd.data.folder.Sample` of each id of a registry dataset (lesion images only),
    found under ``data_root`` (default: ``$LESION_KD_DATA``); FileNotFoundError when the folder is missing."""
    from ..data.registry import DATASETS, data_dir

    spec = DATASETS[dataset]
    root = data_dir(data_root) / spec.folder
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: the {dataset} folder is not here (set $LESION_KD_DATA)")
    by_id = {s.id: s for s in spec.samples(root, False)}
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise FileNotFoundError(f"{root}: {len(missing)} of the ids are missing, e.g. {missing[0]}")
    return [by_id[i] for i in ids]


def segment_dice(model: str | os.PathLike | Any, dataset: str, ids: Sequence[str],
                 data_root: str | os.PathLike | None = None, batch_size: int = 8, threads: int | None = None,
                 device: str = "cpu") -> dict[str, Any]:
    """Mean and per-image Dice of ``model`` (a path, a shipped name or an open Predictor) on the test images
    ``ids`` of ``dataset``, at each image's own resolution, through ``segment``'s preprocessing."""
    from ..data.prep import load_and_check
    from ..deploy.segment import Predictor, open_model, predict_masks

    predictor = model if isinstance(model, Predictor) else open_model(model, threads=threads, device=device)
    samples = dataset_samples(dataset, ids, data_root)
    per_image: dict[str, float] = {}
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        pairs = [load_and_check(s) for s in chunk]
        masks = predict_masks(predictor, [img for img, _ in pairs])
        for s, (_, gt), (pred, _) in zip(chunk, pairs, masks, strict=True):
            per_image[s.id] = dice(pred, gt)
    return {"mean_dice": float(np.mean(list(per_image.values()))), "n_images": len(per_image),
            "per_image": per_image, "image_size": predictor.image_size}


def committed_test_ids(split_file: str | os.PathLike) -> list[str]:
    """The test ids of a committed split file (experiments/splits/<name>_v1.json)."""
    import json

    return list(json.loads(Path(split_file).read_text())["splits"]["test"])
