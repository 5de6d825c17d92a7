"""Shared fixtures: the real datasets (read-only, from $LESION_KD_DATA or ../shared/datasets) and small
synthetic folder datasets that tests write themselves. Plain helpers (constants, builders, the command runner)
are in helpers.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import disk_image, make_folder_dataset, real_data_dir

__all__ = ["disk_image", "make_folder_dataset"]  # also importable from here, as before helpers.py


@pytest.fixture(scope="session")
def data_dir() -> Path:
    d = real_data_dir()
    if d is None:
        pytest.skip("real datasets not found: set LESION_KD_DATA to the folder holding Kvasir-SEG/ and BUSI/")
    return d


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Every test caches under one session temp dir, never in the user's ~/.cache."""
    monkeypatch.setenv("LESION_KD_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture
def folder_dataset(tmp_path) -> Path:
    return make_folder_dataset(tmp_path / "mydata")
