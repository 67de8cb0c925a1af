"""The reference engine: materialise the scores, mask, normalise, multiply. The executable spec.

Memory is O(q_len * kv_len): it is never chosen for speed, only for tests, small inputs and the
normalisations that need the whole matrix (Sinkhorn).
"""

from __future__ import annotations

import torch

from attnkit._checks import repeat_kv
from attnkit.normalizations import Normalization
from attnkit.patterns import Pattern
from attnkit.score_mods import ScoreMod


def _lse(x: torch.Tensor, dim: int) -> torch.Tensor:
    """logsumexp that is finite on all-masked slices (all -inf), so ``x - lse`` stays -inf there and neither
    the forward nor the backward produces NaN."""
    empty = torch.isneginf(x).all(dim=dim, keepdim=True)
    return torch.logsumexp(x.masked_fill(empty, 0.0), dim=dim, keepdim=True)


def attention_weights(q: torch.Tensor, k: torch.Tensor, *, pattern: Pattern | None, score_mod: ScoreMod | None,
                      normalization: Normalization, scale: float) -> torch.Tensor:
    """The attention matrix ``[batch, heads, q_len, kv_len]`` (rows of an all-masked query are zero)."""
    b_, h_, q_len, _ = q.shape
    kv_len = k.shape[2]
    compute = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    k = repeat_kv(k, h_)
    s = torch.matmul(q.to(compute), k.to(compute).transpose(-1, -2)) * scale
    dev = q.device
    b = torch.arange(b_, device=dev).view(-1, 1, 1, 1)
    h = torch.arange(h_, device=dev).view(1, -1, 1, 1)
    qi = torch.arange(q_len, device=dev).view(1, 1, -1, 1)
    ki = torch.arange(kv_len, device=dev).view(1, 1, 1, -1)
    if score_mod is not None:
        s = score_mod(s, b, h, qi, ki, q_len, kv_len)
    mask = None if pattern is None else pattern.materialize(q_len, kv_len, batch=b_, heads=h_, device=dev)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    if normalization.name == "softmax":
        return torch.exp(s - _lse(s, -1))
    if normalization.name == "sinkhorn":
        log_k = s
        for t in range(normalization.iterations):
            dim = -1 if t % 2 == 0 else -2  # rows first: one iteration is softmax
            log_k = log_k - _lse(log_k, dim)
        return torch.exp(log_k)
    if normalization.name == "standardize":
        vis = ~torch.isneginf(s)
        count = vis.sum(-1, keepdim=True)
        s0 = torch.where(vis, s, torch.zeros_like(s))
        mu = s0.sum(-1, keepdim=True) / count.clamp_min(1)
        z = torch.where(vis, s - mu, torch.zeros_like(s))
        var = z.square().sum(-1, keepdim=True) / count.clamp_min(1)
        return normalization.gain * z / torch.sqrt(var + normalization.eps)
    w = normalization.weight(s, kv_len)  # f(-inf) = 0 for sigmoid, relu and softplus
    if normalization.row_normalized:
        w = w / w.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)
    return w


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, pattern: Pattern | None = None,
                        score_mod: ScoreMod | None = None, normalization: Normalization,
                        scale: float) -> torch.Tensor:
    """``weights @ v`` with the weights of ``attention_weights``; output ``[batch, heads, q_len, dim_v]``."""
    w = attention_weights(q, k, pattern=pattern, score_mod=score_mod, normalization=normalization, scale=scale)
    v = repeat_kv(v, q.shape[1])
    return torch.matmul(w, v.to(w.dtype)).to(q.dtype)
