"""The name of one result cell's folder, ``<method>-<network>-<labels>pct-seed<k>`` (e.g.
``semikd-mamba_unet-10pct-seed0``): built by ``lesion-kd fit --results_root`` (and the W&B run name), and
read back by the manifest, the tables, the paired comparison and ``lesion-kd compare``.

The parts are separated by ``-``, so a method (results name) or network name must not contain one (the
LiteMedSAM teacher's network is ``litemedsam`` for that reason); underscores are fine.

Standard library only, and nothing of ``lesion_kd``: every layer may import it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_NAME = re.compile(r"^(?P<method>.+)-(?P<network>[^-]+)-(?P<labels>\d+)pct-seed(?P<seed>\d+)$")
FORMAT = "<method>-<network>-<labels>pct-seed<k>"


@dataclass(frozen=True)
class CellName:
    """One cell's results folder name: method (its results name), network, labelled share in percent, seed."""

    method: str
    network: str
    labels_pct: int
    seed: int

    def __post_init__(self) -> None:
        for part in ("method", "network"):
            value = getattr(self, part)
            if not value or "-" in str(value):
                raise ValueError(f"{part} name {value!r}: a results folder is named {FORMAT}, so a {part} name must "
                                 "be non-empty and must not contain '-' (use '_')")

    @classmethod
    def of(cls, method: str, network: str, labels: float, seed: int) -> CellName:
        """From the labelled share as a fraction (``0.1`` -> ``10pct``)."""
        return cls(method, network, round(labels * 100), seed)

    @property
    def labels(self) -> float:
        """The labelled share as a fraction (``10pct`` -> ``0.1``)."""
        return self.labels_pct / 100

    @property
    def folder(self) -> str:
        return f"{self.method}-{self.network}-{self.labels_pct}pct-seed{self.seed}"

    def __str__(self) -> str:
        return self.folder

    @classmethod
    def match(cls, name: str) -> CellName | None:
        """The cell a folder name names, or None where ``name`` does not have the form at all (another folder);
        :class:`ValueError` where it has the form but a part holds a ``-`` (``semi-kd-unet-10pct-seed0``)."""
        m = _NAME.match(name)
        if m is None:
            return None
        if "-" in m["method"]:
            raise ValueError(f"{name!r}: more '-' than {FORMAT} has; a method or network name must not contain '-' "
                             "(use '_'), so this folder cannot be read as a result cell")
        return cls(m["method"], m["network"], int(m["labels"]), int(m["seed"]))

    @classmethod
    def parse(cls, name: str) -> CellName:
        """The cell a folder name names; :class:`ValueError` saying why where it names none."""
        cell = cls.match(name)
        if cell is None:
            raise ValueError(f"{name!r} is not a results folder name ({FORMAT}, e.g. semikd-mamba_unet-10pct-seed0)")
        return cell
