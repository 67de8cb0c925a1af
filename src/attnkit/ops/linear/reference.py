"""The spec of kernelized linear attention: the materialised quadratic form (O(n^2) memory, for tests only).

``A = (phi(Q) phi(K)^T) * D`` with ``D_ij = decay^(i-j) [j <= i]`` (causal) or ``D = 1`` (non-causal);
``out = A V / (A 1)`` (``normalize="denominator"``), ``A V`` (``"none"``) or ``rms_norm(A V)`` (``"rms"``).
A carried state ``(S0, z0)`` after ``offset`` tokens adds ``decay^(i+1) phi(q_i) S0`` to the numerator and
``decay^(i+1) phi(q_i) z0`` to the denominator. The returned state is
``S = decay^n S0 + sum_j decay^(n-1-j) phi(k_j) v_j^T``, ``z`` likewise (Katharopoulos et al. 2020, eq. 5;
Lightning Attention-2 for the decay).
"""

from __future__ import annotations

import torch

from attnkit._checks import repeat_kv
from attnkit.feature_maps import FeatureMap
from attnkit.ops.linear._common import resolve_feature_map
from attnkit.ops.linear.state import LinearAttentionState

__all__ = ["linear_attention_reference"]


def linear_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                               feature_map: str | FeatureMap = "elu", causal: bool = False,
                               decay: float | torch.Tensor | None = None, normalize: str = "denominator",
                               eps: float = 1e-6, state: LinearAttentionState | None = None,
                               return_state: bool = False):
    """Quadratic reference. ``q [b, h, n, d]``, ``k [b, h_kv, n_k, d]``, ``v [b, h_kv, n_k, d_v]`` ->
    ``out [b, h, n, d_v]`` in the inputs' dtype (pass float64 inputs for an oracle)."""
    fm = resolve_feature_map(feature_map, causal)
    b, h, n, _ = q.shape
    nk = k.shape[2]
    offset = state.offset if state is not None else 0
    pq, pk = fm(q, k, q_offset=offset, k_offset=offset)
    pk = repeat_kv(pk, h)
    vv = repeat_kv(v, h)
    a = pq @ pk.transpose(-1, -2)  # [b, h, n, n_k]
    i = torch.arange(n, device=q.device)[:, None]
    j = torch.arange(nk, device=q.device)[None, :]
    if decay is not None:
        lam = torch.as_tensor(decay, dtype=q.dtype, device=q.device).reshape(-1)
        lam = lam.expand(h) if lam.numel() == 1 else lam
        lam = lam.reshape(1, h, 1, 1)
    else:
        lam = torch.ones(1, h, 1, 1, dtype=q.dtype, device=q.device)
    if causal:
        d = torch.where(j <= i, lam ** (i - j).clamp_min(0), torch.zeros((), dtype=q.dtype, device=q.device))
        a = a * d
    num = a @ vv
    den = a.sum(-1, keepdim=True)
    if state is not None:
        carry = lam ** (i + 1) if causal else torch.ones((), dtype=q.dtype, device=q.device)  # [1, h, n, 1]
        num = num + carry * (pq @ state.S.to(q.dtype))
        den = den + carry * (pq @ state.z.to(q.dtype)[..., None])
    if normalize == "denominator":
        sign = torch.where(den < 0, -1.0, 1.0).to(den.dtype)
        out = num / torch.where(den.abs() < eps, sign * eps, den)
    elif normalize == "none":
        out = num
    elif normalize == "rms":
        out = num * torch.rsqrt(num.pow(2).mean(-1, keepdim=True) + eps)
    else:
        raise ValueError(f"normalize must be 'denominator', 'none' or 'rms', got {normalize!r}")
    if not return_state:
        return out
    w = lam ** (nk - 1 - torch.arange(nk, device=q.device)).reshape(1, 1, nk, 1) if causal else 1.0
    S = (pk * w).transpose(-1, -2) @ vv
    z = (pk * w).sum(-2)
    if state is not None:
        keep = lam.reshape(1, h, 1, 1) ** nk if causal else 1.0
        S = S + keep * state.S.to(q.dtype)
        z = z + keep.reshape(1, h, 1) * state.z.to(q.dtype) if causal else z + state.z.to(q.dtype)
    return out, LinearAttentionState(S, z, offset + nk)
