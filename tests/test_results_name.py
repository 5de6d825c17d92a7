"""The results folder name <method>-<network>-<labels>pct-seed<k>: one type builds and parses it."""

from __future__ import annotations

import pytest

from lesion_kd.reporting.manifest import Cell
from lesion_kd.results_name import CellName


@pytest.mark.parametrize("name", ["semikd-mamba_unet-10pct-seed0", "supervised-unet-100pct-seed2",
                                  "teacher-litemedsam-20pct-seed1", "semikd_sup-mamba_unet-5pct-seed12"])
def test_parse_and_build_round_trip(name):
    cell = CellName.parse(name)
    assert cell.folder == str(cell) == name
    assert CellName.parse(cell.folder) == cell


def test_parts_and_fractions():
    cell = CellName.of("semikd", "mamba_unet", 0.1, 0)
    assert cell == CellName("semikd", "mamba_unet", 10, 0)
    assert cell.folder == "semikd-mamba_unet-10pct-seed0"
    assert cell.labels == 0.1  # the manifest's fraction, exactly
    manifest_cell = Cell("table", "kvasir-seg", "kvasir", 0.2, "cps", "unet", 1)
    assert manifest_cell.name == "cps-unet-20pct-seed1" == CellName.of("cps", "unet", 0.2, 1).folder


@pytest.mark.parametrize("method, network", [("semi-kd", "unet"), ("semikd", "mamba-unet"), ("", "unet")])
def test_a_hyphenated_or_empty_name_is_refused(method, network):
    with pytest.raises(ValueError, match="must not contain '-'"):
        CellName(method, network, 10, 0)


def test_parse_says_why_a_name_is_refused():
    with pytest.raises(ValueError, match="must not contain '-'"):
        CellName.parse("semi-kd-unet-10pct-seed0")
    for other in ("report", "semikd-unet-10pct", "semikd-unet-tenpct-seed0", "semikd-10pct-seed0"):
        assert CellName.match(other) is None
        with pytest.raises(ValueError, match="not a results folder name"):
            CellName.parse(other)
