"""Visual state-space (VSS) block: a Mamba selective scan over a 2D feature map in four directions.

The four scan orders of SS2D (VMamba): row-major, column-major and both reversed. As in UltraLight
VM-UNet's parallel vision-Mamba layer, the channels are split into four groups that are scanned in
parallel, one order per group, so the block costs one 1D scan over its channels instead of four;
the output projection mixes the groups, so every output position sees the whole map. The scan's
x_proj / dt_proj weights are shared by the groups (as UltraLight shares its Mamba across channel
chunks); A, D and the step bias are per channel.

Tensors are channels-last (B, H, W, C) inside a VSS stage: the linear layers then work on contiguous
rows, and the scan receives its tokens time-major without a transpose.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .scan import selective_scan

__all__ = ["SS2D", "VSSBlock", "scan_orders_to_sequence", "sequence_to_scan_orders"]

_N_DIRECTIONS = 4


def scan_orders_to_sequence(x: torch.Tensor) -> torch.Tensor:
    """(B, H, W, 4, C') channel groups -> time-major tokens (L=H*W, B, 4, C').

    Group 0 is read row-major, group 1 column-major, groups 2 and 3 are those orders reversed.
    """
    b, h, w, k, c = x.shape
    L = h * w
    rows = x[:, :, :, 0::2].permute(1, 2, 0, 3, 4).reshape(L, b, 2, c)  # groups 0, 2 in row-major order
    cols = x[:, :, :, 1::2].permute(2, 1, 0, 3, 4).reshape(L, b, 2, c)  # groups 1, 3 in column-major order
    return torch.stack([rows[:, :, 0], cols[:, :, 0], rows[:, :, 1].flip(0), cols[:, :, 1].flip(0)], dim=2)


def sequence_to_scan_orders(y: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`scan_orders_to_sequence`: (L, B, 4, C') -> (B, H, W, 4, C')."""
    L, b, k, c = y.shape
    rows = torch.stack([y[:, :, 0], y[:, :, 2].flip(0)], dim=2).view(h, w, b, 2, c).permute(2, 0, 1, 3, 4)
    cols = torch.stack([y[:, :, 1], y[:, :, 3].flip(0)], dim=2).view(w, h, b, 2, c).permute(2, 1, 0, 3, 4)
    return torch.stack([rows[..., 0, :], cols[..., 0, :], rows[..., 1, :], cols[..., 1, :]], dim=3)


class SS2D(nn.Module):
    """2D selective-scan mixer; (B, H, W, C) -> (B, H, W, C), channels-last.

    in_proj (C -> 2 d_inner: x, z) -> depthwise 3x3 conv + SiLU on x -> four-direction selective
    scan of x (one direction per channel group) -> LayerNorm -> gate with SiLU(z) -> out_proj.
    """

    def __init__(
        self,
        dim: int,
        d_state: int = 16,
        expand: float = 2.0,
        dt_rank: int | None = None,
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        scan_backend: str = "auto",
    ) -> None:
        super().__init__()
        d_inner = int(expand * dim)
        if d_inner % _N_DIRECTIONS:
            raise ValueError(f"expand * dim = {d_inner} must be divisible by {_N_DIRECTIONS} (scan directions)")
        self.d_inner, self.d_state = d_inner, d_state
        self.d_group = d_inner // _N_DIRECTIONS
        self.dt_rank = dt_rank or max(1, math.ceil(dim / 16))
        self.scan_backend = scan_backend

        self.in_proj = nn.Linear(dim, 2 * d_inner, bias=False)
        self.conv = nn.Conv2d(d_inner, d_inner, 3, padding=1, groups=d_inner)
        self.x_proj = nn.Linear(self.d_group, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_group, bias=False)
        # Mamba's initialisation: S4D-real A = -(1..N), D = 1, step sizes log-uniform in [dt_min, dt_max].
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(d_inner, 1))
        self.D = nn.Parameter(torch.ones(d_inner))
        dt = torch.exp(torch.rand(d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        nn.init.uniform_(self.dt_proj.weight, -(self.dt_rank**-0.5), self.dt_rank**-0.5)
        self.out_norm = nn.LayerNorm(d_inner)
        self.out_proj = nn.Linear(d_inner, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, _ = x.shape
        L, k, c, n = h * w, _N_DIRECTIONS, self.d_group, self.d_state
        xs, z = self.in_proj(x).chunk(2, dim=-1)  # (B, H, W, d_inner) each
        # The conv sees a channels-last NCHW view; oneDNN keeps channels-last, so no copies here.
        xs = F.silu(self.conv(xs.permute(0, 3, 1, 2))).permute(0, 2, 3, 1)
        seq = scan_orders_to_sequence(xs.reshape(b, h, w, k, c))  # (L, B, 4, c)
        dbc = self.x_proj(seq)  # (L, B, 4, R + 2N), shared by the four groups
        dt_low, Bs, Cs = dbc.split([self.dt_rank, n, n], dim=-1)
        delta = self.dt_proj(dt_low)  # (L, B, 4, c)
        # (B, D, L) and (B, G, N, L) views of time-major memory: the scan reads them without copies.
        y = selective_scan(
            seq.view(L, b, k * c).permute(1, 2, 0),
            delta.reshape(L, b, k * c).permute(1, 2, 0),
            -torch.exp(self.A_log),
            Bs.permute(1, 2, 3, 0),
            Cs.permute(1, 2, 3, 0),
            D=self.D,
            delta_bias=self.dt_bias,
            delta_softplus=True,
            backend=self.scan_backend,
        )  # (B, 4c, L)
        y = sequence_to_scan_orders(y.permute(2, 0, 1).reshape(L, b, k, c), h, w).reshape(b, h, w, k * c)
        return self.out_proj(self.out_norm(y) * F.silu(z))


class VSSBlock(nn.Module):
    """Pre-norm residual block: x + SS2D(LN(x)), then x + MLP(LN(x)) when mlp_ratio > 0.

    (B, H, W, C) -> (B, H, W, C), channels-last.
    """

    def __init__(
        self,
        dim: int,
        d_state: int = 16,
        expand: float = 2.0,
        mlp_ratio: float = 0.0,
        scan_backend: str = "auto",
    ) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mixer = SS2D(dim, d_state=d_state, expand=expand, scan_backend=scan_backend)
        self.mlp = None
        if mlp_ratio > 0:
            hidden = int(dim * mlp_ratio)
            self.mlp = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.mixer(self.norm(x))
        if self.mlp is not None:
            x = x + self.mlp(x)
        return x
