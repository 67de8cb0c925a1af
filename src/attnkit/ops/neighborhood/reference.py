"""Reference neighborhood attention: the explicit boolean mask over flattened tokens, then dense attention.

Obviously correct and quadratic in the number of tokens (tests only): the mask comes from the pattern's
predicate, scores are computed in float64, the score modifier sees flattened indices.
"""

from __future__ import annotations

import torch

from attnkit._checks import default_scale, repeat_kv
from attnkit.patterns.spatial import neighborhood_pattern

__all__ = ["neighborhood_reference"]


def neighborhood_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel_size, *, dilation=1,
                           stride=1, is_causal=False, score_mod=None, scale: float | None = None) -> torch.Tensor:
    """Dense masked attention on ``q [b, h, *spatial, d]``, ``k, v [b, h_kv, *spatial, d]``; returns
    ``[b, h, *spatial, d_v]`` in ``q.dtype`` (computed in float64)."""
    b, h = q.shape[:2]
    spatial = tuple(q.shape[2:-1])
    n = 1
    for s in spatial:
        n *= s
    pattern = neighborhood_pattern(spatial, kernel_size, dilation=dilation, stride=stride, is_causal=is_causal)
    mask = pattern.materialize(n, n, device=q.device)  # [1, 1, n, n]
    qf = q.reshape(b, h, n, q.shape[-1]).double()
    kf = repeat_kv(k.reshape(b, k.shape[1], n, k.shape[-1]), h).double()
    vf = repeat_kv(v.reshape(b, v.shape[1], n, v.shape[-1]), h).double()
    s = (qf @ kf.transpose(-1, -2)) * default_scale(q, scale)
    if score_mod is not None:
        bi = torch.arange(b, device=q.device).view(-1, 1, 1, 1)
        hi = torch.arange(h, device=q.device).view(1, -1, 1, 1)
        qi = torch.arange(n, device=q.device).view(1, 1, -1, 1)
        ki = torch.arange(n, device=q.device).view(1, 1, 1, -1)
        s = score_mod(s, bi, hi, qi, ki, n, n)
    s = s.masked_fill(~mask, float("-inf"))
    out = torch.softmax(s, dim=-1) @ vf
    return out.reshape(b, h, *spatial, v.shape[-1]).to(q.dtype)
