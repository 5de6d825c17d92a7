"""``lesion-kd export``: the student of a checkpoint as an ONNX or TorchScript file, verified against PyTorch.

    lesion-kd export --ckpt RUN/checkpoints/best-XXXX.ckpt --format onnx --out student.onnx
    lesion-kd export --ckpt ... --format torchscript --out student.pt --dynamic-size

The export is compared with the eager network on random and real images before it is written (the largest
|logit difference| is printed; above --tolerance nothing is written) and lands atomically at --out.
"""

from __future__ import annotations

import sys

from . import parser


def main(argv: list[str]) -> int:
    p = parser("lesion-kd export", __doc__)
    p.add_argument("--ckpt", required=True, help="a lesion-kd checkpoint of any method (only its student is exported)")
    p.add_argument("--format", required=True, choices=["onnx", "torchscript"], help="file format")
    p.add_argument("--out", required=True, help="output file (written to a temporary name, then renamed)")
    p.add_argument("--size", type=int, default=None,
                   help="input side S (a multiple of the network stride); default: the checkpoint's training "
                        "image size, else 256. With --dynamic-size: the default inference size in the metadata")
    p.add_argument("--dynamic-size", action="store_true",
                   help="accept any height and width (multiples of the stride) instead of a fixed S x S")
    p.add_argument("--max-size", type=int, default=2048, help="with --dynamic-size: the largest side to support")
    p.add_argument("--tolerance", type=float, default=1e-4,
                   help="largest accepted |logit difference| between the export and eager PyTorch")
    p.add_argument("--verify-input", action="append", default=None, metavar="PATH",
                   help="image file or folder for the real-image check (repeatable); default: the images of "
                        "the checkpoint's training dataset, when found")
    args = p.parse_args(argv)
    from ..deploy.export import ExportError, export_student

    try:
        export_student(args.ckpt, args.format, args.out, size=args.size, dynamic_size=args.dynamic_size,
                       max_size=args.max_size, tolerance=args.tolerance, verify_inputs=args.verify_input)
    except ExportError as e:
        print(f"lesion-kd export: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
