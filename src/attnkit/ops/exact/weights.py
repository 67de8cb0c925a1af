"""Public attention matrices of the exact engine, computed a block of query rows at a time.

``attention_weights`` returns the probabilities ``w_ij`` that ``attnkit.attention`` applies (same pattern,
score modifier, normalisation and scale); ``attention_lse`` returns the per-row log-sum-exp of the modified,
masked scores (what FlashAttention-style kernels keep). Memory is ``O(block_q * kv_len)`` per step plus the
``[batch, heads, len(queries), kv_len]`` result: ask for the query rows you need (``queries=``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from attnkit._checks import check_qkv, default_scale, repeat_kv
from attnkit.normalizations import Normalization, resolve
from attnkit.patterns import Pattern
from attnkit.score_mods import ScoreMod

__all__ = ["attention_weights", "attention_lse"]


def _query_index(queries: Sequence[int] | torch.Tensor | slice | None, q_len: int, device) -> torch.Tensor:
    if queries is None:
        return torch.arange(q_len, device=device)
    if isinstance(queries, slice):
        return torch.arange(q_len, device=device)[queries]
    idx = torch.as_tensor(queries, device=device, dtype=torch.long).reshape(-1)
    if idx.numel() and (idx.min() < -q_len or idx.max() >= q_len):
        raise ValueError(f"queries must index the q_len={q_len} query rows, got values in "
                         f"[{int(idx.min())}, {int(idx.max())}]")
    return idx % q_len


def _scores(q_rows, k, qi, pattern, score_mod, scale, q_len, kv_len):
    """Modified, masked scores ``[batch, heads, rows, kv_len]`` (float32 for half inputs) of the query rows
    at absolute positions ``qi``."""
    b_, h_ = q_rows.shape[:2]
    compute = torch.float32 if q_rows.dtype in (torch.float16, torch.bfloat16) else q_rows.dtype
    s = torch.matmul(q_rows.to(compute), repeat_kv(k, h_).to(compute).transpose(-1, -2)) * scale
    dev = q_rows.device
    b = torch.arange(b_, device=dev).view(-1, 1, 1, 1)
    h = torch.arange(h_, device=dev).view(1, -1, 1, 1)
    qv = qi.view(1, 1, -1, 1)
    kv = torch.arange(kv_len, device=dev).view(1, 1, 1, -1)
    if score_mod is not None:
        s = score_mod(s, b, h, qv, kv, q_len, kv_len)
    if pattern is not None:
        allowed = pattern.allowed(b, h, qv, kv, q_len, kv_len)
        s = s.masked_fill(~allowed.expand_as(s), float("-inf"))
    return s


def _prepare(q, k, pattern, score_mod, normalization, scale):
    check_qkv(q, k, k)
    if pattern is not None and not isinstance(pattern, Pattern):
        raise TypeError(f"pattern must be an attnkit.patterns.Pattern, got {type(pattern).__name__}")
    from attnkit.ops.exact.engines import _resolve_score_mod

    mod = _resolve_score_mod(score_mod)
    if mod is not None:
        mod.check(q.shape[1])
        mod.to(q.device)
    if pattern is not None:
        pattern.check(q.shape[2], k.shape[2], q.shape[0], q.shape[1])
    return mod, resolve(normalization), default_scale(q, scale)


def attention_weights(q: torch.Tensor, k: torch.Tensor, *, pattern: Pattern | None = None,
                      score_mod: ScoreMod | Sequence[ScoreMod] | None = None,
                      normalization: str | Normalization = "softmax", scale: float | None = None,
                      queries: Sequence[int] | torch.Tensor | slice | None = None,
                      block_q: int = 256) -> torch.Tensor:
    """The attention probabilities of ``attnkit.attention(q, k, v, ...)`` for the chosen query rows.

    Args:
        q: ``[batch, heads, q_len, dim]``; k: ``[batch, kv_heads, kv_len, dim]``.
        pattern, score_mod, normalization, scale: as in ``attnkit.attention``.
        queries: query rows to return (indices, a slice, or None for all).
        block_q: rows computed per step (bounds the working memory to ``block_q * kv_len`` per head).

    Returns:
        ``[batch, heads, len(queries), kv_len]`` in ``q``'s dtype; rows that the pattern masks completely are
        zero. Differentiable in ``q`` and ``k``. Sinkhorn normalisation couples all rows, so it is computed on
        the whole matrix (``O(q_len * kv_len)``) and then sliced.
    """
    if not isinstance(block_q, int) or isinstance(block_q, bool) or block_q < 1:
        raise ValueError(f"block_q must be a positive int, got {block_q!r}")
    mod, norm, scale = _prepare(q, k, pattern, score_mod, normalization, scale)
    q_len, kv_len = q.shape[2], k.shape[2]
    idx = _query_index(queries, q_len, q.device)
    if norm.name == "sinkhorn":
        from .reference import attention_weights as full_weights

        w = full_weights(q, k, pattern=pattern, score_mod=mod, normalization=norm, scale=scale)
        return w.index_select(2, idx).to(q.dtype)
    blocks = []
    for start in range(0, idx.numel(), block_q):
        qi = idx[start:start + block_q]
        s = _scores(q.index_select(2, qi), k, qi, pattern, mod, scale, q_len, kv_len)
        if norm.name == "softmax":
            empty = torch.isneginf(s).all(dim=-1, keepdim=True)
            lse = torch.logsumexp(s.masked_fill(empty, 0.0), dim=-1, keepdim=True)
            w = torch.exp(s - lse)
        else:
            w = norm.weight(s, kv_len)
            if norm.row_normalized:
                w = w / w.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)
        blocks.append(w.to(q.dtype))
    if not blocks:
        return q.new_zeros(q.shape[0], q.shape[1], 0, kv_len)
    return torch.cat(blocks, dim=2)


def attention_lse(q: torch.Tensor, k: torch.Tensor, *, pattern: Pattern | None = None,
                  score_mod: ScoreMod | Sequence[ScoreMod] | None = None, scale: float | None = None,
                  block_q: int = 256) -> torch.Tensor:
    """Row log-sum-exp ``log sum_j exp(s_ij)`` of the modified, masked scores: ``[batch, heads, q_len]``,
    float32 for half inputs; ``-inf`` for rows the pattern masks completely. Two partial attentions over
    disjoint key sets merge exactly with these (``attnkit.distributed.merge``)."""
    mod, _, scale = _prepare(q, k, pattern, score_mod, "softmax", scale)
    q_len, kv_len = q.shape[2], k.shape[2]
    idx = torch.arange(q_len, device=q.device)
    out = []
    for s in range(0, q_len, block_q):
        sc = _scores(q[:, :, s:s + block_q], k, idx[s:s + block_q], pattern, mod, scale, q_len, kv_len)
        empty = torch.isneginf(sc).all(dim=-1, keepdim=True)
        # fill rows with no allowed key before the reduction, so the backward stays finite, then mark them -inf
        lse = torch.logsumexp(sc.masked_fill(empty, 0.0), dim=-1)
        out.append(lse.masked_fill(empty[..., 0], float("-inf")))
    return torch.cat(out, dim=2) if out else q.new_zeros(q.shape[0], q.shape[1], 0, dtype=torch.float32)
