"""``lesion-kd data``: download and prepare the public datasets, and slice MSD tasks into 2D lesion data.

    lesion-kd data list
    lesion-kd data download kvasir-seg --to DATA
    lesion-kd data download busi --to DATA --from-archive ~/Downloads/Dataset_BUSI_with_GT.zip
    lesion-kd data prepare-msd --task Task03_Liver --in Task03_Liver --out DATA/MSD-Liver --lesion-label 2

Every command is idempotent: run it again and a finished dataset is left alone (no network request).
"""

from __future__ import annotations

import argparse
import sys


def _labels(text: str) -> list[int]:
    try:
        return [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected an integer label or a comma list (1,2,3)") from None


def build_parser() -> argparse.ArgumentParser:
    from ..data.catalogue import DATASETS
    from ..data.download import BASE_ENV, MAX_RATIO, MAX_UNPACKED_BYTES
    from ..data.msd import MSD_TASKS

    p = argparse.ArgumentParser(prog="lesion-kd data", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="action", required=True, metavar="{list,download,prepare-msd}")

    sub.add_parser("list", help="the datasets that 'download' knows, and which need a manual step")

    names = ", ".join(f"{k}{'' if s.automatic else ' (manual)'}" for k, s in DATASETS.items())
    d = sub.add_parser(
        "download", help="fetch, verify, unpack and convert a public dataset to the suite's folder layout",
        description=f"Download a public dataset into TO/<folder> in the suite's layout (images/, masks/). "
                    f"Known: {names}. Mirrors: ${BASE_ENV}=URL serves the archives under their official names.")
    d.add_argument("name", choices=sorted(DATASETS), help="dataset to prepare")
    d.add_argument("--to", required=True, help="data folder (e.g. $LESION_KD_DATA); the dataset goes to TO/<folder>")
    d.add_argument("--from-archive", action="append", default=None, metavar="FILE",
                   help="prepare from a local archive (.zip/.tar[.gz]) or unpacked folder instead of downloading "
                        "(manual datasets); repeat for datasets with several archives")
    d.add_argument("--url", action="append", default=None,
                   help="download from this URL instead of the registry's (one per archive, in order)")
    d.add_argument("--cache-dir", default=None,
                   help="where archives and the checksum record go (default $LESION_KD_CACHE or ~/.cache/lesion_kd)")
    d.add_argument("--keep-archive", action="store_true", help="keep the downloaded archive(s) after conversion")
    d.add_argument("--force", action="store_true", help="rebuild a dataset folder that this command prepared before")
    d.add_argument("--retries", type=int, default=3, help="resume an interrupted transfer this many times")
    d.add_argument("--max-unpacked-gb", type=float, default=MAX_UNPACKED_BYTES / 2**30,
                   help="refuse an archive that unpacks to more than this (zip-bomb guard)")
    d.add_argument("--max-ratio", type=float, default=MAX_RATIO,
                   help="refuse an archive (or member) that expands more than this many times (zip-bomb guard)")
    d.add_argument("--no-progress", action="store_true", help="no progress bars")

    m = sub.add_parser(
        "prepare-msd", help="slice a Medical Segmentation Decathlon task into 2D lesion images and masks",
        description="Turn an MSD task (imagesTr/labelsTr NIfTI, dataset.json) into images/<case>_s<slice>.png and "
                    "masks/, with a patient-level split (splits.json, listing.csv). Tasks with defaults: "
                    + ", ".join(f"{k} (label {','.join(map(str, t.lesion_labels))})" for k, t in MSD_TASKS.items()))
    m.add_argument("--task", required=True, help="task name, e.g. Task03_Liver (selects the defaults)")
    m.add_argument("--in", dest="in_dir", required=True, help="the task folder (holding dataset.json, imagesTr/, labelsTr/)")
    m.add_argument("--out", required=True, help="output folder (images/, masks/, splits.json, listing.csv)")
    m.add_argument("--lesion-label", type=_labels, action="append", default=None, metavar="K",
                   help="label value(s) that are lesion (repeat or comma list); default: the task's (liver: 2)")
    m.add_argument("--window-level", type=float, default=None, help="CT window level L (default: the task's, e.g. 40)")
    m.add_argument("--window-width", type=float, default=None, help="CT window width W (default: the task's, e.g. 400)")
    m.add_argument("--channel", type=int, default=None, help="channel of a 4D MR volume (BrainTumour: 0 = FLAIR)")
    m.add_argument("--empty-ratio", type=float, default=0.0,
                   help="slices without lesion kept per lesion slice of each case (0: lesion slices only)")
    m.add_argument("--min-lesion-pixels", type=int, default=1,
                   help="a slice needs this many lesion pixels to count as a lesion slice")
    m.add_argument("--seed", type=int, default=0, help="seed of the empty-slice choice and the patient split")
    m.add_argument("--split-fractions", type=float, nargs=3, default=(0.7, 0.1, 0.2), metavar=("TRAIN", "VAL", "TEST"),
                   help="patient-level split fractions (of slices)")
    m.add_argument("--force", action="store_true", help="replace an output folder prepared with other options")
    m.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _list() -> int:
    from ..data.catalogue import DATASETS

    for name, s in DATASETS.items():
        how = "automatic" if s.automatic else "manual (--from-archive)"
        print(f"{name:<14} -> {s.folder:<14} {how:<24} {s.notes}")
    return 0


def main(argv: list[str]) -> int:
    """Entry point of ``lesion-kd data``; returns the exit status (1: error, 2: a manual step is needed)."""
    args = build_parser().parse_args(argv)
    from ..data.download import DownloadError, ManualDownloadRequired, prepare_dataset
    from ..data.io import DataError

    try:
        if args.action == "list":
            return _list()
        if args.action == "download":
            result = prepare_dataset(
                args.name, args.to, from_archives=args.from_archive, urls=args.url, cache_dir=args.cache_dir,
                force=args.force, keep_archives=args.keep_archive, retries=args.retries,
                max_bytes=int(args.max_unpacked_gb * 2**30), max_ratio=args.max_ratio, progress=not args.no_progress)
            state = "prepared" if result.changed else "already prepared (nothing to do)"
            print(f"{args.name}: {state}: {result.path} ({', '.join(f'{k} {v}' for k, v in result.counts.items())})")
            return 0
        from ..data.msd import prepare_msd

        labels = tuple(v for group in args.lesion_label for v in group) if args.lesion_label else None
        window = None
        if (args.window_level is None) != (args.window_width is None):
            print("lesion-kd data prepare-msd: error: give both --window-level and --window-width", file=sys.stderr)
            return 2
        if args.window_level is not None:
            window = (args.window_level, args.window_width)
        out, changed, counts = prepare_msd(
            args.task, args.in_dir, args.out, lesion_labels=labels, window=window, channel=args.channel,
            empty_ratio=args.empty_ratio, min_lesion_pixels=args.min_lesion_pixels, seed=args.seed,
            fractions=tuple(args.split_fractions), force=args.force, progress=not args.no_progress)
        state = "prepared" if changed else "already prepared with these options (nothing to do)"
        print(f"{args.task}: {state}: {out} ({', '.join(f'{k} {v}' for k, v in counts.items())})")
        print(f"train on it with: --data.dataset {out / 'listing.csv'}")
        return 0
    except ManualDownloadRequired as e:
        print(f"lesion-kd data {args.action}: {e}", file=sys.stderr)
        return 2
    except (DataError, DownloadError, ValueError) as e:
        print(f"lesion-kd data {args.action}: error: {e}", file=sys.stderr)
        return 1
