"""Are the teacher's pseudo-labels worth distilling? Their Dice on the unlabeled training images (issue 28).

Before any long run of a method that trains the student on teacher pseudo-labels, this measures them against
the hidden masks of the unlabeled training images (masks the method never sees): per image, at the suite's
evaluation grid (the canonical ``size x size`` image, as every table's Dice).

- ``head``: the teacher's read-out (a ``teacher`` cell's checkpoint: the head on the cached LiteMedSAM embedding,
  fitted on the labeled images only), thresholded at 0.5;
- ``box``: LiteMedSAM's own prompt encoder and mask decoder, prompted by the bounding box of the head's
  prediction (its largest connected component; the ground truth is never used), thresholded at 0.5; an image
  where the head predicts nothing keeps the empty mask;
- ``gt box`` (with ``--gt-box``): the same decoder prompted by the ground-truth box: an upper bound of the
  decoder, not a pseudo-label;
- ``confident``: the head's pixels with probability outside [0.1, 0.9] only (the share kept, and their
  accuracy), what a confidence-weighted loss would mostly learn from.

The box refinement runs the teacher's image encoder again (the decoder needs its padded-frame embedding), about
1.3-3 s an image on this CPU, so ``--n`` picks a seeded subset of the unlabeled images. One thread::

    OMP_NUM_THREADS=1 python benchmarks/pseudo_labels.py --dataset kvasir-seg --labeled-fraction 0.1 --seed 0 \\
        --checkpoint RUN/checkpoints/best-N.ckpt --n 100 --gt-box
"""

from __future__ import annotations

import argparse
import json
import random

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from lesion_kd.data.datamodule import LesionDataModule
from lesion_kd.data.io import read_image
from lesion_kd.data.prep import load_canonical, resize_mask
from lesion_kd.models import build_teacher, load_student
from lesion_kd.pseudo_labels import canonical_box_to_input, largest_box, refine_with_boxes
from lesion_kd.teacher_cache import PromptFrameCache, TeacherEmbeddingCache


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    total = pred.sum() + truth.sum()
    return 1.0 if total == 0 else float(2 * (pred & truth).sum() / total)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", default="kvasir-seg")
    ap.add_argument("--labeled-fraction", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0, help="the label seed (which training images are labeled)")
    ap.add_argument("--checkpoint", required=True, help="a teacher cell's checkpoint (the read-out head)")
    ap.add_argument("--size", type=int, default=160, help="the evaluation grid (the cpu profile's 160)")
    ap.add_argument("--n", type=int, default=100, help="unlabeled images to measure (a seeded subset; 0: all)")
    ap.add_argument("--gt-box", action="store_true", help="also the decoder prompted by the ground-truth box")
    ap.add_argument("--no-refine", action="store_true", help="the head only (no teacher encoder run)")
    ap.add_argument("--frames", choices=["torch", "onnx", "hybrid"],
                    help="refine from the prompt-frame cache of that encoder (PromptFrameCache, filled here if "
                         "needed) through lesion_kd.pseudo_labels.refine_with_boxes, the training code path, "
                         "instead of running the encoder again per image; --gt-box still runs the decoder only")
    ap.add_argument("--json", help="write the per-image figures here")
    args = ap.parse_args()
    torch.manual_seed(0)

    dm = LesionDataModule(dataset=args.dataset, labeled_fraction=args.labeled_fraction, label_seed=args.seed,
                          image_size=args.size, num_workers=0)
    dm.setup()
    samples = list(dm.unlabeled)
    random.Random(0).shuffle(samples)
    samples = samples[: args.n] if args.n else samples
    head = load_student(args.checkpoint)
    cache = TeacherEmbeddingCache(dataset=dm.dataset_name)
    cache.fill(samples)  # the unlabeled images' entries (already there when a SemiKD run filled the cache)
    frames = None
    if args.frames and not args.no_refine:
        frames = PromptFrameCache(dataset=dm.dataset_name, encoder=args.frames)
        frames.fill(samples)
    teacher = None if args.no_refine else (frames.teacher if frames is not None else build_teacher("litemedsam"))

    rows = []
    for s in tqdm(samples, desc=f"{args.dataset}: pseudo-labels", unit="img"):
        canon = load_canonical(s, args.size)
        truth = canon.mask.astype(bool)
        with torch.no_grad():
            logits = head(cache.get(s).float()[None])
            prob = torch.softmax(F.interpolate(logits, size=(args.size, args.size), mode="bilinear",
                                               align_corners=False), 1)[0, 1].numpy()
        pred = prob >= 0.5
        confident = (prob < 0.1) | (prob > 0.9)
        row = {"id": s.id, "head": dice(pred, truth), "confident_share": float(confident.mean()),
               "confident_accuracy": float((pred == truth)[confident].mean()) if confident.any() else float("nan"),
               "truth_area": float(truth.mean()), "head_area": float(pred.mean())}
        if frames is not None:
            hw = read_image(s.image).shape[:2]
            frame = frames.prompt_frame(s, hw)
            refined, _ = refine_with_boxes(teacher, [frame], torch.from_numpy(prob)[None])
            row["box"] = dice(refined[0].numpy() >= 0.5, truth)
            if args.gt_box:  # the same refinement, prompted by the box of the true mask
                refined, _ = refine_with_boxes(teacher, [frame], torch.from_numpy(truth.astype(np.float32))[None])
                row["gt box"] = dice(refined[0].numpy() >= 0.5, truth)
        elif teacher is not None:
            img = read_image(s.image)
            h, w = img.shape[:2]
            x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255
            frame = teacher.encode_for_prompts(x)  # one encoder run for both prompts
            prompts = {"box": largest_box(pred.astype(np.uint8))}
            if args.gt_box:
                prompts["gt box"] = largest_box(truth.astype(np.uint8))
            for name, box in prompts.items():
                if box is None:
                    row[name] = dice(np.zeros_like(truth), truth)
                    continue
                p = teacher.decode_boxes(frame, canonical_box_to_input(box, args.size, (h, w)))[0, 0].numpy()
                refined = resize_mask((p >= 0.5).astype(np.uint8), args.size).astype(bool)
                row[name] = dice(refined, truth)
        rows.append(row)

    def mean(key: str) -> float:
        vals = [r[key] for r in rows if key in r and np.isfinite(r[key])]
        return float(np.mean(vals)) if vals else float("nan")

    print(f"{args.dataset} {round(args.labeled_fraction * 100)}% labels, seed {args.seed}: {len(rows)} unlabeled "
          f"training images at {args.size}x{args.size} (hidden masks)")
    print(f"  head (read-out, p >= 0.5)         Dice {100 * mean('head'):.2f}")
    if teacher is not None:
        better = np.mean([r["box"] > r["head"] for r in rows])
        print(f"  box-refined (decoder, head's box) Dice {100 * mean('box'):.2f}  (better than the head on "
              f"{100 * better:.0f}% of the images)")
        if args.gt_box:
            print(f"  ground-truth box (upper bound)    Dice {100 * mean('gt box'):.2f}")
    print(f"  confident pixels (p < 0.1 or > 0.9): {100 * mean('confident_share'):.1f}% of the pixels, "
          f"{100 * mean('confident_accuracy'):.2f}% correct")
    print(f"  lesion share: head {100 * mean('head_area'):.1f}%, truth {100 * mean('truth_area'):.1f}%")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
