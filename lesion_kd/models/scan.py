"""Selective scan (Mamba's S6 recurrence) with mamba-ssm's semantics, on CPU and GPU.

For every batch element, channel ``d`` and state ``n``::

    delta = softplus(delta + delta_bias)            (each part only when asked)
    x_t   = exp(delta_t * A) * x_{t-1} + delta_t * B_t * u_t,     x_{-1} = 0
    y_t   = C_t . x_t + D * u_t
    out   = y * silu(z)                             (when z is given)

Shapes (as ``mamba_ssm.ops.selective_scan_interface.selective_scan_fn``): u, delta, z (B, D, L);
A (D, N); B, C (B, N, L), or (B, G, N, L) with G groups of D // G channels sharing one B/C;
D, delta_bias (D,); returns (B, D, L).

Implementations behind :func:`selective_scan`:

* ``"cuda"``: mamba-ssm's fused kernel (optional extra ``pip install 'lesion-kd[cuda]'``).
* the eager pure-PyTorch path: :class:`SelectiveScanFn`, an autograd Function that runs the
  recurrence over time-major contiguous (L, B, G, N, D/G) blocks (one in-place ``addcmul_`` per step,
  no autograd bookkeeping per step) and whose hand-written backward is the reverse recurrence in the
  same layout. On CPU the per-step overhead and the memory layout dominate, not the arithmetic.
* the loop-free formulations, :class:`ScanFormulation` strategies sharing one set-up (compute dtype,
  delta bias, softplus, B/C grouping) and one finish (D skip, z gate, output dtype):
  ``"chunked"``: :class:`ChunkedScan` / :func:`selective_scan_chunked` (log-space cumulative sums
  within chunks of 8 steps, applied recursively across chunks), a fixed, small number of standard ops.
  It is what tracing and export (``torch.jit.trace``, ``torch.export``, ``torch.onnx.export``) see:
  the eager loop would unroll into L nodes per call. :class:`ExportScan` / :func:`selective_scan_export`
  is the shape-polymorphic, ONNX-Runtime-friendly variant an exporter selects for the duration of an
  export with :func:`scan_formulation` (a context variable read here; nothing is patched).

:func:`selective_scan_ref` (:class:`ReferenceScan`, the same set-up and finish) is the plain sequential
loop (autograd through ``unbind`` time slices) that the tests and the benchmark compare against.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
import warnings
from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F

__all__ = [
    "ChunkedScan",
    "ExportScan",
    "ReferenceScan",
    "ScanFormulation",
    "SelectiveScanFn",
    "cuda_scan_available",
    "levels_for",
    "loop_free_formulation",
    "mamba_ssm_import_error",
    "scan_formulation",
    "selective_scan",
    "selective_scan_chunked",
    "selective_scan_export",
    "selective_scan_ref",
]

_BACKENDS = ("auto", "torch", "cuda", "chunked")
_INSTALL_HINT = (
    "The CUDA selective scan needs the optional extra: pip install 'lesion-kd[cuda]' "
    "(mamba-ssm and causal-conv1d, built against your torch; it needs a CUDA GPU and toolkit). "
    "Use backend='auto' or 'torch' for the pure-PyTorch scan."
)


# --------------------------------------------------------------------------------------------------
# Optional mamba-ssm kernel: imported lazily (importing mamba_ssm pulls in triton and is slow), once,
# and the failure is kept so that a request for the CUDA path can say why it is missing.
# --------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _load_mamba_kernel() -> tuple[Callable | None, str | None]:
    """Return ``(selective_scan_fn, None)`` or ``(None, reason)``; the import is attempted once."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except (ImportError, OSError, RuntimeError) as err:
        # mamba-ssm built without a GPU raises ImportError (selective_scan_cuda); a CUDA/torch ABI
        # mismatch raises OSError or RuntimeError. Keep the message; it is shown on request.
        return None, f"{type(err).__name__}: {err}"
    return selective_scan_fn, None


def mamba_ssm_import_error() -> str | None:
    """Why mamba-ssm's kernel cannot be imported, or None when it can."""
    return _load_mamba_kernel()[1]


def cuda_scan_available() -> bool:
    """True when mamba-ssm's kernel imports and a CUDA device is present."""
    return torch.cuda.is_available() and _load_mamba_kernel()[0] is not None


