"""The selective scan: the pure-PyTorch paths equal the sequential reference and mambapy, in values and
gradients; backend selection and its errors."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from lesion_kd.models import scan as scan_mod
from lesion_kd.models import selective_scan
from lesion_kd.models.scan import SelectiveScanFn, selective_scan_chunked, selective_scan_ref

OPTIONS = list(itertools.product([False, True], repeat=4))  # has D, has z, has delta_bias, softplus
OPTION_IDS = [f"D{int(a)}-z{int(b)}-bias{int(c)}-softplus{int(d)}" for a, b, c, d in OPTIONS]


def make_inputs(b=2, d=8, L=37, n=4, groups=None, dtype=torch.float64, seed=0, options=(True,) * 4):
    """Random scan inputs (stable A < 0); the optional ones are None when switched off."""
    has_D, has_z, has_bias, _ = options
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype)

    bc_shape = (b, n, L) if groups is None else (b, groups, n, L)
    return dict(
        u=rnd(b, d, L),
        delta=torch.rand(b, d, L, generator=g, dtype=dtype) * 0.8 + 0.05,
        A=-(torch.rand(d, n, generator=g, dtype=dtype) * 2 + 0.1),
        B=rnd(*bc_shape),
        C=rnd(*bc_shape),
        D=rnd(d) if has_D else None,
        z=rnd(b, d, L) if has_z else None,
        delta_bias=rnd(d) * 0.3 if has_bias else None,
    )


def values_and_grads(fn, inputs, softplus, seed=1):
    """Output and the gradients of <output, w> for a fixed random w, w.r.t. every given input."""
    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items() if v is not None}
    args = {k: leaves.get(k) for k in inputs}
    y = fn(**args, delta_softplus=softplus)
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=y.dtype)
    grads = torch.autograd.grad((y * w).sum(), list(leaves.values()))
    return y.detach(), dict(zip(leaves, grads, strict=True))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def assert_same(fn, ref, inputs, softplus, tol):
    y, gy = values_and_grads(fn, inputs, softplus)
    r, gr = values_and_grads(ref, inputs, softplus)
    assert y.shape == r.shape
    assert rel_err(y, r) < tol, "values"
    for k in gr:
        assert gy[k].shape == gr[k].shape, k
        assert rel_err(gy[k], gr[k]) < tol, f"gradient w.r.t. {k}: {rel_err(gy[k], gr[k]):.2e}"


def torch_backend(**kw):
    return selective_scan(**kw, backend="torch")


@pytest.mark.parametrize("options", OPTIONS, ids=OPTION_IDS)
def test_torch_scan_equals_sequential_reference_float64(options):
    inputs = make_inputs(options=options)
    assert_same(torch_backend, selective_scan_ref, inputs, options[3], tol=1e-6)


@pytest.mark.parametrize("options", [(False,) * 4, (True,) * 4], ids=["bare", "all-options"])
def test_torch_scan_equals_sequential_reference_float32(options):
    inputs = make_inputs(L=64, dtype=torch.float32, options=options)
    assert_same(torch_backend, selective_scan_ref, inputs, options[3], tol=1e-4)


def test_torch_scan_with_grouped_B_C_equals_reference():
    inputs = make_inputs(d=8, groups=4)
    assert_same(torch_backend, selective_scan_ref, inputs, True, tol=1e-6)


def test_torch_scan_carries_state_and_gradient_across_time_blocks(monkeypatch):
    """Force blocks of 5 steps (L=37: 7 full blocks and a partial one) so that the checkpointed
    states and the gradient carried between blocks are exercised."""
    monkeypatch.setattr(scan_mod, "_BLOCK_ELEMS", 1)
    monkeypatch.setattr(scan_mod, "_MIN_BLOCK_STEPS", 5)
    inputs = make_inputs(groups=2)
    assert_same(torch_backend, selective_scan_ref, inputs, True, tol=1e-6)
    with torch.no_grad():  # inference keeps a single carried state instead of per-block checkpoints
        y = selective_scan(**inputs, delta_softplus=True, backend="torch")
    assert rel_err(y, selective_scan_ref(**inputs, delta_softplus=True)) < 1e-6


@pytest.mark.parametrize("options", [(False,) * 4, (True,) * 4], ids=["bare", "all-options"])
def test_scan_gradcheck_float64(options):
    inputs = make_inputs(b=1, d=2, L=6, n=2, groups=2, options=options)
    names = [k for k, v in inputs.items() if v is not None]
    leaves = [inputs[k].clone().requires_grad_() for k in names]

    def fn(*tensors):
        kw = dict(zip(names, tensors, strict=True))
        args = [kw.get(k) for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
        return SelectiveScanFn.apply(*args, options[3])

    assert torch.autograd.gradcheck(fn, leaves)


@pytest.mark.parametrize("options", [(False,) * 4, (True,) * 4], ids=["bare", "all-options"])
def test_chunked_scan_equals_sequential_reference(options):
    # L=37 with chunks of 8 pads the last chunk and recurses two levels (37 -> 5 chunks -> 1).
    assert_same(selective_scan_chunked, selective_scan_ref, make_inputs(options=options), options[3], tol=1e-6)
    inputs32 = make_inputs(L=100, dtype=torch.float32, options=options)
    assert_same(selective_scan_chunked, selective_scan_ref, inputs32, options[3], tol=1e-4)


def test_chunked_scan_is_finite_and_exact_enough_with_extreme_decays():
    """Per-step log-decays of -200 would overflow a naive exp(-cumsum) formulation in float32."""
    inputs = make_inputs(L=64, dtype=torch.float32)
    inputs["delta"] = inputs["delta"] * 100  # delta * A down to about -200 per step
    y = selective_scan_chunked(**inputs)
    r = selective_scan_ref(**inputs)
    assert torch.isfinite(y).all()
    assert rel_err(y, r) < 1e-4


def mambapy_selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    """The selective scan as mambapy computes it, on its parallel scan ``pscan`` ((B, L, D, N) layout)."""
    pscan = pytest.importorskip("mambapy.pscan").pscan
    if delta_bias is not None:
        delta = delta + delta_bias[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    dt, x = delta.transpose(1, 2), u.transpose(1, 2)
    hs = pscan(torch.exp(dt.unsqueeze(-1) * A), (dt * x).unsqueeze(-1) * B.transpose(1, 2).unsqueeze(2))
    y = (hs @ C.transpose(1, 2).unsqueeze(-1)).squeeze(3)
    if D is not None:
        y = y + D * x
    if z is not None:
        y = y * F.silu(z.transpose(1, 2))
    return y.transpose(1, 2)


@pytest.mark.parametrize("L", [64, 50], ids=["power-of-two", "padded"])
def test_torch_scan_equals_mambapy_pscan(L):
    inputs = make_inputs(L=L)
    assert_same(torch_backend, mambapy_selective_scan, inputs, True, tol=1e-6)


def test_half_precision_inputs_accumulate_in_float32():
    inputs = make_inputs(L=32, dtype=torch.float32)
    half = {k: (v.to(torch.bfloat16) if v is not None else None) for k, v in inputs.items()}
    y = selective_scan(**half, delta_softplus=True, backend="torch")
    assert y.dtype == torch.bfloat16
    ref = selective_scan_ref(**{k: (v.float() if v is not None else None) for k, v in half.items()}, delta_softplus=True)
    assert rel_err(y.float(), ref) < 2e-2


def test_auto_backend_on_cpu_is_the_torch_recurrence():
    inputs = make_inputs()
    y_auto = selective_scan(**inputs, backend="auto")
    y_torch = selective_scan(**inputs, backend="torch")
    assert torch.equal(y_auto, y_torch)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.filterwarnings("ignore:.*torch.jit.trace.*:FutureWarning")
def test_tracing_uses_the_loop_free_chunked_path():
    """Traced, the scan has no per-step ops: its graph does not grow with L (the eager loop would
    unroll into one addcmul per step) and it computes the same values."""
    sizes = {}
    for L in (64, 256):
        inputs = make_inputs(L=L, dtype=torch.float32)
        args = tuple(inputs[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias"))

        def fn(*a):
            return selective_scan(*a, delta_softplus=True)

        traced = torch.jit.trace(fn, args, check_trace=False)
        graph = str(traced.graph)
        assert "addcmul" not in graph
        sizes[L] = len(list(traced.graph.nodes()))
        assert rel_err(traced(*args), selective_scan_ref(*args, delta_softplus=True)) < 1e-4
    # L=256 has one more chunk level than L=64 (a constant number of nodes), not 192 more steps.
    assert sizes[256] - sizes[64] < 256 - 64


def test_cuda_backend_request_without_kernel_says_why_and_how_to_install(monkeypatch):
    monkeypatch.setattr(scan_mod, "_load_mamba_kernel", lambda: (None, "ImportError: no module selective_scan_cuda"))
    with pytest.raises(RuntimeError) as err:
        selective_scan(**make_inputs(), backend="cuda")
    msg = str(err.value)
    assert "selective_scan_cuda" in msg
    assert "pip install 'lesion-kd[cuda]'" in msg


def test_cuda_backend_request_with_cpu_tensors_is_an_error():
    # Whether or not mamba-ssm imports here, CPU tensors cannot go to the CUDA kernel.
    with pytest.raises(RuntimeError, match="lesion-kd\\[cuda\\]"):
        selective_scan(**make_inputs(), backend="cuda")


def test_import_failure_is_recorded_not_swallowed():
    kernel, reason = scan_mod._load_mamba_kernel()
    assert (kernel is None) == (reason is not None)
    assert scan_mod.mamba_ssm_import_error() == reason
    if kernel is None:
        assert "Error" in reason  # the exception type and message are kept


def test_bad_arguments_are_rejected():
    inputs = make_inputs()
    with pytest.raises(ValueError, match="backend"):
        selective_scan(**inputs, backend="triton")
    bad = dict(inputs, A=inputs["A"][:, :2].T.contiguous())
    with pytest.raises(ValueError, match="A must be"):
        selective_scan(**bad)
    bad = dict(inputs, B=inputs["B"][..., :-1])
    with pytest.raises(ValueError, match="B and C"):
        selective_scan(**bad)
