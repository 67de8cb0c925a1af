"""Global-summary mixers: PoNet's multi-granularity pooling (F14), Hrrformer's holographic reduced
representations (F15) and the Extractor (F20).

Part of :mod:`attnkit.nn.mixers` (issue 12); the math is in :mod:`attnkit.ops.mixers`."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from attnkit.nn.mixers._base import _check_dim, _Mixer, _positive, _refuse_causal
from attnkit.ops.mixers import hrr
from attnkit.ops.mixers._common import (
    long_conv,
)

__all__ = ["PoNetMixer", "HrrformerMixer", "Extractor"]


# ---- F14: PoNet -------------------------------------------------------------------------------------------------

class PoNetMixer(_Mixer):
    """PoNet's multi-granularity pooling (Tan et al., "PoNet: Pooling Network for Efficient Token Mixing in
    Long Sequences", sec. 3): global aggregation (a mean-pooled query ``g`` attending once over the tokens,
    ``g' = softmax(g K^T / sqrt(d)) V``), segment max-pooling over fixed segments of ``segment`` tokens (the
    paper's sentence segments) and local max-pooling over ``local_window`` tokens, fused as
    ``o_i = W_o (g' * x_o_i + s_seg(i) + l_i)``. O(seq dim)."""

    def __init__(self, dim: int, *, segment: int = 32, local_window: int = 3, causal: bool = False):
        super().__init__(dim, False)
        _refuse_causal("PoNet", causal)
        _check_dim(dim)
        _positive(segment=segment, local_window=local_window)
        if local_window % 2 == 0:
            raise ValueError(f"local_window must be odd (same padding), got {local_window}")
        self.segment, self.local_window = segment, local_window
        self.proj = nn.Linear(dim, 6 * dim)  # g, k, v, x_o, segment, local
        self.out = nn.Linear(dim, dim)

    def _parts(self, x):
        self._check(x)
        return self.proj(x).chunk(6, dim=-1)

    def _global(self, g, k, v):
        q = g.mean(1, keepdim=True)  # [b, 1, d]
        return torch.softmax(q @ k.transpose(1, 2) / math.sqrt(self.dim), dim=-1) @ v

    def _segments(self, s):
        b, n, d = s.shape
        c = min(self.segment, n)
        nc = -(-n // c)
        sp = F.pad(s, (0, 0, 0, nc * c - n), value=float("-inf"))
        return sp.view(b, nc, c, d).amax(2).repeat_interleave(c, dim=1)[:, :n]

    def local_max(self, l_):
        w = self.local_window
        return F.max_pool1d(l_.transpose(1, 2), w, stride=1, padding=w // 2).transpose(1, 2)

    def forward(self, x):
        g, k, v, xo, s, l_ = self._parts(x)
        return self.out(self._global(g, k, v) * xo + self._segments(s) + self.local_max(l_))

    def reference(self, x):
        g, k, v, xo, s, l_ = self._parts(x)
        n = x.shape[1]
        c = min(self.segment, n)
        seg = torch.stack([s[:, (i // c) * c: (i // c + 1) * c].amax(1) for i in range(n)], 1)
        m = self.local_window // 2
        loc = torch.stack([l_[:, max(i - m, 0): i + m + 1].amax(1) for i in range(n)], 1)
        return self.out(self._global(g, k, v) * xo + seg + loc)


# ---- F15: Hrrformer -------------------------------------------------------------------------------------------

class HrrformerMixer(_Mixer):
    """Hrrformer attention (Alam et al., "Recasting Self-Attention with Holographic Reduced
    Representations", eq. 1-4) over ``num_heads`` heads, with input and output projections; see
    :mod:`attnkit.ops.mixers.hrr`. The causal form (prefix sums of the bindings, a prefix softmax) is not in
    the paper; it decodes with an O(dim) state (:meth:`step`)."""

    def __init__(self, dim: int, *, num_heads: int = 4, causal: bool = False):
        super().__init__(dim, causal)
        _check_dim(dim, num_heads=num_heads)
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def _heads(self, x):
        self._check(x)
        b, n, _ = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.num_heads, self.dim // self.num_heads)
        return qkv.permute(2, 0, 3, 1, 4).unbind(0)

    def _merge(self, o, x):
        b, n, _ = x.shape
        return self.out(o.transpose(1, 2).reshape(b, n, self.dim).to(x.dtype))

    def forward(self, x):
        return self._merge(hrr.hrr_attention(*self._heads(x), causal=self.causal), x)

    def reference(self, x):
        return self._merge(hrr.hrr_attention_reference(*self._heads(x), causal=self.causal), x)

    def step(self, x_t: torch.Tensor, state=None):
        """Causal decoding: ``x_t [batch, dim]`` -> ``(y_t [batch, dim], state)``."""
        if not self.causal:
            raise ValueError("step() decodes the causal form; build the mixer with causal=True")
        b = x_t.shape[0]
        q, k, v = self.qkv(x_t).view(b, 3, self.num_heads, -1).unbind(1)
        y, state = hrr.hrr_step(q, k, v, state)
        return self.out(y.reshape(b, self.dim).to(x_t.dtype)), state


# ---- F20: Extractor ----------------------------------------------------------------------------------------------

class Extractor(_Mixer):
    """An Extractor-style causal mixer after Chen, "Attention Is Not All You Need Anymore" (2023): the paper
    builds its Extractors (SHE, HE, WE, ME) from elementwise products and learnable weights indexed by the
    relative position over the causal prefix. The full text was not reachable in this session, so this is the
    minimalist structure the catalogue records (F20), not a verified transcription of the paper's equations:
    ``y_t = W_o ((x_t W_q) * sum_{j <= t} w_{t - j} * (x_j W_v))`` with learned per-channel weights
    ``w [max_len, dim]`` (lags beyond ``max_len`` weigh 0), computed by FFT. Always causal."""

    def __init__(self, dim: int, *, max_len: int = 2048, causal: bool = True):
        super().__init__(dim, True)
        _check_dim(dim)
        _positive(max_len=max_len)
        self.max_len = max_len
        self.qv = nn.Linear(dim, 2 * dim)
        decay = torch.exp(-torch.arange(max_len, dtype=torch.float32)[:, None] / 64.0)
        self.weight = nn.Parameter(decay * (1 + 0.1 * torch.randn(max_len, dim)) / 8.0)
        self.out = nn.Linear(dim, dim)

    def forward(self, x):
        self._check(x)
        q, v = self.qv(x).chunk(2, dim=-1)
        k = self.weight[: min(x.shape[1], self.max_len)]
        return self.out(q * long_conv(v, k, 0))

    def reference(self, x):
        self._check(x)
        q, v = self.qv(x).chunk(2, dim=-1)
        n = x.shape[1]
        pos = torch.arange(n, device=x.device)
        lag = pos[:, None] - pos[None, :]
        inside = (lag >= 0) & (lag < self.max_len)
        w = self.weight[lag.clamp(0, self.max_len - 1)] * inside[..., None].to(x.dtype)  # [t, j, dim]
        return self.out(q * torch.einsum("tjc,bjc->btc", w, v))