def _is_tracing() -> bool:
    """True while the graph is being captured (jit trace, dynamo / torch.export, ONNX export)."""
    return bool(
        torch.jit.is_tracing()
        or torch.onnx.is_in_onnx_export()
        or torch.compiler.is_compiling()
        or torch.compiler.is_exporting()
    )


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # Like mamba-ssm's kernel, accumulate half-precision inputs in float32.
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _check_shapes(u, delta, A, B, C, D, z, delta_bias) -> int:
    """Validate shapes; return the number of B/C groups G."""
    if u.dim() != 3 or delta.shape != u.shape:
        raise ValueError(f"u and delta must both be (B, D, L); got {tuple(u.shape)} and {tuple(delta.shape)}")
    b, d, L = u.shape
    if A.dim() != 2 or A.shape[0] != d:
        raise ValueError(f"A must be (D, N) with D={d}; got {tuple(A.shape)}")
    n = A.shape[1]
    if B.dim() == 3:
        g = 1
        ok = B.shape == (b, n, L) and C.shape == (b, n, L)
    elif B.dim() == 4:
        g = B.shape[1]
        ok = B.shape == (b, g, n, L) and C.shape == B.shape and d % g == 0
    else:
        ok, g = False, 1
    if not ok:
        raise ValueError(
            f"B and C must be (B, N, L) = {(b, n, L)} or (B, G, N, L) with D divisible by G; "
            f"got {tuple(B.shape)} and {tuple(C.shape)}"
        )
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None and t.shape != (d,):
            raise ValueError(f"{name} must be (D,) = ({d},); got {tuple(t.shape)}")
    if z is not None and z.shape != u.shape:
        raise ValueError(f"z must be (B, D, L) like u; got {tuple(z.shape)}")
    return g


# --------------------------------------------------------------------------------------------------
# One set-up and one finish for the formulations that run in plain tensor ops
# --------------------------------------------------------------------------------------------------
class _Prepared(NamedTuple):
    """The set-up's result: inputs in the compute dtype, step sizes final, B and C grouped."""

    u: torch.Tensor  # (b, d, L)
    delta: torch.Tensor  # (b, d, L): delta_bias added, softplus applied (when asked)
    A: torch.Tensor  # (d, n)
    B: torch.Tensor  # (b, g, 1, n, L)
    C: torch.Tensor  # (b, g, 1, n, L)
    du: torch.Tensor  # delta * u, (b, d, L)
    groups: int
    dtype: torch.dtype  # the compute dtype
    out_dtype: torch.dtype


def _setup(u, delta, A, B, C, delta_bias, delta_softplus: bool, groups: int, softplus=F.softplus) -> _Prepared:
    """Compute dtype (float32 for half-precision inputs, like mamba-ssm's kernel), delta bias, softplus,
    B/C grouped as (b, g, 1, n, L) and delta * u: what every formulation does before its recurrence."""
    b, d, L = u.shape
    n = A.shape[1]
    out_dtype = u.dtype
    cd = _compute_dtype(u.dtype)
    u, delta, A, B, C = (t.to(cd) for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.to(cd)[:, None]
    if delta_softplus:
        delta = softplus(delta)
    B = B.reshape(b, groups, 1, n, L)
    C = C.reshape(b, groups, 1, n, L)
    return _Prepared(u, delta, A, B, C, delta * u, groups, cd, out_dtype)


def _finish(y: torch.Tensor, p: _Prepared, D: torch.Tensor | None, z: torch.Tensor | None) -> torch.Tensor:
    """The D skip, the z gate and the output dtype, after the recurrence's y = C . x (b, d, L)."""
    if D is not None:
        y = y + D.to(p.dtype)[:, None] * p.u
    if z is not None:
        y = y * F.silu(z.to(p.dtype))
    return y.to(p.out_dtype)


class ScanFormulation:
    """A way of running the recurrence between the shared :func:`_setup` and :func:`_finish`.

    Called like :func:`selective_scan_ref` (u, delta, A, B, C, D, z, delta_bias, delta_softplus); a subclass
    gives :meth:`recurrence` (y = C . x from the prepared inputs) and may change the softplus (as ops, the
    result the same) or skip the shape check (symbolic shapes under graph capture). The reference, the chunked
    and the export formulations are such strategies; :func:`scan_formulation` selects the one graph capture
    records. The eager :class:`SelectiveScanFn` and the CUDA kernel fuse set-up and finish into their own
    time-major loops and are not: :func:`selective_scan` picks them by ``backend``.
    """

    name = "formulation"
    check_shapes = True
    softplus = staticmethod(F.softplus)

    def recurrence(self, p: _Prepared) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus: bool = False) -> torch.Tensor:
        if self.check_shapes:
            g = _check_shapes(u, delta, A, B, C, D, z, delta_bias)
        else:
            g = B.shape[1] if B.dim() == 4 else 1
        p = _setup(u, delta, A, B, C, delta_bias, delta_softplus, g, self.softplus)
        return _finish(self.recurrence(p), p, D, z)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


