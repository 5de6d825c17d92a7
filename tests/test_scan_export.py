"""The export formulation of the selective scan is a strategy of lesion_kd.models.scan, selected for an export by a
context variable (issue 32, item 4): no function of the scan module is replaced, before, during or after."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn as nn

from lesion_kd.deploy.export_scan import export_scan_formulation, levels_for, longest_scan
from lesion_kd.models import scan as scan_mod
from lesion_kd.models.scan import (
    ChunkedScan,
    ExportScan,
    ReferenceScan,
    ScanFormulation,
    loop_free_formulation,
    scan_formulation,
    selective_scan,
    selective_scan_chunked,
    selective_scan_export,
    selective_scan_ref,
)


def module_functions() -> dict[str, object]:
    return {k: v for k, v in vars(scan_mod).items() if callable(v)}


def inputs(L: int = 77, g: int = 2, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    b, d, n = 2, 8, 4
    u, delta, z = (torch.randn(b, d, L, generator=gen) for _ in range(3))
    A = -torch.rand(d, n, generator=gen) * 5
    B = torch.randn(b, g, n, L, generator=gen)
    C = torch.randn(B.shape, generator=gen)
    return dict(u=u, delta=delta, A=A, B=B, C=C, D=torch.randn(d, generator=gen), z=z,
                delta_bias=torch.randn(d, generator=gen), delta_softplus=True)


class Scans(nn.Module):
    """A stand-in network: two selective scans of different lengths (as two VSS stages)."""

    def __init__(self) -> None:
        super().__init__()
        self.A = nn.Parameter(-torch.rand(3, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = []
        for t in (x.flatten(2), x[:, :, ::2, ::2].flatten(2)):  # (b, 3, h*w) and (b, 3, h*w/4)
            B = t[:, :2].abs()
            out.append(selective_scan(t, t.sigmoid(), self.A, B, B, delta_softplus=True).mean((1, 2)))
        return torch.stack(out, 1)


def test_no_module_function_is_replaced_before_during_or_after_an_export():
    before = module_functions()
    chunked = scan_mod.selective_scan_chunked
    net = Scans().eval()
    with export_scan_formulation(levels_for(64 * 64), polymorphic=True) as formulation:
        assert scan_mod.selective_scan_chunked is chunked is selective_scan_chunked
        assert module_functions() == before
        assert loop_free_formulation() is formulation and isinstance(formulation, ExportScan)
        with torch.no_grad():
            torch.jit.trace(net, torch.rand(1, 3, 16, 16), check_trace=False)
        assert module_functions() == before
    assert longest_scan(net, 64, probe=16) == 64 * 64  # recorded through a selected formulation, too
    assert scan_mod.selective_scan_chunked is chunked and module_functions() == before
    assert isinstance(loop_free_formulation(), ChunkedScan)


def test_graph_capture_records_the_selected_formulation():
    calls: list[int] = []

    class Counting(ExportScan):
        def __call__(self, u, *args, **kwargs):
            calls.append(int(u.shape[-1]))
            return super().__call__(u, *args, **kwargs)

    net = Scans().eval()
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        net(x)  # eager: the pure-PyTorch recurrence, no loop-free formulation
        assert calls == []
        with scan_formulation(Counting(levels=levels_for(256), polymorphic=True)):
            net(x)  # eager calls are unaffected inside the block too
            assert calls == []
            traced = torch.jit.trace(net, x, check_trace=False)
        assert calls == [256, 64]
        torch.testing.assert_close(traced(x), net(x), atol=1e-5, rtol=1e-5)


def test_backend_chunked_runs_the_selected_formulation_bit_for_bit():
    args = inputs()
    plain = selective_scan(**args, backend="chunked")
    assert torch.equal(plain, selective_scan_chunked(**args))
    with export_scan_formulation(levels_for(77)):
        exported = selective_scan(**args, backend="chunked")
    assert torch.equal(exported, selective_scan_export(**args, levels=levels_for(77)))
    assert torch.equal(selective_scan(**args, backend="chunked"), plain)  # restored
    torch.testing.assert_close(exported, selective_scan_ref(**args), atol=5e-5, rtol=1e-5)


@pytest.mark.parametrize("formulation", [ReferenceScan(), ChunkedScan(), ChunkedScan(4), ExportScan(3),
                                         ExportScan(3, polymorphic=True)], ids=repr)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_formulation_shares_the_set_up_and_finish(formulation, dtype):
    args = inputs(L=40, g=1, seed=1)
    args["B"], args["C"] = args["B"][:, 0], args["C"][:, 0]  # (b, n, L): ungrouped
    half = {k: (v.to(dtype) if isinstance(v, torch.Tensor) and k not in ("A", "D", "delta_bias") else v)
            for k, v in args.items()}
    y = formulation(**half)
    assert isinstance(formulation, ScanFormulation) and y.dtype == dtype and y.shape == args["u"].shape
    ref = selective_scan_ref(**{k: (v.float() if isinstance(v, torch.Tensor) else v) for k, v in half.items()})
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(y.float(), ref.to(dtype).float(), atol=tol, rtol=tol)


def test_the_selection_belongs_to_the_context_that_made_it():
    seen: list[ScanFormulation] = []
    with scan_formulation(ExportScan(2)):
        thread = threading.Thread(target=lambda: seen.append(loop_free_formulation()))
        thread.start()
        thread.join()
    assert isinstance(seen[0], ChunkedScan)  # another thread keeps the default


def test_scan_formulation_refuses_a_plain_function():
    with pytest.raises(TypeError, match="ScanFormulation"), scan_formulation(selective_scan_chunked):
        pass
