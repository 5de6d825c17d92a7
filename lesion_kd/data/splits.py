"""Versioned split files: written once, then read (and checked against the folder) by every run."""

from __future__ import annotations

import json
from pathlib import Path

from .io import DataError, atomic_write_bytes

SPLITS_DIR = Path(__file__).resolve().parents[2] / "experiments" / "splits"


def load_or_write_splits(path: Path, make, known_ids: set[str], source: str) -> dict[str, list[str]]:
    """Read ``path`` if it exists, else compute ``make()`` and write it atomically.

    The stored ids must all exist in the dataset (``known_ids``); a stale split file is an error that
    names the file, rather than a silent change of the test set.
    """
    if path.is_file():
        try:
            stored = json.loads(path.read_text())
            splits = {k: list(stored["splits"][k]) for k in ("train", "val", "test")}
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise DataError(f"{path}: unreadable split file ({e}); delete it to regenerate") from e
        for k, ids in splits.items():
            missing = [i for i in ids if i not in known_ids]
            if missing:
                raise DataError(
                    f"{path}: {k} id {missing[0]!r} is not in {source} ({len(missing)} missing); "
                    "the dataset changed since the split was written"
                )
        return splits
    splits = make()
    overlap = (set(splits["train"]) & set(splits["val"])) | (set(splits["train"]) & set(splits["test"]))
    overlap |= set(splits["val"]) & set(splits["test"])
    if overlap:
        raise RuntimeError(f"split builder produced overlapping splits ({sorted(overlap)[:3]})")
    doc = {"version": 1, "source": source, "counts": {k: len(v) for k, v in splits.items()}, "splits": splits}
    atomic_write_bytes(path, (json.dumps(doc, indent=1) + "\n").encode())
    return splits
