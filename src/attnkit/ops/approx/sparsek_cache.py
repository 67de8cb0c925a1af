"""SPARSEK's decode cache: generation keeps only the key/value pairs that can still be selected, O(k) of them.

Lou et al., "Sparser is Faster and Less is More: Efficient Sparse Attention for Long-Range Transformers", 2024
(Sec. 3: "during generation only O(k) KV entries are kept"). Causal SPARSEK gives query i the mask
``m_i = clip(u - tau_i, 0, 1)`` over its prefix with ``sum_j m_ij = k``. Adding a key can only raise
``sum_j clip(u_j - t, 0, 1)`` at every ``t``, so ``tau_i`` never decreases; a key with ``u_j <= tau_i`` therefore
has ``m = 0`` for every later query and can be dropped, unless it is still inside the sliding ``window`` (weight
1). The cache holds the keys with ``u_j > tau`` (the support, ~k of them plus the fractional ones) and the last
``window`` keys; dropped keys contribute 0 to every later threshold, so the threshold over the cache equals the
threshold over the whole prefix, and each step equals row i of :func:`~attnkit.ops.approx.sparsek_attention`
with ``causal=True`` (tested).
"""

from __future__ import annotations

import torch

from attnkit.ops.approx._common import check_positive_int, masked_attention_lse, upcast
from attnkit.ops.approx.sparsek import sparsek_mask, sparsek_scores, sparsek_threshold

__all__ = ["SparseKDecodeCache"]


class SparseKDecodeCache:
    """Decode-time SPARSEK attention with an O(top_k + window) cache per ``[batch, head]``.

    ``step(q, k, v, scores=None)``: one token, ``q, k [batch, heads, 1, d]``, ``v [batch, heads, 1, dv]``; key
    scores from ``score_weight [heads, d]`` (+ ``score_bias``) given here, or ``scores [batch, heads, 1]`` given per
    step. Returns ``[batch, heads, 1, dv]``. ``len(cache)`` is the largest number of entries any ``[batch, head]``
    holds (the memory bound); ``position`` the number of tokens seen.
    """

    def __init__(self, top_k: int, *, window: int = 0, score_weight: torch.Tensor | None = None,
                 score_bias: torch.Tensor | float | None = None, scale: float | None = None):
        self.top_k = check_positive_int("top_k", top_k)
        self.window = check_positive_int("window", window, minimum=0)
        self.score_weight, self.score_bias, self.scale = score_weight, score_bias, scale
        self.k = self.v = self.u = self.pos = None  # [b, h, P, .], u = -inf marks an empty slot
        self.position = 0

    def __len__(self) -> int:
        return 0 if self.u is None else int(torch.isfinite(self.u).sum(-1).max())

    def step(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scores: torch.Tensor | None = None
             ) -> torch.Tensor:
        for name, t in (("q", q), ("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor) or t.dim() != 4 or t.shape[2] != 1:
                raise ValueError(f"{name} must be [batch, heads, 1, dim] (one decode step), got "
                                 f"{getattr(t, 'shape', type(t).__name__)}")
        if scores is None:
            if self.score_weight is None:
                raise ValueError("pass scores= ([batch, heads, 1]) to step(), or score_weight= to the cache")
            scores = sparsek_scores(k, self.score_weight, self.score_bias)
        elif scores.shape != k.shape[:3]:
            raise ValueError(f"scores must be [batch, heads, 1] = {tuple(k.shape[:3])}, got {tuple(scores.shape)}")
        i = self.position
        u_new = upcast(scores.detach()).double()
        pos_new = torch.full(k.shape[:3], i, dtype=torch.long, device=k.device)
        if self.k is None:
            self.k, self.v, self.u, self.pos = k, v, u_new, pos_new
        else:
            self.k = torch.cat([self.k, k], dim=2)
            self.v = torch.cat([self.v, v], dim=2)
            self.u = torch.cat([self.u, u_new], dim=2)
            self.pos = torch.cat([self.pos, pos_new], dim=2)
        tau = sparsek_threshold(self.u, self.top_k)  # [b, h]; over the cache = over the prefix
        m = sparsek_mask(self.u, self.top_k, tau)
        in_window = self.pos > i - self.window if self.window else torch.zeros_like(self.pos, dtype=torch.bool)
        m = torch.where(in_window & torch.isfinite(self.u), torch.ones_like(m), m)
        keep = m > 0
        scale = self.scale if self.scale is not None else q.shape[-1] ** -0.5
        bias = torch.log(torch.where(keep, m, torch.ones_like(m)))[..., None, :]
        s = (q @ self.k.transpose(-1, -2) * scale).to(m.dtype) + bias
        out, _ = masked_attention_lse(s, self.v, keep[..., None, :])
        self._evict(tau, i + 1)
        self.position += 1
        return out.to(v.dtype)

    def _evict(self, tau: torch.Tensor, next_i: int) -> None:
        """Drop entries no later query can select (``u <= tau``) once they leave the window; compact the rest."""
        alive = torch.isfinite(self.u) & (self.u > tau[..., None])
        if self.window:
            alive = alive | (self.pos > next_i - self.window)
        width = max(int(alive.sum(-1).max()), 1)
        order = alive.to(torch.int8).argsort(dim=-1, descending=True, stable=True)[..., :width]
        alive = alive.gather(-1, order)

        def take(x):
            return x.gather(2, order[..., None].expand(-1, -1, -1, x.shape[-1]))

        self.k, self.v = take(self.k), take(self.v)
        self.u = self.u.gather(-1, order).masked_fill(~alive, float("-inf"))
        self.pos = self.pos.gather(-1, order)