# --------------------------------------------------------------------------------------------------
# Sequential reference
# --------------------------------------------------------------------------------------------------
class ReferenceScan(ScanFormulation):
    """The straightforward sequential loop over ``unbind`` time slices, differentiated by autograd."""

    name = "reference"

    def recurrence(self, p: _Prepared) -> torch.Tensor:
        b, d, L = p.u.shape
        n, g = p.A.shape[1], p.groups
        dA = torch.exp(p.delta.unsqueeze(-1) * p.A[:, None, :])  # (b, d, L, n)
        dBu = (p.du.reshape(b, g, d // g, L, 1) * p.B.transpose(-1, -2)).reshape(b, d, L, n)
        Ct = p.C.transpose(-1, -2).expand(b, g, d // g, L, n).reshape(b, d, L, n)
        x = p.u.new_zeros(b, d, n)
        ys = []
        for dA_t, dBu_t, C_t in zip(dA.unbind(2), dBu.unbind(2), Ct.unbind(2), strict=True):
            x = dA_t * x + dBu_t
            ys.append((x * C_t).sum(-1))
        return torch.stack(ys, dim=-1)


_REFERENCE = ReferenceScan()


def selective_scan_ref(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
) -> torch.Tensor:
    """The straightforward sequential loop over ``unbind`` time slices, differentiated by autograd.

    Slow (L autograd steps); the ground truth for tests and the baseline of benchmarks/bench_scan.py.
    Shapes as :func:`selective_scan`; returns (B, D, L).
    """
    return _REFERENCE(u, delta, A, B, C, D, z, delta_bias, delta_softplus)



# --------------------------------------------------------------------------------------------------
# Eager pure-PyTorch path: recurrence in a time-major buffer, hand-written backward
# --------------------------------------------------------------------------------------------------
def _time_major(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, ..., L) -> contiguous (L, B, ...), without a copy when the memory is time-major already.

    A caller that keeps its tokens time-major (the VSS block does) passes ``x.permute(1, 2, 0)`` and
    pays nothing. A (B, ..., L)-contiguous input is copied as the transpose of a 2D matrix: ATen does
    those with a cache-blocked kernel, several times faster than a generic 3D strided copy.
    """
    t = t.to(dtype)
    tm = t.movedim(-1, 0)
    if tm.is_contiguous():
        return tm
    if t.is_contiguous():
        L = t.shape[-1]
        return t.reshape(-1, L).t().contiguous().view(L, *t.shape[:-1])
    return tm.contiguous()


def _batch_major(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(L, B, ...) -> (B, ..., L) as a view (values as mamba-ssm's, memory stays time-major)."""
    return t.movedim(0, -1).to(dtype)


# Elements (L_block * B * D * N) of one block buffer: ~2 MB of float32, so that the three buffers a
# block needs stay in cache. Fresh full-size (L, B, D, N) tensors would cost more in page faults and
# memory traffic than the arithmetic on them.
_BLOCK_ELEMS = 1 << 19
_MIN_BLOCK_STEPS = 16


def _block_steps(L: int, per_step: int) -> int:
    return max(1, min(L, max(_MIN_BLOCK_STEPS, _BLOCK_ELEMS // max(per_step, 1))))


class SelectiveScanFn(torch.autograd.Function):
    """Selective scan with a hand-written backward; both passes loop over time in place.

    Layout: the states are time-major and contiguous, (L, B, G, N, D/G) (state index outside the
    channel index), in blocks of a few dozen steps; each step is one in-place ``addcmul_`` on a
    contiguous (B, G, N, D/G) slice, so that no autograd node and no strided copy is made per step,
    and y_t = C_t . x_t is a (1 x N) @ (N x D/G) product per (t, b, group), which CPU BLAS does far
    faster than the (D/G x N) @ (N x 1) one of a channel-outer layout. Forward keeps only the state
    entering each block (as mamba-ssm's kernel, backward recomputes the states rather than storing
    all L of them). Backward walks the blocks in reverse: recompute the block's states, run the
    reverse recurrence g_t = C_t dy_t + exp(delta_{t+1} A) g_{t+1}, then every input gradient follows
    from g, the states and a few batched products.
    """

    @staticmethod
    def _prepare(u, delta, A, B, C, delta_bias, delta_softplus, g):
        """Time-major (L, B, ...) copies of the small inputs, in the compute dtype; A as (G, N, D/G)."""
        bsz, d, L = u.shape
        n = A.shape[1]
        cd = _compute_dtype(u.dtype)
        dt_raw = _time_major(delta, cd)  # (L, b, d)
        if delta_bias is not None:
            dt_raw = dt_raw + delta_bias.to(cd)
        dt = F.softplus(dt_raw) if delta_softplus else dt_raw
        ut = _time_major(u, cd)
        Bt = _time_major(B.reshape(bsz, g, n, L), cd)  # (L, b, g, n)
        Ct = _time_major(C.reshape(bsz, g, n, L), cd)
        At = A.to(cd).view(g, d // g, n).transpose(1, 2).contiguous()  # (g, n, d/g)
        return dt_raw, dt, ut, Bt, Ct, At

    @staticmethod
    def _block_states(a, h, a_steps, h_steps, dt, dtu, At, Bt, h_in) -> None:
        """Fill a with exp(dt A) and h with the states of one block (both (m, b, g, n, d/g)), given the
        entering state h_in (b, g, n, d/g). ``a_steps`` / ``h_steps`` are per-step views of the
        buffers, made once per call (``unbind`` per block would cost as much as the steps)."""
        m, bsz, g, n, dg = h.shape
        torch.mul(dt.view(m, bsz, g, 1, dg), At, out=a)
        a.exp_()
        torch.mul(Bt.view(m, bsz, g, n, 1), dtu.view(m, bsz, g, 1, dg), out=h)
        h_steps[0].addcmul_(a_steps[0], h_in)
        for t in range(1, m):
            h_steps[t].addcmul_(a_steps[t], h_steps[t - 1])

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus: bool, for_backward: bool = True):
        g = _check_shapes(u, delta, A, B, C, D, z, delta_bias)
        bsz, d, L = u.shape
        n = A.shape[1]
        dg = d // g
        dt_raw, dt, ut, Bt, Ct, At = SelectiveScanFn._prepare(u, delta, A, B, C, delta_bias, delta_softplus, g)
        cd = dt.dtype
        dtu = dt * ut

        lb = _block_steps(L, bsz * d * n)
        starts = list(range(0, L, lb))
        a_buf = dt.new_empty(lb, bsz, g, n, dg)
        h_buf = dt.new_empty(lb, bsz, g, n, dg)
        # State entering each block: kept for backward (checkpoints); inference needs only a carry.
        entering = dt.new_zeros(len(starts) if for_backward else 1, bsz, g, n, dg)
        a_steps, h_steps = a_buf.unbind(0), h_buf.unbind(0)
        y = dt.new_empty(L, bsz, d)
        for k, t0 in enumerate(starts):
            t1 = min(t0 + lb, L)
            m, mbg = t1 - t0, (t1 - t0) * bsz * g
            kk = k if for_backward else 0
            SelectiveScanFn._block_states(
                a_buf[:m], h_buf[:m], a_steps, h_steps, dt[t0:t1], dtu[t0:t1], At, Bt[t0:t1], entering[kk]
            )
            if k + 1 < len(starts):
                entering[kk + 1 if for_backward else 0].copy_(h_steps[m - 1])
            # y_t = C_t . x_t for every (t, b, group) of the block: one batched (1 x N) @ (N x D/G).
            torch.bmm(Ct[t0:t1].view(mbg, 1, n), h_buf[:m].view(mbg, n, dg), out=y[t0:t1].view(mbg, 1, dg))
        if D is not None:
            y = torch.addcmul(y, ut, D.to(cd))
        out = y
        zt = None
        if z is not None:
            zt = _time_major(z, cd)
            out = y * F.silu(zt)

        ctx.groups = g
        ctx.block = lb
        ctx.has = (D is not None, z is not None, delta_bias is not None)
        ctx.dtypes = tuple(getattr(t, "dtype", None) for t in (u, delta, A, B, C, z, delta_bias))
        ctx.save_for_backward(ut, dt, dtu, dt_raw if delta_softplus else None, At, Bt, Ct, D, zt, y, entering)
        return _batch_major(out, u.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        ut, dt, dtu, dt_raw, At, Bt, Ct, D, zt, y, entering = ctx.saved_tensors
        has_D, has_z, has_bias = ctx.has
        g, lb = ctx.groups, ctx.block
        L, bsz, d = ut.shape
        n, dg = At.shape[1], At.shape[2]
        cd = ut.dtype
        u_dtype, delta_dtype, A_dtype, B_dtype, C_dtype, z_dtype, bias_dtype = ctx.dtypes

        go = _time_major(grad_out, cd)  # (L, b, d)
        dz = None
        if has_z:  # out = y * silu(z); ATen's fused silu_backward gives go * y * silu'(z)
            dz = torch.ops.aten.silu_backward(go * y, zt)
            dy = go * F.silu(zt)
        else:
            dy = go

        a_buf = dt.new_empty(lb, bsz, g, n, dg)
        h_buf = dt.new_empty(lb, bsz, g, n, dg)
        g_buf = dt.new_empty(lb, bsz, g, n, dg)
        g_next = dt.new_zeros(bsz, g, n, dg)  # state gradient of the first step of the block after
        a_next = dt.new_zeros(bsz, g, n, dg)  # and its decay
        dC = dt.new_empty(L, bsz, g, n)
        dB = dt.new_empty(L, bsz, g, n)
        d_dtu = dt.new_empty(L, bsz, d)
        ddt = dt.new_empty(L, bsz, d)
        dA_param = dt.new_zeros(g, n, dg)
        a_steps, h_steps, g_steps = a_buf.unbind(0), h_buf.unbind(0), g_buf.unbind(0)
        starts = list(range(0, L, lb))
        for k in range(len(starts) - 1, -1, -1):
            t0 = starts[k]
            t1 = min(t0 + lb, L)
            m, mbg = t1 - t0, (t1 - t0) * bsz * g
            a, h, gh = a_buf[:m], h_buf[:m], g_buf[:m]
            SelectiveScanFn._block_states(a, h, a_steps, h_steps, dt[t0:t1], dtu[t0:t1], At, Bt[t0:t1], entering[k])
            dy_k = dy[t0:t1]
            # Reverse recurrence for the state gradient, carried in from the block after.
            torch.mul(Ct[t0:t1].view(m, bsz, g, n, 1), dy_k.view(m, bsz, g, 1, dg), out=gh)
            g_steps[m - 1].addcmul_(a_next, g_next)
            for t in range(m - 2, -1, -1):
                g_steps[t].addcmul_(a_steps[t + 1], g_steps[t + 1])
            g_next.copy_(g_steps[0])
            a_next.copy_(a_steps[0])

            # dC_t = sum_c x_t dy_t; the input term B_t (dt u)_t has gradient g_t.
            torch.bmm(h.view(mbg, n, dg), dy_k.reshape(mbg, dg, 1), out=dC[t0:t1].view(mbg, n, 1))
            torch.bmm(Bt[t0:t1].reshape(mbg, 1, n), gh.view(mbg, n, dg), out=d_dtu[t0:t1].view(mbg, 1, dg))
            torch.bmm(gh.view(mbg, n, dg), dtu[t0:t1].reshape(mbg, dg, 1), out=dB[t0:t1].view(mbg, n, 1))

            # Gradient w.r.t. the log-decay dt_t A: g_t * x_{t-1} * exp(dt_t A), in place over g.
            gh[1:].mul_(h[:-1])
            gh[0].mul_(entering[k])
            gh.mul_(a)
            torch.mul(gh, dt[t0:t1].view(m, bsz, g, 1, dg), out=h)  # h is free now
            dA_param += h.view(m * bsz, g, n, dg).sum(0)
            gh.mul_(At)
            torch.sum(gh, dim=-2, out=ddt[t0:t1].view(m, bsz, g, dg))

        du = d_dtu * dt
        if has_D:
            du.addcmul_(dy, D.to(cd))
        ddt.addcmul_(d_dtu, ut)
        if dt_raw is not None:  # fused softplus backward (beta 1, threshold 20, as F.softplus)
            ddt = torch.ops.aten.softplus_backward(ddt, dt_raw, 1.0, 20.0)
        d_bias = ddt.sum((0, 1)).to(bias_dtype) if has_bias else None
        dD = (dy * ut).sum((0, 1)).to(D.dtype) if has_D else None

        back = _batch_major
        dB_out = back(dB, B_dtype)
        dC_out = back(dC, C_dtype)
        if g == 1:
            dB_out, dC_out = dB_out.squeeze(1), dC_out.squeeze(1)
        # Gradients keep the time-major memory of the saved inputs; autograd accepts any strides.
        return (
            back(du, u_dtype),
            back(ddt, delta_dtype),
            dA_param.transpose(1, 2).reshape(d, n).to(A_dtype),
            dB_out,
            dC_out,
            dD,
            back(dz, z_dtype) if has_z else None,
            d_bias,
            None,
            None,
        )


# --------------------------------------------------------------------------------------------------
# Export-friendly path: chunked log-space formulation, no data-dependent or length-long loops
# --------------------------------------------------------------------------------------------------
_CHUNK = 8


def _max_exponent(dtype: torch.dtype) -> float:
    # Largest |exponent| the chunked formulation may meet: well inside exp's range (88 for float32,
    # 709 for float64), leaving room for |inputs| up to ~1e10 and a sum over a chunk.
    return 600.0 if dtype == torch.float64 else 64.0


def _chunked_linear_scan(log_a: torch.Tensor, x: torch.Tensor, chunk: int, min_log: float) -> torch.Tensor:
    """All states of h_t = exp(log_a_t) h_{t-1} + x_t, h_{-1} = 0, along dim -2; (..., L, N) -> same.

    Within a chunk of T steps, with S the inclusive cumulative sum of log_a and M = S at the chunk's
    middle step, h_t = exp(S_t - M) * (cumsum_s(exp(M - S_s) x_s) + exp(M) h_start): ten full-size
    vectorised ops (clamp, cumsum, 2 sub, 2 exp, mul, cumsum, add, mul). Referencing the middle
    step bounds every exponent by |min_log| * T / 2. Log-decays below
    ``min_log`` are raised to it: such a step keeps a fraction exp(min_log) of the previous state
    (1e-7 for float32), which is below the working precision, so this changes nothing measurable.
    The chunk-end states obey the same recurrence one level up (decay S_T, input h_T with zero start),
    so it recurses, log_T(L) levels deep, until one chunk is left.
    """
    L = x.shape[-2]
    T = min(chunk, L)
    pad = (-L) % T
    if pad:  # padding at the end never influences earlier states
        log_a = F.pad(log_a, (0, 0, 0, pad))
        x = F.pad(x, (0, 0, 0, pad))
    nc = (L + pad) // T
    la = log_a.clamp(min=min_log).unflatten(-2, (nc, T))  # (..., nc, T, N)
    xx = x.unflatten(-2, (nc, T))
    S = la.cumsum(-2)
    mid = (T - 1) // 2
    M = S[..., mid : mid + 1, :]
    e = torch.exp(S - M)
    # exp(M - S), not 1 / e: the gradient of a division squares e, which overflows float32.
    acc = torch.cumsum(torch.exp(M - S) * xx, dim=-2)
    if nc > 1:
        # Chunk ends with a zero start are e_T * acc_T; their own recurrence gives each chunk's start.
        ends = _chunked_linear_scan(S[..., -1, :], e[..., -1, :] * acc[..., -1, :], chunk, min_log)  # (..., nc, N)
        start = F.pad(ends[..., :-1, :], (0, 0, 1, 0))  # state entering each chunk; zero for the first
        acc = acc + torch.exp(M) * start.unsqueeze(-2)  # M >= 4 min_log: exp(M) stays a normal float
    h = (e * acc).flatten(-3, -2)
    return h[..., :L, :] if pad else h


def _min_log(dtype: torch.dtype, chunk: int) -> float:
    """Lowest log-decay a step keeps (lower ones are raised to it): bounds every in-chunk exponent
    |S_t - M| by :func:`_max_exponent`."""
    return -_max_exponent(dtype) / max(1, (chunk - 1) - (chunk - 1) // 2)


class ChunkedScan(ScanFormulation):
    """The loop-free formulation of :func:`selective_scan_chunked` (``chunk`` steps a chunk); the default
    that graph capture records."""

    name = "chunked"

    def __init__(self, chunk: int = _CHUNK) -> None:
        self.chunk = chunk

    def recurrence(self, p: _Prepared) -> torch.Tensor:
        b, d, L = p.u.shape
        n, g = p.A.shape[1], p.groups
        log_a = p.delta.unsqueeze(-1) * p.A[:, None, :]  # (b, d, L, n)
        x = (p.du.reshape(b, g, d // g, L, 1) * p.B.transpose(-1, -2)).reshape(b, d, L, n)
        h = _chunked_linear_scan(log_a, x, self.chunk, _min_log(p.dtype, self.chunk))  # (b, d, L, n)
        return (h.reshape(b, g, d // g, L, n) * p.C.transpose(-1, -2)).sum(-1).reshape(b, d, L)

    def __repr__(self) -> str:
        return f"ChunkedScan(chunk={self.chunk})"


_CHUNKED = ChunkedScan()


def selective_scan_chunked(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    chunk: int = _CHUNK,
) -> torch.Tensor:
    """Loop-free selective scan (cumsum, exp, mul, pad, reshape only): traces and exports to ONNX.

    The graph has a fixed number of nodes per log_chunk(L) level (3 levels for L=256), independent
    of L otherwise. Gradients come from autograd. Shapes as :func:`selective_scan`; returns (B, D, L).
    """
    scan = _CHUNKED if chunk == _CHUNK else ChunkedScan(chunk)
    return scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus)


# --------------------------------------------------------------------------------------------------
# Export formulation: loop-free, shape-polymorphic, inference-only (selected by the exporter)
# --------------------------------------------------------------------------------------------------
def levels_for(max_len: int, chunk: int = _CHUNK) -> int:
    """Recursion depth that covers sequences up to ``max_len`` steps: the smallest k with chunk**k >= max_len."""
    return max(1, math.ceil(math.log(max(max_len, 2)) / math.log(chunk) - 1e-9))


def _chunk_matrices(T: int, mid: int, like: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Constant (T, T) and (T, 1) matrices that turn the in-chunk sums into GEMMs (see :func:`_export_linear_scan`)."""
    s = torch.arange(T, device=like.device)
    upper = (s[:, None] <= s[None, :]).to(like.dtype)  # upper[s, t] = [s <= t]: x @ upper = cumsum
    w_mid = (s <= mid).to(like.dtype)
    return upper, upper - w_mid[:, None], w_mid[:, None], (1 - w_mid)[:, None], torch.ones_like(w_mid)


def _export_linear_scan(
    log_a: torch.Tensor, x: torch.Tensor, chunk: int, min_log: float, levels: int, polymorphic: bool
) -> torch.Tensor:
    """All states of h_t = exp(log_a_t) h_{t-1} + x_t, h_{-1} = 0, along the last dim; (..., L) -> same.

    Time is the last axis and every in-chunk sum is a product with a constant (T, T) or (T, 1)
    matrix, so that each becomes one GEMM over all rows ((B * D * N * L / T) x T times T x T). With
    the chunk axis innermost, ONNX Runtime's CumSum and its broadcasting element-wise kernels run in
    spans of T = 8 elements and cost several times a same-shape op; the GEMMs do not.

    Per chunk, with S the cumulative log-decay and M = S at the middle step (as the training-side
    formulation): h_t = exp(S_t - M) * (sum_{s<=t} x_s / exp(S_s - M) + exp(M) h_start). Log-decays
    below ``min_log`` are raised to it, which bounds every exponent by 64 (the decay is then below
    float32 precision anyway). The chunk-end states follow the same recurrence one level up;
    ``levels`` bounds the depth wherever the length is not a plain int (symbolic under torch.export
    with a dynamic size; a traced value under ``torch.jit.trace``) or ``polymorphic`` is set; a plain
    int length recurses as far as it needs and pads only when it must. ``polymorphic`` makes a
    ``torch.jit.trace`` graph valid for other lengths (always pad; fixed depth).
    """
    L = x.shape[-1]
    T = chunk
    log_a = log_a.clamp(min=min_log)
    pad = (-L) % T
    static_pad = isinstance(pad, int) and not polymorphic
    if not (static_pad and pad == 0):  # a symbolic length always pads (by zero steps where it divides)
        log_a = F.pad(log_a, (0, pad))
        x = F.pad(x, (0, pad))
    la = log_a.unflatten(-1, (-1, T))  # (..., nc, T)
    xx = x.unflatten(-1, (-1, T))
    upper, w_rel, w_mid, w_rest, ones = _chunk_matrices(T, (T - 1) // 2, la)
    e = torch.exp(la @ w_rel)  # exp(S_t - M)
    q = xx / e
    nc = la.shape[-2]
    if nc > 1 if isinstance(nc, int) and not polymorphic else levels > 1:
        M = (la @ w_mid).squeeze(-1)  # (..., nc)
        end_minus_mid = (la @ w_rest).squeeze(-1)  # S_T - M
        end0 = torch.exp(end_minus_mid) * (q @ ones[:, None]).squeeze(-1)  # chunk-end state, zero start
        if polymorphic:
            # Chunk ends by recursive doubling: nested chunk levels would need nested size arithmetic
            # (ceil of ceil of L / 8), on which torch.export adds guards that the ONNX graph then drops.
            steps = (levels - 1) * round(math.log2(T))  # covers nc <= T**(levels - 1)
            ends = _doubling_scan(M + end_minus_mid, end0, steps)
        else:
            ends = _export_linear_scan(M + end_minus_mid, end0, T, min_log, levels - 1, polymorphic)
        start = F.pad(ends[..., :-1], (1, 0))  # state entering each chunk; zero for the first
        carry = (torch.exp(M) * start).unsqueeze(-1)  # M >= 4 min_log: exp(M) stays a normal float
        # carry @ ones: the (..., nc, 1) -> (..., nc, T) broadcast as a K=1 GEMM (see the docstring)
        acc = q @ upper + carry @ ones[None, :]
    else:
        acc = q @ upper
    h = (e * acc).flatten(-2)
    return h if static_pad and pad == 0 else h[..., :L]


def _doubling_scan(log_a: torch.Tensor, x: torch.Tensor, steps: int) -> torch.Tensor:
    """All states of h_t = exp(log_a_t) h_{t-1} + x_t along the last dim, for L <= 2**steps, by recursive
    doubling (Hillis-Steele): after step k each state holds the last 2**(k+1) inputs. Only shifts by
    constants and slices to the input's own length: valid for any L without size arithmetic.
    Needs log_a <= 0 (a decaying, stable recurrence, as in the VSS blocks), so that exp never overflows.
    """
    L = x.shape[-1]
    for k in range(steps):
        shift = 1 << k
        x = x + torch.exp(log_a) * F.pad(x, (shift, 0))[..., :L]
        if k + 1 < steps:
            log_a = log_a + F.pad(log_a, (shift, 0))[..., :L]
    return x


def _stable_softplus(x: torch.Tensor) -> torch.Tensor:
    # softplus as relu(x) + log(1 + exp(-|x|)): ONNX Runtime's Softplus kernel is several times slower than
    # these four ops, and the form is stable for any x (the result differs from F.softplus by less than
    # float32 resolution).
    return F.relu(x) + torch.log1p(torch.exp(-x.abs()))


class ExportScan(ScanFormulation):
    """The scan as an exported graph sees it: loop-free, shape-polymorphic, inference-only.

    Selected for the duration of an export (``with scan_formulation(ExportScan(levels, polymorphic)):``, as
    :func:`lesion_kd.deploy.export_scan.export_scan_formulation` does); the set-up and finish are the shared
    ones. Two properties of the chunked formulation matter for deployment and differ here:

    * **Shape polymorphism.** The chunked formulation decides in Python whether to pad the sequence to a
      multiple of the chunk and how many levels deep to recurse (``if pad:``, ``if nc > 1:``). A traced or
      exported graph bakes those decisions in, so an export with a dynamic spatial size fails
      (``torch.export`` cannot guard on them) or, through ``torch.jit.trace``, silently breaks at another
      size. Here the padding is always applied (zero steps after the end never change earlier states) and
      the recursion depth is fixed from the largest sequence the export must accept (``levels``, see
      :func:`levels_for`): a level whose sequence fits in one chunk costs a few tiny ops. ``polymorphic``:
      build a graph valid for any length up to chunk**levels (for ``torch.jit.trace``, which cannot mark
      lengths symbolic).
    * **A layout and op mix that ONNX Runtime runs fast.** The element-wise ops on the states are most of
      the exported student's CPU time. Here the states are laid out (B, G, D/G, N, L), time last (the layout
      the (B, D, L) inputs already have), the in-chunk cumulative sums are GEMMs with constant triangular
      matrices, softplus is four cheap ops, and, with no backward to protect, ``exp(M - S) * x`` becomes
      ``x / exp(S - M)``. At 256x256 this takes the exported student from about 43 to about 31 ms per image
      on one CPU thread (ONNX Runtime 1.32). Every exponent stays within +-64, as in the chunked formulation.

    Shapes are not checked (they may be symbolic); semantics, shapes and dtypes are :func:`selective_scan`'s.
    """

    name = "export"
    check_shapes = False
    softplus = staticmethod(_stable_softplus)

    def __init__(self, levels: int = 8, polymorphic: bool = False, chunk: int = _CHUNK) -> None:
        self.levels, self.polymorphic, self.chunk = levels, polymorphic, chunk

    def recurrence(self, p: _Prepared) -> torch.Tensor:
        b, d, L = p.u.shape
        n, g = p.A.shape[1], p.groups
        dg = d // g
        log_a = p.delta.reshape(b, g, dg, 1, L) * p.A.reshape(g, dg, n, 1)  # (b, g, dg, n, L)
        x = p.du.reshape(b, g, dg, 1, L) * p.B
        h = _export_linear_scan(log_a, x, self.chunk, _min_log(p.dtype, self.chunk), self.levels, self.polymorphic)
        return (h * p.C).sum(-2).reshape(b, d, L)

    def __repr__(self) -> str:
        return f"ExportScan(levels={self.levels}, polymorphic={self.polymorphic}, chunk={self.chunk})"


def selective_scan_export(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    chunk: int = _CHUNK,
    levels: int = 8,
    polymorphic: bool = False,
) -> torch.Tensor:
    """Loop-free, shape-polymorphic selective scan for exported graphs (:class:`ExportScan`); returns y (B, D, L).

    Shapes as :func:`selective_scan`. ``levels``: the recursion depth used when the sequence length is
    symbolic or ``polymorphic`` is set (covers L <= chunk**levels; see :func:`levels_for`); ``polymorphic``:
    build a graph valid for any length up to that (for ``torch.jit.trace``, which cannot mark lengths symbolic).
    """
    return ExportScan(levels, polymorphic, chunk)(u, delta, A, B, C, D, z, delta_bias, delta_softplus)


# --------------------------------------------------------------------------------------------------
# Which loop-free formulation graph capture records: a context variable, read by selective_scan
# --------------------------------------------------------------------------------------------------
_LOOP_FREE: contextvars.ContextVar[ScanFormulation | None] = contextvars.ContextVar("lesion_kd_scan_formulation",
                                                                                    default=None)


def loop_free_formulation() -> ScanFormulation:
    """The formulation :func:`selective_scan` runs while a graph is captured or for ``backend="chunked"``:
    the one selected by :func:`scan_formulation`, else :class:`ChunkedScan`."""
    return _LOOP_FREE.get() or _CHUNKED


@contextlib.contextmanager
def scan_formulation(formulation: ScanFormulation) -> Iterator[ScanFormulation]:
    """Within the block (this thread or task only), graph capture (jit trace, torch.export, ONNX export) and
    ``backend="chunked"`` calls of :func:`selective_scan` run ``formulation`` instead of the chunked one; eager
    calls of the other backends are unaffected, and the previous choice comes back on exit, also after an
    error. No function of this module is replaced: ``selective_scan_chunked`` stays what it is."""
    if not isinstance(formulation, ScanFormulation):
        raise TypeError(f"scan_formulation needs a ScanFormulation, got {type(formulation).__name__}")
    token = _LOOP_FREE.set(formulation)
    try:
        yield formulation
    finally:
        _LOOP_FREE.reset(token)


# --------------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------------

def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """Selective scan with mamba-ssm's ``selective_scan_fn`` semantics; returns y (B, D, L).

    Args:
        u, delta: (B, D, L) input and step sizes; z: optional (B, D, L) gate, output * silu(z).
        A: (D, N) state matrix (negative for a stable recurrence).
        B, C: (B, N, L), or (B, G, N, L) with G groups of D // G channels each.
        D: optional (D,) skip; delta_bias: optional (D,) added to delta; delta_softplus: softplus(delta).
        backend: ``"auto"``: mamba-ssm's CUDA kernel for CUDA tensors when it is installed, otherwise
            the pure-PyTorch scan; ``"torch"``: the pure-PyTorch scan (the eager recurrence, or the
            chunked formulation while tracing or exporting); ``"cuda"``: the kernel, an error saying
            why and how to install it when it is unavailable; ``"chunked"``: the loop-free formulation.
            Wherever the loop-free formulation runs, it is :func:`loop_free_formulation`'s: the chunked one
            unless :func:`scan_formulation` selected another (an exporter selects :class:`ExportScan`).
    """
    if backend not in _BACKENDS:
        raise ValueError(f"unknown selective-scan backend {backend!r}; choose one of {_BACKENDS}")
    if backend == "cuda" or (backend == "auto" and u.is_cuda and not _is_tracing()):
        kernel, reason = _load_mamba_kernel()
        if kernel is not None and u.is_cuda:
            return kernel(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
        if backend == "cuda":
            why = reason if kernel is None else f"the tensors are on {u.device}, not on a CUDA device"
            raise RuntimeError(f"CUDA selective scan unavailable: {why}. {_INSTALL_HINT}")
        # auto on a GPU without the kernel: correct, but slower; say so (Python shows it once per caller)
        warnings.warn(
            f"mamba-ssm's CUDA kernel is unavailable ({reason}); using the pure-PyTorch scan. {_INSTALL_HINT}",
            stacklevel=2,
        )
    if backend == "chunked" or _is_tracing():  # the chunked formulation, or the one scan_formulation selected
        return loop_free_formulation()(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    tensors = (u, delta, A, B, C, D, z, delta_bias)
    for_backward = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    return SelectiveScanFn.apply(*tensors, delta_softplus, for_backward)
