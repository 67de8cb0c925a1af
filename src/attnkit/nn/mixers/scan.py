"""Mixers run as scans: Mega's multi-dimensional damped EMA with single-head gated attention (F2) and Mamba-ND's
selective scan over 1/2/3-D orders (F18).

Part of :mod:`attnkit.nn.mixers` (issue 12); the math is in :mod:`attnkit.ops.mixers`."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from attnkit.nn.mixers._base import _check_dim, _Mixer, _positive
from attnkit.ops.mixers import scan
from attnkit.ops.mixers._common import (
    compute_dtype,
    conv_direct,
    conv_reference,
)

__all__ = ["SCAN_ORDERS", "Mega", "MambaND"]


# ---- F2: Mega ---------------------------------------------------------------------------------------------

class Mega(_Mixer):
    """Mega (Ma et al., "Mega: Moving Average Equipped Gated Attention", eq. 2-3 EMA, eq. 6-12 gated
    attention): multi-dimensional damped EMA ``X' = SiLU(EMA(X) + omega X)``, single-head attention of
    ``Q = kappa_q Z + mu_q``, ``K = kappa_k Z + mu_k`` (``Z = SiLU(X' W_z)``) over ``V = SiLU(X W_v)`` within
    chunks of ``chunk_size`` tokens (Mega-chunk; None: the whole sequence), reset gate ``r``, output
    ``H = SiLU(X' W_h + (r * A V) W_o)`` and update gate ``Y = u H + (1 - u) X``. The EMA runs by chunks
    (:func:`~attnkit.ops.mixers.scan.ema_chunked`; reference: the recurrence; :func:`~attnkit.ops.mixers.scan.
    ema_fft` is its FFT form). Not included: the relative-position bias ``b_rel`` and the
    bidirectional EMA of the paper's encoders (the EMA here is always causal)."""

    def __init__(self, dim: int, *, ema_dim: int = 16, z_dim: int | None = None, chunk_size: int | None = 128,
                 causal: bool = False):
        super().__init__(dim, causal)
        _check_dim(dim)
        z_dim = z_dim or max(dim // 4, 1)
        _positive(ema_dim=ema_dim, z_dim=z_dim)
        if chunk_size is not None:
            _positive(chunk_size=chunk_size)
        self.chunk_size, self.z_dim = chunk_size, z_dim
        self.alpha = nn.Parameter(torch.randn(dim, ema_dim) * 0.2)  # sigmoid(.) around 0.5
        self.delta = nn.Parameter(torch.randn(dim, ema_dim) * 0.2)
        self.beta = nn.Parameter(torch.randn(dim, ema_dim) * 0.02 + (-1.0) ** torch.arange(ema_dim))
        self.eta = nn.Parameter(torch.randn(dim, ema_dim) * ema_dim ** -0.5)
        self.omega = nn.Parameter(torch.randn(dim) * 0.1)
        self.w_z = nn.Linear(dim, z_dim)
        self.kappa = nn.Parameter(torch.randn(2, z_dim) * 0.1 + 1.0)
        self.mu = nn.Parameter(torch.zeros(2, z_dim))
        self.w_v = nn.Linear(dim, dim)
        self.w_r = nn.Linear(dim, dim)
        self.w_h = nn.Linear(dim, dim)
        self.w_o = nn.Linear(dim, dim, bias=False)
        self.w_u = nn.Linear(dim, dim)

    def ema_coefficients(self):
        return scan.ema_coefficients(torch.sigmoid(self.alpha), torch.sigmoid(self.delta), self.beta, self.eta)

    def _gated(self, x, ema_out, attend):
        xp = F.silu(ema_out + self.omega * x)
        z = F.silu(self.w_z(xp))
        q = z * self.kappa[0] + self.mu[0]
        k = z * self.kappa[1] + self.mu[1]
        v = F.silu(self.w_v(x))
        r = F.silu(self.w_r(xp))
        h = F.silu(self.w_h(xp) + self.w_o(r * attend(q, k, v)))
        u = torch.sigmoid(self.w_u(xp))
        return u * h + (1 - u) * x

    def _chunk(self, n: int) -> int:
        return n if self.chunk_size is None else min(self.chunk_size, n)

    def forward(self, x):
        self._check(x)
        p, q, g = self.ema_coefficients()
        ema_out = scan.ema_chunked(x, p, q, g)
        return self._gated(x, ema_out, self._chunked_attention)

    def reference(self, x):
        self._check(x)
        p, q, g = self.ema_coefficients()
        ema_out, _ = scan.ema_reference(x, p, q, g)
        return self._gated(x, ema_out, self._dense_attention)

    def _chunked_attention(self, q, k, v):
        b, n, _ = q.shape
        c = self._chunk(n)
        nc = -(-n // c)
        pad = nc * c - n
        if pad:
            q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
        q, k, v = (t.view(b, nc, c, -1) for t in (q, k, v))
        mask = None
        if pad:
            valid = torch.arange(nc * c, device=q.device).view(nc, 1, c) < n  # keys that exist
            mask = valid.expand(nc, c, c)
            if self.causal:
                mask = mask & torch.ones(c, c, dtype=torch.bool, device=q.device).tril()
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=self.causal and mask is None,
                                             scale=self.z_dim ** -0.5)
        return out.reshape(b, nc * c, -1)[:, :n]

    def _dense_attention(self, q, k, v):
        n = q.shape[1]
        c = self._chunk(n)
        idx = torch.arange(n, device=q.device)
        allowed = (idx[:, None] // c) == (idx[None, :] // c)
        if self.causal:
            allowed = allowed & (idx[None, :] <= idx[:, None])
        logits = (q @ k.transpose(-1, -2)) * self.z_dim ** -0.5
        a = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)
        return a @ v

    def ema_step(self, x_t: torch.Tensor, h: torch.Tensor | None = None):
        """One decoding step of the EMA (the recurrent part; the chunk attention keeps its chunk's keys):
        ``x_t [batch, dim]``, ``h [batch, dim, ema_dim]`` -> ``(EMA output [batch, dim], h)``."""
        p, q, g = self.ema_coefficients()
        if h is None:
            h = torch.zeros(*x_t.shape, p.shape[1], dtype=x_t.dtype, device=x_t.device)
        return scan.ema_step(x_t, p, q, g, h)


# ---- F18: Mamba-ND --------------------------------------------------------------------------------------------

SCAN_ORDERS = ("forward", "backward", "transposed", "transposed_backward")


class MambaND(_Mixer):
    """Mamba-ND (Li et al., "Mamba-ND: Selective State Space Modeling for Multi-Dimensional Data", sec. 3):
    a Mamba layer (Gu & Dao, "Mamba", Algorithm 2: input projection, causal depthwise conv, selective scan
    with input-dependent ``dt, B, C``, SiLU gate, output projection) run over ``x [batch, *spatial, dim]``
    flattened in one ``order``: ``"forward"`` (row-major, H+W+), ``"backward"`` (H-W-), ``"transposed"``
    (axes reversed, W+H+) or ``"transposed_backward"`` (W-H-); the paper alternates orders across layers.
    The scan runs by chunks (:func:`~attnkit.ops.mixers.scan.selective_scan_chunked`); the 1-D forward
    order is causal and decodes with :meth:`step`."""

    spatial = None

    def __init__(self, dim: int, *, state_size: int = 16, expand: int = 2, conv_size: int = 4,
                 dt_rank: int | None = None, order: str = "forward", chunk: int | None = None,
                 causal: bool = False):
        super().__init__(dim, causal)
        _check_dim(dim)
        dt_rank = dt_rank or math.ceil(dim / 16)
        _positive(state_size=state_size, expand=expand, conv_size=conv_size, dt_rank=dt_rank)
        if order not in SCAN_ORDERS:
            raise ValueError(f"order must be one of {SCAN_ORDERS}, got {order!r}")
        if causal and order != "forward":
            raise ValueError(f"causal=True needs order='forward' (the scan runs past to future), got {order!r}")
        self.order, self.chunk, self.conv_size = order, chunk, conv_size
        e = expand * dim
        self.inner, self.state_size, self.dt_rank = e, state_size, dt_rank
        self.in_proj = nn.Linear(dim, 2 * e)
        self.conv = nn.Parameter(torch.randn(conv_size, e) * conv_size ** -0.5)
        self.conv_bias = nn.Parameter(torch.zeros(e))
        self.x_proj = nn.Linear(e, dt_rank + 2 * state_size, bias=False)
        self.dt_proj = nn.Linear(dt_rank, e)
        with torch.no_grad():  # dt in [1e-3, 1e-1] at initialisation, as in Mamba
            dt = torch.exp(torch.rand(e) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        self.A_log = nn.Parameter(torch.log(torch.arange(1, state_size + 1, dtype=torch.float32)).repeat(e, 1))
        self.D = nn.Parameter(torch.ones(e))
        self.out_proj = nn.Linear(e, dim)

    # -- scan orders --------------------------------------------------------------------------------------
    def flatten(self, x: torch.Tensor) -> torch.Tensor:
        """``[batch, *spatial, dim]`` -> ``[batch, seq, dim]`` in this layer's order."""
        nd = x.dim() - 2
        if self.order.startswith("transposed") and nd > 1:
            x = x.permute(0, *range(nd, 0, -1), nd + 1)
        seq = x.reshape(x.shape[0], -1, x.shape[-1])
        return seq.flip(1) if self.order.endswith("backward") else seq

    def unflatten(self, seq: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        nd = len(shape) - 2
        if self.order.endswith("backward"):
            seq = seq.flip(1)
        if self.order.startswith("transposed") and nd > 1:
            tshape = (shape[0], *reversed(shape[1:-1]), seq.shape[-1])
            return seq.reshape(tshape).permute(0, *range(nd, 0, -1), nd + 1)
        return seq.reshape(*shape[:-1], seq.shape[-1])

    # -- the 1-D layer --------------------------------------------------------------------------------------
    def _project(self, u):
        xz = self.in_proj(u)
        return xz.chunk(2, dim=-1)

    def _ssm_inputs(self, xc):
        dt, B, C = self.x_proj(xc).split([self.dt_rank, self.state_size, self.state_size], dim=-1)
        dt = F.softplus(self.dt_proj(dt))
        return dt, B, C

    def _layer(self, u, conv, scan_fn):
        x, z = self._project(u)
        xc = F.silu(conv(x, self.conv, 0) + self.conv_bias)
        dt, B, C = self._ssm_inputs(xc)
        ct = compute_dtype(u.dtype)
        A = -torch.exp(self.A_log.to(ct))
        y = scan_fn(xc.to(ct), dt.to(ct), A, B.to(ct), C.to(ct)).to(u.dtype)
        y = (y + self.D * xc) * F.silu(z)
        return self.out_proj(y)

    def forward(self, x):
        self._check(x)
        seq = self.flatten(x)
        y = self._layer(seq, conv_direct, lambda *a: scan.selective_scan_chunked(*a, chunk=self.chunk))
        return self.unflatten(y, x.shape)

    def reference(self, x):
        self._check(x)
        seq = self.flatten(x)
        y = self._layer(seq, conv_reference, lambda *a: scan.selective_scan_reference(*a)[0])
        return self.unflatten(y, x.shape)

    def step(self, x_t: torch.Tensor, state=None):
        """Causal decoding of a 1-D sequence: ``x_t [batch, dim]``; ``state = (conv window [batch, conv_size,
        inner], h [batch, inner, state_size])``, None at the start."""
        if not self.causal:
            raise ValueError("step() decodes the causal form; build the mixer with causal=True")
        x, z = self._project(x_t)
        ct = compute_dtype(x_t.dtype)
        if state is None:
            window = x.new_zeros(x.shape[0], self.conv_size, self.inner)
            h = torch.zeros(x.shape[0], self.inner, self.state_size, dtype=ct, device=x.device)
        else:
            window, h = state
        window = torch.cat([window[:, 1:], x[:, None]], dim=1)
        # conv convention y_t = sum_j k[j] x_{t - j}: the newest input meets tap 0
        xc = F.silu((window.flip(1) * self.conv).sum(1) + self.conv_bias)
        dt, B, C = self._ssm_inputs(xc)
        A = -torch.exp(self.A_log.to(ct))
        y, h = scan.selective_scan_step(xc.to(ct), dt.to(ct), A, B.to(ct), C.to(ct), h)
        y = (y.to(x_t.dtype) + self.D * xc) * F.silu(z)
        return self.out_proj(y), (window, h)
