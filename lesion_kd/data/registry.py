"""Known datasets and their standard splits.

``data.dataset`` is either a registry name (resolved under the data directory, ``$LESION_KD_DATA``) or a
path to any folder with ``images/`` and ``masks/``. Registry splits are written once to versioned files in
``experiments/splits/`` (committed), so that every method sees the same images; a user folder gets a
seeded split written beside the run instead (never into the data folder).
"""

from __future__ import annotations

import csv
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from .folder import Sample, scan_folder
from .io import DataError

DATA_ENV = "LESION_KD_DATA"


def data_dir(explicit: str | os.PathLike | None = None) -> Path:
    """The folder holding the known datasets: ``explicit``, else ``$LESION_KD_DATA``, else ``./data``."""
    return Path(explicit or os.environ.get(DATA_ENV) or "data").expanduser()


def _stratified_split(samples: list[Sample], fractions: tuple[float, float, float], seed: int) -> dict[str, list[str]]:
    """Split ids into train/val/test by ``fractions`` within each ``group``, reproducibly by ``seed``."""
    groups: dict[str | None, list[Sample]] = {}
    for s in samples:
        groups.setdefault(s.group, []).append(s)
    out: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    rng = random.Random(seed)
    for key in sorted(groups, key=str):
        ids = sorted(s.id for s in groups[key])
        rng.shuffle(ids)
        n_test = round(len(ids) * fractions[2])
        n_val = round(len(ids) * fractions[1])
        out["test"] += ids[:n_test]
        out["val"] += ids[n_test : n_test + n_val]
        out["train"] += ids[n_test + n_val :]
    return {k: sorted(v) for k, v in out.items()}


def random_split(samples: list[Sample], fractions: tuple[float, float, float] = (0.7, 0.1, 0.2), seed: int = 0):
    """Seeded (and, where samples carry a ``group``, stratified) train/val/test split of a folder."""
    if abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"split fractions {fractions} must sum to 1")
    return _stratified_split(samples, fractions, seed)


def _folder_samples(root: Path, include_normal: bool) -> list[Sample]:
    return scan_folder(root)


def _kvasir_splits(root: Path, samples: list[Sample], include_normal: bool) -> dict[str, list[str]]:
    """test = PraNet's 100 ids; val = 90 of the other 900 drawn with seed 0; train = the other 810."""
    test_file = root / "splits" / "pranet_test.txt"
    if not test_file.is_file():
        raise DataError(f"{test_file}: Kvasir-SEG's standard test list is missing")
    test = sorted(line.strip() for line in test_file.read_text().splitlines() if line.strip())
    known = {s.id for s in samples}
    unknown = [i for i in test if i not in known]
    if unknown:
        raise DataError(f"{test_file}: id {unknown[0]!r} has no image in {root / 'images'}")
    rest = sorted(known - set(test))
    rng = random.Random(0)
    val = sorted(rng.sample(rest, 90))
    train = sorted(set(rest) - set(val))
    return {"train": train, "val": val, "test": test}


def _busi_samples(root: Path, include_normal: bool) -> list[Sample]:
    meta = root / "metadata.csv"
    if not meta.is_file():
        raise DataError(f"{meta}: BUSI's metadata (id, category) is missing")
    with open(meta, newline="") as f:
        category = {row["id"]: row["category"] for row in csv.DictReader(f)}
    samples = []
    for s in scan_folder(root):
        if s.id not in category:
            raise DataError(f"{meta}: no row for image {s.image.name}")
        if category[s.id] == "normal" and not include_normal:
            continue
        samples.append(replace(s, group=category[s.id]))
    return samples


def _busi_splits(root: Path, samples: list[Sample], include_normal: bool) -> dict[str, list[str]]:
    """70/10/20, stratified by category (benign/malignant[/normal]), seed 0."""
    return _stratified_split(samples, (0.7, 0.1, 0.2), seed=0)


def _seeded_splits(root: Path, samples: list[Sample], include_normal: bool) -> dict[str, list[str]]:
    """70/10/20 with seed 0 (these datasets publish no standard split)."""
    return _stratified_split(samples, (0.7, 0.1, 0.2), seed=0)


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    folder: str
    samples: Callable[[Path, bool], list[Sample]]
    splits: Callable[[Path, list[Sample], bool], dict[str, list[str]]]
    citation: str


DATASETS: dict[str, DatasetSpec] = {
    "kvasir-seg": DatasetSpec(
        "kvasir-seg", "Kvasir-SEG", _folder_samples, _kvasir_splits,
        "Jha D, et al. Kvasir-SEG: A Segmented Polyp Dataset. MMM 2020, LNCS 11962, pp. 451-462.",
    ),
    "busi": DatasetSpec(
        "busi", "BUSI", _busi_samples, _busi_splits,
        "Al-Dhabyani W, et al. Dataset of breast ultrasound images. Data in Brief 2020;28:104863.",
    ),
    # Prepared by `lesion-kd data download NAME --to $LESION_KD_DATA` (docs/datasets.md); seeded splits.
    "isic2018": DatasetSpec(
        "isic2018", "ISIC2018", _folder_samples, _seeded_splits,
        "Codella N, et al. Skin Lesion Analysis Toward Melanoma Detection 2018 (ISIC). arXiv:1902.03368; "
        "Tschandl P, et al. The HAM10000 dataset. Sci Data 2018;5:180161.",
    ),
    "cvc-clinicdb": DatasetSpec(
        "cvc-clinicdb", "CVC-ClinicDB", _folder_samples, _seeded_splits,
        "Bernal J, et al. WM-DOVA maps for accurate polyp highlighting in colonoscopy. CMIG 2015;43:99-111.",
    ),
    "ph2": DatasetSpec(
        "ph2", "PH2", _folder_samples, _seeded_splits,
        "Mendonca T, et al. PH2 - A dermoscopic image database for research and benchmarking. EMBC 2013.",
    ),
}


def split_file_name(name: str, include_normal: bool) -> str:
    return f"{name}{'-with-normal' if include_normal else ''}_v1.json"
