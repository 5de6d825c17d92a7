"""Selective-scan forward+backward time on CPU: this suite's pure-PyTorch scan vs. the sequential
reference loop vs. mambapy's parallel scan (batch 2, 192 channels, state 16, L = 1024 and 4096).

Run: .venv/bin/python benchmarks/bench_scan.py [--lengths 1024 4096] [--repeats 3]
Prints a markdown table. All three compute the same function (D, z, delta_bias, softplus included).
"""

from __future__ import annotations

import os
import statistics
import time

import torch
import torch.nn.functional as F
from machine import print_machine_header

from lesion_kd.commands import parser
from lesion_kd.models.scan import selective_scan, selective_scan_chunked, selective_scan_ref


def mambapy_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus=True):
    """The same selective scan written as mambapy writes it, around ``mambapy.pscan.pscan``.

    (B, D, L) inputs; mambapy works in (B, L, D, N).
    """
    from mambapy.pscan import pscan

    delta = delta + delta_bias[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    dt = delta.transpose(1, 2)  # (b, L, d)
    x = u.transpose(1, 2)
    deltaA = torch.exp(dt.unsqueeze(-1) * A)  # (b, L, d, n)
    BX = (dt * x).unsqueeze(-1) * B.transpose(1, 2).unsqueeze(2)
    hs = pscan(deltaA, BX)
    y = (hs @ C.transpose(1, 2).unsqueeze(-1)).squeeze(3)  # (b, L, d)
    y = y + D * x
    return (y * F.silu(z.transpose(1, 2))).transpose(1, 2)


IMPLEMENTATIONS = {
    "pure-PyTorch (SelectiveScanFn)": lambda *a: selective_scan(*a, delta_softplus=True, backend="torch"),
    "sequential reference loop": lambda *a: selective_scan_ref(*a, delta_softplus=True),
    "mambapy pscan": lambda *a: mambapy_scan(*a, delta_softplus=True),
    "chunked (export path)": lambda *a: selective_scan_chunked(*a, delta_softplus=True),
}


def make_inputs(b: int, d: int, n: int, L: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(b, d, L, generator=g)
    delta = torch.randn(b, d, L, generator=g) * 0.5 - 2.0
    A = -torch.arange(1, n + 1, dtype=torch.float32).repeat(d, 1)  # Mamba's S4D-real init
    B = torch.randn(b, n, L, generator=g)
    C = torch.randn(b, n, L, generator=g)
    D = torch.ones(d)
    z = torch.randn(b, d, L, generator=g)
    delta_bias = torch.rand(d, generator=g) * 0.1
    return [t.requires_grad_() for t in (u, delta, A, B, C, D, z, delta_bias)]


def time_fwd_bwd(fn, inputs, repeats: int) -> tuple[float, float]:
    """Median seconds of forward and of forward+backward."""
    fwd, total = [], []
    w = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(1))
    for _ in range(repeats + 1):  # first run warms up allocator and caches
        for t in inputs:
            t.grad = None
        t0 = time.perf_counter()
        y = fn(*inputs)
        t1 = time.perf_counter()
        (y * w).sum().backward()
        t2 = time.perf_counter()
        fwd.append(t1 - t0)
        total.append(t2 - t0)
    return statistics.median(fwd[1:]), statistics.median(total[1:])


def main() -> None:
    p = parser("benchmarks/bench_scan.py", __doc__)  # the docstring's whole first sentence (it spans two lines)
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--channels", type=int, default=192)
    p.add_argument("--state", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--only", nargs="+", default=None, help="subset of implementations (name prefixes)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    impls = {k: v for k, v in IMPLEMENTATIONS.items() if not args.only or any(k.startswith(o) for o in args.only)}
    impls.setdefault("sequential reference loop", IMPLEMENTATIONS["sequential reference loop"])

    print_machine_header()
    print(f"batch {args.batch}, channels {args.channels}, state {args.state}, float32, "
          f"median of {args.repeats} after 1 warm-up\n")
    print("| L | implementation | forward s | forward+backward s | speed-up vs loop (fwd+bwd) |")
    print("|---|---|---|---|---|")
    for L in args.lengths:
        inputs = make_inputs(args.batch, args.channels, args.state, L)
        rows = {name: time_fwd_bwd(fn, inputs, args.repeats) for name, fn in impls.items()}
        ref_total = rows["sequential reference loop"][1]
        for name, (f, t) in rows.items():
            print(f"| {L} | {name} | {f:.3f} | {t:.3f} | {ref_total / t:.1f}x |")
    print(f"\nload average after: {tuple(round(x, 2) for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
