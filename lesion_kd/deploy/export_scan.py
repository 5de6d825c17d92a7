"""The selective scan as an exported graph sees it: loop-free, shape-polymorphic, inference-only.

:func:`lesion_kd.models.scan.selective_scan` already switches to its loop-free chunked formulation
(:func:`~lesion_kd.models.scan.selective_scan_chunked`) while a graph is being captured. Two properties
of that formulation matter for deployment and are changed here, for the duration of an export only
(:func:`export_scan_formulation`):

* **Shape polymorphism.** The training-side formulation decides in Python whether to pad the sequence
  to a multiple of the chunk and how many levels deep to recurse (``if pad:``, ``if nc > 1:``). A
  traced or exported graph bakes those decisions in, so an export with a dynamic spatial size fails
  (``torch.export`` cannot guard on them) or, through ``torch.jit.trace``, silently breaks at another
  size. Here the padding is always applied (zero steps after the end never change earlier states) and
  the recursion depth is fixed from the largest sequence the export must accept (``levels``): a level
  whose sequence fits in one chunk costs a few tiny ops.
* **A layout and op mix that ONNX Runtime runs fast.** The element-wise ops on the (B, D, L, N) states
  are most of the exported student's CPU time. Here time is the last axis (the layout the (B, D, L)
  inputs already have), the in-chunk cumulative sums are GEMMs with constant triangular matrices, and,
  with no backward to protect, ``exp(M - S) * x`` becomes ``x / exp(S - M)``. At 256x256 this takes the
  exported student from about 43 to about 31 ms per image on one CPU thread (ONNX Runtime 1.32).
  Every exponent stays within +-64, as in the training formulation.

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
import torch.nn.functional as F

from ..models import scan as _scan

__all__ = ["export_scan_formulation", "levels_for", "longest_scan", "selective_scan_export"]

CHUNK = 8


def levels_for(max_len: int, chunk: int = CHUNK) -> int:
    """Recursion depth that covers sequences up to ``max_len`` steps: the smallest k with chunk**k >= max_len."""
    return max(1, math.ceil(math.log(max(max_len, 2)) / math.log(chunk) - 1e-9))


def _chunk_matrices(T: int, mid: int, like: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Constant (T, T) and (T, 1) matrices that turn the in-chunk sums into GEMMs (see :func:`_linear_scan`)."""
    s = torch.arange(T, device=like.device)
    upper = (s[:, None] <= s[None, :]).to(like.dtype)  # upper[s, t] = [s <= t]: x @ upper = cumsum
    w_mid = (s <= mid).to(like.dtype)
    return upper, upper - w_mid[:, None], w_mid[:, None], (1 - w_mid)[:, None], torch.ones_like(w_mid)


def _linear_scan(
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
            ends = _linear_scan(M + end_minus_mid, end0, T, min_log, levels - 1, polymorphic)
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
    chunk: int = CHUNK,
    levels: int = 8,
    polymorphic: bool = False,
) -> torch.Tensor:
    """Loop-free, shape-polymorphic selective scan for exported graphs; returns y (B, D, L).

    Shapes as :func:`lesion_kd.models.scan.selective_scan`. ``levels``: the recursion depth used when
    the sequence length is symbolic or ``polymorphic`` is set (covers L <= chunk**levels; see
    :func:`levels_for`); ``polymorphic``: build a graph valid for any length up to that (for
    ``torch.jit.trace``, which cannot mark lengths symbolic). The states
    are laid out (B, G, D/G, N, L), time last, which is the layout of the (B, D, L) inputs.
    """
    b, d, L = u.shape
    n = A.shape[1]
    g = B.shape[1] if B.dim() == 4 else 1
    dg = d // g
    out_dtype = u.dtype
    cd = _scan._compute_dtype(u.dtype)  # the training formulation's accumulation dtype
    u, delta, A, B, C = (t.to(cd) for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.to(cd)[:, None]
    if delta_softplus:
        # softplus as relu(x) + log(1 + exp(-|x|)): ONNX Runtime's Softplus kernel is several times
        # slower than these four ops, and the form is stable for any x (the result differs from
        # F.softplus by less than float32 resolution).
        delta = F.relu(delta) + torch.log1p(torch.exp(-delta.abs()))
    log_a = delta.reshape(b, g, dg, 1, L) * A.reshape(g, dg, n, 1)  # (b, g, dg, n, L)
    x = (delta * u).reshape(b, g, dg, 1, L) * B.reshape(b, g, 1, n, L)
    # Bound every in-chunk exponent |S_t - M| by 64 (float32), as the training formulation does.
    min_log = -_scan._max_exponent(cd) / max(1, (chunk - 1) - (chunk - 1) // 2)
    h = _linear_scan(log_a, x, chunk, min_log, levels, polymorphic)
    y = (h * C.reshape(b, g, 1, n, L)).sum(-2).reshape(b, d, L)
    if D is not None:
        y = y + D.to(cd)[:, None] * u
    if z is not None:
        y = y * F.silu(z.to(cd))
    return y.to(out_dtype)


def longest_scan(net: nn.Module, side: int, probe: int = 64) -> int:
    """The longest sequence any selective scan of ``net`` sees for a ``side`` x ``side`` input (0: no scan).

    Traced once at ``probe`` x ``probe`` (cheap) and scaled by area: a VSS stage scans its h x w tokens.
    It sets the recursion depth of a dynamic-size export (deeper than needed only costs a few tiny ops).
    """
    seen: list[int] = []
    original = _scan.selective_scan_chunked

    def record(u, *args, **kwargs):
        seen.append(int(u.shape[-1]))
        return original(u, *args, **kwargs)

    _scan.selective_scan_chunked = record
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer chatter; this trace is thrown away
            torch.jit.trace(net, torch.rand(1, 3, probe, probe), check_trace=False)
    finally:
        _scan.selective_scan_chunked = original
    return math.ceil(max(seen) * (side / probe) ** 2) if seen else 0


@contextlib.contextmanager
def export_scan_formulation(levels: int, polymorphic: bool = False) -> Iterator[None]:
    """Within the block, graph capture (jit trace, torch.export, ONNX export) records
    :func:`selective_scan_export` (recursion depth ``levels``; shape-polymorphic if ``polymorphic``)
    instead of the training-side chunked formulation. Eager calls are unaffected (they never take the
    chunked path), and the original is restored on exit, also after an error."""
    original = _scan.selective_scan_chunked

    def patched(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
        return selective_scan_export(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                     levels=levels, polymorphic=polymorphic)

    _scan.selective_scan_chunked = patched
    try:
        yield
    finally:
        _scan.selective_scan_chunked = original
