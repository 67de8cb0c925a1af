"""Kernelised attention with relative positional encoding by FFT (Luo et al. 2021, "Stable, Fast and Accurate:
Kernelized Attention with Relative Positional Encoding", eq. 6-8).

``out_i = sum_j phi(q_i) . phi(k_j) exp(b_{j - i}) v_j / sum_j phi(q_i) . phi(k_j) exp(b_{j - i})``. The matrix
``C_ij = exp(b_{j - i})`` is Toeplitz, so ``Y_i = sum_j C_ij phi(k_j) [v_j, 1]^T`` is a convolution along the
sequence of every (feature, value) channel pair: one FFT of length >= 3n per pair, O(n log n m d_v) time and
O(n m d_v) memory; ``out_i = phi(q_i) . Y_i``. Causal: ``b_{j - i} = -inf`` for ``j > i`` (a lower-triangular
Toeplitz matrix). ``phi`` is a feature map of :mod:`attnkit.feature_maps` (Performer's positive random features
by default); ``b`` is a learnable table of ``2 max_len - 1`` values per head, zero-initialised (``b = 0`` is the
plain kernelised attention).
"""

from __future__ import annotations

import torch
from torch import nn

from attnkit._checks import check_qkv, repeat_kv
from attnkit.feature_maps import FeatureMap
from attnkit.feature_maps import get as get_feature_map

__all__ = ["ToeplitzRPEAttention", "toeplitz_reference"]


class ToeplitzRPEAttention(nn.Module):
    """``q [batch, heads, n, d]``, ``k, v [batch, kv_heads, n, d / d_v]`` -> ``[batch, heads, n, d_v]`` with
    ``n <= max_len``."""

    def __init__(self, num_heads: int, max_len: int, *, feature_map: str | FeatureMap = "favor",
                 num_features: int = 64, causal: bool = False, eps: float = 1e-6):
        super().__init__()
        if max_len < 1 or num_heads < 1:
            raise ValueError(f"num_heads and max_len must be >= 1, got {num_heads}, {max_len}")
        params = {"num_features": num_features} if feature_map in ("favor", "trig", "dijiang") else {}
        self.feature_map = get_feature_map(feature_map, **params) if isinstance(feature_map, str) else feature_map
        self.num_heads, self.max_len, self.causal, self.eps = num_heads, max_len, causal, eps
        self.bias = nn.Parameter(torch.zeros(num_heads, 2 * max_len - 1))

    def weights(self, n: int, dtype: torch.dtype) -> torch.Tensor:
        """``exp(b_r)`` for ``r = j - i = -(n-1) .. n-1``: ``[heads, 2n - 1]`` (0 for ``r > 0`` when causal)."""
        if n > self.max_len:
            raise ValueError(f"sequence length {n} exceeds max_len={self.max_len}; build with a larger max_len")
        b = self.bias[:, self.max_len - n: self.max_len + n - 1].to(dtype)
        if self.causal:
            r = torch.arange(-(n - 1), n, device=b.device)
            b = b.masked_fill(r > 0, float("-inf"))
        return torch.exp(b)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        check_qkv(q, k, v)
        if q.shape[2] != k.shape[2]:
            raise ValueError(f"relative positions need as many queries as keys, got {q.shape[2]} and {k.shape[2]}")
        if q.shape[1] != self.num_heads:
            raise ValueError(f"built for {self.num_heads} heads, got q with {q.shape[1]}")
        dtype = q.dtype
        work = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
        q, k, v = q.to(work), repeat_kv(k, q.shape[1]).to(work), repeat_kv(v, q.shape[1]).to(work)
        b, h, n, _ = q.shape
        pq, pk = self.feature_map(q, k)  # [b, h, n, m]
        v1 = torch.cat([v, v.new_ones(b, h, n, 1)], dim=-1)  # the ones column carries the denominator
        u = pk[..., :, None] * v1[..., None, :]  # [b, h, n, m, d_v + 1]
        # Y_i = sum_j t[i - j] U_j: a linear convolution with t[d] = exp(b_{-d}); Y_i = Z[i + n - 1]
        t = self.weights(n, work).flip(-1)  # index p <-> d = p - (n - 1), d = i - j
        size = 1 << (3 * n - 2).bit_length()
        fu = torch.fft.rfft(u, n=size, dim=2)
        ft = torch.fft.rfft(t, n=size, dim=-1)[None, :, :, None, None]
        y = torch.fft.irfft(fu * ft, n=size, dim=2)[:, :, n - 1: 2 * n - 1]  # [b, h, n, m, d_v + 1]
        o = (pq[..., :, None] * y).sum(-2)
        num, den = o[..., :-1], o[..., -1:]
        sign = torch.where(den < 0, -1.0, 1.0).to(den.dtype)
        return (num / torch.where(den.abs() < self.eps, sign * self.eps, den)).to(dtype)


def toeplitz_reference(built: ToeplitzRPEAttention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       **_: object) -> torch.Tensor:
    """The explicit O(n^2) form: ``A_ij = phi(q_i) . phi(k_j) exp(b_{j - i})`` (masked when causal), normalised."""
    k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
    n = q.shape[2]
    pq, pk = built.feature_map(q, k)
    i = torch.arange(n, device=q.device)
    rel = i[None, :] - i[:, None]  # j - i
    bias = built.bias[:, rel + built.max_len - 1].to(q.dtype)  # [h, n, n]
    a = (pq @ pk.transpose(-1, -2)) * torch.exp(bias)
    if built.causal:
        a = a * (rel <= 0)
    den = a.sum(-1, keepdim=True)
    sign = torch.where(den < 0, -1.0, 1.0).to(den.dtype)
    return (a @ v) / torch.where(den.abs() < built.eps, sign * built.eps, den)
