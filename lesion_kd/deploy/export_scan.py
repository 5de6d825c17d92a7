"""The selective scan as an exported graph sees it: loop-free, shape-polymorphic, inference-only.

:func:`lesion_kd.models.scan.selective_scan` runs a loop-free formulation while a graph is being captured:
the chunked one (:class:`~lesion_kd.models.scan.ChunkedScan`) unless another is selected with
:func:`~lesion_kd.models.scan.scan_formulation`, a context variable that the scan reads (no function is
replaced). The export formulation, :class:`~lesion_kd.models.scan.ExportScan` (shape-polymorphic, with a
layout and op mix that ONNX Runtime runs fast; the reasons are in its docstring), lives beside the others in
:mod:`lesion_kd.models.scan` and shares their set-up and finish. This module is what the exporter
(:mod:`lesion_kd.deploy.export`) uses of it:

* :func:`export_scan_formulation`: select :class:`~lesion_kd.models.scan.ExportScan` for the duration of an
  export;
* :func:`longest_scan`: the longest sequence a network's scans see, which sets the export's recursion depth
  (:func:`levels_for`), recorded by a formulation selected the same way.

Semantics, shapes and dtypes are those of :func:`lesion_kd.models.scan.selective_scan`; an export is
verified against the eager network before it is written (:mod:`lesion_kd.deploy.export`).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator

import torch
import torch.nn as nn

from ..models.scan import ChunkedScan, ExportScan, levels_for, scan_formulation, selective_scan_export

__all__ = ["CHUNK", "export_scan_formulation", "levels_for", "longest_scan", "selective_scan_export"]

CHUNK = ExportScan().chunk


class _RecordingScan(ChunkedScan):
    """The chunked formulation, noting the length of every sequence it scans."""

    name = "chunked (recording lengths)"

    def __init__(self) -> None:
        super().__init__()
        self.lengths: list[int] = []

    def __call__(self, u, *args, **kwargs):
        self.lengths.append(int(u.shape[-1]))
        return super().__call__(u, *args, **kwargs)


def longest_scan(net: nn.Module, side: int, probe: int = 64) -> int:
    """The longest sequence any selective scan of ``net`` sees for a ``side`` x ``side`` input (0: no scan).

    Traced once at ``probe`` x ``probe`` (cheap) and scaled by area: a VSS stage scans its h x w tokens.
    It sets the recursion depth of a dynamic-size export (deeper than needed only costs a few tiny ops).
    """
    recorder = _RecordingScan()
    with scan_formulation(recorder), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer chatter; this trace is thrown away
        torch.jit.trace(net, torch.rand(1, 3, probe, probe), check_trace=False)
    seen = recorder.lengths
    return math.ceil(max(seen) * (side / probe) ** 2) if seen else 0


@contextlib.contextmanager
def export_scan_formulation(levels: int, polymorphic: bool = False) -> Iterator[ExportScan]:
    """Within the block, graph capture (jit trace, torch.export, ONNX export) records
    :class:`~lesion_kd.models.scan.ExportScan` (recursion depth ``levels``; shape-polymorphic if
    ``polymorphic``) instead of the training-side chunked formulation. Eager calls are unaffected (they never
    take the loop-free path), and the previous choice comes back on exit, also after an error."""
    with scan_formulation(ExportScan(levels, polymorphic)) as formulation:
        yield formulation
