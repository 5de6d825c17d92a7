"""Box-refined pseudo-labels: the teacher's mask decoder, prompted by the box of its read-out's prediction.

SemiKD+ (``SemiKDModule(pl_refine="box")``, issue 28). The read-out head on the frozen teacher embedding
labels an unlabeled image; the bounding box of that label's largest connected component prompts the teacher's
own prompt encoder and mask decoder (LiteMedSAM's), whose mask is the refined pseudo-label. The ground truth
is never used. On Kvasir-SEG at 10% labels this lifts the labels of 100 unlabeled training images from 74.44
to 78.86 Dice against their hidden masks (``benchmarks/pseudo_labels.py``, ``benchmarks/README.md``).

Everything here works on the *canonical* image (the whole image squashed onto the ``size x size`` grid of
:mod:`lesion_kd.data.geometry`): a refined label is stored once per image and brought onto each augmented view
by the view's recorded geometry, as the cached teacher embedding is. Written by hand: no library ships a
"prompt SAM with the box of a coarse mask" step.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
import torch


def largest_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """x0, y0, x1, y1 (exclusive ends, in pixels) of the largest 8-connected component of a {0,1} mask, or
    None when the mask is empty."""
    n, _, stats, _ = cv2.connectedComponentsWithStats(np.ascontiguousarray(mask, dtype=np.uint8), connectivity=8)
    if n <= 1:
        return None
    k = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    x, y, w, h = (int(v) for v in stats[k, :4])
    return x, y, x + w, y + h


def canonical_box_to_input(box: tuple[int, int, int, int], size: int, image_hw: tuple[int, int]) -> torch.Tensor:
    """A box on the canonical ``size x size`` grid -> (1, 4) float box in the image's own pixels (x0 y0 x1 y1)."""
    H, W = image_hw
    sx, sy = W / size, H / size
    x0, y0, x1, y1 = box
    return torch.tensor([[x0 * sx, y0 * sy, x1 * sx, y1 * sy]], dtype=torch.float32)


@torch.no_grad()
def refine_with_boxes(teacher, frames: Sequence[tuple[torch.Tensor, tuple[int, int], tuple[int, int]]],
                      probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Box-refine canonical lesion probabilities.

    teacher: a SAM-family teacher (``decode_boxes``); frames: each image's prompt frame
    (:meth:`lesion_kd.teacher_cache.PromptFrameCache.prompt_frame`); probs: (N, S, S) the read-out's lesion
    probabilities on the canonical grid. Returns the refined (N, S, S) float32 probabilities and a (N,) bool
    tensor, True where the image was refined; an image whose read-out predicts no lesion keeps its read-out.
    """
    if probs.ndim != 3 or probs.shape[-1] != probs.shape[-2] or len(frames) != probs.shape[0]:
        raise ValueError(f"refine_with_boxes: expected {len(frames)} square (S, S) maps, got {tuple(probs.shape)}")
    size = probs.shape[-1]
    out = probs.detach().float().cpu().clone()
    refined = torch.zeros(len(frames), dtype=torch.bool)
    masks = (out >= 0.5).numpy().astype(np.uint8)
    for i, frame in enumerate(frames):
        box = largest_box(masks[i])
        if box is None:
            continue
        p = teacher.decode_boxes(frame, canonical_box_to_input(box, size, frame[2]), size=(size, size))
        out[i] = p[0, 0].float().cpu()
        refined[i] = True
    return out, refined
