"""Known datasets by name: where their folders are, and their standard splits.

``data.dataset`` is either a registry name (resolved under the data directory, ``$LESION_KD_DATA``) or a
path to any folder with ``images/`` and ``masks/``. The names and everything about them (folder, sources,
citation, converter, split rule) are the catalogue's (:mod:`lesion_kd.data.catalogue`; ``DATASETS`` is its
table). Registry splits are written once to versioned files in ``experiments/splits/`` (committed), so that
every method sees the same images; a user folder gets a seeded split written beside the run instead (never
into the data folder).
"""

from __future__ import annotations

import os
from pathlib import Path

from .catalogue import DATASETS, DatasetSpec, random_split

__all__ = ["DATASETS", "DATA_ENV", "DatasetSpec", "data_dir", "random_split", "split_file_name"]

DATA_ENV = "LESION_KD_DATA"


def data_dir(explicit: str | os.PathLike | None = None) -> Path:
    """The folder holding the known datasets: ``explicit``, else ``$LESION_KD_DATA``, else ``./data``."""
    return Path(explicit or os.environ.get(DATA_ENV) or "data").expanduser()


def split_file_name(name: str, include_normal: bool) -> str:
    return f"{name}{'-with-normal' if include_normal else ''}_v1.json"
