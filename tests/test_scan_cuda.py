"""mamba-ssm's CUDA kernel equals the pure-PyTorch scan (needs a CUDA GPU and mamba-ssm; skipped
cleanly otherwise, with the reason)."""

from __future__ import annotations

import pytest
import torch

from lesion_kd.models import selective_scan
from lesion_kd.models.scan import mamba_ssm_import_error

pytestmark = pytest.mark.gpu


@pytest.fixture
def cuda_device() -> torch.device:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    reason = mamba_ssm_import_error()
    if reason is not None:
        pytest.skip(f"mamba-ssm's CUDA kernel does not import ({reason}); pip install 'lesion-kd[cuda]'")
    return torch.device("cuda")


def _inputs(device, b=2, d=64, L=300, n=16, groups=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    bc = (b, n, L) if groups is None else (b, groups, n, L)
    t = dict(
        u=torch.randn(b, d, L, generator=g),
        delta=torch.randn(b, d, L, generator=g) * 0.5 - 1.0,
        A=-torch.arange(1, n + 1, dtype=torch.float32).repeat(d, 1),
        B=torch.randn(*bc, generator=g),
        C=torch.randn(*bc, generator=g),
        D=torch.randn(d, generator=g),
        z=torch.randn(b, d, L, generator=g),
        delta_bias=torch.rand(d, generator=g) * 0.1,
    )
    return {k: v.to(device).requires_grad_() for k, v in t.items()}


def _run(inputs, backend):
    for v in inputs.values():
        v.grad = None
    y = selective_scan(**inputs, delta_softplus=True, backend=backend)
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.device)
    (y * w).sum().backward()
    return y.detach(), {k: v.grad.clone() for k, v in inputs.items()}


@pytest.mark.parametrize("groups", [None, 4], ids=["shared-B-C", "grouped-B-C"])
def test_cuda_kernel_equals_torch_scan(cuda_device, groups):
    inputs = _inputs(cuda_device, groups=groups)
    y_cuda, g_cuda = _run(inputs, "cuda")
    y_torch, g_torch = _run(inputs, "torch")
    torch.testing.assert_close(y_cuda, y_torch, rtol=1e-3, atol=1e-3)
    for k in g_torch:
        scale = g_torch[k].abs().max().item()
        torch.testing.assert_close(g_cuda[k], g_torch[k], rtol=2e-3, atol=2e-3 * max(scale, 1.0), msg=k)


def test_auto_backend_uses_the_kernel_on_gpu(cuda_device):
    inputs = _inputs(cuda_device, L=64)
    with torch.no_grad():
        y_auto = selective_scan(**inputs, delta_softplus=True)
        y_cuda = selective_scan(**inputs, delta_softplus=True, backend="cuda")
    assert torch.equal(y_auto, y_cuda)


def test_student_forward_backward_on_gpu(cuda_device):
    from lesion_kd.models import build_model

    model = build_model("mamba_unet").to(cuda_device)
    x = torch.randn(2, 3, 128, 160, device=cuda_device)
    model(x).square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
