"""``lesion-kd segment``: masks, overlays and a CSV summary for a folder of images, from an exported student.

    lesion-kd segment --model student.onnx --input photos/ --output masks/ [--tta] [--overwrite]
    lesion-kd segment --model kvasir-seg --input photos/ --output masks/    # a student shipped with lesion-kd
    lesion-kd segment --list-models

--model is an ONNX file (run by onnxruntime, without torch or the training code), a TorchScript file, a
lesion-kd checkpoint (run by torch), or the name of a trained student shipped inside the package
(kvasir-seg: colonoscopy polyps; busi: breast ultrasound; --list-models shows them with their test Dice,
size and data licence; research use only, not a medical device). An existing file always wins over a name.
Writes <id>_mask.png (0/255, at each image's own size), <id>_overlay.png and segments.csv. Unreadable
files are reported and skipped; the exit status is 1 when there were any. This module imports no torch or
Lightning for an ONNX model: for that guarantee run it as ``python -m lesion_kd.commands.segment``
(``lesion-kd`` itself loads Lightning for its other commands).
"""

from __future__ import annotations

import sys

from . import parser


def main(argv: list[str]) -> int:
    p = parser("lesion-kd segment", __doc__)
    p.add_argument("--model", help="exported .onnx, TorchScript file, a lesion-kd .ckpt, or the name of a shipped "
                                   "model (--list-models)")
    p.add_argument("--input", help="an image file or a folder of images (not recursive)")
    p.add_argument("--output", help="folder for <id>_mask.png, <id>_overlay.png and segments.csv")
    p.add_argument("--list-models", action="store_true",
                   help="list the trained students shipped with lesion-kd (name, dataset, test Dice, size, licence) and exit")
    p.add_argument("--tta", action="store_true", help="test-time augmentation: mean softmax over identity, h- and v-flip")
    p.add_argument("--overwrite", action="store_true", help="redo images whose mask or overlay exists (default: skip them)")
    p.add_argument("--batch-size", type=int, default=8, help="images per forward pass")
    p.add_argument("--size", type=int, default=None,
                   help="inference side S for dynamic-size models (default: the size recorded at export/training)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: $OMP_NUM_THREADS, else all cores)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to run the model")
    p.add_argument("--no-spin-wait", action="store_true",
                   help="ONNX: idle worker threads sleep instead of spinning (much faster on a CPU busy with other jobs, "
                        "slower on an idle one)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.list_models:
        from ..pretrained import format_table

        print(format_table())
        return 0
    missing = [f"--{n}" for n in ("model", "input", "output") if getattr(args, n) is None]
    if missing:
        p.error(f"the following arguments are required: {', '.join(missing)} (or --list-models)")
    from ..deploy.segment import open_model, segment_images

    try:
        predictor = open_model(args.model, size=args.size, threads=args.threads, device=args.device,
                               spin_wait=not args.no_spin_wait)
        print(f"model: {predictor.describe()}")
        summary = segment_images(args.input, args.output, predictor, tta=args.tta, overwrite=args.overwrite,
                                 batch_size=args.batch_size, progress=not args.no_progress)
    except (FileNotFoundError, ValueError) as e:
        print(f"lesion-kd segment: {e}", file=sys.stderr)
        return 2
    return 1 if summary.failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
