"""Linear-attention variants that wrap the engine with a paper's extra term or normalisation, as
``(q, k, v) -> out`` modules on ``[batch, heads, seq, dim]`` tensors, each with a materialised reference:

- :class:`GalerkinAttention` (Cao 2021, "Choose a Transformer: Fourier or Galerkin", eq. 2.4-2.5): Galerkin type
  ``z = Q (LN(K)^T LN(V)) / n`` (linear) and Fourier type ``z = (LN(Q) LN(K)^T) V / n`` (quadratic); causal:
  ``1 / (i + 1)`` instead of ``1 / n`` over the prefix;
- :class:`ESSAttention` (Zhang et al. 2023, "ESSAformer", SCC kernel): centred, squared, normalised q and k,
  ``out = V + q_hat (k_hat^T V) / sqrt(n)`` (non-causal);
- :class:`LLNDiagAttention` (Nahshan et al., LLN): ``(LLN + block-diagonal softmax with blocks of d) / 2``;
- :class:`FocusedDWCAttention` (Han et al. 2023, "FLatten Transformer", eq. 8): focused linear attention plus a
  depthwise convolution of V over the sequence (the rank-restoration term; causal: left-padded).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from attnkit import patterns as P
from attnkit._checks import check_qkv, repeat_kv
from attnkit.feature_maps import FocusedFeatureMap, LogNormalFeatureMap
from attnkit.functional.exact import attention
from attnkit.functional.linear import linear_attention
from attnkit.ops.linear.reference import linear_attention_reference

__all__ = ["GalerkinAttention", "ESSAttention", "LLNDiagAttention", "FocusedDWCAttention", "variant_reference"]


def _work(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


class GalerkinAttention(nn.Module):
    """``kind="galerkin"``: ``Q (LN(K)^T LN(V)) / n``; ``kind="fourier"``: ``(LN(Q) LN(K)^T) V / n``. The layer
    norms are per head dimension with learnable affine parameters (``head_dim`` needed)."""

    def __init__(self, head_dim: int, *, kind: str = "galerkin", causal: bool = False, chunk_size: int = 64):
        super().__init__()
        if kind not in ("galerkin", "fourier"):
            raise ValueError(f"kind must be 'galerkin' or 'fourier', got {kind!r}")
        self.kind, self.causal, self.chunk_size = kind, causal, chunk_size
        self.norm_a = nn.LayerNorm(head_dim)  # K
        self.norm_b = nn.LayerNorm(head_dim)  # V (galerkin) or Q (fourier)

    @staticmethod
    def _ln(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, norm.normalized_shape, norm.weight.to(x.dtype), norm.bias.to(x.dtype), norm.eps)

    def _normed(self, q, k, v):
        k = self._ln(self.norm_a, k)
        if self.kind == "galerkin":
            return q, k, self._ln(self.norm_b, v)
        return self._ln(self.norm_b, q), k, v

    def _length(self, n: int, n_k: int, x: torch.Tensor) -> torch.Tensor:
        if self.causal:
            return torch.arange(1, n + 1, device=x.device, dtype=x.dtype)[:, None]
        return torch.full((n, 1), float(n_k), device=x.device, dtype=x.dtype)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        check_qkv(q, k, v)
        dtype = q.dtype
        q, k, v = self._normed(_work(q), _work(k), _work(v))
        # both types are softmax-free products; the linear engine runs either association order
        out = linear_attention(q, k, v, feature_map="identity", normalize="none", causal=self.causal,
                               chunk_size=self.chunk_size)
        return (out / self._length(q.shape[2], k.shape[2], out)).to(dtype)


class ESSAttention(nn.Module):
    """ESSA: ``q_c = q - mean_c(q)``, ``q_hat = q_c^2 / ||q_c||^2`` (same for k), ``q_hat`` L2-normalised over
    channels, ``k_hat`` over tokens; ``out = V + q_hat (k_hat^T V) / sqrt(n)``. Non-causal (image SR)."""

    def __init__(self, eps: float = 1e-6):
        super().__init__()
        self.eps = eps

    def features(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        qc = q - q.mean(-1, keepdim=True)
        kc = k - k.mean(-1, keepdim=True)
        qh = qc.square() / qc.square().sum(-1, keepdim=True).clamp_min(self.eps)
        kh = kc.square() / kc.square().sum(-1, keepdim=True).clamp_min(self.eps)
        return F.normalize(qh, dim=-1, eps=self.eps), F.normalize(kh, dim=-2, eps=self.eps)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        check_qkv(q, k, v)
        if q.shape[2] != k.shape[2]:
            raise ValueError(f"ESSA adds V as a residual: it needs as many queries as keys, got {q.shape[2]} "
                             f"and {k.shape[2]}")
        dtype = q.dtype
        q, k, v = _work(q), repeat_kv(_work(k), q.shape[1]), repeat_kv(_work(v), q.shape[1])
        qh, kh = self.features(q, k)
        return (v + qh @ (kh.transpose(-1, -2) @ v) / math.sqrt(k.shape[2])).to(dtype)


class LLNDiagAttention(nn.Module):
    """The published LLN layer: ``(LLN(q, k, v) + BlockDiagSoftmax_d(q, k, v)) / 2`` with softmax blocks of
    ``block`` tokens (default: the head dimension), causal in both halves when ``causal``."""

    def __init__(self, *, causal: bool = False, block: int | None = None, chunk_size: int = 64):
        super().__init__()
        self.causal, self.block, self.chunk_size = causal, block, chunk_size
        self.feature_map = LogNormalFeatureMap(causal=causal)

    def _pattern(self, d: int):
        p = P.block_local(self.block or d)
        return p & P.causal() if self.causal else p

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        lln = linear_attention(q, k, v, feature_map=self.feature_map, causal=self.causal,
                               chunk_size=self.chunk_size)
        diag = attention(q, k, v, pattern=self._pattern(q.shape[-1]))
        return 0.5 * (lln + diag.to(lln.dtype))


class FocusedDWCAttention(nn.Module):
    """FLatten: ``focused_linear(q, k, v) + DWConv(v)`` with a depthwise convolution of ``kernel_size`` taps over
    the sequence per (head, channel) (left-padded when ``causal``)."""

    def __init__(self, head_dim: int, num_heads: int, *, p: float = 3.0, kernel_size: int = 5, causal: bool = False,
                 chunk_size: int = 64):
        super().__init__()
        if kernel_size < 1:
            raise ValueError(f"kernel_size must be >= 1, got {kernel_size}")
        self.causal, self.chunk_size, self.kernel_size = causal, chunk_size, kernel_size
        self.num_heads = num_heads
        self.feature_map = FocusedFeatureMap(p=p)
        self.dwc = nn.Conv1d(num_heads * head_dim, num_heads * head_dim, kernel_size, groups=num_heads * head_dim)

    def conv(self, v: torch.Tensor) -> torch.Tensor:
        """``v [b, h, n, d]`` -> depthwise-convolved ``[b, h, n, d]``."""
        b, h, n, d = v.shape
        if h != self.num_heads:
            raise ValueError(f"FocusedDWCAttention was built for {self.num_heads} heads, got v with {h}")
        left = self.kernel_size - 1 if self.causal else (self.kernel_size - 1) // 2
        x = F.pad(v.permute(0, 1, 3, 2).reshape(b, h * d, n), (left, self.kernel_size - 1 - left))
        w, bias = self.dwc.weight.to(x.dtype), self.dwc.bias.to(x.dtype)
        return F.conv1d(x, w, bias, groups=h * d).view(b, h, d, n).permute(0, 1, 3, 2)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        check_qkv(q, k, v)
        out = linear_attention(q, k, v, feature_map=self.feature_map, causal=self.causal, chunk_size=self.chunk_size)
        return out + self.conv(repeat_kv(v, q.shape[1])).to(out.dtype)


def variant_reference(built: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **_: object):
    """Materialised references of the variants (quadratic products, explicit masks)."""
    n, n_k = q.shape[2], k.shape[2]
    h = q.shape[1]
    k, v = repeat_kv(k, h), repeat_kv(v, h)
    causal_mask = torch.ones(n, n_k, dtype=torch.bool, device=q.device).tril()
    if isinstance(built, GalerkinAttention):
        qn, kn, vn = built._normed(q, k, v)
        a = qn @ kn.transpose(-1, -2)
        if built.causal:
            a = a * causal_mask
        return (a @ vn) / built._length(n, n_k, a)
    if isinstance(built, ESSAttention):
        qh, kh = built.features(q, k)
        return v + (qh @ kh.transpose(-1, -2)) @ v / math.sqrt(n_k)
    if isinstance(built, LLNDiagAttention):
        lln = linear_attention_reference(q, k, v, feature_map=built.feature_map, causal=built.causal)
        blk = built.block or q.shape[-1]
        i, j = torch.arange(n, device=q.device), torch.arange(n_k, device=q.device)
        keep = (i[:, None] // blk) == (j[None, :] // blk)
        if built.causal:
            keep = keep & causal_mask
        s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
        diag = torch.softmax(s.masked_fill(~keep, float("-inf")), dim=-1) @ v
        return 0.5 * (lln + diag)
    if isinstance(built, FocusedDWCAttention):
        lin = linear_attention_reference(q, k, v, feature_map=built.feature_map, causal=built.causal)
        # the convolution as an explicit sum of shifted copies: out_t = b + sum_j w_j v_{t + j - left}
        ks = built.kernel_size
        left = ks - 1 if built.causal else (ks - 1) // 2
        w = built.dwc.weight.view(h, v.shape[-1], ks).to(v.dtype)  # [h, d, taps]
        conv = built.dwc.bias.view(h, 1, v.shape[-1]).to(v.dtype).expand_as(v).clone()
        for j in range(ks):
            shift = j - left
            src = torch.zeros_like(v)
            if shift >= 0:
                src[:, :, :n - shift] = v[:, :, shift:]
            else:
                src[:, :, -shift:] = v[:, :, :n + shift]
            conv = conv + src * w[:, :, j][None, :, None, :]
        return lin + conv
    raise TypeError(f"no reference for {type(built).__name__}")
