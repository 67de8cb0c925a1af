"""Parallel mode: non-causal linear attention in O(n m d_v) (``phi(Q) (phi(K)^T [V, 1])``), or the causal form
as the masked quadratic product (O(n^2); a readable check, the chunked mode is the fast causal path)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from attnkit.feature_maps import FeatureMap
from attnkit.ops.linear._common import decay_powers, features, values_with_ones


def parallel_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fm: FeatureMap, *, causal: bool,
                     log_decay: torch.Tensor | None, s0: torch.Tensor | None, offset: int,
                     finalize: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``q [b, h, n, d]``, ``k, v [b, h_kv, n_k, *]``; ``s0 [b, h, m, d_v + 1]`` or None; ``log_decay [h]``.
    Returns ``out [b, h, n, d_v]`` and the extended state ``[b, h, m, d_v + 1]``."""
    h, n = q.shape[1], q.shape[2]
    pq, pk = features(fm, q, k, offset, offset)  # [b, h, n, m]
    v1 = values_with_ones(v, h)  # [b, h, n_k, d_v + 1]
    if not causal:
        kv = pk.transpose(-1, -2) @ v1  # [b, h, m, d_v + 1]
        s = kv if s0 is None else s0 + kv
        return finalize(pq @ s), s
    a = pq @ pk.transpose(-1, -2)  # [b, h, n, n]
    idx = torch.arange(n, device=q.device)
    if log_decay is None:
        a = a.tril()
        o = a @ v1
        s = pk.transpose(-1, -2) @ v1
        if s0 is not None:
            o = o + pq @ s0
            s = s + s0
        return finalize(o), s
    rel = (idx[:, None] - idx[None, :]).clamp_min(0)
    d = decay_powers(log_decay, rel).tril()  # [h, n, n]: decay^(i-j) for j <= i
    o = (a * d) @ v1
    s = (pk * decay_powers(log_decay, n - 1 - idx)[..., None]).transpose(-1, -2) @ v1
    if s0 is not None:
        o = o + decay_powers(log_decay, idx + 1)[..., None] * (pq @ s0)
        s = s + decay_powers(log_decay, torch.tensor(n, device=q.device))[..., None, None] * s0
    return finalize(o), s
