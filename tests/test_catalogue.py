"""The dataset catalogue: one spec per dataset, registered once, each consistent in itself."""

from __future__ import annotations

import re
from dataclasses import replace
from urllib.parse import urlparse

import pytest

from lesion_kd.data import DataError, convert
from lesion_kd.data import registry as data_registry
from lesion_kd.data.catalogue import DATASETS, get_dataset, list_datasets, register_dataset
from lesion_kd.data.download import _source_txt


def test_the_paper_datasets_and_the_downloadable_ones_are_registered():
    assert list_datasets() == ["busi", "cvc-clinicdb", "isic2018", "kvasir-seg", "ph2"]
    assert data_registry.DATASETS is DATASETS  # the old home re-exports the one table
    assert get_dataset("busi").folder == "BUSI" and get_dataset("kvasir-seg").folder == "Kvasir-SEG"


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_every_spec_is_consistent(name):
    spec = DATASETS[name]
    assert spec.name == name
    assert spec.folder and "/" not in spec.folder and spec.folder.lower().replace("-", "") in (
        name.replace("-", ""), name.replace("-", "") + "seg")
    # a citation: authors, a title, a year; a licence or terms; a homepage
    assert re.match(r"^[A-Z][\w-]+ [A-Z]+[,.]", spec.citation) and re.search(r"\b20[12]\d\b", spec.citation)
    assert spec.licence and urlparse(spec.homepage).scheme == "https"
    # sources: official file names, each with a URL (automatic) or none of them with one and the steps by hand
    assert spec.archives and len({a.filename for a in spec.archives}) == len(spec.archives)
    for a in spec.archives:
        assert "/" not in a.filename
        assert a.url is None or (urlparse(a.url).scheme == "https" and a.url.endswith("/" + a.filename))
    assert spec.automatic == all(a.url for a in spec.archives)
    if not spec.automatic:
        assert spec.manual and f"lesion-kd data download {name} " in spec.manual
    # its converter and its split rule
    assert spec.convert.__module__ == convert.__name__ and spec.convert.__name__.startswith("convert_")
    assert callable(spec.samples) and callable(spec.splits)
    assert sum(s.convert is spec.convert for s in DATASETS.values()) == 1
    # what a prepared folder says about itself comes from the same spec
    txt = _source_txt(spec, [], {"images": 0})
    assert f"Dataset: {spec.folder}" in txt and f"Cite: {spec.citation}" in txt and f"License: {spec.licence}" in txt


def test_a_name_is_registered_once_and_an_unknown_name_names_the_known_ones():
    with pytest.raises(ValueError, match="registered twice"):
        register_dataset(replace(DATASETS["busi"]))
    with pytest.raises(DataError, match="unknown dataset 'nope'; known: busi, cvc-clinicdb"):
        get_dataset("nope")
