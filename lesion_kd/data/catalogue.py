"""The catalogue of known datasets: one spec per dataset, registered once.

A dataset's spec says everything the suite knows about it: its name (``data.dataset``), the folder it lives
in under the data directory (``$LESION_KD_DATA``), where it comes from (official archives, or the steps of a
manual download), its licence or terms, its citation, the converter from its archives to the suite's
layout (:mod:`lesion_kd.data.convert`), and its split rule. :mod:`lesion_kd.data.registry` resolves a name to
a folder and a split with it; :mod:`lesion_kd.data.download` transfers, checks and unpacks the archives it
names (``lesion-kd data download``).

Adding a dataset: one ``register_dataset(DatasetSpec(...))`` below (docs/contributing.md, "Adding a
dataset"). A name registered twice is an error, as for networks (:mod:`lesion_kd.models.registry`).

Published SHA-256 values: none of the publishers gives one (checked on their download pages), so every
archive has ``sha256=None`` and is verified by trust-on-first-use (:mod:`lesion_kd.data.download`).
"""

from __future__ import annotations

import csv
import random
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from .convert import (
    Converter,
    convert_busi,
    convert_cvc_clinicdb,
    convert_isic2018,
    convert_kvasir,
    convert_ph2,
)
from .folder import Sample, scan_folder
from .io import DataError


@dataclass(frozen=True)
class ArchiveSpec:
    """One file of a dataset's official distribution.

    ``url`` is None where no direct public link exists (a manual download). ``sha256``/``size`` are the
    published values, None where the publisher gives none (then trust-on-first-use applies).
    """

    filename: str
    url: str | None
    sha256: str | None = None
    size: int | None = None


@dataclass(frozen=True)
class DatasetSpec:
    """Everything about one known dataset: where it lives and comes from, its terms and citation, how its
    archives become the suite's layout, and how it is split."""

    name: str  # the registry name (``data.dataset``, ``lesion-kd data download NAME``)
    folder: str  # the folder under the data directory (and under ``data download --to``)
    archives: tuple[ArchiveSpec, ...]  # the official distribution
    homepage: str
    licence: str  # licence or terms of use
    citation: str  # the dataset's paper
    convert: Converter  # official archives (unpacked) -> images/, masks/ and the extras
    samples: Callable[[Path, bool], list[Sample]]  # (root, include_normal) -> the samples the suite reads
    splits: Callable[[Path, list[Sample], bool], dict[str, list[str]]]  # (root, samples, include_normal) -> ids
    manual: str | None = None  # what to download by hand; None: fully automatic
    notes: str = ""

    @property
    def automatic(self) -> bool:
        return self.manual is None and all(a.url for a in self.archives)


DATASETS: dict[str, DatasetSpec] = {}


def register_dataset(spec: DatasetSpec) -> DatasetSpec:
    """Register a dataset under ``spec.name`` (once: a second registration of a name is an error)."""
    if spec.name in DATASETS:
        raise ValueError(f"dataset {spec.name!r} is registered twice")
    DATASETS[spec.name] = spec
    return spec


