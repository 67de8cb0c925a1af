"""Recurrent mode: the RNN view of causal linear attention (Katharopoulos et al. 2020, sec. 3.4), one token at
a time: ``S_i = decay S_{i-1} + phi(k_i) v_i^T``, ``z_i = decay z_{i-1} + phi(k_i)``, ``o_i = phi(q_i) S_i /
phi(q_i) z_i``. O(m d_v) state and work per token, independent of the position: the decoding path."""

from __future__ import annotations

from collections.abc import Callable

import torch

from attnkit.feature_maps import FeatureMap
from attnkit.ops.linear._common import features, values_with_ones


def recurrent_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fm: FeatureMap, *,
                      log_decay: torch.Tensor | None, s0: torch.Tensor | None, offset: int,
                      finalize: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``q [b, h, n, d]``, ``k, v [b, h_kv, n, *]``, ``s0 [b, h, m, d_v + 1]`` or None, ``log_decay [h]``.
    Returns ``out [b, h, n, d_v]`` and the extended state."""
    b, h, n, _ = q.shape
    pq, pk = features(fm, q, k, offset, offset)  # [b, h, n, m]
    v1 = values_with_ones(v, h)  # [b, h, n, d_v + 1]
    m, dv1 = pq.shape[-1], v1.shape[-1]
    s = s0 if s0 is not None else pq.new_zeros(b, h, m, dv1)
    lam = None if log_decay is None else torch.exp(log_decay).reshape(1, h, 1, 1)
    outs = []
    for t in range(n):
        kv = pk[:, :, t, :, None] * v1[:, :, t, None, :]  # [b, h, m, d_v + 1]
        s = kv + (s if lam is None else lam * s)
        outs.append(pq[:, :, t, None, :] @ s)  # [b, h, 1, d_v + 1]
    return finalize(torch.cat(outs, dim=2)), s
