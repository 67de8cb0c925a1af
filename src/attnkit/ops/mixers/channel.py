"""Attention over channels instead of tokens: a ``d x d`` map per head or group, linear in the sequence length.

- XCA (El-Nouby et al., "XCiT: Cross-Covariance Image Transformers", eq. 5): queries and keys L2-normalised
  per channel over the tokens, ``A = softmax(tau * Q_hat^T K_hat)`` (``d_h x d_h``), ``out = V A^T``.
- Channel group attention (Ding et al., "DaViT: Dual Attention Vision Transformers", eq. 3):
  ``A_g = softmax(Q_g^T K_g / sqrt(C_g))`` per channel group, ``out_g = V_g A_g^T``.

Shapes: ``q, k, v [batch, heads, seq, d]``; maps ``[batch, heads, d, d]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def xca(q, k, v, temperature, *, return_map: bool = False):
    """Cross-covariance attention; ``temperature [heads]``. O(seq d^2) per head."""
    qn = F.normalize(q, dim=2)  # per channel, over tokens
    kn = F.normalize(k, dim=2)
    a = torch.softmax(qn.transpose(-1, -2) @ kn * temperature.view(1, -1, 1, 1), dim=-1)  # [b, h, d, d]
    out = v @ a.transpose(-1, -2)
    return (out, a) if return_map else out


def xca_reference(q, k, v, temperature):
    """XCA spelled out: channel norms as square roots of sums of squares, softmax as exp / sum."""
    qn = q / q.square().sum(2, keepdim=True).sqrt().clamp_min(1e-12)
    kn = k / k.square().sum(2, keepdim=True).sqrt().clamp_min(1e-12)
    logits = torch.einsum("bhni,bhnj->bhij", qn, kn) * temperature.view(1, -1, 1, 1)
    e = torch.exp(logits - logits.amax(-1, keepdim=True))
    a = e / e.sum(-1, keepdim=True)
    return torch.einsum("bhnj,bhij->bhni", v, a)


def channel_group_attention(q, k, v, *, return_map: bool = False):
    """DaViT's channel group attention (groups on the ``heads`` axis)."""
    d = q.shape[-1]
    a = torch.softmax(q.transpose(-1, -2) @ k * d ** -0.5, dim=-1)  # [b, g, d, d]
    out = v @ a.transpose(-1, -2)
    return (out, a) if return_map else out


def channel_group_attention_reference(q, k, v):
    d = q.shape[-1]
    logits = torch.einsum("bgni,bgnj->bgij", q, k) / d ** 0.5
    e = torch.exp(logits - logits.amax(-1, keepdim=True))
    return torch.einsum("bgnj,bgij->bgni", v, e / e.sum(-1, keepdim=True))