def get_dataset(name: str) -> DatasetSpec:
    """The spec of a registered dataset; :class:`DataError` naming the known ones otherwise."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; known: {', '.join(sorted(DATASETS))}")
    return DATASETS[name]


def list_datasets() -> list[str]:
    return sorted(DATASETS)


# ---------------------------------------------------------------------------------------- split rules
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


# ------------------------------------------------------------------------------------------- datasets
# Kvasir-SEG and BUSI are the paper's; the others are prepared by `lesion-kd data download NAME --to
# $LESION_KD_DATA` (docs/datasets.md) and split by seed.
register_dataset(DatasetSpec(
    name="kvasir-seg",
    folder="Kvasir-SEG",
    archives=(ArchiveSpec("kvasir-seg.zip", "https://datasets.simula.no/downloads/kvasir-seg.zip",
                          sha256=None),  # not published: trust on first use
              ),
    homepage="https://datasets.simula.no/kvasir-seg/",
    licence="research and educational use only; commercial use forbidden without permission (Simula)",
    citation=("Jha D, Smedsrud PH, Riegler MA, Halvorsen P, de Lange T, Johansen D, Johansen HD. "
              "Kvasir-SEG: A Segmented Polyp Dataset. MultiMedia Modeling (MMM) 2020, LNCS 11962, pp. 451-462."),
    notes="1000 polyp images (JPEG) with JPEG masks (thresholded >127); splits/pranet_{test,train}.txt added",
    convert=convert_kvasir,
    samples=_folder_samples,
    splits=_kvasir_splits,
))

register_dataset(DatasetSpec(
    name="isic2018",
    folder="ISIC2018",
    archives=(
        ArchiveSpec("ISIC2018_Task1-2_Training_Input.zip",
                    "https://isic-challenge-data.s3.amazonaws.com/2018/ISIC2018_Task1-2_Training_Input.zip",
                    sha256=None),  # not published: trust on first use (about 10.4 GB)
        ArchiveSpec("ISIC2018_Task1_Training_GroundTruth.zip",
                    "https://isic-challenge-data.s3.amazonaws.com/2018/ISIC2018_Task1_Training_GroundTruth.zip",
                    sha256=None),  # not published: trust on first use
    ),
    homepage="https://challenge.isic-archive.com/data/#2018",
    licence="CC BY-NC 4.0 (ISIC archive; see ATTRIBUTION.txt in the input archive)",
    citation=("Codella N, et al. Skin Lesion Analysis Toward Melanoma Detection 2018: A Challenge Hosted by the "
              "International Skin Imaging Collaboration (ISIC). arXiv:1902.03368; and Tschandl P, Rosendahl C, "
              "Kittler H. The HAM10000 dataset. Sci Data 2018;5:180161."),
    notes="task 1 (lesion boundary segmentation) training set: 2594 dermoscopy JPEGs, *_segmentation.png masks",
    convert=convert_isic2018,
    samples=_folder_samples,
    splits=_seeded_splits,
))

register_dataset(DatasetSpec(
    name="busi",
    folder="BUSI",
    archives=(ArchiveSpec("Dataset_BUSI_with_GT.zip", None),),
    homepage="https://scholar.cu.edu.eg/?q=afahmy/pages/dataset",
    licence="research use with citation (no licence file; Kaggle mirrors list CC0)",
    citation=("Al-Dhabyani W, Gomaa M, Khaled H, Fahmy A. Dataset of breast ultrasound images. "
              "Data in Brief 2020;28:104863. doi:10.1016/j.dib.2019.104863."),
    manual=(
        "BUSI is distributed from a web page (and Kaggle, which needs a login), with no stable direct link.\n"
        "  1. Download 'Dataset_BUSI_with_GT' from https://scholar.cu.edu.eg/?q=afahmy/pages/dataset\n"
        "     (or Kaggle: https://www.kaggle.com/datasets/aryashah2k/breast-ultrasound-images-dataset,\n"
        "     'Download' gives archive.zip holding Dataset_BUSI_with_GT/{benign,malignant,normal}/).\n"
        "  2. lesion-kd data download busi --to DIR --from-archive PATH/TO/THE.zip"
    ),
    notes="780 ultrasound PNGs; multi-lesion masks merged (OR); normal images have empty masks; metadata.csv",
    convert=convert_busi,
    samples=_busi_samples,
    splits=_busi_splits,
))

register_dataset(DatasetSpec(
    name="cvc-clinicdb",
    folder="CVC-ClinicDB",
    archives=(ArchiveSpec("CVC-ClinicDB.zip", None),),
    homepage="https://polyp.grand-challenge.org/CVCClinicDB/",
    licence="research use only; cite the paper (terms on polyp.grand-challenge.org)",
    citation=("Bernal J, Sanchez FJ, Fernandez-Esparrach G, Gil D, Rodriguez C, Vilarino F. WM-DOVA maps for "
              "accurate polyp highlighting in colonoscopy: Validation vs. saliency maps from physicians. "
              "Comput Med Imaging Graph 2015;43:99-111."),
    manual=(
        "CVC-ClinicDB is shared on request through polyp.grand-challenge.org (no direct public link).\n"
        "  1. Request/download CVC-ClinicDB from https://polyp.grand-challenge.org/CVCClinicDB/\n"
        "     (the archive holds Original/ and 'Ground Truth/' folders of 612 TIFFs; the Kaggle copy\n"
        "     'balraj98/cvcclinicdb' with PNG/ and TIF/ folders works too).\n"
        "  2. lesion-kd data download cvc-clinicdb --to DIR --from-archive PATH/TO/CVC-ClinicDB.zip\n"
        "     (a .rar must be unpacked first, e.g. 'unrar x CVC-ClinicDB.rar'; then pass the folder)"
    ),
    notes="612 colonoscopy frames (TIFF, read with tifffile), written as PNG",
    convert=convert_cvc_clinicdb,
    samples=_folder_samples,
    splits=_seeded_splits,
))

register_dataset(DatasetSpec(
    name="ph2",
    folder="PH2",
    archives=(ArchiveSpec("PH2Dataset.rar", None),),
    homepage="https://www.fc.up.pt/addi/ph2%20database.html",
    licence="research use only; cite the paper (terms on the ADDI project page)",
    citation=("Mendonca T, Ferreira PM, Marques JS, Marcal ARS, Rozeira J. PH2 - A dermoscopic image database "
              "for research and benchmarking. IEEE EMBC 2013, pp. 5437-5440."),
    manual=(
        "PH2 is downloaded from the ADDI project page after accepting its terms, as a RAR archive.\n"
        "  1. Download PH2Dataset.rar from https://www.fc.up.pt/addi/ph2%20database.html\n"
        "  2. Unpack it (RAR is not read here): 'unrar x PH2Dataset.rar' or '7z x PH2Dataset.rar'\n"
        "  3. lesion-kd data download ph2 --to DIR --from-archive PATH/TO/PH2Dataset\n"
        "     (the folder holding 'PH2 Dataset images/IMDxxx/...'; a .zip or .tar.gz repack works too)"
    ),
    notes="200 dermoscopy BMPs from nested IMDxxx/ folders; *_lesion.bmp masks",
    convert=convert_ph2,
    samples=_folder_samples,
    splits=_seeded_splits,
))
